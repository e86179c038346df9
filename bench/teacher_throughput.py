"""Teacher throughput, measured the way a user pays for it: our pipeline (`dsbs teacher`: Ray Data ->
vLLM) vs a bare `vllm.LLM.generate` script vs a batched `transformers.generate` script.

Same for every variant:
- budget: the CPU cores this bench may use (its affinity, inherited by every process a variant
  starts) and the same compute threads on them (`--threads`, default all of those cores): vLLM's
  OpenMP threads are bound to those cores, one a core (VLLM_CPU_OMP_THREADS_BIND and OMP_NUM_THREADS:
  set by this bench for the bare script, by the pipeline itself for its engine, which runs in the
  caller's environment as a user's would), transformers sets torch's threads to the same number;
- work: the embedded SmolLM2-135M teacher, our few-shot SVAMP prompt over the first N SVAMP train
  rows, greedy, the prompt's stop strings, --max-new-tokens, batch --batch-size;
- how: each job is a fresh command (Python start, imports, engine start, generation, outputs
  written), run to its end.

Two figures per variant, from two jobs (--small rows and --rows rows), the median over --repeats
rounds in which the variants take turns in ABBA order (this VM's speed drifts by 10-30 % over
minutes of full load):
- end to end: the wall seconds of the --rows job, start included;
- rate: output tokens/s of the difference between the two jobs, so fixed start costs cancel and
  every per-row cost of the variant (batching, Ray Data, the store) counts.
Each round's line also gives probe_s, a fixed single-thread loop timed right before its jobs: the
VM's speed at that moment.
The bench is the reaper of all it starts: a process a job leaves behind is named and ended. The last
line gives the pipeline against bare vLLM (end to end, rate) and against transformers (rate).

    python bench/teacher_throughput.py [--rows 256] [--small 32] [--max-new-tokens 64] [--threads N] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _prompts(n: int):
    from dsbs_ray.prompts import load_prompt
    from dsbs_ray.tasks import teacher_examples

    prompt = load_prompt("svamp")
    return prompt, [prompt.render(e.input) for e in teacher_examples("svamp", "train")[:n]]


def job_vllm(args) -> dict:
    """The bare engine: LLM(...) with the pipeline's engine settings, one generate(), outputs written."""
    from vllm import LLM, SamplingParams

    from dsbs_ray.embedded import smollm2_path
    from dsbs_ray.engines import engine_settings
    from dsbs_ray.teacher import TeacherSpec

    prompt, prompts = _prompts(args.rows)
    engine, _ = engine_settings(TeacherSpec(), gpus=0)
    llm = LLM(model=str(smollm2_path()), seed=0, **engine)
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, stop=list(prompt.stop))
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()  # the EngineCore process ends with the job
    Path(args.out).write_text(json.dumps([o.outputs[0].text for o in outs]))
    return {"tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def job_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsbs_ray.embedded import smollm2_path

    torch.set_num_threads(args.threads)
    prompt, prompts = _prompts(args.rows)
    path = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts, tokens = [], 0
    with torch.no_grad():
        for i in range(0, len(prompts), args.batch_size):
            enc = tok(prompts[i:i + args.batch_size], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 stop_strings=list(prompt.stop), tokenizer=tok, pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            tokens += int((new != tok.pad_token_id).sum())
            texts += tok.batch_decode(new, skip_special_tokens=True)
    Path(args.out).write_text(json.dumps(texts))
    return {"tokens": tokens}


def _command(variant: str, rows: int, args, work: Path) -> list[str]:
    if variant == "dsbs-ray pipeline":
        return [str(Path(sys.executable).parent / "dsbs"), "teacher", "--tasks", "svamp", "--splits", "train",
                "--limit", str(rows), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                str(args.batch_size), "--out-dir", str(work / "ann"), "--store", str(work / "store"),
                "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    job = {"vllm.LLM.generate": "vllm", "transformers.generate": "transformers"}[variant]
    return [sys.executable, str(HERE), "--job", job, "--rows", str(rows), "--max-new-tokens", str(args.max_new_tokens),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--out", str(work / "out.json")]


def speed_probe() -> float:
    """Seconds of a fixed single-thread Python loop: this VM's speed right before a job, printed with
    it, so a job that ran in a slow minute shows as one."""
    t0 = time.perf_counter()
    total = 0
    for i in range(20_000_000):
        total += i
    return time.perf_counter() - t0


def run_job(variant: str, rows: int, args, env: dict) -> dict:
    """One job as a fresh command in a fresh work dir: (wall seconds, output tokens)."""
    from dsbs_ray.processes import descendants, end_descendants

    probe = speed_probe()
    before = descendants()
    with tempfile.TemporaryDirectory(prefix="teacher-bench-") as work:
        t0 = time.perf_counter()
        r = subprocess.run(_command(variant, rows, args, Path(work)), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    left = end_descendants(spare=before)
    if left:
        print(f"warning: {variant} left {len(left)} process(es) running; ended: {', '.join(left)}", file=sys.stderr)
    if r.returncode != 0:
        sys.exit(f"{variant} ({rows} rows) failed:\n{r.stderr[-3000:]}")
    line = json.loads(r.stdout.strip().splitlines()[-1])
    tokens = line["output_tokens_now"] if "output_tokens_now" in line else line["tokens"]
    return {"rows": rows, "wall_s": wall, "tokens": tokens, "probe_s": probe}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="rows of the end-to-end job")
    ap.add_argument("--small", type=int, default=32, help="rows of the second job (the rate is the difference)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="compute threads (all cores)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of every variant; the medians are reported")
    ap.add_argument("--variants", default="transformers.generate,vllm.LLM.generate,dsbs-ray pipeline")
    ap.add_argument("--job", choices=["vllm", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:  # one job of a variant, in its own process
        result = {"vllm": job_vllm, "transformers": job_transformers}[args.job](args)
        print(json.dumps(result), flush=True)
        return

    from _isolated import leave_nothing_behind

    from dsbs_ray.embedded import smollm2_path

    leave_nothing_behind()
    smollm2_path()  # converted once, outside every timing
    cores = sorted(os.sched_getaffinity(0))[:args.threads]
    bind = ",".join(map(str, cores))
    from dsbs_ray.engines import engine_settings
    from dsbs_ray.teacher import TeacherSpec

    # The pipeline runs in the caller's environment, as a user runs it: its engine binds the budget's
    # cores itself, one thread a core (given the cores as a user gives them, VLLM_CPU_OMP_THREADS_BIND,
    # when the budget is not all of them). The scripts get the environment that engine gets (KV cache,
    # worker inside the engine core) and the same cores and threads.
    _, extra = engine_settings(TeacherSpec(), gpus=0)
    script_env = dict(os.environ) | extra["runtime_env"]["env_vars"] | {
        "VLLM_CPU_OMP_THREADS_BIND": bind, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false"}
    pipeline_env = dict(os.environ) | ({"VLLM_CPU_OMP_THREADS_BIND": bind} if len(cores) < len(os.sched_getaffinity(0))
                                       else {})
    print(f"budget: cores {bind} (of {os.cpu_count()}), {args.threads} compute threads per variant; SVAMP train "
          f"rows, SmolLM2-135M, greedy, <= {args.max_new_tokens} new tokens, batch {args.batch_size}; jobs of "
          f"{args.small} and {args.rows} rows, each a fresh command", flush=True)
    variants = args.variants.split(",")
    rounds = {v: [] for v in variants}
    for r in range(args.repeats):  # variants take turns, first to last then last to first (ABBA), so
        for variant in variants[::-1] if r % 2 else variants:  # a drift in this VM's speed hits all alike
            env = pipeline_env if variant == "dsbs-ray pipeline" else script_env
            small, full = run_job(variant, args.small, args, env), run_job(variant, args.rows, args, env)
            rate = (full["tokens"] - small["tokens"]) / (full["wall_s"] - small["wall_s"])
            rounds[variant].append({"end_to_end_s": full["wall_s"], "tokens_per_s": rate, "tokens": full["tokens"],
                                    "small_job_s": small["wall_s"], "probe_s": (small["probe_s"] + full["probe_s"]) / 2})
            print(f"round {r + 1} {variant:22s} {json.dumps({k: round(v, 2) for k, v in rounds[variant][-1].items()})}",
                  flush=True)
    results = {v: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for v, runs in rounds.items()}
    for variant, result in results.items():
        print(f"median {variant:22s} {json.dumps({k: round(v, 2) for k, v in result.items()})}", flush=True)
    p, v = results.get("dsbs-ray pipeline"), results.get("vllm.LLM.generate")
    t = results.get("transformers.generate")
    headline = []
    if p and v:
        headline.append(f"pipeline / bare vLLM end to end {v['end_to_end_s'] / p['end_to_end_s']:.2f} (goal >= 0.9; "
                        f"{p['end_to_end_s']:.0f} s vs {v['end_to_end_s']:.0f} s for {args.rows} rows), rate "
                        f"{p['tokens_per_s'] / v['tokens_per_s']:.2f} (goal >= 1.0)")
    if p and t:
        headline.append(f"pipeline / transformers rate {p['tokens_per_s'] / t['tokens_per_s']:.2f} (goal >= 4)")
    if headline:
        print("teacher: " + "; ".join(headline))


if __name__ == "__main__":
    main()
