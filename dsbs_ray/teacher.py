"""Teacher annotations: scoring a teacher's outputs against gold, and annotating task splits with an
open teacher (Ray Data -> vLLM through `ray.data.llm`, or an OpenAI-compatible endpoint: the engines
are dsbs_ray.engines'), every split a command asks for through one pipeline.

Output is a data dir in the paper's released layout, so training reads our annotations exactly like
the PaLM ones:
    OUT/TASK/TASK_SPLIT.json              the annotated rows (JSON lines)
    OUT/TASK/llm/SPLIT_CoT_0.json         raw teacher outputs in row order (sample 0)
    OUT/TASK/annotations_SPLIT.parquet    row id, raw, rationale, label, parse status, teacher, ...
    OUT/TASK/shards/SPLIT/*.parquet       what finished so far; a rerun skips these rows
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsbs_ray import annotations, rationales
from dsbs_ray.annotations import DEFAULT_STORE, FAILED
from dsbs_ray.cache import hash_file, read_json_object
from dsbs_ray.data import attach_teacher
from dsbs_ray.embedded import SMOLLM2, smollm2_path
from dsbs_ray.engines import Stalled, last_engine_error, request_seed, watched
from dsbs_ray.errors import RunFailure, UserError
from dsbs_ray.locks import hold
from dsbs_ray.metrics import accuracy
from dsbs_ray.prompts import Prompt, load_prompt
from dsbs_ray.tasks import Parsed, Task, get_task, is_labelled, load_examples, load_rows, load_teacher_outputs


def teacher_report(task_name: str, split: str, data_dir: Path | str | None = None) -> dict:
    """Accuracy of the teacher's labels in TASK/llm/ against the split's gold labels.

    A row whose output does not parse counts as wrong and as a parse failure.
    """
    task = get_task(task_name)
    outputs = load_teacher_outputs(task_name, split, data_dir)
    examples = load_examples(task_name, split, data_dir)
    if not is_labelled(examples):
        raise UserError(f"task {task.name}: split {split} has no gold labels (column {task.spec.label!r}) to score "
                        f"the teacher against")
    rows = attach_teacher(examples, outputs, task, where=f"{task.name}/{split}")
    acc = accuracy([r.teacher_label for r in rows], [r.gold for r in rows], task.match)
    return {
        "task": task.name,
        "split": split,
        "n": len(rows),
        "accuracy": round(acc, 4),
        "parse_failures": sum(r.parse_status != "ok" for r in rows),
    }


# ---------------------------------------------------------------------------------------------
# Annotation


class TeacherSpec(BaseModel):
    """A teacher and how it samples: what keys its annotations in the store (with the prompt)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="names the teacher in runs and reports (default: from model and sampling)")
    model: str = SMOLLM2  # HF id or path; the embedded SmolLM2 by default
    endpoint: str | None = None  # OpenAI-compatible server (e.g. vllm serve); model then names the served model
    prompts_dir: str | None = None  # NAME.yaml few-shot prompts instead of the task spec's own
    temperature: float = Field(0.0, ge=0)
    samples: int = Field(1, ge=1, description="completions per row; > 1 votes (self-consistency), needs temperature > 0")
    max_new_tokens: int = Field(128, ge=1)
    structured: bool = False  # vLLM structured output: a regex that ends in the task's answer format
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(1, ge=1, description="vLLM engine replicas")
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=256)
    seed: int | None = Field(None, ge=0, description="samples drawn reproducibly from this seed (part of the store "
                             "key): per request on GPU engines and endpoints, the engine's own seed on vllm-cpu")
    engine_restarts: int = Field(3, ge=0, description="a dead engine is restarted this many times, then the command "
                                 "stops in one line (every sample already written is kept)")
    request_retries: int = Field(5, ge=0, description="endpoint: a timeout, 408, 429 or 5xx is retried this many "
                                 "times (backoff 1, 2, 4 ... s), then the command stops in one line")
    request_timeout_s: float = Field(300.0, gt=0, description="endpoint: seconds one request may take")
    stall_timeout_s: float = Field(1800.0, gt=0, description="no sample for this long (engine start included): the "
                                   "command stops in one line, every sample written kept (a hung engine is an end)")

    @model_validator(mode="after")
    def _sampling_can_differ(self):
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"samples: {self.samples} samples at temperature 0 are {self.samples} copies of one "
                             f"greedy answer; set temperature > 0 (e.g. 0.7) or samples: 1")
        return self

    def label(self) -> str:
        """The teacher's name in runs and reports."""
        if self.name:
            return self.name
        base = Path(self.model.split(":", 1)[-1].rstrip("/")).name
        return base + (f"-t{self.temperature:g}-k{self.samples}" if self.samples > 1 or self.temperature else "")


