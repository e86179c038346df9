"""Data for one job: which rows it trains on (the carved validation split, nested data fractions, the
teacher's samples through the rationale filter), their token ids (cached), and length-bucketed batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dsbs_ray.annotations import read_samples
from dsbs_ray.cache import cache_dir, warn_damaged
from dsbs_ray.errors import UserError
from dsbs_ray.rationales import choose, vote
from dsbs_ray.tasks import Example, Parsed, Task, get_task, load_examples, load_teacher_outputs, teacher_examples

if TYPE_CHECKING:
    from dsbs_ray.job import TrainConfig

VALID_FRACTION = 0.1  # the paper carves 10 % of train as validation where a task has no valid split
VALID_SEED = 0


@dataclass(frozen=True)
class AnnotatedExample:
    """A row with its teacher annotation (rationale and teacher label, parsed from the raw output)."""

    id: str
    input: str
    gold: str
    rationale: str
    teacher_label: str
    parse_status: str


def valid_size(n_rows: int, valid_fraction: float = VALID_FRACTION) -> int:
    """How many rows carve_validation holds out (ceil, as `train_test_split` does)."""
    return math.ceil(valid_fraction * n_rows)


def fraction_size(n_rows: int, fraction: float) -> int:
    """How many rows fraction_indices takes: round(fraction * n_rows), at least 1 (0 of 0 rows)."""
    return max(1, round(fraction * n_rows)) if n_rows else 0


def carve_validation(n_rows: int, valid_fraction: float = VALID_FRACTION, seed: int = VALID_SEED):
    """(train_indices, valid_indices) split the way the paper splits its train set.

    Same arithmetic as `datasets.Dataset.train_test_split(test_size=valid_fraction, seed=seed)`
    (ceil for the held-out count, a default_rng permutation), so the rows match the paper's.
    """
    n_valid = valid_size(n_rows, valid_fraction)
    order = np.random.default_rng(seed).permutation(n_rows)
    return order[n_valid:].tolist(), order[:n_valid].tolist()


def fraction_indices(n_rows: int, fraction: float, seed: int) -> list[int]:
    """A deterministic subsample of range(n_rows) with round(fraction * n_rows) rows (at least 1).

    Nested for one seed: every smaller fraction's rows are inside every larger one's, so curves
    across fractions compare like with like. Returned in ascending order.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    if n_rows == 0:
        return []
    k = fraction_size(n_rows, fraction)
    order = np.random.default_rng(seed).permutation(n_rows)
    return sorted(order[:k].tolist())


def attach_teacher(examples: list[Example], outputs: list[str], task: Task, where: str) -> list[AnnotatedExample]:
    """Join raw teacher outputs to their rows (row order) and parse them; never drops a row."""
    if len(examples) != len(outputs):
        raise UserError(f"{where}: {len(outputs)} teacher outputs for {len(examples)} rows")
    annotated = []
    for example, output in zip(examples, outputs):
        parsed = task.parse(output)
        annotated.append(
            AnnotatedExample(example.id, example.input, example.gold, parsed.rationale, parsed.label, parsed.status)
        )
    return annotated


# ---------------------------------------------------------------------------------------------
# The rows of one job (cfg: a dsbs_ray.job.TrainConfig)


def _rows(examples):
    return [{"id": e.id, "input": e.input, "label": e.gold} for e in examples]


def teacher_samples(cfg: TrainConfig, n_rows: int, n_split: int) -> list[list[Parsed]]:
    """The teacher's samples for the first n_rows of the n_split train rows: from the annotation
    store entry, or (one sample each) the released outputs in the data dir."""
    task = get_task(cfg.task)
    if cfg.annotations:  # the store keys rows as the teacher saw them (two texts: its teacher_join)
        view = teacher_examples(cfg.task, "train", cfg.data_dir)[:n_rows]
        return read_samples(Path(cfg.annotations), view, cfg.samples)
    outputs = load_teacher_outputs(cfg.task, "train", cfg.data_dir)
    if len(outputs) != n_split:
        raise UserError(f"{task.name}/train: {len(outputs)} teacher outputs for {n_split} rows")
    return [[task.parse(o)] for o in outputs[:n_rows]]


