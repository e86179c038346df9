"""The training recipe: config in, metrics out. `train_loop` is plain torch: it runs in one process
with no Ray (LocalSession), or on each Ray Train worker (RaySession); `train` checks the job on the
driver, then runs the loop there or on Ray Train. What changes per student family lives in
dsbs_ray.families; the rest is shared:

    job.py        TrainConfig, run names, paths, driver-side checks
    data.py       which rows, token ids, length-bucketed batches
    families/     per family: prompts/targets as ids, batches, the multi-task forward, generation
    loss.py       alpha * L_label + (1 - alpha) * L_rationale over the global batch
    backends.py   plain torch / DDP and DeepSpeed ZeRO
    sessions.py   one process, or a Ray Train worker
    evaluate.py   greedy generation scored by the task metric
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsbs_ray.backends import (
    DeepSpeedBackend, TorchBackend, checkpoint_layout, deepspeed_config, local_parameters, pin_deepspeed_accelerator,
    single_process_group, use_bf16,
)
from dsbs_ray.data import bucketed_batches, prepare_data, shard_batch, trained_tokens
from dsbs_ray.errors import UserError
from dsbs_ray.evaluate import evaluate
from dsbs_ray.families import family_for, family_of
from dsbs_ray.job import TrainConfig, prune_run, resolve_paths, stored_result, validate, write_result
from dsbs_ray.locks import hold
from dsbs_ray.loss import multitask_loss
from dsbs_ray.phases import Phases
from dsbs_ray.ray_init import init_ray
from dsbs_ray.sessions import LocalSession, RaySession
from dsbs_ray.students import count_parameters, fetch_student, load_student, load_tokenizer, resolve_student
from dsbs_ray.task_spec import get_task


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


@dataclass
class Loaded:
    """The student as the loop trains it: the family's multi-task module inside its backend."""

    module: torch.nn.Module
    backend: TorchBackend | DeepSpeedBackend
    tokenizer: object
    family: object
    bf16: bool
    accelerator: str | None  # DeepSpeed's, when ZeRO is on
    hf_ds_config: object  # for ZeRO-3: while it lives, from_pretrained builds students partitioned
    loaded_parameters: int  # the most parameters one rank holds (ZeRO-3 partitions them)


def load_for_training(cfg: TrainConfig, device, world: int, phases: Phases) -> tuple[Loaded, dict]:
    """(the student in its backend, the job's data): DeepSpeed's process group first where ZeRO is on
    (start), then the weights (load) and the rows as token ids (data)."""
    bf16 = use_bf16(cfg, device)
    with phases.time("load"):
        path = fetch_student(cfg.student)  # before zero.Init below: a download or a conversion builds whole models
    ds_config, hf_ds_config, accelerator = None, None, None
    with phases.time("start"):
        if cfg.zero != "off":
            accelerator = pin_deepspeed_accelerator(device)
            single_process_group(device)
            import deepspeed

            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
            ds_config = deepspeed_config(cfg, bf16)
            if cfg.zero == "3":
                from transformers.integrations import HfDeepSpeedConfig

                hf_ds_config = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(cfg.seed)
    with phases.time("load"):
        student, tokenizer = load_student(path, device.type)
        family = family_of(student.config)
        loaded = torch.tensor([local_parameters(student)], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(loaded, op=torch.distributed.ReduceOp.MAX)
    with phases.time("data"):
        data = prepare_data(cfg, tokenizer, family)
    with phases.time("load"):
        module = family.MultiTask(student)
        backend = (TorchBackend(module, cfg, world, device) if cfg.zero == "off"
                   else DeepSpeedBackend(module, cfg, ds_config, device))
    return Loaded(module, backend, tokenizer, family, bf16, accelerator, hf_ds_config, int(loaded.item())), data


class Schedule:
    """The global batches, step by step: length-bucketed epochs, each reshuffled by (seed, epoch), so
    a resumed run draws the same batches as one that never stopped. Holds one epoch at a time."""

    def __init__(self, keys: list, cfg: TrainConfig, min_rows: int):
        self.keys, self.cfg, self.min_rows = keys, cfg, min_rows
        self.epochs = {0: bucketed_batches(keys, cfg.batch_size, cfg.seed, 0, min_rows)}
        self.per_epoch = len(self.epochs[0])  # the same for every epoch: it depends on sizes, not order

    def __call__(self, step: int) -> list[int]:
        epoch = step // self.per_epoch
        if epoch not in self.epochs:
            self.epochs = {epoch: bucketed_batches(self.keys, self.cfg.batch_size, self.cfg.seed, epoch, self.min_rows)}
        return self.epochs[epoch][step % self.per_epoch]


def resume(cfg: TrainConfig, session, backend, world: int) -> tuple[int, str | None]:
    """(the step to start from, why the run starts afresh or None): the session's last checkpoint,
    unless it was saved with another layout (world size, ZeRO stage, precision)."""
    layout = checkpoint_layout(cfg, world)
    found = {"step": 0, "restart": None}

    def load(directory: Path) -> bool:
        saved = json.loads((directory / "trainer_state.json").read_text())
        if saved.get("layout") != layout:
            found["restart"] = (f"checkpoint at step {saved.get('step')} was saved with {saved.get('layout')}, "
                                f"this run is {layout}: starting afresh from step 0")
            return False
        backend.load(directory)
        found["step"] = saved["step"]
        return True

    session.restore(load)
    return found["step"], found["restart"]


def train_step(cfg: TrainConfig, run: Loaded, tokens: dict, keys: list, rows: list[int], world: int, rank: int,
               device) -> float:
    """One optimizer step on a global batch: this rank's micro-batches forward and backward, the loss
    normalised by the global batch's target tokens (so micro-batches and ranks add up to one batch)."""
    n_label = sum(len(tokens["labels"][i]) for i in rows)
    n_rationale = sum(len(tokens["rationale_ids"][i]) for i in rows) if "rationale_ids" in tokens else 0

    def loss_fn(pred, expl):
        return multitask_loss(pred, expl, cfg.alpha, n_label, n_rationale, scale=world)

    micro_batches = shard_batch(rows, keys, world, rank, cfg.grad_accum)
    step_loss = 0.0
    for m, micro in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in run.family.collate(tokens, micro, run.family.pad_id(run.tokenizer)).items()}
        step_loss += run.backend.accumulate(batch, loss_fn, last_micro=m == len(micro_batches) - 1) / world
    run.backend.step()
    return step_loss


