"""Student training: the multi-task loss, one step, the loop, evaluation by generation, the
DeepSpeed config, and the Ray Train wrapper.

`train_loop` is a plain function: it runs in one process with no Ray (LocalSession), or on each
Ray Train worker (RaySession). Everything Ray-specific lives in RaySession and `train`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsbs_ray.annotations import read_samples
from dsbs_ray.data import (
    bucketed_batches, carve_validation, collate, fraction_indices, hash_file, length_key,
    shard_batch, tokenize_split,
)
from dsbs_ray.errors import UserError, build
from dsbs_ray.locks import hold
from dsbs_ray.metrics import accuracy
from dsbs_ray.students import check_student, count_parameters, fetch_student, load_student, load_tokenizer
from dsbs_ray.prompts import NLI_PROMPT_JOIN
from dsbs_ray.rationales import RationaleFilter, Unmatched, choose
from dsbs_ray.tasks import Parsed, get_task, load_examples, load_teacher_outputs


# How a job is laid out on its workers; none of it changes the result (the loss is normalised by the
# global batch), so a changed layout keeps the run name; a checkpoint records its layout (_layout).
RUN_LAYOUT_KEYS = {"workers", "cpus_per_worker", "gpus_per_worker", "micro_batch_size", "zero"}


TEACHER_DEFAULTS = {"train_limit": None, "teacher": "released", "annotations": None, "samples": 1,
                    "rationale_filter": "none", "unmatched": "no-rationale"}


class TrainConfig(BaseModel):
    """One training job. Defaults are the paper's (lr 5e-5, batch 64, 10k steps, inputs 1024,
    targets 256, alpha 0.5); CPU runs override steps, lengths and batch."""

    model_config = ConfigDict(extra="forbid")

    task: str
    student: str
    method: Literal["standard", "dsbs"] = "dsbs"
    label_source: Literal["gold", "teacher"] = "gold"
    fraction: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    alpha: float = Field(0.5, ge=0, le=1)
    max_steps: int = Field(10_000, ge=1)
    batch_size: int = Field(64, ge=1, description="global rows per optimizer step")
    micro_batch_size: int | None = Field(None, ge=1, description="rows per worker per forward")
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_input_length: int = Field(1024, ge=8)
    max_target_length: int = Field(256, ge=2)
    gen_max_length: int = Field(64, ge=1)
    eval_every: int = Field(250, ge=1, description="evaluate on valid and test every K steps")
    checkpoint_every: int = Field(1000, ge=1, description="checkpoint (weights + optimizer) every K steps, "
                                  "and at the last step")
    eval_batch_size: int = Field(64, ge=1)
    eval_limit: int | None = Field(None, ge=1, description="rows of valid/test to evaluate (all if None)")
    explain: bool = False
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    zero: Literal["off", "0", "1", "2", "3"] = "2"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 compute on a GPU, fp32 on "
                                                      "a CPU, decided by each worker from its own device; master "
                                                      "weights, gradients and optimizer state are always fp32")
    data_dir: str | None = None
    train_limit: int | None = Field(None, ge=1, description="train on the first N rows of the train split only "
                                    "(before the validation carve): CPU demos")
    teacher: str = Field("released", description="names the teacher whose annotations the job reads: 'released' "
                         "(TASK/llm/ in the data dir) or a sweep teacher's name")
    annotations: str | None = Field(None, description="the teacher's store entry for the train split "
                                    "(dsbs_ray.annotations); None: the released outputs in the data dir")
    samples: int = Field(1, ge=1, description="teacher samples per row to read (> 1: the label is their vote)")
    rationale_filter: RationaleFilter = "none"
    unmatched: Unmatched = Field("no-rationale", description="a row the filter leaves without a rationale: "
                                 "train on its label alone, or drop it")
    data_fingerprint: str | None = Field(None, description="hash of the data files the job reads (set by "
                                         "resolve_paths): edited data is a new run, never a stale resume")
    output_dir: str = "runs"
    run_name: str | None = None
    max_failures: int = Field(0, ge=0)
    tracking_uri: str | None = None  # with mlflow_run_id: rank 0 logs loss/accuracy by step there
    mlflow_run_id: str | None = None

    @model_validator(mode="after")
    def _batch_divides(self):
        micro = self.micro_batch_size or max(1, self.batch_size // self.workers)
        if self.batch_size % (micro * self.workers):
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {micro} "
                             f"x workers {self.workers}")
        return self

    @property
    def micro(self) -> int:
        return self.micro_batch_size or max(1, self.batch_size // self.workers)

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro * self.workers)

    @property
    def uses_teacher(self) -> bool:
        return self.method == "dsbs" or self.label_source == "teacher"

    def name(self) -> str:
        """Readable run name plus a hash of everything that changes the result, so a rerun of the
        same job resumes its checkpoints and a changed job never does."""
        if self.run_name:
            return self.run_name
        keys = self.model_dump(exclude=RUN_LAYOUT_KEYS | {"output_dir", "run_name", "max_failures", "eval_batch_size",
                                                          "eval_every", "checkpoint_every", "tracking_uri",
                                                          "mlflow_run_id"})
        for key, default in TEACHER_DEFAULTS.items():  # at their defaults they leave older run names as they were
            if keys[key] == default:
                del keys[key]
        digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]
        student = Path(self.student.rstrip("/")).name
        return f"{self.task}-{student}-{self.method}-{self.label_source}-f{self.fraction:g}-s{self.seed}-{digest}"


def load_config(**kwargs) -> TrainConfig:
    """TrainConfig from keyword arguments; a validation error becomes one line naming the field."""
    return build(TrainConfig, **kwargs)


# ---------------------------------------------------------------------------------------------
# Data for one job


def _rows(examples):
    return [{"id": e.id, "input": e.input, "label": e.gold} for e in examples]


def teacher_samples(cfg: TrainConfig, n_rows: int, n_split: int) -> list[list[Parsed]]:
    """The teacher's samples for the first n_rows of the n_split train rows: from the annotation
    store entry, or (one sample each) the released outputs in the data dir."""
    task = get_task(cfg.task)
    if cfg.annotations:  # the store keys rows as the teacher saw them (NLI: premise, then hypothesis)
        view = load_examples(task.name, "train", cfg.data_dir, NLI_PROMPT_JOIN)[:n_rows]
        return read_samples(Path(cfg.annotations), view, cfg.samples)
    outputs = load_teacher_outputs(task.name, "train", cfg.data_dir)
    if len(outputs) != n_split:
        raise UserError(f"{task.name}/train: {len(outputs)} teacher outputs for {n_split} rows")
    return [[task.parse(o)] for o in outputs[:n_rows]]


def select_rows(cfg: TrainConfig, eos_token: str) -> dict:
    """Train/valid/test rows for a job: train rows carry the label (gold, or the teacher's vote) and,
    for dsbs, the rationale the filter keeps (dsbs_ray.rationales).

    Which rows train: with gold labels, every row of the fraction (so finetune and dsbs-gold train on
    the same rows) unless the filter drops it (unmatched: drop); a row left without a rationale
    trains on its label alone (rows_without_rationale). With teacher labels, rows where no sample's
    label parses are left out too (dropped_unparsed)."""
    task = get_task(cfg.task)
    split = load_examples(task.name, "train", cfg.data_dir, eos_token)
    train = split[:cfg.train_limit]
    if task.has_valid:
        valid = load_examples(task.name, "valid", cfg.data_dir, eos_token)
        train_idx = list(range(len(train)))
    else:
        train_idx, valid_idx = carve_validation(len(train))
        valid = [train[i] for i in valid_idx]
    keep = fraction_indices(len(train_idx), cfg.fraction, cfg.seed)
    chosen = [train[train_idx[i]] for i in keep]
    counts = {"dropped_unparsed": 0, "dropped_by_filter": 0, "rows_without_rationale": 0, "rows_with_rationale": 0}
    if cfg.uses_teacher:
        samples = teacher_samples(cfg, len(train), len(split))
        train_rows = []
        for i, ex in zip(keep, chosen):
            c = choose(samples[train_idx[i]], ex.gold, task.metric, cfg.rationale_filter, cfg.unmatched)
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
    test = load_examples(task.name, "test", cfg.data_dir, eos_token)
    limit = cfg.eval_limit
    return {"train": train_rows, "valid": _rows(valid[:limit]), "test": _rows(test[:limit])} | counts


def prepare_data(cfg: TrainConfig, tokenizer) -> dict:
    """Selected rows plus their token ids (tokenized once, cached on disk)."""
    rows = select_rows(cfg, tokenizer.eos_token)
    if len(rows["train"]) < cfg.workers * cfg.grad_accum:
        raise UserError(f"only {len(rows['train'])} training rows for {cfg.workers} workers x "
                        f"{cfg.grad_accum} accumulation steps; raise fraction or lower batch_size")
    dsbs = cfg.method == "dsbs"
    lengths = dict(max_input_length=cfg.max_input_length, max_target_length=cfg.max_target_length)
    data = {"rows": rows, "train": tokenize_split(rows["train"], tokenizer, prefixes=dsbs, explain_inputs=dsbs,
                                                  rationale=dsbs, **lengths)}
    for split in ("valid", "test"):
        data[split] = tokenize_split(rows[split], tokenizer, prefixes=dsbs, explain_inputs=dsbs and cfg.explain,
                                     rationale=False, **lengths)
    return data


def validate(cfg: TrainConfig) -> None:
    """Every check that can fail on user input, run on the driver before any worker starts."""
    check_student(cfg.student)
    task = get_task(cfg.task)
    if cfg.uses_teacher and not cfg.annotations:  # (store annotations: the sweep generates them first)
        load_teacher_outputs(task.name, "train", cfg.data_dir)  # raises naming the missing file
    if cfg.zero != "off":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("zero: DeepSpeed is not installed; use --zero off") from None


# ---------------------------------------------------------------------------------------------
# The model: one module that returns the summed token losses of both tasks


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of target tokens), ignoring -100 padding."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


class MultiTaskSeq2Seq(torch.nn.Module):
    """Wraps a seq2seq student; forward returns per-task (summed token loss, token count).

    Where the paper's code runs two full forward passes on batches padded to their longest row, this
    does the same arithmetic with less padding:
    - the predict and explain inputs go through the encoder as one batch;
    - each task runs its own decoder pass, so short labels are not padded to rationale length;
    - rationales are decoded in `rationale_groups` groups of similar length, each trimmed to its
      own longest rationale and input;
    - for T5 the LM head and cross-entropy run only on real target positions, not on padding.
    """

    def __init__(self, student, rationale_groups: int = 2):
        super().__init__()
        self.student = student
        self.rationale_groups = rationale_groups
        self.t5_head = getattr(student.config, "model_type", None) in ("t5", "mt5")

    def _decode_once(self, encoder_hidden, attention_mask, labels):
        decoder_input_ids = self.student.prepare_decoder_input_ids_from_labels(labels=labels)
        if not self.t5_head:
            out = self.student(encoder_outputs=(encoder_hidden,), attention_mask=attention_mask,
                               decoder_input_ids=decoder_input_ids, use_cache=False)
            return token_loss_sums(out.logits, labels)
        hidden = self.student.get_decoder()(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden,
                                            encoder_attention_mask=attention_mask, use_cache=False).last_hidden_state
        keep = labels != -100
        hidden = hidden[keep]
        if self.student.config.scale_decoder_outputs:  # as T5ForConditionalGeneration.forward
            hidden = hidden * (self.student.config.d_model ** -0.5)
        return token_loss_sums(self.student.lm_head(hidden), labels[keep])

    def _decode(self, encoder_hidden, attention_mask, labels, groups: int = 1):
        if groups == 1 or labels.size(0) < 2 * groups:
            return self._decode_once(encoder_hidden, attention_mask, labels)
        target_lengths = (labels != -100).sum(1)
        loss, count = 0.0, 0
        for rows in torch.argsort(target_lengths, descending=True).chunk(groups):
            width = int(attention_mask[rows].sum(1).max())
            group_loss, group_count = self._decode_once(encoder_hidden[rows, :width], attention_mask[rows, :width],
                                                        labels[rows, :max(1, int(target_lengths[rows].max()))])
            loss, count = loss + group_loss, count + group_count
        return loss, count

    def forward(self, input_ids, attention_mask, labels, expl_input_ids=None, expl_attention_mask=None,
                rationale_ids=None):
        encoder = self.student.get_encoder()
        if expl_input_ids is None:
            hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self._decode(hidden, attention_mask, labels), None
        n = input_ids.size(0)
        width = max(input_ids.size(1), expl_input_ids.size(1))
        pad = self.student.config.pad_token_id
        ids = torch.cat([F.pad(input_ids, (0, width - input_ids.size(1)), value=pad),
                         F.pad(expl_input_ids, (0, width - expl_input_ids.size(1)), value=pad)])
        mask = torch.cat([F.pad(attention_mask, (0, width - attention_mask.size(1))),
                          F.pad(expl_attention_mask, (0, width - expl_attention_mask.size(1)))])
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return (self._decode(hidden[:n], mask[:n], labels),
                self._decode(hidden[n:], mask[n:], rationale_ids, groups=self.rationale_groups))


def multitask_loss(pred: tuple, expl: tuple | None, alpha: float, n_label: int, n_rationale: int,
                   scale: float = 1.0) -> torch.Tensor:
    """alpha * L_label + (1 - alpha) * L_rationale, each the mean over the target tokens of the whole
    global batch (n_label, n_rationale), so split micro-batches and workers add up to exactly the
    loss of one big batch. `scale` is the world size: DDP and DeepSpeed average gradients over ranks."""
    label_sum, _ = pred
    if expl is None:
        return label_sum / n_label * scale
    rationale_sum, _ = expl
    return (alpha * label_sum / n_label + (1 - alpha) * rationale_sum / max(n_rationale, 1)) * scale


# ---------------------------------------------------------------------------------------------
# Backends: plain torch (one process or DDP) and DeepSpeed ZeRO. Both keep fp32 master weights,
# fp32 gradients and fp32 optimizer state; bf16 is compute only (torch autocast).


def _linear_schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def use_bf16(cfg: TrainConfig, device) -> bool:
    """bf16 compute on GPU, fp32 on CPU unless asked; decided by the worker from its own device."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


class TorchBackend:
    """torch AdamW with a linear warmup/decay schedule; DDP when world > 1."""

    def __init__(self, module, cfg: TrainConfig, world: int, device):
        self.module = module.to(device)
        self.model = module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _linear_schedule(cfg.warmup_steps, cfg.max_steps))
        self.max_grad_norm = cfg.max_grad_norm
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(cfg, device)
                         else contextlib.nullcontext())
        self.world = world

    def accumulate(self, batch: dict, loss_fn, last_micro: bool) -> float:
        """Forward and backward of one micro-batch; DDP syncs gradients only on the last one."""
        sync = contextlib.nullcontext() if (self.world == 1 or last_micro) else self.model.no_sync()
        with sync:
            with self.autocast:
                outputs = self.model(**batch)
            loss = loss_fn(*outputs)
            loss.backward()
        return loss.item()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, rank: int):
        if rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, directory / "state.pt")

    def load(self, directory: Path):
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self, rank: int) -> dict | None:
        return self.module.student.state_dict() if rank == 0 else None


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    """DeepSpeed's config for a job. bf16 through DeepSpeed's torch_autocast mode, not its bf16 mode
    (which keeps bf16 weights and accumulates gradients in bf16); no module is marked safe for
    bf16 gradient communication, so gradients are reduced and accumulated in fp32."""
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": int(cfg.zero)},
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    """DeepSpeed engine (ZeRO stage 0-3) over the job's process group, with torch AdamW so nothing
    needs a JIT-compiled op on CPU."""

    def __init__(self, module, cfg: TrainConfig, ds_config: dict, device):
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the CPU shm op
        self.stage = int(cfg.zero)
        self.module = module.to(device)
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(cfg.warmup_steps, cfg.max_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=not torch.distributed.is_initialized())

    def accumulate(self, batch: dict, loss_fn, last_micro: bool) -> float:
        """Forward and backward of one micro-batch; DeepSpeed steps the optimizer itself at the
        accumulation boundary. Our loss is already normalised per global batch: no 1/GAS scaling."""
        loss = loss_fn(*self.engine(**batch))
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()
        return loss.item()

    def step(self):
        pass

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, directory: Path, rank: int):
        self.engine.save_checkpoint(str(directory), tag="state")

    def load(self, directory: Path):
        self.engine.load_checkpoint(str(directory), tag="state")

    def full_state_dict(self, rank: int) -> dict | None:
        """The student's full weights on rank 0 (None elsewhere). Under ZeRO-3 a collective that
        gathers one layer at a time onto rank 0 only: no rank ever holds the whole model twice."""
        if self.stage != 3:
            return self.module.student.state_dict() if rank == 0 else None
        full = self.engine._zero3_consolidated_16bit_state_dict()  # named for fp16; our params are fp32
        if rank != 0:
            return None
        return {k.removeprefix("student."): v for k, v in full.items()}



