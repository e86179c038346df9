"""One training job: its config (TrainConfig), its name, its resolved paths and data fingerprint,
and the checks that run on the driver before any worker starts."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsbs_ray.cache import hash_file
from dsbs_ray.errors import UserError, build
from dsbs_ray.rationales import RationaleFilter, Unmatched
from dsbs_ray.students import check_student
from dsbs_ray.tasks import get_task, load_examples, load_teacher_outputs, source_tasks


# How a job is laid out on its workers; none of it changes the result (the loss is normalised by the
# global batch), so a changed layout keeps the run name; a checkpoint records its layout (_layout).
RUN_LAYOUT_KEYS = {"workers", "cpus_per_worker", "gpus_per_worker", "micro_batch_size", "zero"}


TEACHER_DEFAULTS = {"train_limit": None, "teacher": "released", "annotations": None, "samples": 1,
                    "rationale_filter": "none", "unmatched": "no-rationale"}


class TrainConfig(BaseModel):
    """One training job. Defaults are the paper's (lr 5e-5, batch 64, 10k steps, inputs 1024,
    targets 256, alpha 0.5); CPU runs override steps, lengths and batch."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="a built-in task's name, or a task spec's path (absolute once resolved)")
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
    eval_every: int = Field(250, ge=1, description="score valid every K steps (valid and test at the last step)")
    checkpoint_every: int = Field(1000, ge=1, description="checkpoint (weights + optimizer) every K steps, "
                                  "and at the last step")
    eval_batch_size: int = Field(64, ge=1)
    eval_limit: int | None = Field(None, ge=1, description="rows of valid scored at each evaluation (all if None)")
    test_limit: int | None = Field(None, ge=1, description="score only the first N test rows (CPU demos; the "
                                   "result says so in test_rows); None: the whole test split, once, at the end")
    keep: Literal["model", "none", "all"] = Field("model", description="what a finished run keeps besides its "
                                                  "result and predictions: model (the exported student), none, "
                                                  "or all (its checkpoints too, optimizer state included)")
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
                                                          "mlflow_run_id", "keep"})
        for key, default in TEACHER_DEFAULTS.items():  # at their defaults they leave older run names as they were
            if keys[key] == default:
                del keys[key]
        if self.eval_limit is None and self.test_limit is None:  # scored as before test_limit existed: whole test
            del keys["test_limit"]
        task = get_task(self.task).name  # a spec by its name, wherever it lives: its content is in the fingerprint
        keys["task"] = task
        digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]
        return f"{task}-{student_name(self.student)}-{self.method}-{self.label_source}-f{self.fraction:g}-s{self.seed}-{digest}"


def load_config(**kwargs) -> TrainConfig:
    """TrainConfig from keyword arguments; a validation error becomes one line naming the field."""
    return build(TrainConfig, **kwargs)


RESULT_FILE = "result.json"  # a finished run's metrics, in its run dir


def stored_result(job: TrainConfig) -> dict | None:
    """A finished run's stored result, None if it has none. One that is not JSON, or lacks what its
    MLflow run is logged from (accuracy, parameters), is refused in one line naming it (a sweep reads
    every one before it starts anything)."""
    from dsbs_ray.files import read_json

    path = Path(job.output_dir) / job.name() / RESULT_FILE
    if not path.exists():
        return None
    result = read_json(path)
    fields = result if isinstance(result, dict) else {}
    bad = [k for k in ("accuracy", "parameters") if type(fields.get(k)) not in (int, float)]  # bool is no number
    if bad:
        raise UserError(f"{path}: not a finished trial's result (no number {', '.join(bad)}); restore it, or move "
                        f"the trial's run dir {path.parent} away to train the trial again")
    return result


def write_result(job: TrainConfig, result: dict) -> None:
    """The run's result, written atomically: from here on the run is finished."""
    import os

    path = Path(job.output_dir) / job.name() / RESULT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def prune_run(run_dir: Path, keep: str, checkpoint: str | None) -> str | None:
    """What a finished run keeps (its result is written): `all` everything; `model` its exported
    student, no checkpoint (the optimizer state only served a resume); `none` neither. Only what the
    run wrote goes: checkpoints/ (one process), checkpoint_* (Ray Train's), model/. Returns the
    checkpoint path still there, if any."""
    import shutil

    if keep == "all":
        return checkpoint
    doomed = [run_dir / "checkpoints"] + sorted(run_dir.glob("checkpoint_*")) + [run_dir / "model"] * (keep == "none")
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    return None