@dataclass
class Progress:
    """What the loop has counted in this process."""

    start_step: int = 0
    restart: str | None = None  # why the run started afresh from a checkpoint it could not load
    window_loss: float = 0.0  # summed step losses since the last evaluation
    window_steps: int = 0
    train_seconds: float = 0.0
    examples: int = 0
    eval_rows: int = 0
    first_loss: float | None = None  # mean loss over the first evaluation window of this run
    last: dict = field(default_factory=dict)  # the last evaluation's metrics


def train_loop(config: dict, session=None) -> dict | None:
    """Train one student; returns the final metrics on rank 0 (None elsewhere).

    config: a TrainConfig as a dict. session: LocalSession (default) or RaySession.
    """
    loop_start, loop_started_at = time.perf_counter(), time.time()
    phases, progress = Phases(), Progress()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a trial's lines are its steps, evaluations and result
    cfg = TrainConfig(**config)
    run_dir = Path(cfg.output_dir).resolve() / cfg.name()
    run_dir.mkdir(parents=True, exist_ok=True)
    session = session or LocalSession(run_dir)
    rank, world = session.rank, session.world
    device = session.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run, data = load_for_training(cfg, device, world, phases)
    tokens = data["train"]
    keys = [run.family.length_key(tokens, i) for i in range(len(tokens["labels"]))]
    with phases.time("checkpoint"):
        progress.start_step, progress.restart = resume(cfg, session, run.backend, world)
    if progress.start_step or progress.restart:
        _log(rank, f"resumed from checkpoint at step {progress.start_step}" if progress.start_step else progress.restart)
    schedule = Schedule(keys, cfg, min_rows=world * cfg.grad_accum)

    def evaluate_split(split: str, final: bool) -> float:
        progress.eval_rows += len(data[split]["labels"])
        with phases.time("eval"):
            return evaluate(run.module.student, run.tokenizer, run.family, data, split, cfg, device, rank, world,
                            synced=cfg.zero == "3" and world > 1,
                            predictions_path=run_dir / f"predictions_{split}.jsonl" if final else None)

    def report(metrics: dict, checkpoint: bool):
        if not checkpoint:
            with phases.time("logging"):
                return session.report(metrics, None)
        with phases.time("checkpoint"), tempfile.TemporaryDirectory(prefix="dsbs_ckpt_") as d:
            run.backend.save(Path(d), rank, last=metrics["step"] == cfg.max_steps)
            if rank == 0:
                (Path(d) / "trainer_state.json").write_text(json.dumps(
                    {"step": metrics["step"], "layout": checkpoint_layout(cfg, world)}))
            session.report(metrics, Path(d) if any(Path(d).iterdir()) else None)

    live = _live_metrics(cfg) if rank == 0 else None
    run.module.train()
    for step in range(progress.start_step, cfg.max_steps):
        t0 = time.perf_counter()
        rows = schedule(step)
        progress.window_loss += train_step(cfg, run, tokens, keys, rows, world, rank, device)
        progress.window_steps += 1
        step_seconds = time.perf_counter() - t0
        phases.add("steps", step_seconds)
        progress.train_seconds += step_seconds
        progress.examples += len(rows)
        done = step + 1
        final = done == cfg.max_steps
        evaluate_now = done % cfg.eval_every == 0 or final
        checkpoint_now = done % cfg.checkpoint_every == 0 or final
        if not (evaluate_now or checkpoint_now):
            continue
        metrics = evaluation(cfg, run, done, progress, evaluate_split, phases, world, rank) if evaluate_now \
            else {"step": done}
        # the last step's checkpoint only where the run keeps them all: a finished run resumes nothing
        report(metrics, checkpoint=checkpoint_now and (not final or cfg.keep == "all"))
        if live and evaluate_now:
            with phases.time("logging"):
                live(metrics, done)

    if progress.last.get("step") == cfg.max_steps:  # evaluated at the last step already
        accuracy = {"valid_accuracy": progress.last["valid_accuracy"], "accuracy": progress.last["test_accuracy"]}
    else:  # resumed from a checkpoint at the last step: nothing ran in this process
        accuracy = {"valid_accuracy": evaluate_split("valid", True), "accuracy": evaluate_split("test", True)}
    with phases.time("export"):
        weights = run.backend.full_state_dict(rank) if cfg.keep != "none" else None
        if rank == 0 and cfg.keep != "none":
            run.module.student.save_pretrained(run_dir / "model", state_dict=weights)
            run.tokenizer.save_pretrained(run_dir / "model")
    run.hf_ds_config = None
    if rank != 0:
        return None
    return accuracy | job_metrics(cfg, run, data, schedule, progress, phases, run_dir) | {
        "loop_seconds": time.perf_counter() - loop_start, "loop_started_at": loop_started_at, "device": device.type,
        "world": world, "node_id": session.node_id()}