# ---------------------------------------------------------------------------------------------
# Evaluation by greedy generation


@torch.no_grad()
def generate(student, tokenizer, token_ids: list[list[int]], *, batch_size: int, max_new_tokens: int, device,
             rank: int = 0, world: int = 1, synced: bool = False) -> list[str]:
    """Greedy decoding of every row, sharded over ranks and gathered; the full list on every rank.

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
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        out = student.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                               num_beams=1, max_new_tokens=max_new_tokens, synced_gpus=synced)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
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


def evaluate(student, tokenizer, data: dict, split: str, cfg: TrainConfig, device, rank, world, synced,
             predictions_path: Path | None = None) -> float:
    """The task metric of greedy predictions on `split`; rank 0 writes the predictions file."""
    rows, tokens = data["rows"][split], data[split]
    preds = generate(student, tokenizer, tokens["input_ids"], batch_size=cfg.eval_batch_size,
                     max_new_tokens=cfg.gen_max_length, device=device, rank=rank, world=world, synced=synced)
    # gold as the tokenizer can express it (what the paper compares against: decoded label tokens)
    golds = tokenizer.batch_decode(tokens["labels"], skip_special_tokens=True)
    metric = get_task(cfg.task).metric
    acc = accuracy(preds, golds, metric)
    rationales = None
    if "expl_input_ids" in tokens:
        rationales = generate(student, tokenizer, tokens["expl_input_ids"], batch_size=cfg.eval_batch_size,
                              max_new_tokens=cfg.max_target_length, device=device, rank=rank, world=world,
                              synced=synced)
    if predictions_path is not None and rank == 0:
        with open(predictions_path, "w", encoding="utf-8") as f:
            for i, (row, pred, gold) in enumerate(zip(rows, preds, golds)):
                line = {"id": row["id"], "input": row["input"], "gold": gold, "prediction": pred,
                        "correct": accuracy([pred], [gold], metric) == 1.0}
                if rationales is not None:
                    line["rationale"] = rationales[i]
                f.write(json.dumps(line) + "\n")
    return acc


# ---------------------------------------------------------------------------------------------
# Sessions: where rank/world and the device come from, where checkpoints and metrics go


class LocalSession:
    """One process, no Ray: this process's device (the first visible GPU, else the CPU);
    checkpoints under run_dir/checkpoints, each written to a hidden temp dir and renamed into place,
    so a kill mid-copy never leaves a partial step_N for a later run to load."""

    rank, world, local_rank = 0, 1, 0

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.history: list[dict] = []

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def node_id(self) -> str | None:
        return None

    def _checkpoints(self) -> list[Path]:
        found = [p for p in (self.run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def restore(self, load) -> bool:
        ckpts = self._checkpoints()
        return bool(ckpts) and load(ckpts[-1])

    def report(self, metrics: dict, checkpoint_dir: Path | None):
        self.history.append(metrics)
        if checkpoint_dir is None:
            return
        root = self.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        dest = root / f"step_{metrics['step']}"
        partial = root / f".partial-{uuid.uuid4().hex}"
        shutil.copytree(checkpoint_dir, partial)
        if dest.exists():  # the same step saved again (a run restarted afresh): set the old copy aside
            dest.rename(root / f".old-{uuid.uuid4().hex}")
        os.replace(partial, dest)
        for old in self._checkpoints()[:-2] + [p for p in root.glob(".*-*") if p.is_dir()]:
            shutil.rmtree(old, ignore_errors=True)  # ours only: step_N and our hidden temp dirs

    def checkpoint_path(self) -> str | None:
        ckpts = self._checkpoints()
        return str(ckpts[-1]) if ckpts else None


class RaySession:
    """Inside a Ray Train worker: rank, world and device from the train context (the device Ray
    Train assigned to this worker, on its own node), checkpoints through ray.train.report (every rank
    reports; DeepSpeed shards from all ranks land in one checkpoint)."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def node_id(self) -> str | None:
        import ray

        return ray.get_runtime_context().get_node_id()

    def restore(self, load) -> bool:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as d:
            return load(Path(d))

    def report(self, metrics: dict, checkpoint_dir: Path | None):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------
