"""Training throughput: our step vs a baseline built the way the paper's released code trains.

Baseline: transformers Seq2SeqTrainer; a collator that splits each batch into predict/explain
features through pandas and pads each to the longest row of a random batch; two full forward passes
per step (predict, explain). Ours: `dsbs_ray.train` without Ray (one process, torch AdamW, fp32 on
CPU): length-bucketed batches with dynamic padding, one encoder pass for both tasks.

Same tiny T5, same CQA rows (PaLM rationales), same batch size, same number of steps; each variant
runs in its own subprocess so peak memory is its own. Measured at batch 16 and at the paper's batch
64; the last line is the headline ratio at the paper's batch size.

    python bench/train_throughput.py [--student t5-tiny-m] [--batch-sizes 16,64]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

from _isolated import leave_nothing_behind, run_isolated


def _config(args, student_path: str, output_dir: str):
    from dsbs_ray.job import load_config

    return load_config(task="cqa", student=student_path, method="dsbs", label_source="gold",
                       fraction=args.fraction, max_steps=args.steps, batch_size=args.batch_size, seed=0,
                       max_input_length=args.max_input_length, max_target_length=256, lr=5e-5,
                       eval_every=args.steps, eval_limit=4, gen_max_length=4, zero="off",
                       data_dir=args.data_dir, output_dir=output_dir)


def run_ours(args, student_path: str, queue):
    from dsbs_ray.train import train

    with tempfile.TemporaryDirectory() as out:
        m = train(_config(args, student_path, out), use_ray=False)
    queue.put({"examples_per_s": m["examples_per_s"], "train_seconds": m["train_seconds"],
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_paper_baseline(args, student_path: str, queue):
    import pandas as pd
    from datasets import Dataset
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments)
    from transformers.trainer_utils import set_seed

    from dsbs_ray.data import select_rows

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    with tempfile.TemporaryDirectory() as out:
        rows = select_rows(_config(args, student_path, out), tokenizer.eos_token)["train"]
    set_seed(0)
    model = AutoModelForSeq2SeqLM.from_pretrained(student_path)

    def tokenize(batch):  # as the paper's run.py: prefixes, inputs cut at max length, targets at 256
        enc = tokenizer(["predict: " + x for x in batch["input"]], max_length=args.max_input_length, truncation=True)
        expl = tokenizer(["explain: " + x for x in batch["input"]], max_length=args.max_input_length, truncation=True)
        enc["expl_input_ids"], enc["expl_attention_mask"] = expl["input_ids"], expl["attention_mask"]
        enc["labels"] = tokenizer(batch["label"], max_length=256, truncation=True)["input_ids"]
        enc["aux_labels"] = tokenizer(batch["rationale"], max_length=256, truncation=True)["input_ids"]
        return enc

    ds = Dataset.from_list([{k: r[k] for k in ("input", "label", "rationale")} for r in rows])
    ds = ds.map(tokenize, batched=True, remove_columns=["input", "label", "rationale"])

    class PandasSplitCollator(DataCollatorForSeq2Seq):
        def __call__(self, features, return_tensors=None):
            df = pd.DataFrame(features)
            pred = df.loc[:, ~df.columns.isin(["aux_labels", "expl_input_ids", "expl_attention_mask"])].to_dict("records")
            expl = df.loc[:, ~df.columns.isin(["labels", "input_ids", "attention_mask"])].rename(
                columns={"aux_labels": "labels", "expl_input_ids": "input_ids",
                         "expl_attention_mask": "attention_mask"}).to_dict("records")
            return {"pred": super().__call__(pred, return_tensors), "expl": super().__call__(expl, return_tensors)}

    class TwoPassTrainer(Seq2SeqTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pred = model(**inputs["pred"])
            expl = model(**inputs["expl"])
            loss = 0.5 * pred.loss + 0.5 * expl.loss
            return (loss, {"pred": pred, "expl": expl}) if return_outputs else loss

    with tempfile.TemporaryDirectory() as out:
        targs = Seq2SeqTrainingArguments(
            out, remove_unused_columns=False, max_steps=args.steps, learning_rate=5e-5,
            per_device_train_batch_size=args.batch_size, save_strategy="no", eval_strategy="no",
            logging_strategy="no", report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True)
        trainer = TwoPassTrainer(model=model, args=targs, train_dataset=ds,
                                 data_collator=PandasSplitCollator(tokenizer=tokenizer, model=model))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    queue.put({"examples_per_s": args.steps * args.batch_size / seconds, "train_seconds": seconds,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="t5-tiny-m", help="tiny student name (see dsbs make-tiny-students)")
    ap.add_argument("--batch-sizes", default="16,64", help="comma-separated; the last one is the headline")
    ap.add_argument("--examples", type=int, default=960, help="training examples per measurement")
    ap.add_argument("--max-input-length", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=0.25, help="fraction of CQA train (0.25: ~2190 rows)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    leave_nothing_behind()

    import torch

    from dsbs_ray.students import make_tiny_students

    ratios = {}
    with tempfile.TemporaryDirectory() as students:
        path = str(make_tiny_students(students)[args.student])
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            args.batch_size, args.steps = batch_size, max(5, args.examples // batch_size)
            print(f"student {args.student}, CQA, batch {batch_size}, {args.steps} steps, inputs <= "
                  f"{args.max_input_length} tokens, fp32, {torch.get_num_threads()} threads", flush=True)
            baseline = run_isolated(run_paper_baseline, args, path)
            print("  paper-style baseline:", json.dumps(baseline), flush=True)
            ours = run_isolated(run_ours, args, path)
            print("  dsbs-ray:            ", json.dumps(ours), flush=True)
            ratios[batch_size] = ours["examples_per_s"] / baseline["examples_per_s"]
            print(f"  batch {batch_size}: examples/s ours {ours['examples_per_s']:.2f} vs baseline "
                  f"{baseline['examples_per_s']:.2f} ({ratios[batch_size]:.2f}x); peak RSS "
                  f"{ours['peak_rss_mb']:.0f} MB vs {baseline['peak_rss_mb']:.0f} MB", flush=True)
    last = list(ratios)[-1]
    print(f"train throughput ratio at batch {last} (ours / paper-style baseline): {ratios[last]:.2f}x")


if __name__ == "__main__":
    main()