class AnnotateConfig(TeacherSpec):
    task: str
    split: str = "train"
    data_dir: str | None = None
    out_dir: str = "work/annotations"
    store: str = DEFAULT_STORE  # the annotation store (shared with sweeps)
    limit: int | None = Field(None, ge=1, description="annotate the first N rows only")
    tracking_uri: str | None = None
    experiment: str = "dsbs-teacher"


def _sampling(spec: TeacherSpec, task: Task, prompt: Prompt) -> dict:
    """vLLM sampling params of one sample, the same for every request (a seed, when set, is added per
    request: engines.request_seed; vllm-cpu takes none, it kills its engine on one, and gets the
    engine seed instead). The store keeps what was drawn, so a sample is drawn once and read back ever
    after. Structured output: a regex that ends in the task's answer format (weak teachers drift from it)."""
    params = {"temperature": spec.temperature, "max_tokens": spec.max_new_tokens, "stop": list(prompt.stop)}
    if spec.structured:
        params["structured_outputs"] = {"regex": task.answer_regex}
    return params


def teacher_identity(spec: TeacherSpec, task: Task, split: str, prompt: Prompt) -> dict:
    """What keys a teacher's annotations in the store: the model as named (a local path resolved),
    the prompt's hash, the sampling (not the sample count: more samples extend fewer), task, split."""
    model = spec.model
    if spec.endpoint is None and model != SMOLLM2 and Path(model).exists():
        model = str(Path(model).resolve())
    teacher = model if spec.endpoint is None else f"{spec.endpoint.rstrip('/')}#{model}"
    sampling = _sampling(spec, task, prompt)
    if spec.seed is not None:  # (unseeded entries keep the key they always had)
        sampling = sampling | {"seed": spec.seed}
    return {"teacher": teacher, "prompt_hash": prompt.hash, "sampling": sampling, "task": task.name, "split": split}


def _check_endpoint(endpoint: str) -> list[str]:
    """Served model ids, or a one-line error if the server does not answer."""
    url = endpoint.rstrip("/") + "/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return [m["id"] for m in json.load(r)["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise UserError(f"endpoint {endpoint} is not reachable ({getattr(e, 'reason', e)})") from None


def _resolve_model(cfg: TeacherSpec) -> TeacherSpec:
    """The spec with its model made loadable (embedded converted, paths absolute); one line if not."""
    if cfg.endpoint:
        served = _check_endpoint(cfg.endpoint)
        if cfg.model == SMOLLM2:
            return cfg.model_copy(update={"model": served[0]})
        if cfg.model not in served:
            raise UserError(f"model: endpoint {cfg.endpoint} serves {', '.join(served)}, not {cfg.model}")
        return cfg
    if cfg.model == SMOLLM2:
        smollm2_path()  # converted now (once), so a missing package is one line up front
        return cfg
    path = Path(cfg.model)
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model {cfg.model}: no config.json in that directory")
        return cfg.model_copy(update={"model": str(path.resolve())})
    if cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") != 1:
        raise UserError(f"model path {cfg.model} does not exist")
    try:  # a hub id: fetch its config now, so an unreachable hub is one line before any engine starts
        from huggingface_hub import hf_hub_download

        hf_hub_download(cfg.model, "config.json")
    except Exception as e:  # noqa: BLE001 (offline, unknown repo, gated: all one line)
        raise UserError(f"model {cfg.model}: cannot load it from the Hugging Face hub "
                        f"({str(e).splitlines()[0][:200]})") from None
    return cfg


