"""Evaluation by greedy generation: rows sharded over ranks, scored by the task metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dsbs_ray.job import TrainConfig
from dsbs_ray.metrics import accuracy
from dsbs_ray.tasks import get_task


@torch.no_grad()
def generate(student, tokenizer, family, token_ids: list[list[int]], *, batch_size: int, max_new_tokens: int, device,
             rank: int = 0, world: int = 1, synced: bool = False) -> list[str]:
    """Greedy decoding of every row (the family decodes a batch), sharded over ranks and gathered; the
    full list on every rank.

    synced: ZeRO-3 across ranks needs every rank in every forward, so each rank runs the same number
    of batches (a rank with nothing left decodes a one-token stand-in row)."""
    was_training = student.training
    student.eval()
    mine = sorted(range(rank, len(token_ids), world), key=lambda i: -len(token_ids[i]))
    n_batches = math.ceil(math.ceil(len(token_ids) / world) / batch_size)
    results = []
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        if not idx and not synced:
            break
        seqs = [token_ids[i] for i in idx] or [[tokenizer.eos_token_id]]
        texts = family.generate_batch(student, tokenizer, seqs, max_new_tokens, device, synced)
        results += list(zip(idx, texts))
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        results = [pair for part in gathered for pair in part]
    student.train(was_training)
    texts = [""] * len(token_ids)
    for i, text in results:
        texts[i] = text
    return texts


def evaluate(student, tokenizer, family, data: dict, split: str, cfg: TrainConfig, device, rank, world, synced,
             predictions_path: Path | None = None) -> float:
    """The task metric of greedy predictions on `split`; rank 0 writes the predictions file."""
    rows, tokens = data["rows"][split], data[split]
    preds = generate(student, tokenizer, family, tokens["input_ids"], batch_size=cfg.eval_batch_size,
                     max_new_tokens=cfg.gen_max_length, device=device, rank=rank, world=world, synced=synced)
    # gold as the tokenizer can express it (what the paper compares against: decoded label tokens)
    golds = tokenizer.batch_decode(tokens["labels"], skip_special_tokens=True)
    match = get_task(cfg.task).match
    acc = accuracy(preds, golds, match)
    rationales = None
    if "expl_input_ids" in tokens:
        rationales = generate(student, tokenizer, family, tokens["expl_input_ids"], batch_size=cfg.eval_batch_size,
                              max_new_tokens=cfg.max_target_length, device=device, rank=rank, world=world,
                              synced=synced)
    if predictions_path is not None and rank == 0:
        with open(predictions_path, "w", encoding="utf-8") as f:
            for i, (row, pred, gold) in enumerate(zip(rows, preds, golds)):
                line = {"id": row["id"], "input": row["input"], "gold": gold, "prediction": pred,
                        "correct": match(pred, gold)}
                if rationales is not None:
                    line["rationale"] = rationales[i]
                f.write(json.dumps(line) + "\n")
    return acc
