"""The sweep end to end on a real local Ray, a real MLflow SQLite store and a real browser on the
MLflow UI. Grids are sweeps/local.yaml with fewer steps (the cluster's `ray job submit`:
test_cluster_jobs.py)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ports import free_port

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow
PY = sys.executable
BIN = Path(PY).parent


# the released PaLM outputs as the teacher, one filter, the whole train split: 8 trials, no engine
# (tests/test_sweep_teacher.py runs the teacher inside the sweep)
RELEASED = {"teacher": "released", "rationale_filter": "none", "train_limit": None, "fractions": [0.25, 1.0]}


def _local_sweep(tmp: Path, tiny: dict, data_dir: Path, name: str, **overrides) -> Path:
    """sweeps/local.yaml with two tiny T5 students (the embedded SmolLM2 student has its own test),
    the test's data and stores, and short trials."""
    cfg = yaml.safe_load((REPO / "sweeps" / "local.yaml").read_text())
    cfg["students"] = [{"id": str(tiny[n]), "workers": 1, "cpus_per_worker": 0.5, "zero": "off"}
                       for n in ("t5-tiny-s", "t5-tiny-m")]
    cfg |= {"name": name, "data_dir": str(data_dir), "output_dir": str(tmp / "sweeps"),
            "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "max_steps": 10, "eval_every": 10, "eval_limit": 10, "test_limit": 10,
            "checkpoint_every": 5,  # a checkpoint with optimizer state mid-trial, gone once the trial is done
            "gen_max_length": 16} | RELEASED | overrides
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _done_markers(out: Path) -> dict:
    """Trials done: trained (result.json) and logged (their MLflow run id in it, the sweep's last write)."""
    done = {}
    for p in out.glob("*/*/result.json"):
        stamp = p.stat().st_mtime_ns
        if "mlflow_run_id" in json.loads(p.read_text()):
            done[p.parent.name] = stamp
    return done