def evaluation(cfg: TrainConfig, run: Loaded, done: int, progress: Progress, evaluate_split, phases: Phases,
               world: int, rank: int) -> dict:
    """An evaluation point: the window's mean loss (over ranks), valid accuracy (its eval_limit rows),
    and at the last step the whole test split (its test_limit rows); one line on rank 0."""
    loss_t = torch.tensor([progress.window_loss], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(loss_t)
    final = done == cfg.max_steps
    eval_start, rows_before = phases.seconds.get("eval", 0.0), progress.eval_rows
    metrics = {"step": done, "loss": loss_t.item() / progress.window_steps,
               "valid_accuracy": evaluate_split("valid", final)}  # the last evaluation writes the predictions files
    if final:
        metrics["test_accuracy"] = evaluate_split("test", final)
    eval_s = phases.seconds["eval"] - eval_start
    metrics |= {"lr": run.backend.lr(), "examples_per_s": progress.examples / max(progress.train_seconds, 1e-9),
                "examples": progress.examples, "train_seconds": progress.train_seconds, "eval_seconds": eval_s}
    test_part = f" test_accuracy {metrics['test_accuracy']:.4f}" if final else ""
    _log(rank, f"step {done}/{cfg.max_steps} loss {metrics['loss']:.4f} valid_accuracy {metrics['valid_accuracy']:.4f}"
               f"{test_part} {metrics['examples_per_s']:.1f} ex/s; eval {eval_s:.1f} s for "
               f"{progress.eval_rows - rows_before} rows")
    progress.window_loss, progress.window_steps, progress.last = 0.0, 0, metrics
    progress.first_loss = metrics["loss"] if progress.first_loss is None else progress.first_loss
    return metrics


def job_metrics(cfg: TrainConfig, run: Loaded, data: dict, schedule: Schedule, progress: Progress, phases: Phases,
                run_dir: Path) -> dict:
    """A finished job's record (result.json, MLflow): what trained on what, how long each part took."""
    tokens = data["train"]
    return {
        "task": get_task(cfg.task).name, "task_spec": cfg.task, "student": cfg.student, "family": run.family.NAME,
        "method": cfg.method, "label_source": cfg.label_source, "fraction": cfg.fraction, "seed": cfg.seed,
        "parameters": count_parameters(run.module.student), "train_rows": len(tokens["labels"]),
        # every step's tokens, also those of steps a resumed run did before (the ledger is the job's)
        "train_tokens": sum(trained_tokens(tokens, schedule(s)) for s in range(cfg.max_steps)),
        **{k: data["rows"][k] for k in ("dropped_unparsed", "rows_without_rationale", "rows_with_rationale",
                                        "dropped_by_filter")},
        "steps": cfg.max_steps, "resumed_from_step": progress.start_step, "restarted_afresh": progress.restart,
        "examples_per_s": progress.examples / progress.train_seconds if progress.train_seconds else None,
        "train_seconds": progress.train_seconds, "run_dir": str(run_dir), "phases": phases.seconds,
        "eval_rows": progress.eval_rows,
        "eval_seconds_per_100_rows": 100 * phases.seconds.get("eval", 0.0) / max(1, progress.eval_rows),
        "test_rows": len(data["test"]["labels"]), "valid_rows": len(data["valid"]["labels"]),
        "predictions": str(run_dir / "predictions_test.jsonl"), "first_loss": progress.first_loss,
        "final_loss": progress.last.get("loss"), "precision": "bf16" if run.bf16 else "fp32",
        "deepspeed_accelerator": run.accelerator,
        "master_dtype": str(next(run.module.student.parameters()).dtype).removeprefix("torch."),
        "max_rank_loaded_parameters": run.loaded_parameters,
    }


# ---------------------------------------------------------------------------------------------
# Ray Train wrapper


def _ray_worker(config: dict):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    return train_loop(config, RaySession())


def free_memory() -> None:
    """Give a finished job's memory back to the OS, for a process that runs the next job (a reused
    Tune trial actor). glibc keeps freed heap for reuse: measured, a SmolLM2 job left 2.7 GB resident
    after gc, 0.6 GB after malloc_trim; two reused actors on 24 GB ran out of memory without it."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).malloc_trim(0)


def train(cfg: TrainConfig, use_ray: bool = True) -> dict:
    """Run one job: checks first (clear errors before any worker starts), then the loop on
    cfg.workers Ray Train workers, or in this process when use_ray is False.

    A finished job leaves its result in its run dir (result.json) and, once it is there, only what
    `keep` asks for: a rerun returns that result (skipped: True) and trains nothing."""
    t0 = time.perf_counter()
    cfg = resolve_paths(cfg)
    validate(cfg)
    if not use_ray and cfg.workers != 1:
        raise UserError("workers: more than one worker needs Ray (drop --no-ray)")
    run_dir = Path(cfg.output_dir).resolve() / cfg.name()
    with hold(run_dir, "run of this job", "output_dir"):  # its checkpoints are one run's
        stored = stored_result(cfg)
        if stored is not None:
            return {**stored, "skipped": True}
        phases = Phases()
        with phases.time("data"):  # fills the token cache once; fails early on bad data
            prepare_data(cfg, load_tokenizer(cfg.student), family_for(resolve_student(cfg.student)))
        metrics = _run_job(cfg, use_ray, phases)
        metrics["wall_seconds"] = time.perf_counter() - t0
        metrics["phases"] = phases.table(metrics["wall_seconds"])
        write_result(cfg, metrics)
        metrics["checkpoint"] = prune_run(run_dir, cfg.keep, metrics.get("checkpoint"))
        return {**metrics, "skipped": False}


def _run_job(cfg: TrainConfig, use_ray: bool, phases: Phases) -> dict:
    """The loop in this process, or on Ray Train; the loop's phases join `phases`, and on Ray Train
    the time from fit() to the loop's first line is start-up (controller, worker group, process group)."""
    if not use_ray:
        session = LocalSession(Path(cfg.output_dir).resolve() / cfg.name())
        metrics = train_loop(cfg.model_dump(), session)
        metrics["checkpoint"] = session.checkpoint_path()
    else:
        import ray.train
        from ray.train.torch import TorchTrainer

        fit_started_at = time.time()
        with phases.time("start"):
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
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                logging_config=ray.LoggingConfig(log_level="WARNING")),  # its INFO lines: Ray's log folder only
        )
        result = trainer.fit()
        metrics = dict(result.return_value)
        phases.add("start", max(0.0, metrics["loop_started_at"] - fit_started_at - phases.seconds["start"]))
        metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    phases.merge(metrics["phases"])
    return metrics