def fraction_split(cfg: TrainConfig, split: list, load_valid) -> tuple[list, list, list[int]]:
    """(train rows, valid rows, indices into train of the fraction's rows): the first train_limit rows
    of the split, validation carved from them (or load_valid() where the task has its own), then the
    nested fraction of the rest. The one place that decides which rows a job reads."""
    train = split[:cfg.train_limit]
    task = get_task(cfg.task)
    if task.has_valid:
        valid, train_idx = load_valid(), list(range(len(train)))
    else:
        carve = task.spec.carve.valid
        train_idx, valid_idx = carve_validation(len(train), carve.fraction, carve.seed)
        valid = [train[i] for i in valid_idx]
    return train, valid, [train_idx[i] for i in fraction_indices(len(train_idx), cfg.fraction, cfg.seed)]


def select_rows(cfg: TrainConfig, join: str) -> dict:
    """Train/valid/test rows for a job: train rows carry the label (gold, or the teacher's vote) and,
    for dsbs, the rationale the filter keeps (dsbs_ray.rationales).

    Which rows train: with gold labels, every row of the fraction (so finetune and dsbs-gold train on
    the same rows) unless the filter drops it (unmatched: drop); a row left without a rationale
    trains on its label alone (rows_without_rationale). With teacher labels, rows where no sample's
    label parses are left out too (dropped_unparsed). join: what stands between the two
    texts of a two-text input ({join}: the student family's choice)."""
    task = get_task(cfg.task)
    split = load_examples(cfg.task, "train", cfg.data_dir, join)
    train, valid, used = fraction_split(cfg, split, lambda: load_examples(cfg.task, "valid", cfg.data_dir, join))
    chosen = [train[i] for i in used]
    counts = {"dropped_unparsed": 0, "dropped_by_filter": 0, "rows_without_rationale": 0, "rows_with_rationale": 0}
    if cfg.uses_teacher:
        samples = teacher_samples(cfg, len(train), len(split))
        if any(not e.gold for e in valid) and not task.has_valid:  # carved from unlabelled train: the teacher's
            at = {id(e): i for i, e in enumerate(train)}  # (valid holds train's own Example objects)
            valid = [e if e.gold else Example(e.id, e.input, vote(samples[at[id(e)]], task).label) for e in valid]
        train_rows = []
        for i, ex in zip(used, chosen):
            c = choose(samples[i], ex.gold, task, cfg.rationale_filter, cfg.unmatched)
            if cfg.label_source == "teacher" and not c.teacher_ok:
                counts["dropped_unparsed"] += 1
            elif not c.keep:
                counts["dropped_by_filter"] += 1
            else:
                train_rows.append({"id": ex.id, "input": ex.input, "gold": ex.gold, "rationale": c.rationale,
                                   "label": c.teacher_label if cfg.label_source == "teacher" else ex.gold})
        with_rationale = sum(bool(r["rationale"].strip()) for r in train_rows)
        counts |= {"rows_with_rationale": with_rationale, "rows_without_rationale": len(train_rows) - with_rationale}
    else:
        train_rows = _rows(chosen)
    test = load_examples(cfg.task, "test", cfg.data_dir, join)
    return {"train": train_rows, "valid": _rows(valid[:cfg.eval_limit]), "test": _rows(test[:cfg.test_limit])} | counts


def prepare_data(cfg: TrainConfig, tokenizer, family) -> dict:
    """Selected rows plus their token ids in the student family's format (tokenized once, cached on disk)."""
    rows = select_rows(cfg, family.nli_join(tokenizer))
    if len(rows["train"]) < cfg.workers * cfg.grad_accum:
        raise UserError(f"only {len(rows['train'])} training rows for {cfg.workers} workers x "
                        f"{cfg.grad_accum} accumulation steps; raise fraction or lower batch_size")
    dsbs = cfg.method == "dsbs"
    lengths = dict(max_input_length=cfg.max_input_length, max_target_length=cfg.max_target_length)
    data = {"rows": rows, "train": tokenize_split(rows["train"], tokenizer, family, prefixes=dsbs, explain_inputs=dsbs,
                                                  rationale=dsbs, **lengths)}
    for split in ("valid", "test"):
        data[split] = tokenize_split(rows[split], tokenizer, family, prefixes=dsbs, explain_inputs=dsbs and cfg.explain,
                                     rationale=False, **lengths)
    return data


# ---------------------------------------------------------------------------------------------
# Tokenization (once per content, cached on disk) and length-bucketed batches with dynamic padding.