def _trial_runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string="tags.`dsbs.role` = 'trial'")


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory, students, data_dir):
    """sweeps/local.yaml (2 students x 2 fractions x 2 methods) killed (SIGKILL, driver and its local
    Ray) after two trials finished, then rerun to the end."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = _local_sweep(tmp, students, data_dir, "local-test")
    cmd = [PY, "-m", "dsbs_ray", "sweep", str(path)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while len(_done_markers(tmp / "sweeps")) < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    before = _done_markers(tmp / "sweeps")
    assert len(before) >= 2, first.stdout.read().decode()[-3000:] if first.poll() is not None else "timeout"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = _done_markers(tmp / "sweeps")
    assert len(before) < 8, "the sweep finished before it could be interrupted"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    return {"tmp": tmp, "summary": summary, "before": before, "after": _done_markers(tmp / "sweeps"),
            "uri": f"sqlite:///{tmp / 'mlflow.db'}"}


def test_local_sweep_completes_after_an_interruption(resumed_sweep):
    s = resumed_sweep["summary"]
    assert s["trials"] == 8 and s["failed"] == 0
    # skipped: logged before the kill, or trained and killed before its MLflow run was logged (now logged)
    assert s["skipped"] >= len(resumed_sweep["before"]) and s["finished"] == 8 - s["skipped"]
    assert len(resumed_sweep["after"]) == 8
    # the trials finished before the kill were not trained again: their results are untouched
    for trial, mtime in resumed_sweep["before"].items():
        assert resumed_sweep["after"][trial] == mtime


def test_mlflow_has_one_child_run_per_trial_with_params_and_accuracy(resumed_sweep, students):
    from mlflow import MlflowClient

    uri = resumed_sweep["uri"]
    runs = _trial_runs(uri, "local-test")
    assert len(runs) == 8 and len({r.data.tags["dsbs.trial"] for r in runs}) == 8
    parent = resumed_sweep["summary"]["parent_run_id"]
    sizes = {}
    for r in runs:
        p, m = r.data.params, r.data.metrics
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent
        assert p["task"] == "svamp" and p["method"] in {"finetune", "dsbs-gold"} and p["steps"] == "10"
        assert float(p["fraction"]) in {0.25, 1.0} and p["seed"] == "0" and p["alpha"] == "0.5"
        assert p["label_source"] == "gold" and p["student_name"] in {"t5-tiny-s", "t5-tiny-m"}
        assert 0.0 <= m["accuracy"] <= 1.0 and m["examples_per_s"] > 0 and m["wall_seconds"] > 0
        sizes.setdefault(p["student_name"], set()).add(int(p["parameters"]))
        # loss and eval accuracy by step, as the trial ran
        history = MlflowClient(uri).get_metric_history(r.info.run_id, "loss")
        assert [h.step for h in history] == [10]
    assert len(sizes["t5-tiny-s"]) == 1 and max(sizes["t5-tiny-s"]) < min(sizes["t5-tiny-m"])
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(runs[0].info.run_id)}
    assert {"predictions_test.jsonl", "config.json"} <= artifacts
    sweeps = MlflowClient(uri).search_runs([runs[0].info.experiment_id], filter_string="tags.`dsbs.role` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    report = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert {"report/report.md", "report/accuracy_vs_fraction.png", "report/accuracy_vs_size.png"} <= report


def test_every_trial_records_where_its_time_went_and_keeps_its_model_but_no_optimizer_state(resumed_sweep):
    """Each trial's phases (start-up, load, data, steps, evaluation, checkpoints, export, logging and
    the rest) add up to its wall time, in its result and as MLflow metrics; the summary sums them. A
    finished trial keeps (keep: model, the default) its exported student and no checkpoint."""
    from mlflow import MlflowClient

    from dsbs_ray.phases import PHASES

    names = set(PHASES) | {"other"}
    results = {p.parent.name: json.loads(p.read_text())
               for p in (resumed_sweep["tmp"] / "sweeps" / "local-test").glob("*/result.json")}
    assert len(results) == 8
    c = MlflowClient(resumed_sweep["uri"])
    for r in results.values():
        phases, run = r["phases"], Path(r["run_dir"])
        assert set(phases) == names and all(v >= 0 for v in phases.values())
        assert sum(phases.values()) == pytest.approx(r["trial_seconds"])
        assert phases["steps"] == pytest.approx(r["train_seconds"]) and phases["steps"] > 0
        assert phases["eval"] > 0 and phases["logging"] > 0 and phases["data"] > 0
        assert r["test_rows"] == 10 and r["eval_seconds_per_100_rows"] > 0
        metrics = c.get_run(r["mlflow_run_id"]).data.metrics
        assert {k: metrics[f"phase_{k}_seconds"] for k in names} == pytest.approx(phases)
        assert (run / "model" / "model.safetensors").exists() and (run / "predictions_test.jsonl").exists()
        assert not (run / "checkpoints").exists() and not [d for d in run.glob("checkpoint_*") if d.is_dir()]
    summary = resumed_sweep["summary"]["phases"]
    assert set(summary) == names and sum(v["share"] for v in summary.values()) == pytest.approx(1.0)
    # (summed over the trials the rerun trained: some of the 8)
    assert 0 < summary["steps"]["seconds"] <= sum(r["phases"]["steps"] for r in results.values()) + 1e-6


def test_every_trial_has_a_cost_ledger_at_the_sweep_prices(resumed_sweep, data_dir):
    """CPU trials: accelerator-seconds = workers x CPUs x the job's wall time; tokens trained on; the
    teacher tokens of the rows the trial read (none for finetune, every row of the fraction for dsbs,
    its outputs as the released files hold them); USD at the default prices; the report prices them."""
    from dsbs_ray.ledger import Prices
    from dsbs_ray.tasks import load_teacher_outputs

    prices = Prices()
    outputs = load_teacher_outputs("svamp", "train", str(data_dir))
    for r in _trial_runs(resumed_sweep["uri"], "local-test"):
        p, m, tags = r.data.params, r.data.metrics, r.data.tags
        assert tags["dsbs.accelerator"] == "cpu"
        assert m["accelerator_seconds"] == pytest.approx(1 * 0.5 * m["wall_seconds"])
        assert m["cost_training_usd"] == pytest.approx(m["accelerator_seconds"] / 3600 * prices.cpu_hour)
        # 10 steps of 16 rows: every row has an input and a label of at least one token each
        assert m["train_tokens"] >= 10 * 16 * 2
        assert m["cost_usd"] == pytest.approx(m["cost_training_usd"] + m["cost_teacher_usd"])
        assert m["test_accuracy"] == m["accuracy"]
        if p["method"] == "finetune":
            assert m["teacher_tokens"] == 0 and m["cost_teacher_usd"] == 0
            continue
        rows = int(m["train_rows"])  # dsbs-gold with no filter: every row of the fraction trains
        assert m["teacher_samples"] == rows and m["teacher_tokens"] == m["teacher_prompt_tokens"] + m["teacher_output_tokens"]
        # the released outputs average well over 10 tokens; every sample pays the 8-exemplar prompt
        assert m["teacher_output_tokens"] > 10 * rows and m["teacher_prompt_tokens"] > 500 * rows
        assert m["cost_teacher_usd"] == pytest.approx(m["teacher_tokens"] / 1e6 * prices.teacher_per_million_tokens)
        assert "estimated with the SmolLM2 tokenizer" in tags["dsbs.teacher_tokens_counted"]
    assert len(outputs) == 800


def _mlflow_ui(store: str, port: int) -> subprocess.Popen:
    """`make mlflow-ui` on this store and port, as a user starts it, once it serves."""
    proc = subprocess.Popen(["make", "-s", "mlflow-ui", f"MLFLOW_STORE={store}", f"MLFLOW_PORT={port}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("make mlflow-ui did not serve in 120 s: " + proc.stdout.read()[-2000:])
    return proc


def test_the_mlflow_ui_opens_on_the_trials_in_a_real_browser(resumed_sweep, tmp_path):
    """`make mlflow-ui` over a finished sweep prints the experiment's link; headless Chromium opens it
    and lands on the model-training runs table with every trial row and the compare-by columns, no
    click; the parent run's page shows the report. Screenshots go to test-artifacts/."""
    from browser import Browser

    from dsbs_ray import tracking

    port = free_port()
    proc = _mlflow_ui(resumed_sweep["uri"], port)
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        links = subprocess.run([str(BIN / "dsbs"), "mlflow-links", "--tracking-uri", resumed_sweep["uri"],
                                "--base-url", f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
        assert links.returncode == 0, links.stderr[-2000:]
        url = links.stdout.strip().split("local-test: ", 1)[1].split()[0]
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/")
        runs = _trial_runs(resumed_sweep["uri"], "local-test")
        with Browser(width=2600, height=1300) as b:
            b.goto(url)
            names = [r.info.run_name for r in runs]
            text = b.wait_for(lambda t: all(n in t for n in names), 90, "all 8 trial rows")
            b.screenshot(artifacts / "mlflow-ui-trials.png")
            assert "workflowType=machine_learning" in b.url() and "/runs" in b.url()
            assert "matching runs" in text and "Token Usage" not in text  # not the GenAI overview
            headers = text.split(names[0])[0]  # the table's header row comes before the first row
            for column in ("task", "student_name", "parameters", "method", "fraction", "seed", "test_accuracy",
                           "cost_usd"):
                assert column in headers.split(), column
            accuracy = {f"{r.data.metrics['test_accuracy']:g}" for r in runs}
            assert any(a in text for a in accuracy)
            parent = resumed_sweep["summary"]["parent_run_id"]
            b.goto(tracking.run_url(f"http://127.0.0.1:{port}", runs[0].info.experiment_id, parent))
            b.wait_for(lambda t: "Frontier" in t and "cheapest that beats it" in t, 90, "the report on the parent run")
            b.screenshot(artifacts / "mlflow-ui-report.png")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_report_command_writes_figures_and_frontier(resumed_sweep, tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([PY, "-m", "dsbs_ray", "report", "--experiment", "local-test", "--tracking-uri",
                        resumed_sweep["uri"], "--out-dir", str(out), "--no-log"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["trials"] == 8
    for png in ("accuracy_vs_fraction.png", "accuracy_vs_size.png", "accuracy_vs_cost.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000
    text = (out / "report.md").read_text()
    frontier = [ln for ln in text.splitlines() if ln.startswith(("| svamp | released | finetune |",
                                                                 "| svamp | released | dsbs-gold |"))]
    assert len(frontier) >= 2
    # the PaLM teacher's test accuracy on SVAMP (74.0 %) is the line to beat
    assert "74.0 (test)" in frontier[0]


def test_a_finished_sweep_rerun_on_a_new_tracking_store_logs_every_trial_there_and_starts_no_ray(
        resumed_sweep, students, data_dir):
    """A user moves to another MLflow store and reruns the finished sweep: every trial is logged there
    from its stored result (params, final metrics, ledger), none trains, and neither Ray nor Tune starts."""
    tmp = resumed_sweep["tmp"]

    def results():  # every trial's stored result, less the MLflow run it was last logged to
        return {p.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "mlflow_run_id"}
                for p in (tmp / "sweeps").glob("*/*/result.json")}

    before = results()
    models = {p: p.stat().st_mtime_ns for p in (tmp / "sweeps").glob("*/*/model/*")}
    uri = f"sqlite:///{tmp / 'moved.db'}"
    path = _local_sweep(tmp, students, data_dir, "local-test", tracking_uri=uri)
    r = subprocess.run([PY, "-m", "dsbs_ray", "sweep", str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert (s["trials"], s["skipped"], s["finished"], s["failed"]) == (8, 8, 0, 0)
    # no Ray started (its dashboard address would be on the sweep's first line), no Tune
    assert "Ray dashboard" not in r.stderr and "Trial status" not in r.stderr, r.stderr[-3000:]
    assert any(ln.startswith("sweep local-test: 8 trials (8 already finished)") for ln in r.stderr.splitlines())
    assert results() == before and len(before) == 8  # nothing trained: the same results, now logged there
    assert {p: p.stat().st_mtime_ns for p in (tmp / "sweeps").glob("*/*/model/*")} == models and models
    old = {x.data.tags["dsbs.trial"]: x for x in _trial_runs(resumed_sweep["uri"], "local-test")}
    moved = _trial_runs(uri, "local-test")
    assert len(moved) == 8 and {x.data.tags["dsbs.trial"] for x in moved} == set(old)
    for x in moved:
        o = old[x.data.tags["dsbs.trial"]]
        assert x.info.status == "FINISHED" and x.data.tags["mlflow.parentRunId"] == s["parent_run_id"]
        assert x.data.params == o.data.params
        for k in ("accuracy", "test_accuracy", "examples_per_s", "train_tokens", "accelerator_seconds", "cost_usd"):
            assert x.data.metrics[k] == pytest.approx(o.data.metrics[k]), k
    assert Path(s["report"]).read_text().count("| svamp | released |") >= 2


@pytest.mark.parametrize("damage, needle", [
    (lambda t: t[: len(t) // 2], "not valid JSON"),  # cut short, as by a full disk or an editor
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "accuracy"}), "no number accuracy"),
    (lambda t: json.dumps({**json.loads(t), "parameters": "many"}), "no number parameters"),
    (lambda t: "[1, 2]", "no number accuracy, parameters"),
])
def test_a_damaged_trial_result_stops_a_rerun_in_one_line_and_changes_nothing(resumed_sweep, students, data_dir,
                                                                              tmp_path, damage, needle):
    """A finished trial's result.json that a rerun cannot log from (not JSON, a field gone) is one line
    naming it, exit 2, before anything starts: no Ray, no MLflow run, every file as it was."""
    import shutil

    shutil.copytree(resumed_sweep["tmp"] / "sweeps", tmp_path / "sweeps")
    victim = sorted((tmp_path / "sweeps").glob("*/*/result.json"))[3]
    victim.write_text(damage(victim.read_text()))

    def files():  # every file of the sweep dir but the lock, which notes its last holder
        return {p: p.read_bytes() for p in (tmp_path / "sweeps").rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    path = _local_sweep(tmp_path, students, data_dir, "local-test")
    r = subprocess.run([PY, "-m", "dsbs_ray", "sweep", str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert str(victim) in r.stderr and needle in r.stderr, r.stderr
    assert files() == before and len(before) > 8
    assert not (tmp_path / "mlflow.db").exists() or not _trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                                      "local-test")


def test_one_sweep_trains_a_t5_and_a_decoder_only_student_and_reports_both(students, data_dir, tmp_path):
    """The size axis across families: a random-init T5 and the pretrained SmolLM2 (its own learning
    rate and steps) in one local sweep; MLflow and the report name each student's family."""
    smollm2 = {"id": "embedded:smollm2-135m-instruct", "workers": 1, "cpus_per_worker": 1, "zero": "off",
               "lr": 1e-4, "max_steps": 2}
    path = _local_sweep(tmp_path, students, data_dir, "families", fractions=[1.0], methods=["dsbs-gold"],
                        train_limit=32, batch_size=8, max_input_length=128, max_target_length=64, eval_limit=8,
                        students=[{"id": str(students["t5-tiny-s"]), "zero": "off", "cpus_per_worker": 1}, smollm2])
    r = subprocess.run([PY, "-m", "dsbs_ray", "sweep", str(path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    runs = _trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "families")
    got = {(x.data.params["student_name"], x.data.params["student_family"], x.data.params["steps"]) for x in runs}
    assert got == {("t5-tiny-s", "seq2seq", "10"), ("smollm2-135m-instruct", "causal", "2")}
    # a quiet log: the dashboard's address first, each trial's steps and result, no Ray line on repeat
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    first = next(i for i, ln in enumerate(lines) if ln.startswith("sweep families: "))
    assert "Ray dashboard http://127.0.0.1:" in lines[first] and not any("step " in ln for ln in lines[:first])
    assert sum("finished: accuracy" in ln for ln in lines) == 2 and any("step 2/2 loss" in ln for ln in lines)
    # (a progress bar's last frame is drawn twice: the embedded SmolLM2 converted into this test's cache)
    repeated = {ln: n for ln, n in Counter(lines).items() if n > 1 and "%|" not in ln}
    assert not repeated and "Failed to query Ray Train Controller" not in r.stderr, repeated
    assert "logging_progress" not in r.stderr and "Trial status" not in r.stderr
    assert "process(es) this command had started" not in r.stderr  # a clean end: nothing for the exit net
    assert all(x.info.status == "FINISHED" and 0.0 <= x.data.metrics["accuracy"] <= 1.0 for x in runs)
    text = Path(summary["report"]).read_text()
    assert "| svamp | released | t5-tiny-s | seq2seq |" in text
    assert "| svamp | released | smollm2-135m-instruct | causal | 134,515,008 | dsbs-gold | 100% |" in text


def test_a_grown_sweep_with_changed_resources_trains_only_the_new_point_and_holds_its_dir(resumed_sweep, students,
                                                                                        data_dir):
    """Between two runs a user grows the grid (a new fraction) and changes a student's resources (ZeRO
    stage, CPUs): only the new point trains, under the same parent run, with the new layout in its tags.
    While it runs, a second sweep on the same dir is refused in one line naming the holder."""
    from mlflow import MlflowClient

    tmp, uri = resumed_sweep["tmp"], resumed_sweep["uri"]
    before = _done_markers(tmp / "sweeps")
    path = _local_sweep(tmp, students, data_dir, "local-test", fractions=[0.25, 0.5, 1.0], methods=["finetune"],
                        students=[{"id": str(students["t5-tiny-s"]), "workers": 1, "cpus_per_worker": 1.0,
                                   "zero": "2"}])
    cmd = [PY, "-m", "dsbs_ray", "sweep", str(path)]
    grown = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp / "sweeps" / "local-test" / ".lock"
    deadline = time.time() + 120
    while not (lock.exists() and f"pid {grown.pid} " in lock.read_text()) and time.time() < deadline:
        assert grown.poll() is None, grown.communicate()[1][-3000:]
        time.sleep(0.2)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr[-2000:]
    assert "in use by another sweep" in second.stderr and f"pid {grown.pid} " in second.stderr
    out, err = grown.communicate(timeout=600)
    assert grown.returncode == 0, err[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["trials"], summary["skipped"], summary["finished"], summary["failed"]) == (3, 2, 1, 0)
    after = _done_markers(tmp / "sweeps")
    assert all(after[t] == m for t, m in before.items())  # nothing finished was trained again
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("local-test").experiment_id
    parents = c.search_runs([exp], filter_string="tags.`dsbs.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.run_id == resumed_sweep["summary"]["parent_run_id"]
    assert parents[0].data.tags["dsbs.fractions"] == "0.25,0.5,1" and parents[0].data.tags["dsbs.trials"] == "3"
    runs = _trial_runs(uri, "local-test")
    assert len(runs) == 9 and len({r.data.tags["dsbs.trial"] for r in runs}) == 9
    new = next(r for r in runs if r.data.params["fraction"] == "0.5")
    assert new.data.tags["dsbs.zero"] == "2" and new.data.tags["dsbs.cpus_per_worker"] == "1"
