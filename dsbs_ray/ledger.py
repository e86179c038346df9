"""The cost ledger: what a trial cost, and the same estimated for a whole grid before it runs.

A trial's ledger: accelerator-seconds (workers x GPUs x the job's wall time; CPU cores where it has no
GPU), the tokens it trained on, and the teacher tokens (prompt + output, every sample) of the rows it
used, priced at the sweep's `prices`. The teacher's cost is the annotation of the trial's rows: what
a user would pay to get this configuration, so configurations compare in money (the paper's question,
in dollars). An estimate (`dsbs sweep --dry-run`) uses 6 x parameters x tokens FLOPs at an assumed
utilisation, and token counts measured on the data.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dsbs_ray.embedded import SMOLLM2

# Train rows of the splits that come from the hub (used by estimates when the split is not local).
HUB_TRAIN_ROWS = {"esnli": 549_367, "anli1": 16_946, "cqa": 9_741, "svamp": 800}
ESTIMATE_SAMPLE_ROWS = 2000  # rows tokenized to measure a task's mean lengths for an estimate


TRIAL_FIXED_SECONDS = 14.0  # a trial's seconds outside its optimizer steps: 13.7, the mean of bench/sweep_overhead.py's 12 here


class Prices(BaseModel):
    """Prices (USD) and, for estimates only, the throughput assumed. Defaults and sources: README."""

    model_config = ConfigDict(extra="forbid")

    gpu_hour: float = Field(2.49, ge=0, description="per GPU-hour (H100 SXM on-demand, early 2026)")
    cpu_hour: float = Field(0.0446, ge=0, description="per CPU-core-hour where a trial has no GPU (AWS c7i)")
    teacher_per_million_tokens: float = Field(3.50, ge=0, description="per million teacher tokens, prompt + output")
    gpu_peak_tflops: float = Field(989.0, gt=0, description="estimates: dense bf16 peak per GPU (H100 SXM)")
    cpu_peak_gflops: float = Field(60.0, gt=0, description="estimates: per CPU core (measured here: ~60)")
    assumed_mfu: float = Field(0.4, gt=0, le=1, description="estimates: the share of peak a step reaches")
    trial_fixed_seconds: float = Field(TRIAL_FIXED_SECONDS, ge=0, description="estimates: what a trial pays "
                                       "besides its optimizer steps (start-up, data, evaluation, checkpoints, "
                                       "export, logging), on each of its accelerators; bench/sweep_overhead.py "
                                       "measures it (the default: its sweep here, README)")


def money(ledger: dict, prices: Prices) -> dict:
    """The ledger's costs in USD: training, teacher and their total."""
    hour = prices.gpu_hour if ledger["accelerator"] == "gpu" else prices.cpu_hour
    training = ledger["accelerator_seconds"] / 3600 * hour
    teacher = (ledger["teacher_prompt_tokens"] + ledger["teacher_output_tokens"]) / 1e6 * prices.teacher_per_million_tokens
    return {"cost_training_usd": training, "cost_teacher_usd": teacher, "cost_usd": training + teacher}


def accelerator(job) -> tuple[str, float]:
    """("gpu", GPUs) or ("cpu", cores) that the job holds while it runs."""
    gpus = job.workers * job.gpus_per_worker
    return ("gpu", gpus) if gpus else ("cpu", job.workers * job.cpus_per_worker)


def trial_ledger(job, result: dict, teacher: dict) -> dict:
    """A finished trial's ledger: its resources x the job's wall time (start-up included: it is paid
    for), the tokens it trained on, and `teacher` (teacher_tokens() of its rows)."""
    kind, units = accelerator(job)
    return {"accelerator": kind, "accelerator_seconds": units * float(result.get("wall_seconds") or 0.0),
            "train_tokens": int(result.get("train_tokens") or 0)} | teacher


# ---------------------------------------------------------------------------------------------
# Teacher tokens


@lru_cache(maxsize=4)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from dsbs_ray.embedded import smollm2_tokenizer_path

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_path()) if name == SMOLLM2 else name)


def counting_tokenizer(teacher_model: str | None) -> tuple[object, str]:
    """(tokenizer, what counted): the teacher's own when it is local (a path, the embedded model),
    else SmolLM2's as a stand-in (the released PaLM outputs, an endpoint, an uncached hub id)."""
    if teacher_model and (teacher_model == SMOLLM2 or (Path(teacher_model) / "config.json").exists()):
        return _tokenizer(teacher_model), "teacher tokenizer"
    return _tokenizer(SMOLLM2), "estimated with the SmolLM2 tokenizer"


