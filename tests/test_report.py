"""The frontier table: per task, teacher and method, the smallest student, then the smallest fraction,
that beats that teacher; the released teacher's accuracy from its outputs (test split, else valid)."""

import pandas as pd
import pytest

from dsbs_ray.report import frontier, markdown, released_teacher_line, summarise


def _trials():
    rows = []
    # (student, parameters, method, fraction, accuracy per seed)
    grid = [("s", 1_000, "finetune", 0.5, [0.50, 0.52]), ("s", 1_000, "finetune", 1.0, [0.60, 0.62]),
            ("m", 5_000, "finetune", 0.5, [0.70, 0.72]), ("m", 5_000, "finetune", 1.0, [0.80, 0.82]),
            ("s", 1_000, "dsbs-gold", 0.5, [0.74, 0.78]), ("s", 1_000, "dsbs-gold", 1.0, [0.90, 0.90]),
            ("m", 5_000, "dsbs-gold", 0.25, [0.80, 0.80]),
            ("s", 1_000, "distill", 1.0, [0.10, 0.20])]
    for student, n, method, fraction, accs in grid:
        for seed, acc in enumerate(accs):
            rows.append({"task": "svamp", "teacher": "released", "student": student, "parameters": n, "method": method,
                         "family": "causal" if student == "m" else "seq2seq",  # a sweep may mix families
                         "fraction": fraction, "seed": seed, "accuracy": acc})
    return pd.DataFrame(rows)


def test_frontier_picks_the_smallest_student_then_the_smallest_fraction():
    summary = summarise(_trials())
    assert summary[(summary.student == "s") & (summary.method == "dsbs-gold") & (summary.fraction == 0.5)]\
        .accuracy.item() == pytest.approx(0.76)
    lines = {("svamp", "released"): (0.75, "test")}
    front = frontier(summary, lines).set_index("method")
    # finetune: the small student never beats 0.75; the medium one does, first at 100 %
    assert front.loc["finetune", "student"] == "m (causal)" and front.loc["finetune", "fraction"] == 1.0
    # dsbs-gold: the small student beats it already at 50 % (mean of seeds 0.76), although the
    # medium student beats it with less data (25 %): size comes first
    assert front.loc["dsbs-gold", "student"] == "s (seq2seq)" and front.loc["dsbs-gold", "fraction"] == 0.5
    assert pd.isna(front.loc["distill", "student"]) and front.loc["distill", "best_accuracy"] == pytest.approx(0.15)
    text = markdown("x", summary, front.reset_index(), lines, 15)
    assert "| svamp | released | distill | 75.0 (test) | none beats it |" in text
    assert "| svamp | released | dsbs-gold | 75.0 (test) | s (seq2seq) | 1,000 | 50% | 76.0 | 90.0 |" in text
    assert "| svamp | released | m | causal | 5,000 | finetune | 100% | 81.0 | 1.4 | 2 |" in text


def test_the_frontier_is_per_teacher():
    """The same students against a weak and a strong teacher: each teacher's line decides its own frontier."""
    trials = _trials()
    both = pd.concat([trials, trials.assign(teacher="weak")], ignore_index=True)
    front = frontier(summarise(both), {("svamp", "released"): (0.75, "test"), ("svamp", "weak"): (0.3, "test")})
    front = front.set_index(["teacher", "method"])
    assert front.loc[("released", "finetune"), "student"] == "m (causal)"
    assert front.loc[("weak", "finetune"), "student"] == "s (seq2seq)" and front.loc[("weak", "finetune"), "fraction"] == 0.5
    assert front.loc[("weak", "finetune"), "teacher_accuracy"] == 0.3


def test_frontier_without_a_teacher_accuracy():
    front = frontier(summarise(_trials()), {})
    assert front.student.isna().all() and front.teacher_accuracy.isna().all()


def test_teacher_accuracy_uses_test_then_valid(data_dir):
    assert released_teacher_line("svamp", str(data_dir)) == {"accuracy": 0.74, "split": "test", "rows": 200}
    # the released data has no test outputs for anli1
    assert released_teacher_line("anli1", str(data_dir)) == {"accuracy": 0.668, "split": "valid", "rows": 1000}


def test_report_on_a_missing_experiment_is_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("dsbs")
    r = subprocess.run([str(exe), "report", "--experiment", "nope", "--tracking-uri",
                        f"sqlite:///{tmp_path / 'mlflow.db'}", "--out-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: experiment: no MLflow experiment 'nope' in sqlite:///{tmp_path / 'mlflow.db'}"
    assert not (tmp_path / "out").exists()