def _prepare(cfg: AnnotateConfig):
    task = get_task(cfg.task)
    prompt = load_prompt(cfg.task, cfg.prompts_dir)
    all_rows, where = load_rows(cfg.task, cfg.split, cfg.data_dir)
    if not all_rows:
        raise UserError(f"{where}: split {cfg.split} of task {task.name} has no rows")
    _check_out_dir(cfg, task.name)
    examples = load_examples(cfg.task, cfg.split, cfg.data_dir, task.spec.teacher_join)
    return _resolve_model(cfg), task, prompt, all_rows, examples


def check(cfg: AnnotateConfig) -> None:
    """Every check on user input (task, prompt file, split rows, model path, endpoint, an output dir
    that would overwrite input), no generation."""
    _prepare(cfg)


# ---------------------------------------------------------------------------------------------
# What annotate writes in the released layout, and never anything else: a manifest per task dir
# records each file it wrote with its content hash; a file that is not in it (or changed since) is
# someone else's and is never overwritten or deleted.

MANIFEST = ".dsbs-teacher-written.json"


def _manifest(task_dir: Path) -> dict:
    """What annotate wrote in a task dir. A damaged manifest claims nothing (one warning line): every
    file it listed then counts as someone else's, and annotate refuses to overwrite it, in one line."""
    path = task_dir / MANIFEST
    if not path.exists():
        return {}
    manifest = read_json_object(path, "the files it listed are treated as not written by dsbs teacher")
    return {} if manifest is None else manifest


def _ours(manifest: dict, task_dir: Path, path: Path) -> bool:
    """Whether `path` is a file annotate wrote (it is in the task dir's manifest with this content)."""
    return manifest.get(path.relative_to(task_dir).as_posix()) == hash_file(path).hexdigest()


def _layout_files(task_dir: Path, task_name: str, split: str) -> list[Path]:
    """The released-layout files annotate writes for a split, and any teacher output files of that
    split already there (the loader concatenates every SPLIT_CoT_K.json)."""
    return ([task_dir / f"{task_name}_{split}.json", task_dir / f"annotations_{split}.parquet"]
            + sorted((task_dir / "llm").glob(f"{split}_CoT_*.json")))


def _check_out_dir(cfg: AnnotateConfig, task_name: str) -> None:
    """Refuse, in one line, an output dir whose split or teacher-output files annotate did not write."""
    from dsbs_ray.tasks import default_data_dir

    out = Path(cfg.out_dir).resolve()
    data_dir = cfg.data_dir or default_data_dir()
    if data_dir is not None and Path(data_dir).resolve() == out:
        raise UserError(f"out_dir {cfg.out_dir} is the data dir the split is read from: annotating into it would "
                        f"overwrite its split and teacher outputs; choose another --out-dir")
    task_dir = out / task_name
    manifest = _manifest(task_dir)
    for path in _layout_files(task_dir, task_name, cfg.split):
        if path.exists() and not _ours(manifest, task_dir, path):
            raise UserError(f"out_dir: {path} exists and was not written by dsbs teacher (or changed since); "
                            f"choose another --out-dir or move that file")


FLUSH_ROWS = 4096  # samples per part file (and at most FLUSH_SECONDS of work lost to a kill)
FLUSH_SECONDS = 60.0


@dataclass(frozen=True)
class Request:
    """What a teacher must write for one task split: its rows (as the teacher sees them) and prompt."""

    task: Task
    split: str
    examples: list
    prompt: Prompt


