"""Sweeps: the sweep config (YAML, validated; unknown keys are errors), its expansion into one
training job per (task, student, fraction, method, seed), and the Ray Tune driver that runs them.

Resuming: every trial is a Ray Train run named by its config hash (an interrupted trial restarts from
its last checkpoint), and a finished trial leaves `result.json` in its run dir, so rerunning a sweep
(or a grown one) trains only what is not finished: finished trials are settled on the driver, and Ray
and Tune start only for what is left (a rerun of a finished sweep starts neither). MLflow: a parent run
per sweep, a child per trial, both found again on rerun (tracking.find_or_start_run).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsbs_ray.annotations import DEFAULT_STORE
from dsbs_ray.errors import RunFailure, UserError, build
from dsbs_ray.job import TrainConfig, load_config, resolve_paths, stored_result, student_name, validate, write_result
from dsbs_ray.phases import Phases, format_phase_table, phase_metrics, phase_rows
from dsbs_ray.ledger import Prices
from dsbs_ray.locks import hold
from dsbs_ray.rationales import RationaleFilter, Unmatched
from dsbs_ray.files import read_yaml
from dsbs_ray.task_spec import get_task
from dsbs_ray.teacher import TeacherSpec

Teacher = Literal["released"] | TeacherSpec  # released: the TASK/llm/ outputs in the data dir

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
    precision: Literal["auto", "fp32", "bf16"] | None = Field(None, description="this student's compute precision "
                                                             "(default: the sweep's)")
    lr: float | None = Field(None, gt=0, description="this student's learning rate (default: the sweep's): a "
                             "pretrained student beside random-init ones wants a smaller one")
    max_steps: int | None = Field(None, ge=1, description="this student's optimizer steps (default: the sweep's)")
    micro_batch_size: int | None = Field(None, ge=1, description="rows per worker per forward; "
                                         "gradient accumulation makes up the global batch")
    grad_accum: int | None = Field(None, ge=1, description="micro-batches per optimizer step; with workers and "
                                   "the global batch it sets micro_batch_size (both given: they must agree)")
    parameters: int | None = Field(None, ge=1, description="the student's size, for the dry run's cost estimate "
                                   "where its config cannot be read (a hub id with no hub)")

    def micro(self, batch_size: int) -> int | None:
        """Rows per worker per forward, from micro_batch_size or grad_accum (None: one micro-batch)."""
        if self.grad_accum is None:
            return self.micro_batch_size
        micro, rest = divmod(batch_size, self.workers * self.grad_accum)
        if rest or not micro or (self.micro_batch_size not in (None, micro)):
            raise UserError(f"students: {self.id}: batch_size {batch_size} is not micro_batch_size "
                            f"{self.micro_batch_size or '?'} x workers {self.workers} x grad_accum {self.grad_accum}")
        return micro


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="names the run dirs, the MLflow experiment (by default) and the parent run")
    tasks: list[str]
    students: list[StudentSpec]
    fractions: list[float]
    methods: list[Literal["finetune", "distill", "dsbs-gold", "dsbs-teacher"]]
    seeds: list[int] = [0]
    teacher: Teacher = "released"
    teachers: list[Teacher] | None = Field(None, min_length=1, description="several teachers: the teacher "
                                           "becomes a sweep axis (instead of `teacher`)")
    rationale_filter: RationaleFilter | list[RationaleFilter] = Field("none", description="a list makes it an axis")
    unmatched: Unmatched = "no-rationale"
    annotation_store: str = Field(default_factory=lambda: os.environ.get("DSBS_ANNOTATION_STORE", DEFAULT_STORE),
                                  description="open teachers' samples, shared by every sweep that names it "
                                  "(default: $DSBS_ANNOTATION_STORE, else work/annotation-store)")
    train_limit: int | None = Field(None, ge=1, description="the first N train rows only (CPU demos)")
    alpha: float = Field(0.5, ge=0, le=1)
    max_steps: int = Field(10_000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, gt=0)
    max_input_length: int = 1024
    max_target_length: int = 256
    gen_max_length: int = 64
    eval_every: int = Field(250, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 compute on GPU workers, fp32 on CPU ones
    eval_limit: int | None = Field(None, ge=1, description="valid rows scored at each evaluation (all if None)")
    test_limit: int | None = Field(None, ge=1, description="the first N test rows only (CPU demos); None: the "
                                   "whole test split, scored once at the end")
    keep: Literal["model", "none", "all"] = Field("model", description="what a finished trial keeps: its exported "
                                                  "model, nothing, or all (checkpoints with optimizer state too)")
    data_dir: str | None = None  # the tasks and the teacher annotations (paper layout); our own annotation dir works too
    output_dir: str = "work/sweeps"
    max_concurrent_trials: int = Field(1, ge=1)
    max_retries: int = Field(1, ge=0)
    prices: Prices = Field(default_factory=Prices, description="the cost ledger's prices (README: defaults, sources)")
    tracking_uri: str | None = None  # default sqlite:///mlflow.db
    experiment: str | None = None  # default: the sweep name

    @model_validator(mode="after")
    def _one_way_to_name_teachers(self):
        if self.teachers is not None and self.teacher != "released":
            raise ValueError("give either teacher or teachers, not both")
        names = [teacher_name(t) for t in self.teacher_list()]
        if len(set(names)) != len(names):
            raise ValueError(f"two teachers share a name ({', '.join(names)}); give each a distinct name")
        return self

    def teacher_list(self) -> list[Teacher]:
        return self.teachers if self.teachers is not None else [self.teacher]

    def filter_list(self) -> list[str]:
        f = self.rationale_filter
        return list(dict.fromkeys(f)) if isinstance(f, list) else [f]


def teacher_name(teacher: Teacher) -> str:
    return "released" if teacher == "released" else teacher.label()


def load_sweep(path: Path | str) -> SweepConfig:
    """A sweep config from YAML; every mistake is one line naming the file and the field."""
    path = Path(path)
    raw = read_yaml(path, "sweep config")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sweep settings")
    cfg = build(SweepConfig, where=f"{path}: ", **raw)
    names = {}
    for task in cfg.tasks:  # a name or a spec path (relative to the working directory, as students are)
        name = get_task(task).name
        if name in names:
            raise UserError(f"{path}: tasks: {names[name]} and {task} are both task {name!r}")
        names[name] = task
    cfg.tasks = [get_task(t).ref for t in cfg.tasks]  # what trials and other processes name them by
    return cfg


def teacher_entry(cfg: SweepConfig, teacher: TeacherSpec, task: str, split: str) -> str:
    """The store entry that holds `teacher`'s annotations of a task split (nothing is created)."""
    from dsbs_ray.annotations import entry_path
    from dsbs_ray.prompts import load_prompt
    from dsbs_ray.teacher import teacher_identity

    identity = teacher_identity(teacher, get_task(task), split, load_prompt(task, teacher.prompts_dir))
    return str(entry_path(cfg.annotation_store, identity))


