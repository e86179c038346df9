"""Training throughput: our step vs a baseline built the way the paper's released code trains.

Baseline: transformers Seq2SeqTrainer; a collator that splits each batch into predict/explain
features through pandas and pads each to the longest row of a random batch; two full forward passes
per step (predict, explain). Ours: `dsbs_ray.train`'s loop without Ray (one process, torch AdamW,
fp32 master weights, bf16 as autocast): length-bucketed batches with dynamic padding, one encoder
pass for both tasks.

Same student, same CQA rows (PaLM rationales), same batch size, precision and number of steps; each
variant runs in its own subprocess, so its peak memory is its own. Each runs twice the timed steps
and the second half is timed (start-up, CUDA plans and allocator growth stay out of the rate; ours
evaluates once between the halves, outside its clock). Tokens/s count
real tokens (both tasks' inputs and targets, no padding); MFU is the model FLOPs of those tokens
(matrix products of the forward, x3 with the backward) over the device's dense peak for the
precision, so padding and recomputation earn nothing. The last line is the headline ratio at the
last batch size and first precision.

    python bench/train_throughput.py                                   # CPU: t5-tiny-m, batch 16 and 64, fp32
    python bench/train_throughput.py --device cuda --student t5-v1_1-base --batch-sizes 64 \
        --precisions bf16,fp32 --max-input-length 1024                 # GPU: T5 v1.1-base shape, random init
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
                       fraction=args.fraction, max_steps=2 * args.steps, batch_size=args.batch_size,
                       seed=0, max_input_length=args.max_input_length, max_target_length=256, lr=5e-5,
                       eval_every=args.steps, eval_limit=4, test_limit=4, gen_max_length=4, zero="off",
                       precision=args.precision, data_dir=args.data_dir, output_dir=output_dir)


def _peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args, student_path: str, queue):
    """train_loop as `dsbs train --no-ray` runs it; its metrics (examples, train seconds) at the
    evaluations after each half give the second half's rate."""
    from pathlib import Path

    from dsbs_ray.job import resolve_paths
    from dsbs_ray.sessions import LocalSession
    from dsbs_ray.train import train_loop

    with tempfile.TemporaryDirectory() as out:
        cfg = resolve_paths(_config(args, student_path, out))
        session = LocalSession(Path(out) / cfg.name())
        m = train_loop(cfg.model_dump(), session)
    half, last = [h for h in session.history if "train_seconds" in h]
    examples, seconds = last["examples"] - half["examples"], last["train_seconds"] - half["train_seconds"]
    queue.put({"examples_per_s": examples / seconds, "train_seconds": seconds, "precision": m["precision"],
               "device": m["device"], "peak_memory_mb": _peak_memory_mb(args.device)})


def run_paper_baseline(args, student_path: str, queue):
    import pandas as pd
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments, TrainerCallback)
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

    class WarmClock(TrainerCallback):
        """Times the second half of the steps."""

        def __init__(self):
            self.start = self.end = None

        def _now(self):
            if args.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, targs, state, control, **kwargs):
            if self.start is None and state.global_step == args.steps:
                self.start = self._now()

        def on_train_end(self, targs, state, control, **kwargs):
            self.end = self._now()

    with tempfile.TemporaryDirectory() as out:
        targs = Seq2SeqTrainingArguments(
            out, remove_unused_columns=False, max_steps=2 * args.steps, learning_rate=5e-5,
            per_device_train_batch_size=args.batch_size, save_strategy="no", eval_strategy="no",
            logging_strategy="no", report_to=[], seed=0, use_cpu=args.device == "cpu",
            bf16=args.precision == "bf16", dataloader_num_workers=0, disable_tqdm=True)
        clock = WarmClock()
        trainer = TwoPassTrainer(model=model, args=targs, train_dataset=ds, callbacks=[clock],
                                 data_collator=PandasSplitCollator(tokenizer=tokenizer, model=model))
        trainer.train()
    seconds = clock.end - clock.start
    queue.put({"examples_per_s": args.steps * args.batch_size / seconds, "train_seconds": seconds,
               "precision": args.precision, "device": model.device.type,
               "peak_memory_mb": _peak_memory_mb(args.device)})


def t5_example_flops(config, pairs: list[tuple[int, int]]) -> float:
    """Training FLOPs (forward matrix products x3) of one example whose tasks are (encoder tokens,
    decoder tokens) pairs, counted on real tokens only: projections, attention scores and values,
    the gated FFN and the LM head, for an encoder-decoder of `config`'s shape."""
    d, inner, ff, vocab = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.vocab_size
    ffn = 3 if "gated" in config.feed_forward_proj else 2
    total = 0.0
    for enc, dec in pairs:
        encoder = config.num_layers * (2 * enc * d * inner * 4 + 2 * 2 * enc * enc * inner + 2 * enc * d * ff * ffn)
        decoder = config.num_decoder_layers * (
            2 * dec * d * inner * 4 + 2 * 2 * dec * dec * inner  # self-attention
            + 2 * dec * d * inner * 2 + 2 * enc * d * inner * 2 + 2 * 2 * dec * enc * inner  # cross-attention
            + 2 * dec * d * ff * ffn)
        total += 3 * (encoder + decoder + 2 * dec * d * vocab)
    return total


def train_tokens(args, student_path: str) -> dict:
    """The training split's token ids, as both variants tokenize them."""
    from dsbs_ray.data import prepare_data
    from dsbs_ray.families import seq2seq
    from dsbs_ray.job import resolve_paths
    from dsbs_ray.students import load_tokenizer

    rows_only = argparse.Namespace(**{**vars(args), "steps": 1, "batch_size": 1, "precision": "fp32"})
    with tempfile.TemporaryDirectory() as out:
        return prepare_data(resolve_paths(_config(rows_only, student_path, out)), load_tokenizer(student_path),
                            seq2seq)["train"]