def generate(spec: TeacherSpec, task: Task, split: str, examples: list, prompt: Prompt, store: Path | str,
             stop_after_rows: int | None = None) -> dict:
    """One task split's samples in the store (generate_all of one request)."""
    return generate_all(spec, [Request(task, split, examples, prompt)], store, stop_after_rows)[0]


def generate_all(spec: TeacherSpec, requests: list[Request], store: Path | str,
                 stop_after_rows: int | None = None) -> list[dict]:
    """The teacher's `spec.samples` samples for every example of every request, in the annotation
    store; resumable. Every request's missing samples go through one pipeline, so the teacher's
    engines start once, whatever the tasks and splits. Returns a report per request (the teacher's
    first-sample and vote accuracy against gold, agreement, tokens).

    `spec` must be resolved (_resolve_model). A finished request returns its stored report and reads
    nothing else; otherwise only the missing (row, sample) pairs are generated, flushed to their
    entry's part file every FLUSH_ROWS samples or FLUSH_SECONDS. stop_after_rows ends early (tests,
    bench). One writer per store entry at a time: a second waits for the first, then finds its rows done."""
    from tqdm import tqdm

    k = spec.samples
    entries = [annotations.open_entry(store, teacher_identity(spec, r.task, r.split, r.prompt)) for r in requests]
    reports = [annotations.finished_report(e, r.examples, k) for e, r in zip(entries, requests)]
    results = {i: rep | {"generated_now": 0, "tokens_per_s": None} for i, rep in enumerate(reports) if rep is not None}
    pending = [i for i, rep in enumerate(reports) if rep is None]
    if not pending:
        return [results[i] for i in range(len(requests))]
    with contextlib.ExitStack() as locks:
        for entry in dict.fromkeys(entries[i] for i in pending):
            locks.enter_context(hold(entry, "annotation by this teacher", "annotation_store", wait=True))
        keys = {i: [annotations.row_key(e) for e in requests[i].examples] for i in pending}
        todo = []
        for i in pending:
            done = annotations.done_samples(entries[i], keys[i], k)
            first_of = {}  # identical rows (same key) are generated once
            todo += [{"key": f"{i}:{r}:{j}", "input": requests[i].examples[r].input, "prompt": i, "sample": j,
                      "seed": -1 if spec.seed is None else request_seed(spec.seed, key, j)}
                     for r, key in enumerate(keys[i]) if first_of.setdefault(key, r) == r
                     for j in range(k) if not done[r, j]]
        generated, tokens, seconds = dict.fromkeys(pending, 0), dict.fromkeys(pending, 0), 0.0
        if todo:
            import ray

            from dsbs_ray.engines import processor
            from dsbs_ray.ray_init import init_ray

            init_ray()  # the engine's own env (KV cache size) travels in its processor's runtime env
            prompts = [r.prompt for r in requests]
            sampling = [_sampling(spec, r.task, r.prompt) for r in requests]
            ds = processor(spec, prompts, sampling)(ray.data.from_items(todo))
            names = ", ".join(f"{requests[i].task.name}/{requests[i].split}" for i in pending)
            t0, last_flush, buffers = time.perf_counter(), time.perf_counter(), {i: [] for i in pending}
            bar = tqdm(total=len(todo), desc=f"teacher {names}", unit="sample")
            pipeline = iter(ds.iter_batches(batch_size=spec.batch_size, batch_format="pandas"))
            batches = watched(pipeline, spec.stall_timeout_s)
            try:
                for batch in batches:
                    for row in batch.to_dict("records"):
                        i, r, j = map(int, row["key"].split(":"))
                        error = _row_error(row)
                        raw = "" if error else row["raw"]
                        n_tokens = 0 if error else int(row["output_tokens"])
                        parsed = Parsed("", "", FAILED) if error else requests[i].task.parse(raw)
                        buffers[i].append({"row_key": keys[i][r], "row_id": requests[i].examples[r].id, "sample": j,
                                           "raw": raw, "rationale": parsed.rationale, "label": parsed.label,
                                           "parse_status": parsed.status, "output_tokens": n_tokens, "error": error})
                        tokens[i] += n_tokens
                        generated[i] += 1
                    seconds = time.perf_counter() - t0
                    bar.update(len(batch["key"]))
                    bar.set_postfix(tokens_per_s=f"{sum(tokens.values()) / max(seconds, 1e-9):.1f}")
                    stop = stop_after_rows is not None and sum(generated.values()) >= stop_after_rows
                    if (sum(map(len, buffers.values())) >= FLUSH_ROWS or stop
                            or time.perf_counter() - last_flush > FLUSH_SECONDS):
                        _flush(entries, buffers)
                        last_flush = time.perf_counter()
                    if stop:
                        break
            except Exception as e:  # an engine that kept dying or hung, an endpoint that stopped answering
                if not (type(e).__module__.startswith("ray.") or isinstance(e, Stalled)):
                    raise  # (ours: a bug keeps its traceback)
                raise RunFailure(_failure_line(spec, e, sum(generated.values()), len(todo))) from e
            finally:
                _flush(entries, buffers)  # every sample received is kept, however the pipeline ended
                batches.close()
                pipeline.close()  # shuts the streaming executor (and its engines) down, also on an early stop
                bar.close()
            if stop_after_rows is not None and sum(generated.values()) < len(todo):
                return [results.get(i) or {"task": requests[i].task.name, "split": requests[i].split,
                                           "rows_total": len(requests[i].examples), "complete": False,
                                           "generated_now": generated[i], "output_tokens_now": tokens[i]}
                        for i in range(len(requests))]
        rate = sum(tokens.values()) / seconds if seconds else None
        for i in pending:
            results[i] = _finish(spec, requests[i], entries[i]) | {
                "generated_now": generated[i], "output_tokens_now": tokens[i], "tokens_per_s": rate}
    return [results[i] for i in range(len(requests))]