def student_name(student: str) -> str:
    """A student's short name for run names and reports: the checkpoint's directory name, the hub id's
    model part, or an embedded model's name."""
    return Path(student.rstrip("/")).name.removeprefix("embedded:")


def validate(cfg: TrainConfig) -> None:
    """Every check that can fail on user input, run on the driver before any worker starts."""
    check_student(cfg.student)
    task = get_task(cfg.task)
    if cfg.uses_teacher and not cfg.annotations:  # (store annotations: the sweep generates them first)
        load_teacher_outputs(cfg.task, "train", cfg.data_dir)  # raises naming the missing file
    check_labels(cfg.task, cfg.data_dir, cfg.label_source, task.has_valid)
    if cfg.zero != "off":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("zero: DeepSpeed is not installed; use --zero off") from None


@lru_cache(maxsize=256)  # a sweep checks many jobs of one task
def check_labels(task_ref: str, data_dir: str | None, label_source: str, has_valid: bool) -> None:
    """Gold labels where a job needs them: always on test (and valid), on train for gold-label
    methods (finetune, dsbs-gold); an unlabelled train split trains from the teacher only."""
    splits = ["train"] * (label_source == "gold") + ["test"] + ["valid"] * has_valid
    task = get_task(task_ref)
    for split in splits:
        examples = load_examples(task_ref, split, data_dir)
        unlabelled = sum(not e.gold for e in examples)
        if not examples:
            raise UserError(f"task {task.name}: split {split} has no rows")
        if unlabelled:
            why = ("finetune and dsbs-gold train on gold labels; use distill or dsbs-teacher (the teacher's labels)"
                   if split == "train" else "its rows are scored against them")
            what = ("no gold labels" if unlabelled == len(examples)
                    else f"{unlabelled} of {len(examples)} rows without a gold label")
            raise UserError(f"task {task.name}: split {split} has {what} (column {task.spec.label!r}): {why}")


def data_fingerprint(task_ref: str, data_dir: str | None, uses_teacher: bool) -> str | None:
    """A hash of the content of the local files a job reads: the task's split files in the data dir
    and, for methods that use the teacher, its train outputs; for a user's spec, also the spec and
    the files it names. Re-annotating or editing the data (or the spec) between two runs gives a new
    run name, so a finished or half-done run on the old data is never picked up. Splits that come
    from the hub are not hashed (None when nothing is local)."""
    task = get_task(task_ref)
    digest, seen = hashlib.sha256(), 0
    if not task.builtin:  # a built-in spec is the package's (its run names stay as they were)
        digest.update(f"spec\0{task.content_hash}\0".encode())
        seen += 1
        for path in spec_files(task):
            digest.update(f"{path.name}\0".encode())
            hash_file(path, digest)
    if not data_dir:
        return digest.hexdigest()[:16] if seen else None
    for part in dict.fromkeys(source_tasks(task_ref, "train") + source_tasks(task_ref, "test")):
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
        key = (task_ref(cfg.task), data_dir, cfg.uses_teacher and not cfg.annotations)
        if key not in memo:
            memo[key] = data_fingerprint(*key)
        fingerprint = memo[key]
    return cfg.model_copy(update={
        "task": task_ref(cfg.task), "student": student, "output_dir": str(Path(cfg.output_dir).resolve()), "data_dir": data_dir,
        "data_fingerprint": fingerprint})


def task_ref(task: str) -> str:
    """How a job names its task to other processes: a built-in's name, else its spec's absolute path."""
    return get_task(task).ref


def spec_files(task) -> list:
    """The local data files a user's spec names (their content is part of its runs' identity)."""
    files = []
    for split in ("train", "valid", "test", "all"):
        for src in getattr(task.spec.data, split) or []:
            if src.file and not src.file.startswith("{data_dir}") and task.resolve(src.file).is_file():
                files.append(task.resolve(src.file))
    return files