def expand(cfg: SweepConfig) -> list[TrainConfig]:
    """One TrainConfig per grid point; an empty grid is an error. The teacher and the rationale
    filter are axes only where they change a trial: finetune reads no teacher, distill no rationale."""
    jobs = []
    for task in cfg.tasks:
        for student in cfg.students:
            for fraction in cfg.fractions:
                for method in cfg.methods:
                    train_method, label_source = METHODS[method]
                    teachers = cfg.teacher_list() if method != "finetune" else [None]
                    filters = cfg.filter_list() if train_method == "dsbs" else ["none"]
                    for teacher in teachers:
                        source = {} if teacher in (None, "released") else {
                            "teacher": teacher.label(), "samples": teacher.samples,
                            "annotations": teacher_entry(cfg, teacher, task, "train")}
                        for rationale_filter in filters:
                            for seed in cfg.seeds:
                                jobs.append(load_config(
                                    task=task, student=student.id, method=train_method, label_source=label_source,
                                    fraction=fraction, seed=seed, alpha=cfg.alpha,
                                    max_steps=student.max_steps or cfg.max_steps,
                                    batch_size=cfg.batch_size, micro_batch_size=student.micro(cfg.batch_size),
                                    lr=student.lr or cfg.lr, max_input_length=cfg.max_input_length,
                                    max_target_length=cfg.max_target_length, gen_max_length=cfg.gen_max_length,
                                    eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                                    precision=student.precision or cfg.precision, eval_limit=cfg.eval_limit,
                                    test_limit=cfg.test_limit, keep=cfg.keep,
                                    workers=student.workers, cpus_per_worker=student.cpus_per_worker,
                                    gpus_per_worker=student.gpus_per_worker, zero=student.zero,
                                    data_dir=cfg.data_dir, train_limit=cfg.train_limit,
                                    rationale_filter=rationale_filter, unmatched=cfg.unmatched,
                                    output_dir=str(Path(cfg.output_dir) / cfg.name), **source))
    if not jobs:
        raise UserError(f"sweep {cfg.name}: the grid is empty (tasks x students x fractions x methods x seeds)")
    return jobs