# Device, accelerator and process group: decided by the process that trains, on its own node


def pin_deepspeed_accelerator(device: torch.device) -> str:
    """DeepSpeed's accelerator for this process, from this process's device (never the driver's):
    a DS_ACCELERATOR inherited from elsewhere, or an accelerator DeepSpeed already picked, is replaced
    when it disagrees."""
    name = "cuda" if device.type == "cuda" else "cpu"
    os.environ["DS_ACCELERATOR"] = name
    from deepspeed.accelerator import real_accelerator

    if real_accelerator.ds_accelerator is not None and real_accelerator.ds_accelerator._name != name:
        real_accelerator.ds_accelerator = None  # picked before we knew the device: pick again
    return real_accelerator.get_accelerator()._name


def _single_process_group(device: torch.device) -> None:
    """A world-1 process group for DeepSpeed outside a launcher (else it looks for MPI). It lives as
    long as the process: DeepSpeed's comm layer keeps a handle on it for later jobs in this process."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # what a launcher would have set, and DeepSpeed asserts on
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _layout(cfg: TrainConfig, world: int) -> dict:
    """What a checkpoint's format depends on: plain torch state is whole (any world size resumes it);
    DeepSpeed's is partitioned by ZeRO stage and world size."""
    if cfg.zero == "off":
        return {"backend": "torch"}
    return {"backend": "deepspeed", "zero": cfg.zero, "world": world}