def count(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def prompt_tokens(tokenizer, prompt, inputs: list[str]) -> list[int]:
    """Prompt tokens per row: the exemplar prefix (counted once) plus the row's query."""
    prefix = count(tokenizer, [prompt.prefix])[0]
    return [prefix + n for n in count(tokenizer, [prompt.query.format(input=x) for x in inputs])]


def teacher_tokens(job, prompts_dir: str | None = None) -> dict:
    """The teacher tokens of the rows a trial reads (its data fraction; dropped rows were paid for
    too): every sample's prompt and output. Open teachers: output tokens as the engine counted them,
    prompts with the teacher's tokenizer; released outputs: both estimated (no PaLM tokenizer)."""
    from dsbs_ray.annotations import read_samples
    from dsbs_ray.data import fraction_split
    from dsbs_ray.prompts import load_prompt
    from dsbs_ray.tasks import load_teacher_outputs, teacher_examples

    none = {"teacher_rows": 0, "teacher_samples": 0, "teacher_prompt_tokens": 0, "teacher_output_tokens": 0,
            "teacher_tokens_counted": "no teacher"}
    if not job.uses_teacher:
        return none
    split = teacher_examples(job.task, "train", job.data_dir)
    train, _, used = fraction_split(job, split, list)
    rows = [train[i] for i in used]
    prompt = load_prompt(job.task, prompts_dir)
    if job.annotations:
        import json

        identity = json.loads((Path(job.annotations) / "teacher.json").read_text())
        model = identity["teacher"] if "#" not in identity["teacher"] else None
        tokenizer, how = counting_tokenizer(model)
        samples = read_samples(Path(job.annotations), rows, job.samples, columns=["output_tokens"])
        output = sum(int(s["output_tokens"] or 0) for row in samples for s in row)
        how = f"outputs counted by the engine, prompts {how}"
    else:
        tokenizer, how = counting_tokenizer(None)
        outputs = load_teacher_outputs(job.task, "train", job.data_dir)
        output = sum(count(tokenizer, [outputs[i] for i in used]))
        how = f"released outputs, {how} and our prompt"
    samples_per_row = job.samples if job.annotations else 1
    return {"teacher_rows": len(rows), "teacher_samples": len(rows) * samples_per_row,
            "teacher_prompt_tokens": samples_per_row * sum(prompt_tokens(tokenizer, prompt, [r.input for r in rows])),
            "teacher_output_tokens": output, "teacher_tokens_counted": how}


# ---------------------------------------------------------------------------------------------
# Estimates before a sweep runs (dsbs sweep --dry-run): the bill of the whole grid


@lru_cache(maxsize=64)
def task_profile(task: str, data_dir: str | None, train_limit: int | None) -> dict:
    """What an estimate needs of a task, measured on the data here with the SmolLM2 tokenizer: train
    rows (the hub's count where the split is not local), mean tokens of an input, a gold label, a
    released teacher output and a teacher prompt; up to ESTIMATE_SAMPLE_ROWS rows of each are read."""
    from dsbs_ray.errors import UserError
    from dsbs_ray.prompts import load_prompt
    from dsbs_ray.tasks import default_data_dir, get_task, load_examples, load_teacher_outputs, split_is_local

    def mean(values):
        return sum(values) / len(values) if values else 0.0

    tokenizer, _ = counting_tokenizer(None)
    rows, sample = None, []
    local = Path(data_dir) if data_dir else default_data_dir()
    for split in get_task(task).splits:  # only what is here: an estimate never waits on the hub
        if not split_is_local(task, split, local):
            continue
        try:
            examples = load_examples(task, split, data_dir)
        except UserError:
            continue
        rows = len(examples) if split == "train" else rows
        sample = sample or examples[:ESTIMATE_SAMPLE_ROWS]
    rows = rows if rows is not None else HUB_TRAIN_ROWS.get(task, len(sample))
    rows = min(rows, train_limit or rows)
    outputs = []
    for split in ("train", "valid", "test"):
        try:
            outputs = load_teacher_outputs(task, split, data_dir)[:ESTIMATE_SAMPLE_ROWS]
            break
        except UserError:
            continue
    prompt = load_prompt(task)
    rationales = [get_task(task).parse(o).rationale for o in outputs]
    return {"rows": rows, "has_valid": get_task(task).has_valid,
            "input": mean(count(tokenizer, [e.input for e in sample])) + 4,  # + "predict: "
            "label": mean(count(tokenizer, [e.gold for e in sample])) + 1,  # + EOS
            "rationale": mean(count(tokenizer, rationales)) + 1 if rationales else None,
            "output": mean(count(tokenizer, outputs)) if outputs else None,
            "prompt": mean(prompt_tokens(tokenizer, prompt, [e.input for e in sample[:200]]))}


def estimate_trial(job, parameters: int, teacher_samples: int, max_new_tokens: int | None, prices: Prices) -> dict:
    """A trial's ledger before it runs: 6 x parameters x tokens trained FLOPs at the assumed
    utilisation of its accelerator's peak, and its fraction's teacher tokens (released outputs' mean
    length, else the teacher's max_new_tokens)."""
    from dsbs_ray.data import fraction_size, valid_size

    profile = task_profile(job.task, job.data_dir, job.train_limit)
    kind, _ = accelerator(job)
    per_row = profile["input"] + min(profile["label"], job.max_target_length)
    if job.method == "dsbs":
        rationale = profile["rationale"] if profile["rationale"] is not None else (max_new_tokens or 0)
        per_row += profile["input"] + min(rationale, job.max_target_length)
    train_tokens = job.max_steps * job.batch_size * per_row
    peak = prices.gpu_peak_tflops * 1e12 if kind == "gpu" else prices.cpu_peak_gflops * 1e9
    step_seconds = 6 * parameters * train_tokens / (peak * prices.assumed_mfu)
    fixed_seconds = prices.trial_fixed_seconds * accelerator(job)[1]  # every accelerator waits through it
    seconds = step_seconds + fixed_seconds
    trainable = profile["rows"] - (0 if profile["has_valid"] else valid_size(profile["rows"]))
    rows = fraction_size(trainable, job.fraction) if job.uses_teacher else 0
    output = profile["output"] if profile["output"] is not None else (max_new_tokens or 0)
    ledger = {"accelerator": kind, "accelerator_seconds": seconds, "fixed_accelerator_seconds": fixed_seconds,
              "train_tokens": int(train_tokens),
              "teacher_rows": rows, "teacher_samples": rows * teacher_samples,
              "teacher_prompt_tokens": int(rows * teacher_samples * profile["prompt"]),
              "teacher_output_tokens": int(rows * teacher_samples * output),
              "teacher_tokens_counted": "estimated"}
    return ledger | money(ledger, prices)


def estimate_grid(cfg, jobs: list) -> tuple[list[dict], dict]:
    """(per-trial estimates, the grid's totals). The teacher annotates each (task, teacher) once for
    all its trials (the store shares it): the totals count the largest fraction's rows once."""
    from dsbs_ray.job import student_name
    from dsbs_ray.students import estimate_parameters
    from dsbs_ray.task_spec import get_task

    specs = {s.id: s for s in cfg.students}
    teachers = {t.label(): t for t in cfg.teacher_list() if t != "released"}
    sizes = {s: specs[s].parameters or estimate_parameters(s) for s in {j.student for j in jobs}}
    unknown = sorted(s for s, n in sizes.items() if not n)
    per_trial, annotation = [], {}
    for job in jobs:
        spec = teachers.get(job.teacher)
        samples = spec.samples if spec else 1
        est = estimate_trial(job, sizes[job.student] or 0, samples, spec.max_new_tokens if spec else None, cfg.prices)
        per_trial.append({"task": get_task(job.task).name, "student": student_name(job.student),
                          "parameters": sizes[job.student], "fraction": job.fraction, "method": job.method,
                          "label_source": job.label_source, "teacher": job.teacher if job.uses_teacher else None} | est)
        if job.uses_teacher:
            key = (job.task, job.teacher)
            tokens = est["teacher_prompt_tokens"] + est["teacher_output_tokens"]
            annotation[key] = max(annotation.get(key, 0), tokens)
    hours = {k: sum(t["accelerator_seconds"] for t in per_trial if t["accelerator"] == k) / 3600 for k in ("gpu", "cpu")}
    training = sum(t["cost_training_usd"] for t in per_trial)
    fixed = sum(t["cost_training_usd"] * t["fixed_accelerator_seconds"] / t["accelerator_seconds"]
                for t in per_trial if t["accelerator_seconds"])
    teacher_tokens = sum(annotation.values())
    teacher_usd = teacher_tokens / 1e6 * cfg.prices.teacher_per_million_tokens
    return per_trial, {"trials": len(per_trial), "gpu_hours": hours["gpu"], "cpu_hours": hours["cpu"],
                       "training_usd": training, "teacher_tokens": teacher_tokens, "teacher_usd": teacher_usd,
                       "total_usd": training + teacher_usd, "fixed_usd": fixed,
                       "fixed_share": fixed / (training + teacher_usd) if training + teacher_usd else 0.0,
                       "prices": cfg.prices.model_dump(),
                       "students_without_a_size": unknown}
