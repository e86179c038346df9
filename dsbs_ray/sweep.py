"""Sweeps: the sweep config (YAML, validated; unknown keys are errors) and its expansion into one
training job per (task, student, fraction, method, seed).

(The Ray Tune driver that runs the grid lands with the sweep issue; expansion needs no Ray.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dsbs_ray.errors import UserError, build
from dsbs_ray.tasks import get_task, read_yaml
from dsbs_ray.train import TrainConfig, load_config

# sweep method -> (training method, label source), as in DESIGN.md
METHODS = {
    "finetune": ("standard", "gold"),
    "distill": ("standard", "teacher"),
    "dsbs-gold": ("dsbs", "gold"),
    "dsbs-teacher": ("dsbs", "teacher"),
}


class StudentSpec(BaseModel):
    """A student and the resources each of its trials gets."""

    model_config = ConfigDict(extra="forbid")

    id: str  # HF hub id or local path
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    zero: Literal["off", "0", "1", "2", "3"] = "2"
    micro_batch_size: int | None = Field(None, ge=1, description="rows per worker per forward; "
                                         "gradient accumulation makes up the global batch")


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    tasks: list[str]
    students: list[StudentSpec]
    fractions: list[float]
    methods: list[Literal["finetune", "distill", "dsbs-gold", "dsbs-teacher"]]
    seeds: list[int] = [0]
    alpha: float = Field(0.5, ge=0, le=1)
    max_steps: int = Field(10_000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, gt=0)
    max_input_length: int = 1024
    max_target_length: int = 256
    gen_max_length: int = 64
    eval_every: int = Field(250, ge=1)
    eval_limit: int | None = None
    data_dir: str | None = None  # the tasks and the teacher annotations (paper layout); our own annotation dir works too
    output_dir: str = "work/sweeps"
    max_concurrent_trials: int = Field(1, ge=1)
    max_retries: int = Field(1, ge=0)
    tracking_uri: str | None = None  # default sqlite:///mlflow.db
    experiment: str | None = None  # default: the sweep name


def load_sweep(path: Path | str) -> SweepConfig:
    """A sweep config from YAML; every mistake is one line naming the file and the field."""
    path = Path(path)
    raw = read_yaml(path, "sweep config")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sweep settings")
    cfg = build(SweepConfig, where=f"{path}: ", **raw)
    for task in cfg.tasks:
        get_task(task)
    return cfg


def expand(cfg: SweepConfig) -> list[TrainConfig]:
    """One TrainConfig per grid point; an empty grid is an error."""
    jobs = []
    for task in cfg.tasks:
        for student in cfg.students:
            for fraction in cfg.fractions:
                for method in cfg.methods:
                    train_method, label_source = METHODS[method]
                    for seed in cfg.seeds:
                        jobs.append(load_config(
                            task=task, student=student.id, method=train_method, label_source=label_source,
                            fraction=fraction, seed=seed, alpha=cfg.alpha, max_steps=cfg.max_steps,
                            batch_size=cfg.batch_size, micro_batch_size=student.micro_batch_size, lr=cfg.lr,
                            max_input_length=cfg.max_input_length, max_target_length=cfg.max_target_length,
                            gen_max_length=cfg.gen_max_length, eval_every=cfg.eval_every,
                            eval_limit=cfg.eval_limit, workers=student.workers,
                            cpus_per_worker=student.cpus_per_worker, gpus_per_worker=student.gpus_per_worker,
                            zero=student.zero, data_dir=cfg.data_dir,
                            output_dir=str(Path(cfg.output_dir) / cfg.name)))
    if not jobs:
        raise UserError(f"sweep {cfg.name}: the grid is empty (tasks x students x fractions x methods x seeds)")
    return jobs