PREDICT_PREFIX = "predict: "
EXPLAIN_PREFIX = "explain: "


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies what a tokenizer does (class and vocabulary), not where it was loaded from."""
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, tokenizer.eos_token, tokenizer.pad_token_id, vocab])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize_split(
    rows: list[dict], tokenizer, family, *, prefixes: bool, explain_inputs: bool, rationale: bool,
    max_input_length: int, max_target_length: int,
) -> dict:
    """Token ids for one split. rows: dicts with id, input, label (and rationale when `rationale`);
    family: the student's (dsbs_ray.families), which says how prompts and targets become ids.

    prefixes: inputs become 'predict: x', the paper's multi-task format (else the raw input, for
    standard finetuning/distillation); explain_inputs adds 'explain: x'; rationale adds its targets.
    Cached under DSBS_CACHE by a hash of the rows, the tokenizer, the family and the lengths,
    written atomically so concurrent workers or runs never read a half-written file.
    """
    key = hashlib.sha256(json.dumps(
        [tokenizer_fingerprint(tokenizer), family.NAME, prefixes, explain_inputs, rationale, max_input_length,
         max_target_length, [(r["id"], r["input"], r["label"], r.get("rationale")) for r in rows]]
    ).encode()).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.pt"
    if path.exists():
        cached = _cached_tokens(path, len(rows), explain_inputs, rationale)
        if cached is not None:
            return cached

    def prompts(prefix):
        return family.encode_prompts(tokenizer, [prefix + r["input"] for r in rows], max_input_length)

    out = {"input_ids": prompts(PREDICT_PREFIX if prefixes else ""),
           "labels": family.encode_targets(tokenizer, [r["label"] for r in rows], max_target_length)}
    if explain_inputs:
        out["expl_input_ids"] = prompts(EXPLAIN_PREFIX)
    if rationale:  # a row with no usable rationale gets no rationale target (no explain loss)
        texts = [r["rationale"] for r in rows]
        out["rationale_ids"] = [t if text.strip() else []
                                for t, text in zip(family.encode_targets(tokenizer, texts, max_target_length), texts)]
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique temp name: PIDs repeat across the nodes that share a cache on shared storage
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


def _cached_tokens(path: Path, n: int, explain_inputs: bool, rationale: bool) -> dict | None:
    """A token cache entry, or None (one warning line) when it is damaged: unreadable, or not the
    lists of token ids of these n rows (a file overwritten by another)."""
    keys = {"input_ids", "labels"} | ({"expl_input_ids"} if explain_inputs else set()) | (
        {"rationale_ids"} if rationale else set())
    try:
        out = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncated zip, garbage, pickle refused: all a miss)
        warn_damaged(path, f"unreadable: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}")
        return None
    if not (isinstance(out, dict) and set(out) == keys and all(isinstance(out[k], list) and len(out[k]) == n
                                                                and all(isinstance(x, list) for x in out[k])
                                                                for k in keys)):
        warn_damaged(path, f"not the token ids of these {n} rows")
        return None
    return out


def trained_tokens(tokens: dict, rows: list[int]) -> int:
    """Tokens a step trains on for these rows: each task's prompt and target, no padding (a row
    without a rationale trains no explain task). The cost ledger's unit of training work."""
    total = 0
    for i in rows:
        total += len(tokens["input_ids"][i]) + len(tokens["labels"][i])
        if tokens.get("rationale_ids") and tokens["rationale_ids"][i]:
            total += len(tokens["expl_input_ids"][i]) + len(tokens["rationale_ids"][i])
    return total


def bucketed_batches(keys: list[tuple], batch_size: int, seed: int, epoch: int, min_size: int = 1,
                     megabatch: int = 50) -> list[list[int]]:
    """One epoch of global batches: shuffled, then sorted by length inside mega-batches of
    `megabatch` batches, so each batch holds rows of similar length and pads little; batch order is
    shuffled again. Same (seed, epoch) -> same batches on every worker. A trailing batch with fewer
    than min_size rows is dropped."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(keys))
    batches = []
    span = batch_size * megabatch
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span].tolist(), key=lambda i: (keys[i], i), reverse=True)
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) >= min_size]
    return [batches[i] for i in rng.permutation(len(batches))]


def shard_batch(batch: list[int], keys: list[tuple], world: int, rank: int, accum: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: rows sorted by length, cut into world x accum
    contiguous, near-equal slices (similar lengths inside each slice)."""
    rows = sorted(batch, key=lambda i: (keys[i], i), reverse=True)
    slices = np.array_split(np.array(rows, dtype=np.int64), world * accum)
    return [s.tolist() for s in slices[rank * accum:(rank + 1) * accum]]
