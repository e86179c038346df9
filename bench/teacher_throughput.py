"""Teacher throughput: output tokens/s of (a) our Ray Data pipeline (`dsbs_ray.teacher.annotate`),
(b) a bare `vllm.LLM.generate`, (c) batched `transformers.generate`; same prompts (our few-shot SVAMP
prompt over SVAMP test rows), same model (the embedded SmolLM2-135M teacher), greedy, same token
budget and stop strings. Engine start is timed apart:
- (b): the `LLM(...)` constructor is timed on its own;
- (a): the pipeline runs twice, on a first batch alone and on all rows; the difference of tokens
  over the difference of seconds is the generation rate, free of Ray and engine start.
Each variant runs in its own subprocess. The last line is the headline ratios.

    python bench/teacher_throughput.py [--rows 64] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from _isolated import run_isolated


def _prompts(n: int):
    from dsbs_ray.prompts import NLI_PROMPT_JOIN, load_prompt
    from dsbs_ray.tasks import get_task, load_rows

    prompt, task = load_prompt("svamp"), get_task("svamp")
    rows, _ = load_rows("svamp", "test")
    return prompt, [prompt.render(task.to_example(r, i, NLI_PROMPT_JOIN).input) for i, r in enumerate(rows[:n])]


def _send(queue, result: dict):
    """Hand the result to the parent, then exit at once: engine subprocesses must not hold the exit."""
    queue.put(result)
    queue.close()
    queue.join_thread()
    os._exit(0)


def run_pipeline(args, queue):
    from dsbs_ray.teacher import AnnotateConfig, annotate

    out = {}
    for n in (args.batch_size, args.rows):
        with tempfile.TemporaryDirectory() as d:
            cfg = AnnotateConfig(task="svamp", split="test", limit=n, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, out_dir=d, store=f"{d}/store",
                                 tracking_uri=f"sqlite:///{d}/mlflow.db")
            t0 = time.perf_counter()
            report = annotate(cfg)
            out[n] = (report["output_tokens_now"], report["output_tokens_now"] / report["tokens_per_s"],
                      time.perf_counter() - t0)
    (tok_small, sec_small, _), (tok_all, sec_all, wall_all) = out[args.batch_size], out[args.rows]
    rate = (tok_all - tok_small) / (sec_all - sec_small)
    _send(queue, {"tokens": tok_all, "tokens_per_s": rate, "start_s": sec_small - tok_small / rate,
                  "wall_s": wall_all})


def run_vllm(args, queue):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from dsbs_ray.embedded import smollm2_path

    prompt, prompts = _prompts(args.rows)
    t0 = time.perf_counter()
    llm = LLM(model=str(smollm2_path()), dtype="float32", max_model_len=2048, enforce_eager=True,
              enable_prefix_caching=True, seed=0)
    start = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, stop=list(prompt.stop))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    _send(queue, {"tokens": tokens, "tokens_per_s": tokens / seconds, "start_s": start})


def run_transformers(args, queue):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsbs_ray.embedded import smollm2_path

    prompt, prompts = _prompts(args.rows)
    path = str(smollm2_path())
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    start = time.perf_counter() - t0
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), args.batch_size):
            enc = tok(prompts[i:i + args.batch_size], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 stop_strings=list(prompt.stop), tokenizer=tok, pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            tokens += int((new != tok.pad_token_id).sum())
    seconds = time.perf_counter() - t0
    _send(queue, {"tokens": tokens, "tokens_per_s": tokens / seconds, "start_s": start})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from dsbs_ray.embedded import smollm2_path

    smollm2_path()  # convert once, outside every timing
    results = {}
    for name, target in (("transformers.generate", run_transformers), ("vllm.LLM.generate", run_vllm),
                         ("dsbs-ray pipeline", run_pipeline)):
        results[name] = run_isolated(target, args)
        print(f"{name:22s} {json.dumps(results[name])}", flush=True)
    a, b, c = (results[k]["tokens_per_s"] for k in ("dsbs-ray pipeline", "vllm.LLM.generate", "transformers.generate"))
    print(f"output tokens/s: pipeline {a:.1f}, bare vLLM {b:.1f}, transformers {c:.1f}; "
          f"engine start: pipeline {results['dsbs-ray pipeline']['start_s']:.0f}s, vLLM "
          f"{results['vllm.LLM.generate']['start_s']:.0f}s")
    print(f"teacher throughput ratios: pipeline/vLLM {a / b:.2f} (goal >= 0.8), pipeline/transformers {a / c:.2f} (goal >= 4)")


if __name__ == "__main__":
    main()
