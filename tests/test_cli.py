import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def dsbs(*args, cwd=None, env=None):
    """Run the installed `dsbs` console script (the one beside this Python)."""
    exe = Path(sys.executable).with_name("dsbs")
    assert exe.exists(), f"console script not installed at {exe}"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_teacher_report_prints_one_json_line(data_dir):
    r = dsbs("teacher-report", "--task", "cqa", "--split", "test", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"task": "cqa", "split": "test", "n": 1221, "accuracy": 0.7723,
                                    "parse_failures": 0}


def test_teacher_report_prints_four_decimals(data_dir):
    r = dsbs("teacher-report", "--task", "svamp", "--split", "test", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    assert '"accuracy": 0.7400,' in r.stdout and json.loads(r.stdout)["accuracy"] == 0.74


def test_teacher_report_data_dir_from_env(data_dir, tmp_path):
    import os
    env = dict(os.environ, DSBS_DATA_DIR=str(data_dir))
    r = dsbs("teacher-report", "--task", "anli1", "--split", "valid", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == 0.668


def _assert_one_line_error(r, *needles):
    assert r.returncode != 0
    assert r.stdout == ""
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_unknown_task_lists_known_tasks(data_dir):
    r = dsbs("teacher-report", "--task", "gsm8k", "--split", "test", "--data-dir", str(data_dir))
    _assert_one_line_error(r, "gsm8k", "cqa", "svamp", "asdiv", "esnli", "anli1")


def test_missing_teacher_file_names_path(tmp_path, data_dir):
    (tmp_path / "svamp").mkdir()
    shutil.copy(data_dir / "svamp" / "svamp_test.json", tmp_path / "svamp")
    r = dsbs("teacher-report", "--task", "svamp", "--split", "test", "--data-dir", str(tmp_path))
    _assert_one_line_error(r, str(tmp_path / "svamp" / "llm" / "test_CoT_0.json"))


def test_count_mismatch_names_both_counts(tmp_path, data_dir):
    (tmp_path / "svamp" / "llm").mkdir(parents=True)
    shutil.copy(data_dir / "svamp" / "svamp_test.json", tmp_path / "svamp")
    outputs = json.loads((data_dir / "svamp" / "llm" / "test_CoT_0.json").read_text())
    (tmp_path / "svamp" / "llm" / "test_CoT_0.json").write_text(json.dumps(outputs[:150]))
    r = dsbs("teacher-report", "--task", "svamp", "--split", "test", "--data-dir", str(tmp_path))
    _assert_one_line_error(r, "150 teacher outputs", "200 rows")


def test_missing_data_dir(tmp_path):
    r = dsbs("teacher-report", "--task", "cqa", "--split", "test", "--data-dir", str(tmp_path / "nope"))
    _assert_one_line_error(r, str(tmp_path / "nope"))


@pytest.mark.parametrize("args", [["teacher-report", "--split", "test"], ["no-such-command"]])
def test_bad_flags_exit_nonzero_without_traceback(args):
    r = dsbs(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_module_entry_point_matches_script(data_dir):
    r = subprocess.run([sys.executable, "-m", "dsbs_ray", "tasks"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    names = [json.loads(line)["task"] for line in r.stdout.splitlines()]
    assert names == ["anli1", "asdiv", "cqa", "esnli", "svamp"]  # the built-in specs, by name


# --- dsbs train: bad input fails before any worker (or Ray) starts ----------------------------


@pytest.mark.parametrize("flags, needles", [
    (["--fraction", "0"], ["fraction", "greater than 0"]),
    (["--fraction", "1.5"], ["fraction", "1.5"]),
    (["--alpha", "2"], ["alpha", "less than or equal to 1"]),
    (["--method", "distill"], ["method", "distill"]),
    (["--label-source", "palm"], ["label_source"]),
    (["--zero", "4"], ["zero"]),
    (["--batch-size", "10", "--workers", "4"], ["batch_size 10", "workers 4"]),
])
def test_train_rejects_bad_flags(students, data_dir, flags, needles):
    r = dsbs("train", "--task", "svamp", "--student", str(students["t5-tiny-s"]), "--data-dir", str(data_dir), *flags)
    _assert_one_line_error(r, *needles)


def test_train_missing_student(data_dir, tmp_path):
    r = dsbs("train", "--task", "svamp", "--student", str(tmp_path / "no-such-student"), "--data-dir", str(data_dir))
    _assert_one_line_error(r, str(tmp_path / "no-such-student"))


def test_train_student_of_no_known_family_and_unknown_embedded_name(data_dir, tmp_path):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    r = dsbs("train", "--task", "svamp", "--student", str(tmp_path / "vit"), "--data-dir", str(data_dir))
    _assert_one_line_error(r, str(tmp_path / "vit"), "'vit'", "neither a seq2seq LM nor a causal LM")
    r = dsbs("train", "--task", "svamp", "--student", "embedded:gpt-17", "--data-dir", str(data_dir))
    _assert_one_line_error(r, "embedded:gpt-17", "embedded:smollm2-135m-instruct")


def test_train_method_needing_missing_teacher_outputs(students, data_dir):
    r = dsbs("train", "--task", "esnli", "--student", str(students["t5-tiny-s"]), "--method", "standard",
             "--label-source", "teacher", "--data-dir", str(data_dir))
    _assert_one_line_error(r, str(data_dir / "esnli" / "llm" / "train_CoT_0.json"))


def test_make_tiny_students_cli(tmp_path):
    r = dsbs("make-tiny-students", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["student"] for row in rows] == ["t5-tiny-s", "t5-tiny-m", "t5-tiny-l"]
    assert rows[0]["parameters"] < rows[1]["parameters"] < rows[2]["parameters"]
    assert all((Path(row["path"]) / "config.json").exists() for row in rows)


def test_mlflow_links_without_a_store_is_one_line_and_creates_nothing(tmp_path):
    db = tmp_path / "mlflow.db"
    r = subprocess.run([str(Path(sys.executable).with_name("dsbs")), "mlflow-links", "--tracking-uri", f"sqlite:///{db}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: tracking_uri: no MLflow store at {db} yet (run `make sweep` or `make demo`)"
    assert not db.exists()
