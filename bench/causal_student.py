"""The embedded pretrained decoder-only student (SmolLM2-135M-Instruct) on CPU: what padding costs.
Training speed of dsbs (predict + explain sequences per row) and standard finetuning (predict only),
each with the padded layout the causal family had before (each task's sequences in a forward of
their own, padded to their longest, rows bucketed by input length) and with the packed layout it has
now (every sequence of a micro-batch packed a few to a row, attention kept inside each sequence,
one forward for both tasks, rows bucketed by their longest sequence).

Same rows (gold labels, PaLM rationales), batch, steps, lengths and learning rate; `dsbs_ray.train`
without Ray (one process, plain torch AdamW, fp32), each variant in its own subprocess. Real tokens
are the rows' prompt and target tokens, no padding (`trained_tokens`, the ledger's unit). The
headline: dsbs / standard cost per row against the ratio of their real tokens per row (goal: within
10 %: a dsbs row costs what its tokens cost, not what its padding costs).

    python bench/causal_student.py [--task svamp] [--steps 24] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from _isolated import leave_nothing_behind, run_isolated


def _config(args, method: str, output_dir: str):
    from dsbs_ray.embedded import SMOLLM2
    from dsbs_ray.job import load_config

    return load_config(task=args.task, student=SMOLLM2, method=method, label_source="gold", fraction=args.fraction,
                       train_limit=args.train_limit, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       seed=0, zero="off", max_input_length=args.max_input_length,
                       max_target_length=args.max_target_length, gen_max_length=args.gen_max_length,
                       eval_every=args.steps, eval_limit=args.eval_limit, test_limit=args.eval_limit,
                       data_dir=args.data_dir, output_dir=output_dir, keep="none")


def use_padded_layout():
    """The causal family as it was before packing (bench baseline only): a row's sort key is its input
    then target length; each task's sequences are right-padded to their own longest and run a forward
    of their own."""
    import torch

    from dsbs_ray.families.seq2seq import pad
    from dsbs_ray.families import causal

    def padded(prompts, targets, pad_id):
        ids, mask = pad([p + t for p, t in zip(prompts, targets)], pad_id)
        labels = torch.full_like(ids, -100)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            labels[i, len(p):len(p) + len(t)] = torch.tensor(t, dtype=torch.long)
        return ids, mask, labels

    def collate(tokens, indices, pad_id):
        batch = dict(zip(("input_ids", "attention_mask", "labels"), padded(
            [tokens["input_ids"][i] for i in indices], [tokens["labels"][i] for i in indices], pad_id)))
        if "rationale_ids" in tokens:
            batch |= dict(zip(("expl_input_ids", "expl_attention_mask", "rationale_ids"), padded(
                [tokens["expl_input_ids"][i] for i in indices], [tokens["rationale_ids"][i] for i in indices], pad_id)))
        return batch

    def length_key(tokens, i):
        target = tokens["rationale_ids"][i] if "rationale_ids" in tokens else tokens["labels"][i]
        return len(tokens["input_ids"][i]), len(target)

    class PaddedMultiTask(causal.MultiTask):
        def forward(self, input_ids, attention_mask, labels, expl_input_ids=None, expl_attention_mask=None,
                    rationale_ids=None):
            pred, _ = super().forward(input_ids, labels, attention_mask=attention_mask)
            if expl_input_ids is None:
                return pred, None
            expl, _ = super().forward(expl_input_ids, rationale_ids, attention_mask=expl_attention_mask)
            return pred, expl

    causal.collate, causal.length_key, causal.MultiTask = collate, length_key, PaddedMultiTask


def run(args, method: str, layout: str, queue):
    import torch

    from dsbs_ray.train import train

    torch.set_num_threads(args.threads)
    if layout == "padded":
        use_padded_layout()
    with tempfile.TemporaryDirectory() as out:
        m = train(_config(args, method, out), use_ray=False)
    queue.put({"method": method, "layout": layout, "examples": args.steps * args.batch_size,
               "train_seconds": m["train_seconds"], "train_tokens": m["train_tokens"],
               "seconds_per_row": m["train_seconds"] / (args.steps * args.batch_size),
               "real_tokens_per_s": m["train_tokens"] / m["train_seconds"], "first_loss": m["first_loss"],
               "final_loss": m["final_loss"], "accuracy": m["accuracy"], "train_rows": m["train_rows"]})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="svamp")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--fraction", type=float, default=0.25, help="fraction of the train rows (SVAMP 0.25: 180 rows)")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--max-input-length", type=int, default=256)
    ap.add_argument("--max-target-length", type=int, default=128)
    ap.add_argument("--gen-max-length", type=int, default=32)
    ap.add_argument("--eval-limit", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    leave_nothing_behind()

    print(f"SmolLM2-135M-Instruct (pretrained), {args.task} gold labels and PaLM rationales, batch "
          f"{args.batch_size}, {args.steps} steps, lr {args.lr:g}, fp32, {args.threads} torch threads, no Ray", flush=True)
    results = {}
    for layout in ("padded", "packed"):
        for method in ("standard", "dsbs"):
            r = results[layout, method] = run_isolated(run, args, method, layout)
            print(f"  {layout} {method}:", json.dumps(r), flush=True)
    for layout in ("padded", "packed"):
        std, dsbs = results[layout, "standard"], results[layout, "dsbs"]
        print(f"{layout}: real tokens/s standard {std['real_tokens_per_s']:.0f}, dsbs {dsbs['real_tokens_per_s']:.0f}; "
              f"s/row standard {std['seconds_per_row']:.3f}, dsbs {dsbs['seconds_per_row']:.3f}")
    speedup = {m: results["padded", m]["seconds_per_row"] / results["packed", m]["seconds_per_row"]
               for m in ("standard", "dsbs")}
    print(f"packed vs padded, per row: standard {speedup['standard']:.2f}x, dsbs {speedup['dsbs']:.2f}x faster")
    token_ratio = results["packed", "dsbs"]["train_tokens"] / results["packed", "standard"]["train_tokens"]
    for layout in ("padded", "packed"):
        cost_ratio = results[layout, "dsbs"]["seconds_per_row"] / results[layout, "standard"]["seconds_per_row"]
        print(f"{layout}: dsbs / standard cost per row {cost_ratio:.2f} against real tokens per row {token_ratio:.2f}: "
              f"{cost_ratio / token_ratio:.2f} (goal 0.90-1.10)")


if __name__ == "__main__":
    main()