def sweep_method(job: TrainConfig) -> str:
    """The sweep method name (finetune, distill, dsbs-gold, dsbs-teacher) of a training job."""
    return next(m for m, pair in METHODS.items() if pair == (job.method, job.label_source))


def trial_params(job: TrainConfig) -> dict:
    """The MLflow params of a trial: what the report groups by, and what changes the result. Every
    one is covered by the run name's hash, so a rerun never tries to change a logged param."""
    from dsbs_ray.families import family_for
    from dsbs_ray.students import resolve_student

    return {"task": get_task(job.task).name, "task_spec": job.task, "student": job.student, "student_name": student_name(job.student),
            "student_family": family_for(resolve_student(job.student)).NAME,
            "method": sweep_method(job), "training_method": job.method, "label_source": job.label_source,
            "fraction": job.fraction, "seed": job.seed, "alpha": job.alpha, "steps": job.max_steps,
            "batch_size": job.batch_size, "lr": job.lr, "max_input_length": job.max_input_length,
            "max_target_length": job.max_target_length, "precision": job.precision,
            "eval_limit": job.eval_limit, "test_limit": job.test_limit or "all", "data_dir": job.data_dir, "data_fingerprint": job.data_fingerprint,
            "train_limit": job.train_limit, "run_name": job.name()} | teacher_params(job)


def teacher_params(job: TrainConfig) -> dict:
    """Where a trial's rationales and teacher labels come from: the teacher, its model, prompt hash,
    sampling and samples (from its store entry), and the filter."""
    if not job.uses_teacher:
        return {"teacher": "none"}
    out = {"teacher": job.teacher, "samples": job.samples, "rationale_filter": job.rationale_filter,
           "unmatched": job.unmatched}
    if job.annotations is None:
        return out | {"teacher_model": "released outputs (TASK/llm/ in the data dir)"}
    identity = json.loads((Path(job.annotations) / "teacher.json").read_text())
    return out | {"teacher_model": identity["teacher"], "prompt_hash": identity["prompt_hash"],
                  "temperature": identity["sampling"]["temperature"],
                  "max_new_tokens": identity["sampling"]["max_tokens"],
                  "structured": "structured_outputs" in identity["sampling"], "annotations": job.annotations}


def trial_layout_tags(job: TrainConfig) -> dict:
    """How the trial ran (workers, ZeRO stage, micro-batch): tags, not params, because a rerun may
    change them without changing the result (MLflow params are write-once)."""
    return {"dsbs.workers": str(job.workers), "dsbs.zero": job.zero, "dsbs.micro_batch_size": str(job.micro),
            "dsbs.gpus_per_worker": f"{job.gpus_per_worker:g}", "dsbs.cpus_per_worker": f"{job.cpus_per_worker:g}"}