def _local_parameters(model) -> int:
    """Parameter elements this rank holds (its shard under ZeRO-3)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# The loop


def _log(rank: int, message: str):
    if rank == 0:
        print(message, flush=True)


def _live_metrics(cfg: TrainConfig):
    """A function that logs step metrics to the job's MLflow run, or None. A store hiccup costs a
    warning, never the training run."""
    if not (cfg.tracking_uri and cfg.mlflow_run_id):
        return None
    from dsbs_ray import tracking

    c = tracking.client(cfg.tracking_uri)

    def log(metrics: dict, step: int):
        try:
            tracking.log_metrics(c, cfg.mlflow_run_id, metrics, step)
        except Exception as e:  # noqa: BLE001
            print(f"warning: MLflow step metrics not logged ({type(e).__name__}: {e})", file=sys.stderr)
    return log


def train_loop(config: dict, session=None) -> dict | None:
    """Train one student; returns the final metrics on rank 0 (None elsewhere).

    config: a TrainConfig as a dict. session: LocalSession (default) or RaySession.
    """
    loop_start = time.perf_counter()
    cfg = TrainConfig(**config)
    run_dir = Path(cfg.output_dir).resolve() / cfg.name()
    run_dir.mkdir(parents=True, exist_ok=True)
    session = session or LocalSession(run_dir)
    rank, world = session.rank, session.world
    device = session.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = use_bf16(cfg, device)
    ds_config, hf_ds_config, accelerator = None, None, None
    if cfg.zero != "off":
        accelerator = pin_deepspeed_accelerator(device)
        _single_process_group(device)
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        ds_config = deepspeed_config(cfg, bf16)
        if cfg.zero == "3":  # while this object lives, from_pretrained builds the student partitioned
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds_config = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(cfg.seed)

    student, tokenizer = load_student(fetch_student(cfg.student), device.type)
    loaded = torch.tensor([_local_parameters(student)], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(loaded, op=torch.distributed.ReduceOp.MAX)
    data = prepare_data(cfg, tokenizer)
    tokens = data["train"]
    keys = [length_key(tokens, i) for i in range(len(tokens["labels"]))]
    module = MultiTaskSeq2Seq(student)
    backend = TorchBackend(module, cfg, world, device) if cfg.zero == "off" else DeepSpeedBackend(module, cfg, ds_config, device)
    synced = cfg.zero == "3" and world > 1

    state = {"step": 0, "restart": None}
    layout = _layout(cfg, world)

    def load(directory: Path) -> bool:
        saved = json.loads((directory / "trainer_state.json").read_text())
        if saved.get("layout") != layout:
            state["restart"] = (f"checkpoint at step {saved.get('step')} was saved with {saved.get('layout')}, "
                                f"this run is {layout}: starting afresh from step 0")
            return False
        backend.load(directory)
        state["step"] = saved["step"]
        return True

    resumed = session.restore(load)
    start_step = state["step"]
    if resumed:
        _log(rank, f"resumed from checkpoint at step {start_step}")
    elif state["restart"]:
        _log(rank, state["restart"])

    def report(metrics: dict, checkpoint: bool):
        if not checkpoint:
            session.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="dsbs_ckpt_") as d:
            backend.save(Path(d), rank)
            if rank == 0:
                (Path(d) / "trainer_state.json").write_text(json.dumps({"step": metrics["step"], "layout": layout}))
            has_files = any(Path(d).iterdir())
            session.report(metrics, Path(d) if has_files else None)

    min_rows = world * cfg.grad_accum
    epoch_batches = {0: bucketed_batches(keys, cfg.batch_size, cfg.seed, 0, min_rows)}  # the current epoch only
    per_epoch = len(epoch_batches[0])  # the same for every epoch: it depends on sizes, not order

    def batch_at(step: int) -> list[int]:
        epoch = step // per_epoch
        if epoch not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[epoch] = bucketed_batches(keys, cfg.batch_size, cfg.seed, epoch, min_rows)
        return epoch_batches[epoch][step % per_epoch]

    def evaluate_split(split: str, final: bool) -> float:
        return evaluate(module.student, tokenizer, data, split, cfg, device, rank, world, synced,
                        predictions_path=run_dir / f"predictions_{split}.jsonl" if final else None)

    live = _live_metrics(cfg) if rank == 0 else None
    module.train()
    loss_sum, loss_steps, train_seconds, examples = 0.0, 0, 0.0, 0
    last_metrics: dict = {}
    first_loss = None  # mean loss over the first evaluation window of this run
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        batch_rows = batch_at(step)
        n_label = sum(len(tokens["labels"][i]) for i in batch_rows)
        n_rationale = sum(len(tokens["rationale_ids"][i]) for i in batch_rows) if "rationale_ids" in tokens else 0
        micro_batches = shard_batch(batch_rows, keys, world, rank, cfg.grad_accum)
        def loss_fn(pred, expl):
            return multitask_loss(pred, expl, cfg.alpha, n_label, n_rationale, scale=world)

        step_loss = 0.0
        for m, rows in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in collate(tokens, rows, tokenizer.pad_token_id).items()}
            step_loss += backend.accumulate(batch, loss_fn, last_micro=m == len(micro_batches) - 1) / world
        backend.step()
        train_seconds += time.perf_counter() - t0
        examples += len(batch_rows)
        loss_sum += step_loss
        loss_steps += 1
        done = step + 1
        final = done == cfg.max_steps
        evaluate_now = done % cfg.eval_every == 0 or final
        checkpoint_now = done % cfg.checkpoint_every == 0 or final
        if not (evaluate_now or checkpoint_now):
            continue
        metrics = {"step": done}
        if evaluate_now:  # valid and test at every evaluation, as the paper's code logs them
            loss_t = torch.tensor([loss_sum], dtype=torch.float64)
            if world > 1:
                torch.distributed.all_reduce(loss_t)
            valid_acc = evaluate_split("valid", final)  # the last evaluation writes the predictions files
            test_acc = evaluate_split("test", final)
            metrics |= {"loss": loss_t.item() / loss_steps, "valid_accuracy": valid_acc, "test_accuracy": test_acc,
                        "lr": backend.lr(), "examples_per_s": examples / max(train_seconds, 1e-9)}
            _log(rank, f"step {done}/{cfg.max_steps} loss {metrics['loss']:.4f} valid_accuracy {valid_acc:.4f} "
                       f"test_accuracy {test_acc:.4f} {metrics['examples_per_s']:.1f} ex/s")
            last_metrics = metrics
            first_loss = metrics["loss"] if first_loss is None else first_loss
            loss_sum, loss_steps = 0.0, 0
        report(metrics, checkpoint=checkpoint_now)
        if live and evaluate_now:
            live(metrics, done)

    if last_metrics.get("step") == cfg.max_steps:  # evaluated at the last step already
        valid_acc, test_acc = last_metrics["valid_accuracy"], last_metrics["test_accuracy"]
    else:  # resumed from a checkpoint at the last step: nothing ran in this process
        valid_acc, test_acc = evaluate_split("valid", True), evaluate_split("test", True)
    weights = backend.full_state_dict(rank)
    parameters = count_parameters(module.student)
    if rank == 0:
        module.student.save_pretrained(run_dir / "model", state_dict=weights)
        tokenizer.save_pretrained(run_dir / "model")
    del hf_ds_config
    if rank != 0:
        return None
    return {
        "task": cfg.task, "student": cfg.student, "method": cfg.method, "label_source": cfg.label_source,
        "fraction": cfg.fraction, "seed": cfg.seed, "parameters": parameters,
        "train_rows": len(tokens["labels"]), "dropped_unparsed": data["rows"]["dropped_unparsed"],
        "rows_without_rationale": data["rows"]["rows_without_rationale"],
        "rows_with_rationale": data["rows"]["rows_with_rationale"],
        "dropped_by_filter": data["rows"]["dropped_by_filter"],
        "accuracy": test_acc, "valid_accuracy": valid_acc, "steps": cfg.max_steps, "resumed_from_step": start_step,
        "restarted_afresh": state["restart"],
        "examples_per_s": examples / train_seconds if train_seconds else None,
        "train_seconds": train_seconds, "loop_seconds": time.perf_counter() - loop_start, "run_dir": str(run_dir),
        "predictions": str(run_dir / "predictions_test.jsonl"), "first_loss": first_loss, "final_loss": last_metrics.get("loss"),
        "device": device.type, "precision": "bf16" if bf16 else "fp32", "deepspeed_accelerator": accelerator,
        "master_dtype": str(next(module.student.parameters()).dtype).removeprefix("torch."),
        "max_rank_loaded_parameters": int(loaded.item()), "world": world, "node_id": session.node_id(),
    }


# ---------------------------------------------------------------------------------------------
# Ray Train wrapper


def _ray_worker(config: dict):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    return train_loop(config, RaySession())


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (e.g. under `ray job submit`), else start a local Ray.

    Passes no runtime env: a submitted job's own runtime env applies as the user wrote it (Ray refuses
    to merge a key set in both), and whatever a worker needs (its device, DeepSpeed's accelerator,
    tokenizer threads) the worker sets itself, on its own node."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=True, object_store_memory=300 * 2**20, log_to_driver=True)


def data_fingerprint(task_name: str, data_dir: str | None, uses_teacher: bool) -> str | None:
    """A hash of the content of the local files a job reads: the task's split files and, for methods
    that use the teacher, its train outputs. Re-annotating or editing the data between two runs gives
    a new run name, so a finished or half-done run on the old data is never picked up. Splits that
    come from the hub are not hashed (None when nothing is local)."""
    if not data_dir:
        return None
    task = get_task(task_name)
    digest, seen = hashlib.sha256(), 0
    for part in (["svamp", "asdiv"] if task.name == "asdiv" else [task.name]):
        folder = Path(data_dir) / part
        files = [p for p in folder.glob("*.json") if not p.name.startswith(".")]
        if uses_teacher:
            files += list((folder / "llm").glob("train_CoT_*.json"))
        for path in sorted(files):
            digest.update(f"{path.relative_to(data_dir)}\0".encode())
            hash_file(path, digest)
            seen += 1
    return digest.hexdigest()[:16] if seen else None


def resolve_paths(cfg: TrainConfig, fingerprints: dict | None = None) -> TrainConfig:
    """Absolute student, data and output paths (Ray workers run in another working directory), and the
    data's fingerprint. A job resolved before (a sweep's trial) keeps its fingerprint, so its run name
    is the one its sweep tracks; `fingerprints` memoizes them across the jobs of one sweep."""
    from dsbs_ray.tasks import default_data_dir

    student = str(Path(cfg.student).resolve()) if Path(cfg.student).exists() else cfg.student
    data_dir = cfg.data_dir or default_data_dir()
    data_dir = str(Path(data_dir).resolve()) if data_dir else None
    fingerprint = cfg.data_fingerprint
    if fingerprint is None:
        memo = {} if fingerprints is None else fingerprints
        key = (cfg.task, data_dir, cfg.uses_teacher and not cfg.annotations)
        if key not in memo:
            memo[key] = data_fingerprint(*key)
        fingerprint = memo[key]
    return cfg.model_copy(update={
        "student": student, "output_dir": str(Path(cfg.output_dir).resolve()), "data_dir": data_dir,
        "data_fingerprint": fingerprint})


def train(cfg: TrainConfig, use_ray: bool = True) -> dict:
    """Run one job: checks first (clear errors before any worker starts), then the loop on
    cfg.workers Ray Train workers, or in this process when use_ray is False."""
    cfg = resolve_paths(cfg)
    validate(cfg)
    prepare_data(cfg, load_tokenizer(cfg.student))  # fills the token cache once; fails early on bad data
    if not use_ray and cfg.workers != 1:
        raise UserError("workers: more than one worker needs Ray (drop --no-ray)")
    with hold(Path(cfg.output_dir) / cfg.name(), "run of this job", "output_dir"):  # its checkpoints are one run's
        return _run_job(cfg, use_ray)


def _run_job(cfg: TrainConfig, use_ray: bool) -> dict:
    t0 = time.time()
    if not use_ray:
        session = LocalSession(Path(cfg.output_dir).resolve() / cfg.name())
        metrics = train_loop(cfg.model_dump(), session)
        metrics["checkpoint"] = session.checkpoint_path()
    else:
        import ray.train
        from ray.train.torch import TorchTrainer

        init_ray()
        resources = {"CPU": cfg.cpus_per_worker}
        if cfg.gpus_per_worker:
            resources["GPU"] = cfg.gpus_per_worker
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config=cfg.model_dump(),
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=cfg.name(), storage_path=str(Path(cfg.output_dir).resolve()),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
        metrics = dict(result.return_value)
        metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    metrics["wall_seconds"] = time.time() - t0
    return metrics