def _row_error(row: dict) -> str:
    """Why the engine or endpoint refused this row ("" if it answered): Ray Data's per-row inference
    error (such rows skip the postprocess) or the endpoint's refusal."""
    for column in ("__inference_error__", "error"):
        value = row.get(column)
        if isinstance(value, str) and value:
            return value[:500]
    return ""


def _failure_line(spec: TeacherSpec, error: Exception, done: int, total: int) -> str:
    """One line for a pipeline that stopped: what died, its own last error, what is kept."""
    kept = f"{done} of {total} samples written this run are kept in the store; rerun the same command to resume"
    if isinstance(error, Stalled):
        cause = last_engine_error(error)
        cause = f"; last engine error: {cause}" if cause != str(error) else ""
        return (f"teacher {spec.endpoint or 'engine ' + spec.label()} stopped answering: {error} "
                f"(stall_timeout_s{cause}); {kept}")
    if spec.endpoint:
        cause = str(error).split("Full Traceback")[0]
        cause = cause.split("Previous Exception:")[-1].strip(" .\n") if "Previous Exception" in cause else cause
        return (f"endpoint {spec.endpoint} stopped answering after {spec.request_retries} retries "
                f"({cause.splitlines()[0][:200] if cause else type(error).__name__}); {kept}")
    return (f"teacher engine {spec.label()} kept dying: engine_restarts {spec.engine_restarts} used up "
            f"(last engine error: {last_engine_error(error)}); {kept}")


def _flush(entries: list[Path], buffers: dict) -> None:
    for i, rows in buffers.items():
        if rows:
            annotations.write_part(entries[i], rows)
            buffers[i] = []