FINAL_METRICS = ("accuracy", "valid_accuracy", "examples_per_s", "wall_seconds", "train_seconds", "loop_seconds",
                 "first_loss", "final_loss", "train_rows", "dropped_unparsed", "rows_without_rationale",
                 "rows_with_rationale", "dropped_by_filter", "resumed_from_step")


def run_trial(job: TrainConfig, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_name: str,
              teacher_lines: dict | None = None, prices: dict | None = None, prompts_dirs: dict | None = None,
              use_ray: bool = True) -> dict:
    """One grid point: its MLflow child run (found again on rerun), training (resuming from the last
    checkpoint), final metrics and artifacts, then the done marker. A finished trial is not trained
    again: its stored result comes back with skipped=True. use_ray False: the job runs in this
    process (a Tune trial actor that holds the job's resources itself).

    The trial's phases (dsbs_ray.phases) are the job's plus `logging`: everything here outside the
    job is MLflow; `other` is what no phase accounts for in the trial's wall time."""
    from dsbs_ray import tracking
    from dsbs_ray.ledger import money, teacher_tokens, trial_ledger
    from dsbs_ray.train import train

    t0 = time.perf_counter()
    job_seconds = 0.0
    run_dir = Path(job.output_dir) / job.name()
    c = tracking.client(tracking_uri)
    tags = {"dsbs.role": "trial", "dsbs.sweep": sweep_name, "dsbs.trial": job.name(),
            "mlflow.parentRunId": parent_run_id}
    result = stored_result(job)
    if result is not None:
        run = tracking.find_run(c, experiment_id, tags)
        if run is not None and run.info.status == "FINISHED":
            return {**result, "skipped": True}
    run_id = tracking.find_or_start_run(c, experiment_id, job.name(), tags)
    tracking.log_params(c, run_id, trial_params(job))
    tracking.set_tags(c, run_id, trial_layout_tags(job))
    if result is None:  # (else: finished before, but its MLflow run was not: log it now, no training)
        try:
            result = train(job.model_copy(update={"tracking_uri": tracking_uri, "mlflow_run_id": run_id}), use_ray)
            job_seconds = result["wall_seconds"]
        except BaseException:
            c.set_terminated(run_id, "FAILED")
            raise
    tracking.log_params(c, run_id, {"parameters": result["parameters"]})
    tracking.set_tags(c, run_id, {"dsbs.device": result.get("device"), "dsbs.node_id": result.get("node_id"),
                                  "dsbs.compute_precision": result.get("precision"),
                                  "dsbs.restarted_afresh": result.get("restarted_afresh")})
    line = (teacher_lines or {}).get(f"{job.task}/{job.teacher}") if job.uses_teacher else None
    if line:  # the teacher's own accuracy on the test rows, for the report's teacher line
        tracking.set_tags(c, run_id, {"dsbs.teacher_split": line["split"], "dsbs.teacher_rows": line["rows"]})
    teacher_metrics = {f"teacher_{k}": line.get(k) for k in ("accuracy", "first_sample_accuracy", "agreement")} if line else {}
    ledger = trial_ledger(job, result, teacher_tokens(job, (prompts_dirs or {}).get(job.teacher)))
    ledger |= money(ledger, Prices(**(prices or {})))
    tracking.set_tags(c, run_id, {"dsbs.accelerator": ledger["accelerator"],
                                  "dsbs.teacher_tokens_counted": ledger["teacher_tokens_counted"]})
    tracking.log_metrics(c, run_id, {k: result.get(k) for k in FINAL_METRICS} | {"parameters": result["parameters"]}
                         | {"test_accuracy": result["accuracy"]} | teacher_metrics | ledger
                         | {"teacher_tokens": ledger["teacher_prompt_tokens"] + ledger["teacher_output_tokens"]},
                         step=job.max_steps)
    (run_dir / "config.json").write_text(json.dumps(job.model_dump(), indent=2))
    for name in ("predictions_test.jsonl", "predictions_valid.jsonl", "config.json"):
        if (run_dir / name).exists():
            c.log_artifact(run_id, str(run_dir / name))
    if job_seconds or "trial_seconds" not in result:  # (else: a finished trial logged to another store again)
        phases = Phases({k: v for k, v in (result.get("phases") or {}).items() if k != "other"})
        trial_seconds = time.perf_counter() - t0 + (result.get("wall_seconds") or 0.0) - job_seconds
        phases.add("logging", time.perf_counter() - t0 - job_seconds)  # (the rest of this function: MLflow)
        result["phases"], result["trial_seconds"] = phases.table(trial_seconds), trial_seconds
    tracking.log_metrics(c, run_id, phase_metrics(result["phases"]) | {"trial_seconds": result["trial_seconds"]},
                         step=job.max_steps)
    c.set_terminated(run_id, "FINISHED")
    result = {**result, "mlflow_run_id": run_id, "method": sweep_method(job), "run_name": job.name(), "ledger": ledger}
    write_result(job, result)
    return {**result, "skipped": False}