def row_flops(config, lengths) -> float:
    inp, label, expl, rationale = lengths
    return t5_example_flops(config, [(inp, label), (expl, rationale)])


def paper_padding(config, lengths: list, batch_size: int) -> float:
    """FLOPs of the baseline's batches over the real ones: random batches, each task padded to its
    longest row (DataCollatorForSeq2Seq). A step that computed real tokens only, at the baseline's
    FLOP rate, would run this much faster."""
    import random

    order = random.Random(0).sample(range(len(lengths)), len(lengths))
    batches = [order[b:b + batch_size] for b in range(0, len(order) - batch_size + 1, batch_size)]
    padded = sum(len(rows) * row_flops(config, [max(lengths[i][k] for i in rows) for k in range(4)]) for rows in batches)
    return padded / sum(row_flops(config, lengths[i]) for rows in batches for i in rows)


# dense peak FLOP/s by device name and precision (NVIDIA's data sheets, SXM parts; fp32 without TF32,
# which torch leaves off for matrix products by default)
PEAK_FLOPS = {"H200": {"bf16": 989.4e12, "fp32": 66.9e12}, "H100": {"bf16": 989.4e12, "fp32": 66.9e12},
              "A100": {"bf16": 312e12, "fp32": 19.5e12}}


def device_peak(device: str, precision: str) -> tuple[str, float | None]:
    import torch

    if device != "cuda":
        return f"cpu, {torch.get_num_threads()} threads", None
    name = torch.cuda.get_device_name()
    peak = next((v[precision] for k, v in PEAK_FLOPS.items() if k in name), None)
    return name, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="t5-tiny-m",
                    help="a tiny student name (see dsbs make-tiny-students) or t5-v1_1-base (its shape, random init)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-sizes", default="16,64", help="comma-separated; the last one is the headline")
    ap.add_argument("--precisions", default="fp32", help="comma-separated bf16/fp32; the first one is the headline")
    ap.add_argument("--examples", type=int, default=960, help="timed training examples per measurement")
    ap.add_argument("--max-input-length", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=0.25, help="fraction of CQA train (0.25: ~2190 rows)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    leave_nothing_behind()

    from dsbs_ray.students import T5_V1_1_BASE, TINY_STUDENTS, make_tiny_students, write_random_t5

    ratios = {}
    with tempfile.TemporaryDirectory() as students:
        if args.student == "t5-v1_1-base":
            path = str(write_random_t5(f"{students}/t5-v1_1-base", T5_V1_1_BASE, vocab_size=32128))
            shape = "T5 v1.1-base shape (d_model 768, 12+12 layers, d_ff 2048, vocab 32128), random init, byte tokenizer"
        else:
            path = str(make_tiny_students(students)[args.student])
            shape = f"shape {TINY_STUDENTS[args.student]}"
        from transformers import AutoConfig

        from dsbs_ray.data import trained_tokens

        config, t = AutoConfig.from_pretrained(path), train_tokens(args, path)
        # (predict input, label, explain input, rationale) token counts of every training row
        lengths = [tuple(map(len, r)) for r in zip(t["input_ids"], t["labels"], t["expl_input_ids"], t["rationale_ids"])]
        tokens = trained_tokens(t, range(len(lengths))) / len(lengths)  # real tokens of the mean row, both tasks
        flops = sum(row_flops(config, r) for r in lengths) / len(lengths)
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            for precision in args.precisions.split(","):
                args.batch_size, args.precision = batch_size, precision
                args.steps = max(5, args.examples // batch_size)
                where, peak = device_peak(args.device, precision)
                print(f"student {args.student} ({shape}), CQA, batch {batch_size}, {args.steps} + "
                      f"{args.steps} timed steps, inputs <= {args.max_input_length} tokens, {precision}, {where}; "
                      f"mean row {tokens:.0f} real tokens, {flops / 1e9:.1f} GFLOP", flush=True)
                result = {}
                for name, run in (("paper-style baseline", run_paper_baseline), ("dsbs-ray", run_ours)):
                    r = run_isolated(run, args, path)
                    r["tokens_per_s"] = r["examples_per_s"] * tokens
                    r["tflops"] = r["examples_per_s"] * flops / 1e12
                    r["mfu"] = r["examples_per_s"] * flops / peak if peak else None
                    result[name] = r
                    print(f"  {name + ':':22s}", json.dumps(r), flush=True)
                ours, base = result["dsbs-ray"], result["paper-style baseline"]
                ratios[batch_size, precision] = ours["examples_per_s"] / base["examples_per_s"]
                mfu = (f"; MFU ours {ours['mfu']:.1%} vs baseline {base['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s"
                       if peak else "")
                print(f"  batch {batch_size} {precision}: tokens/s ours {ours['tokens_per_s']:.0f} vs baseline "
                      f"{base['tokens_per_s']:.0f} ({ratios[batch_size, precision]:.2f}x){mfu}; peak memory "
                      f"{ours['peak_memory_mb']:.0f} MB vs {base['peak_memory_mb']:.0f} MB; the baseline's padded "
                      f"batches hold {paper_padding(config, lengths, batch_size):.2f}x the real FLOPs", flush=True)
    batch, precision = list(ratios)[-1][0], args.precisions.split(",")[0]
    print(f"train throughput ratio at batch {batch}, {precision} (ours / paper-style baseline): "
          f"{ratios[batch, precision]:.2f}x")


if __name__ == "__main__":
    main()