def _finish(spec: TeacherSpec, request: Request, entry: Path) -> dict:
    """A request whose samples are all stored: its report, recorded as finished."""
    task, examples, k = request.task, request.examples, spec.samples
    samples = annotations.read_samples(entry, examples, k)
    report = {"task": task.name, "split": request.split, "teacher": spec.label(), "model": spec.model,
              "prompt_hash": request.prompt.hash, "temperature": spec.temperature, "samples": k,
              "rows_total": len(examples), "complete": True, "entry": str(entry)}
    report |= rationales.teacher_scores(samples, [e.gold for e in examples], task)
    report["accuracy"] = report["vote_accuracy"]
    failed = [e for e, row in zip(examples, samples) if any(s.status == FAILED for s in row)]
    report["failed_rows"] = len(failed)  # rows the engine or endpoint refused (trials: no rationale from them)
    if failed:
        first = annotations.read_samples(entry, failed[:1], k, columns=("error",))[0]
        report["failed_example"] = f"row {failed[0].id}: {next(s['error'] for s in first if s['error'])}"
    if not is_labelled(examples):  # unlabelled rows: nothing to score the teacher against
        report |= {"accuracy": None, "first_sample_accuracy": None, "vote_accuracy": None}
    annotations.mark_finished(entry, examples, k, report)
    return report


def annotate(cfg: AnnotateConfig, stop_after_rows: int | None = None) -> dict:
    """One task split (annotate_all of one config)."""
    return annotate_all([cfg], stop_after_rows)[0]


def annotate_all(cfgs: list[AnnotateConfig], stop_after_rows: int | None = None) -> list[dict]:
    """`dsbs teacher`: annotate task splits into the store, through one pipeline per teacher (its
    engines start once for every task and split), then write each split in the released layout under
    out_dir (when every asked row is done). Returns an annotation report per config.

    Every check that can fail on user input runs before any engine starts."""
    from concurrent.futures import ThreadPoolExecutor

    prepared = [_prepare(cfg) for cfg in cfgs]
    requests = [Request(task, cfg.split, all_examples[:cfg.limit] if cfg.limit else all_examples, prompt)
                for cfg, (_, task, prompt, _, all_examples) in zip(cfgs, prepared)]
    teachers: dict[str, list[int]] = {}  # configs of one teacher (its settings and store) share its engines
    for i, (cfg, (spec, *_)) in enumerate(zip(cfgs, prepared)):
        teacher = spec.model_dump(include=set(TeacherSpec.model_fields))
        teachers.setdefault(json.dumps(teacher, sort_keys=True) + cfg.store, []).append(i)
    results: dict[int, dict] = {}
    with ThreadPoolExecutor(1) as pool:  # the MLflow store opens (import, schema) while the engine starts
        tracking_ready = pool.submit(lambda: [_open_tracking(c) for c in {(c.tracking_uri, c.experiment): c
                                                                          for c in cfgs}.values()])
        for group in teachers.values():
            spec, store = prepared[group[0]][0], cfgs[group[0]].store
            results |= zip(group, generate_all(spec, [requests[i] for i in group], store, stop_after_rows))
        tracking_ready.result()
    return [_report_split(cfg, *prep, results[i]) for i, (cfg, prep) in enumerate(zip(cfgs, prepared))]