def _tune_trial(config: dict, jobs: list[dict], tracking: dict):  # tracking: run_trial's keyword arguments
    """The Tune function trainable: one grid point, reported to Tune once it is done. A one-worker
    job runs right here, in the trial actor that holds its resources (trial_resources): no Ray Train
    controller, worker group or placement group to start, and with reuse_actors the next trial finds
    torch and transformers already imported. Several workers: a Ray Train job (its own workers)."""
    import ray.tune
    import torch

    job = TrainConfig(**jobs[config["trial"]])
    in_process = job.workers == 1
    if in_process:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    try:
        result = run_trial(job, **tracking, use_ray=not in_process)
    finally:
        if in_process:
            from dsbs_ray.train import free_memory

            free_memory()  # the next trial of this (reused) actor starts from a lean process
    ray.tune.report({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None})


def _trial_lines():
    """A Tune callback that prints one line per trial that ends (Tune's own tables stay off: verbose 0)."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self, jobs: list[TrainConfig]):
            self.jobs = jobs

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            steps = r.get("train_seconds") or 0.0
            print(f"trial {self.jobs[trial.config['trial']].name()} finished: accuracy {r.get('accuracy', float('nan')):.4f}, "
                  f"{r.get('trial_seconds') or 0.0:.1f} s ({steps:.1f} s optimizer steps)", file=sys.stderr)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {self.jobs[trial.config['trial']].name()} failed (attempt {trial.num_failures}); "
                  f"its error: {trial.error_file or 'see the Ray logs'}", file=sys.stderr)

    return TrialLines


def trial_resources(job: TrainConfig):
    """What a trial's actor holds: a one-worker job's CPUs and GPUs (it trains in the actor); for a
    Ray Train job a sliver of a CPU (the job's workers hold their own)."""
    from ray.tune import PlacementGroupFactory

    if job.workers == 1:
        bundle = {"CPU": job.cpus_per_worker} | ({"GPU": job.gpus_per_worker} if job.gpus_per_worker else {})
        return PlacementGroupFactory([bundle])
    return PlacementGroupFactory([{"CPU": 0.01}])


def longest_first(jobs: list[TrainConfig]) -> list[TrainConfig]:
    """Trials ordered by estimated cost, biggest first, so the sweep does not end on one long trial
    while the other slots idle: cost ~ parameters x steps x (2 for dsbs: two targets)."""
    from dsbs_ray.students import estimate_parameters

    sizes = {s: estimate_parameters(s) or 0 for s in {j.student for j in jobs}}
    return sorted(jobs, key=lambda j: -sizes[j.student] * j.max_steps * (2 if j.method == "dsbs" else 1))


def check_teachers(cfg: SweepConfig, jobs: list[TrainConfig]) -> list[dict]:
    """Every check on the teachers, before any engine or trial starts (an endpoint that does not
    answer, a model that cannot be loaded, a prompt file, a filter that needs gold the split lacks).
    Returns the annotation requests: per open teacher and task, its train rows (what the trials
    read) and test rows (the teacher's own accuracy line, on the rows the students are scored on)."""
    from dsbs_ray.prompts import load_prompt
    from dsbs_ray.tasks import load_examples, source_tasks, teacher_examples
    from dsbs_ray.teacher import _resolve_model

    needed = {(j.task, j.teacher) for j in jobs if j.uses_teacher}
    if "agree-gold" in cfg.filter_list():
        for task in sorted({t for t, _ in needed}):
            rows = load_examples(task, "train", cfg.data_dir)[:cfg.train_limit]
            missing = sum(not e.gold.strip() for e in rows)
            if missing:
                raise UserError(f"rationale_filter: agree-gold needs gold labels, but {missing} of {len(rows)} "
                                f"rows of {task}/train have none; use none or agree-vote")
    requests = []
    for teacher in cfg.teacher_list():
        if teacher == "released":
            continue
        spec = None
        for task in cfg.tasks:
            if (task, teacher.label()) not in needed:
                continue
            if source_tasks(task, "train") != [get_task(task).name]:
                raise UserError(f"tasks: {task} takes its train rows from other tasks ("
                                f"{', '.join(source_tasks(task, 'train'))}), which an open teacher annotates one "
                                f"task at a time; use the released outputs (teacher: released)")
            spec = spec or _resolve_model(teacher)
            prompt = load_prompt(task, teacher.prompts_dir)
            for split, limit in (("train", cfg.train_limit), ("test", cfg.test_limit)):
                examples = teacher_examples(task, split, cfg.data_dir)[:limit]
                if not examples:
                    raise UserError(f"task {task}: split {split} has no rows to annotate")
                requests.append({"spec": spec, "task": task, "split": split, "examples": examples, "prompt": prompt})
    return requests


def annotate_teachers(cfg: SweepConfig, jobs: list[TrainConfig], requests: list[dict]) -> dict:
    """The annotation stage: each request's missing samples generated into the store (resumable,
    shared), the engines gone before the first trial. Returns the teachers' lines per "task/teacher":
    accuracy (the vote's), first-sample accuracy, agreement, split, rows."""
    from dsbs_ray.engines import wait_engines_released
    from dsbs_ray.report import released_teacher_line
    from dsbs_ray.teacher import Request, generate_all

    lines, generated = {}, 0
    teachers: dict[str, list[dict]] = {}  # one pipeline per teacher: its engines start once for every task and split
    for r in requests:
        teachers.setdefault(r["spec"].label(), []).append(r)
    for group in teachers.values():
        reports = generate_all(group[0]["spec"], [Request(get_task(r["task"]), r["split"], r["examples"], r["prompt"])
                                                  for r in group], cfg.annotation_store)
        for r, report in zip(group, reports):
            generated += report["generated_now"]
            scores = ", ".join(f"{what} {report[key]:.4f}" if report[key] is not None else f"{what} - (no gold)"
                               for what, key in (("vote accuracy", "vote_accuracy"),
                                                 ("first sample", "first_sample_accuracy")))
            print(f"teacher {r['spec'].label()} on {get_task(r['task']).name}/{r['split']}: {report['rows']} rows x "
                  f"{r['spec'].samples} samples ({report['generated_now']} generated now), {scores}, "
                  f"agreement {report['agreement']:.3f}", file=sys.stderr)
            if r["split"] == "test":
                lines[f"{r['task']}/{r['spec'].label()}"] = report | {"split": "test"}
    if generated:
        wait_engines_released()
    for task, teacher in {(j.task, j.teacher) for j in jobs if j.uses_teacher and j.annotations is None}:
        line = released_teacher_line(task, cfg.data_dir)
        if line:
            lines[f"{task}/{teacher}"] = line
    return lines


def check_sweep(cfg: SweepConfig) -> tuple[list[TrainConfig], str, list[dict]]:
    """Every check that can fail on user input, before any engine or trial launches: the grid, the
    students, the data, the teachers and their annotations, the tracking store. Returns (resolved
    jobs, tracking URI, annotation requests)."""
    from dsbs_ray import tracking

    fingerprints: dict = {}  # one hash of the data per (task, data dir, teacher use), not one per trial
    jobs = [resolve_paths(j, fingerprints) for j in expand(cfg)]
    checked = set()
    for job in jobs:
        key = (job.student, job.task, job.uses_teacher, job.annotations, job.data_dir, job.zero)
        if key not in checked:
            validate(job)
            checked.add(key)
    requests = check_teachers(cfg, jobs)
    uri = tracking.tracking_uri(cfg.tracking_uri)
    tracking.check_reachable(uri)
    return longest_first(jobs), uri, requests


def run_sweep(cfg: SweepConfig) -> dict:
    """Annotate what the trials need, run the grid with Ray Tune (a one-worker trial in its Tune
    actor, a bigger one a Ray Train job), then the report. Returns a summary."""
    t0 = time.time()
    jobs, uri, requests = check_sweep(cfg)
    experiment = cfg.experiment or cfg.name
    sweep_dir = Path(cfg.output_dir).resolve() / cfg.name
    with hold(sweep_dir, "sweep", "output_dir"):  # one sweep at a time per sweep dir: run dirs, Tune state, report
        return _run_locked(cfg, jobs, uri, experiment, sweep_dir, t0, requests)


FAILURE_TAG = "dsbs.failure"  # on the parent run: why the sweep stopped before its trials (one line)


def _run_locked(cfg: SweepConfig, jobs: list[TrainConfig], uri: str, experiment: str, sweep_dir: Path,
                t0: float, requests: list[dict]) -> dict:
    from dsbs_ray import tracking
    from dsbs_ray.report import build_report
    from dsbs_ray.ray_init import init_ray

    finished = {j.name() for j in jobs if stored_result(j) is not None}  # a bad one stops us here
    (sweep_dir / "sweep.json").write_text(json.dumps(cfg.model_dump(), indent=2))

    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, experiment)
    parent = tracking.find_or_start_run(c, exp_id, cfg.name, {"dsbs.role": "sweep", "dsbs.sweep": cfg.name})
    # the grid as tags, not params: a grown sweep keeps its parent run, and MLflow params are write-once
    tracking.set_tags(c, parent, {"dsbs.tasks": ",".join(cfg.tasks), "dsbs.students": ",".join(s.id for s in cfg.students),
                                  "dsbs.fractions": ",".join(f"{f:g}" for f in cfg.fractions),
                                  "dsbs.methods": ",".join(cfg.methods), "dsbs.seeds": ",".join(map(str, cfg.seeds)),
                                  "dsbs.teachers": ",".join(teacher_name(t) for t in cfg.teacher_list()),
                                  "dsbs.rationale_filters": ",".join(cfg.filter_list()),
                                  "dsbs.trials": str(len(jobs))})
    c.log_artifact(parent, str(sweep_dir / "sweep.json"))
    if FAILURE_TAG in c.get_run(parent).data.tags:  # a rerun: the last run's failure is not this one's
        c.delete_tag(parent, FAILURE_TAG)
    tracking.set_tags(c, parent, {f"dsbs.price.{k}": f"{v:g}" for k, v in cfg.prices.model_dump().items()})
    ui = tracking.ui_base(uri)
    tracking.set_trials_view(c, exp_id, parent, (
        f"Sweep **{cfg.name}**: {len(jobs)} trials ({', '.join(cfg.tasks)}; students "
        f"{', '.join(student_name(s.id) for s in cfg.students)}; methods {', '.join(cfg.methods)}). Each trial is a run; "
        f"cost_usd is its ledger at the sweep's prices. The report (frontier, figures, intervals) is on the parent run "
        f"[{cfg.name}]({tracking.run_url(ui, exp_id, parent)}): its description and artifacts under report/."))

    dashboard = init_ray() if len(finished) < len(jobs) else None  # the teacher stage and the trials share it
    print(f"sweep {cfg.name}: {len(jobs)} trials ({len(finished)} already finished), "
          f"{cfg.max_concurrent_trials} at a time; MLflow {uri} experiment {experiment!r}"
          + (f"; Ray dashboard {dashboard}" if dashboard else ""), file=sys.stderr)
    errors = {}
    try:
        teacher_lines = annotate_teachers(cfg, jobs, requests)  # starts Ray only for rows still to generate
        trial_kwargs = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent,
                        "sweep_name": cfg.name, "teacher_lines": teacher_lines, "prices": cfg.prices.model_dump(),
                        "prompts_dirs": {teacher_name(t): t.prompts_dir for t in cfg.teacher_list()
                                         if t != "released"}}
        todo = []
        for job in jobs:  # a finished trial is settled here (its MLflow run found, or logged from its result)
            if job.name() in finished:
                run_trial(job, **trial_kwargs)
            else:
                todo.append(job)
        if todo:
            import ray.tune as tune

            shutil.rmtree(sweep_dir / "tune", ignore_errors=True)  # Tune's own bookkeeping; run dirs say what is done
            trainable = tune.with_resources(
                tune.with_parameters(_tune_trial, jobs=[j.model_dump() for j in todo], tracking=trial_kwargs),
                lambda config: trial_resources(todo[config["trial"]]))
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(list(range(len(todo))))},
                tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True),
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=[_trial_lines()(todo)],
                                          failure_config=tune.FailureConfig(max_failures=cfg.max_retries)),
            )
            for r in tuner.fit():
                if r.error is not None:
                    text = str(r.error).strip()
                    errors[todo[r.config["trial"]].name()] = text.splitlines()[-1][:300] if text else repr(r.error)
    except BaseException as e:
        if isinstance(e, (RunFailure, UserError)):  # (a teacher stage that failed: no trial started)
            tracking.set_tags(c, parent, {FAILURE_TAG: str(e)[:1000]})
        c.set_terminated(parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise

    results = []
    for job in jobs:
        row = {"trial": job.name(), "method": sweep_method(job), "fraction": job.fraction, "student": job.student}
        r = stored_result(job)
        if r is not None:
            row |= {"status": "skipped" if job.name() in finished else "finished", "accuracy": r["accuracy"],
                    "examples_per_s": r.get("examples_per_s"), "wall_seconds": r.get("wall_seconds"),
                    "loop_seconds": r.get("loop_seconds"), "train_seconds": r.get("train_seconds"),
                    "trial_seconds": r.get("trial_seconds"), "phases": r.get("phases"),
                    "family": r.get("family"), "eval_seconds_per_100_rows": r.get("eval_seconds_per_100_rows")}
        else:
            row |= {"status": "failed", "error": errors.get(job.name(), "did not finish")}
        results.append(row)
    failed = [r for r in results if r["status"] == "failed"]
    ran = [r["phases"] for r in results if r["status"] == "finished" and r.get("phases")]
    if ran:  # where the trials that ran now spent their time
        print(f"sweep {cfg.name}: where the {len(ran)} trials' time went (seconds summed over trials):\n"
              f"{format_phase_table(ran)}", file=sys.stderr)
    # no report without a finished trial: the failures are the news, not a missing report
    report = (build_report(experiment, uri, out_dir=sweep_dir / "report", parent_run_id=parent)["markdown"]
              if len(failed) < len(results) else None)
    c.set_terminated(parent, "FAILED" if failed else "FINISHED")
    return {"sweep": cfg.name, "trials": len(jobs), "finished": sum(r["status"] == "finished" for r in results),
            "skipped": sum(r["status"] == "skipped" for r in results), "failed": len(failed),
            "experiment": experiment, "tracking_uri": uri, "parent_run_id": parent,
            "mlflow_ui": tracking.experiment_url(ui, exp_id),
            "report": report, "wall_seconds": time.time() - t0, "results": results,
            "phases": {name: {"seconds": sec, "share": share} for name, sec, share in phase_rows(ran)} if ran else None}
