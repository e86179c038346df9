"""The embedded pretrained decoder-only student (SmolLM2-135M-Instruct) on CPU: training examples/s of
dsbs (predict + explain sequences per row) vs standard finetuning (predict only), and its test
accuracy before and after the short dsbs run.

Same SVAMP rows (gold labels, PaLM rationales: dsbs-gold), same batch, steps, lengths and learning
rate; `dsbs_ray.train` without Ray (one process, plain torch AdamW, fp32), each variant in its own
subprocess. Accuracy: greedy generation on the first --eval-limit test rows, scored by equation value,
before any step and after the dsbs run.

    python bench/causal_student.py [--steps 24] [--batch-size 8] [--eval-limit 50]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from _isolated import leave_nothing_behind, run_isolated


def _config(args, method: str, output_dir: str):
    from dsbs_ray.embedded import SMOLLM2
    from dsbs_ray.job import load_config

    return load_config(task="svamp", student=SMOLLM2, method=method, label_source="gold", fraction=args.fraction,
                       max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=0, zero="off",
                       max_input_length=args.max_input_length, max_target_length=args.max_target_length,
                       gen_max_length=args.gen_max_length, eval_every=args.steps, eval_limit=args.eval_limit, test_limit=args.eval_limit,
                       data_dir=args.data_dir, output_dir=output_dir)


def run(args, method: str, queue):
    import torch

    from dsbs_ray.data import prepare_data
    from dsbs_ray.evaluate import evaluate
    from dsbs_ray.families import family_of
    from dsbs_ray.students import fetch_student, load_student
    from dsbs_ray.train import train

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = _config(args, method, out)
        before = None
        if method == "dsbs":  # the untrained student, scored exactly as the run scores it at the end
            student, tokenizer = load_student(fetch_student(cfg.student))
            family = family_of(student.config)
            before = evaluate(student, tokenizer, family, prepare_data(cfg, tokenizer, family), "test", cfg,
                              torch.device("cpu"), 0, 1, False)
            del student
        m = train(cfg, use_ray=False)
    queue.put({"method": method, "examples_per_s": m["examples_per_s"], "train_seconds": m["train_seconds"],
               "first_loss": m["first_loss"], "final_loss": m["final_loss"], "accuracy_before": before,
               "accuracy_after": m["accuracy"], "train_rows": m["train_rows"]})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--fraction", type=float, default=0.25, help="fraction of SVAMP train (0.25: 180 rows)")
    ap.add_argument("--max-input-length", type=int, default=256)
    ap.add_argument("--max-target-length", type=int, default=128)
    ap.add_argument("--gen-max-length", type=int, default=32)
    ap.add_argument("--eval-limit", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    leave_nothing_behind()

    print(f"SmolLM2-135M-Instruct (pretrained, 134.5M parameters), SVAMP dsbs-gold, batch {args.batch_size}, "
          f"{args.steps} steps, lr {args.lr:g}, fp32, {args.threads} torch threads, no Ray", flush=True)
    standard = run_isolated(run, args, "standard")
    print("  standard:", json.dumps(standard), flush=True)
    dsbs = run_isolated(run, args, "dsbs")
    print("  dsbs:    ", json.dumps(dsbs), flush=True)
    print(f"test accuracy on {args.eval_limit} rows: before {dsbs['accuracy_before']:.3f}, after {args.steps} dsbs "
          f"steps {dsbs['accuracy_after']:.3f} (standard run: {standard['accuracy_after']:.3f})")
    print(f"headline: examples/s dsbs {dsbs['examples_per_s']:.2f} vs standard {standard['examples_per_s']:.2f} "
          f"({dsbs['examples_per_s'] / standard['examples_per_s']:.2f}x; dsbs trains two sequences per row)")


if __name__ == "__main__":
    main()
