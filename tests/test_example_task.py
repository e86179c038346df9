"""A user's own tasks, end to end, from a folder of their own: the shipped examples (shop: a number
answer from CSV files; cities: a text answer from one JSONL file with its test split carved) go
through `dsbs task check`, the embedded SmolLM2 teacher (`dsbs teacher` by spec path, then the
sweep's own teacher stage), a finetune / dsbs-gold sweep on a tiny T5, and its report."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"
TRAIN, TEST = 16, 8


def _dsbs(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "dsbs_ray", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_a_users_number_and_text_tasks_go_through_teacher_sweep_and_report(tmp_path, students):
    mine = tmp_path / "mine"
    shutil.copytree(EXAMPLES, mine)
    for spec in ("shop.yaml", "cities.yaml"):
        r = _dsbs("task", "check", spec, cwd=mine)
        assert r.returncode == 0, r.stderr
    # dsbs teacher takes the spec's path: annotates the CSV's rows, writes them back in the released layout
    r = _dsbs("teacher", "--tasks", "./shop.yaml", "--splits", "train", "--limit", TRAIN, "--max-new-tokens", 32,
              "--store", "store", "--out-dir", "annotated", "--tracking-uri", f"sqlite:///{tmp_path / 'teacher.db'}",
              cwd=mine)
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert (line["task"], line["rows"], line["complete"], line["rows_in_layout"]) == ("shop", TRAIN, True, TRAIN)
    assert 0.0 <= line["accuracy"] <= 1.0 and line["parse_failures"] < TRAIN
    layout = [json.loads(x) for x in (mine / "annotated" / "shop" / "shop_train.json").read_text().splitlines()]
    assert [set(x) for x in layout] == [{"uid", "problem", "answer"}] * TRAIN  # the CSV's rows, as they were
    assert len(json.loads((mine / "annotated" / "shop" / "llm" / "train_CoT_0.json").read_text())) == TRAIN

    sweep = {"name": "mine", "tasks": ["./shop.yaml", "./cities.yaml"],
             "students": [{"id": str(students["t5-tiny-s"]), "workers": 1, "cpus_per_worker": 0.5, "zero": "off"}],
             "fractions": [1.0], "methods": ["finetune", "dsbs-gold"],
             "teacher": {"model": "embedded:smollm2-135m-instruct", "max_new_tokens": 32},
             "train_limit": TRAIN, "eval_limit": TEST, "test_limit": TEST, "max_steps": 6, "batch_size": 4, "lr": 3e-3,
             "max_input_length": 128, "max_target_length": 64, "gen_max_length": 12, "eval_every": 6,
             "annotation_store": "store", "output_dir": "sweeps", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "max_concurrent_trials": 2}
    (mine / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    r = _dsbs("sweep", "sweep.yaml", cwd=mine, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (summary["trials"], summary["finished"], summary["failed"]) == (4, 4, 0)
    assert f"on shop/train: {TRAIN} rows x 1 samples (0 generated now)" in r.stderr  # dsbs teacher's, from the store
    assert f"on cities/train: {TRAIN} rows x 1 samples ({TRAIN} generated now)" in r.stderr
    report = Path(summary["report"]).read_text()
    for task in ("shop", "cities"):
        assert f"| {task} | smollm2-135m-instruct | t5-tiny-s | 100% | dsbs-gold | {TEST} | 1 |" in report
        assert f"| {task} | smollm2-135m-instruct | finetune |" in report  # the frontier: its teacher line
    runs = sorted(p.name for p in (mine / "sweeps" / "mine").iterdir() if (p / "result.json").exists())
    assert [n.split("-t5-tiny-s-")[0] for n in runs] == ["cities", "cities", "shop", "shop"]
    preds = [json.loads(x) for x in next((mine / "sweeps" / "mine").glob("cities-*-dsbs-*/predictions_test.jsonl"))
             .read_text().splitlines()]
    assert len(preds) == TEST and all(p["gold"] for p in preds)
    r = _dsbs("report", "--experiment", "mine", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
              "--out-dir", "again", cwd=mine)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (mine / "again" / "report.md").read_text().count("| cities |") >= 2