def _report_split(cfg: AnnotateConfig, spec: TeacherSpec, task: Task, prompt: Prompt, all_rows: list,
                  all_examples: list, result: dict) -> dict:
    """A split's released layout (what is done of it) written, its report, its MLflow run."""
    examples = all_examples[:cfg.limit] if cfg.limit else all_examples
    task_dir = Path(cfg.out_dir) / task.name
    annotated = 0
    if result["complete"]:
        # the released layout holds the longest prefix of the split annotated so far (a rerun with a
        # smaller --limit keeps what a larger one made); the report covers the rows asked for
        entry = Path(result["entry"])
        done = annotations.done_samples(entry, [annotations.row_key(e) for e in all_examples], cfg.samples)
        while annotated < len(all_examples) and done[annotated].all():
            annotated += 1
        _write_released_layout(task_dir, task.name, cfg.split, all_rows[:annotated],
                               _layout_table(spec, task, prompt, entry, all_examples[:annotated]))
    report = {k: result.get(k) for k in ("task", "split", "teacher", "prompt_hash", "rows_total", "complete",
                                         "generated_now", "output_tokens_now", "tokens_per_s", "accuracy", "first_sample_accuracy",
                                         "vote_accuracy", "agreement", "unanimous", "parse_failures", "failed_rows",
                                         "failed_example")}
    report |= {"task": task.name, "split": cfg.split, "teacher": spec.label(),
               "rows": len(examples) if result["complete"] else result["generated_now"] // cfg.samples,
               "rows_in_layout": annotated, "out_dir": str(task_dir), "store_entry": result.get("entry")}
    from dsbs_ray.tracking import log_run

    log_run(cfg.experiment, f"{task.name}-{cfg.split}-{spec.label()}",
            params={k: v for k, v in cfg.model_dump().items() if k not in ("tracking_uri",)} | {"teacher": spec.label()},
            metrics={k: report[k] for k in ("rows", "parse_failures", "failed_rows", "accuracy", "first_sample_accuracy", "agreement",
                                             "tokens_per_s") if report.get(k) is not None},
            artifacts=[task_dir / f"annotations_{cfg.split}.parquet"] if result["complete"] else [],
            uri=cfg.tracking_uri)
    return report


def _open_tracking(cfg: AnnotateConfig) -> None:
    from dsbs_ray import tracking

    c = tracking.client(tracking.tracking_uri(cfg.tracking_uri))
    tracking.experiment_id(c, cfg.experiment)


def _layout_table(spec: TeacherSpec, task: Task, prompt: Prompt, entry: Path, examples: list):
    """Every sample of the layout's rows as a table (row order, then sample), with its provenance."""
    import pandas as pd

    raws = annotations.read_samples(entry, examples, spec.samples, columns=("raw", "output_tokens", "error"))
    records = []
    for i, (ex, row) in enumerate(zip(examples, raws)):
        for j, sample in enumerate(row):
            parsed = Parsed("", "", FAILED) if sample["error"] else task.parse(sample["raw"])
            records.append({"row": i, "row_id": ex.id, "sample": j, "raw": sample["raw"], "rationale": parsed.rationale,
                            "label": parsed.label, "parse_status": parsed.status,
                            "output_tokens": sample["output_tokens"], "error": sample["error"] or "",
                            "teacher": spec.label(),
                            "prompt_hash": prompt.hash, "sampling_params": json.dumps(_sampling(spec, task, prompt))})
    return pd.DataFrame(records)


def _write_released_layout(task_dir: Path, task_name: str, split: str, rows: list[dict], table) -> None:
    """TASK_SPLIT.json (the annotated rows), llm/SPLIT_CoT_0.json (sample 0 in row order) and the
    annotations parquet; each written to a temp file and renamed, then recorded in the manifest.
    Files it replaces were checked to be its own (_check_out_dir)."""
    (task_dir / "llm").mkdir(parents=True, exist_ok=True)
    first = table[table["sample"] == 0].sort_values("row")
    targets = {
        task_dir / f"{task_name}_{split}.json": lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()),
        task_dir / "llm" / f"{split}_CoT_0.json": lambda f: f.write(json.dumps(list(first.raw)).encode()),
        task_dir / f"annotations_{split}.parquet": lambda f: table.drop(columns=["row"]).to_parquet(f, index=False),
    }
    manifest = _manifest(task_dir)
    for path in _layout_files(task_dir, task_name, split):
        if path.exists() and path not in targets and _ours(manifest, task_dir, path):
            path.unlink()  # a CoT_K file of an earlier run of ours (e.g. more samples then)
    for path, write in targets.items():
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
        manifest[path.relative_to(task_dir).as_posix()] = hash_file(path).hexdigest()
    tmp = task_dir / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, task_dir / MANIFEST)
