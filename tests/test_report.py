"""The frontier table: per task, teacher and method, the smallest student, then the smallest fraction,
that beats that teacher; the released teacher's accuracy from its outputs (test split, else valid)."""

import pandas as pd
import pytest

from dsbs_ray.report import (
    PAIRED_COLUMNS, curve_section, frontier, markdown, paired_differences, released_teacher_line, run_description,
    summarise, valid_curves,
)

NO_PAIRS = pd.DataFrame(columns=PAIRED_COLUMNS)
T_975_DF1 = 12.7062  # the 97.5 % quantile of Student's t with 1 degree of freedom


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
    text = markdown("x", summary, front.reset_index(), lines, NO_PAIRS, 15)
    assert "| svamp | released | distill | 75.0 (test) | none beats it |" in text
    assert "| svamp | released | dsbs-gold | 75.0 (test) | s (seq2seq) | 1,000 | 50% | 76.0 | — | not priced |" in text
    # two seeds (0.80, 0.82): the 95 % t interval of the mean is t(0.975, 1) x sd / sqrt(2)
    half = T_975_DF1 * 0.02 / 2 ** 0.5 / 2 ** 0.5 * 100
    assert f"| svamp | released | m | causal | 5,000 | finetune | 100% | 81.0 | ±{half:.1f} | 2 | — |" in text
    assert "Intervals: 95 % t intervals" in text and "One seed" not in text


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


def test_the_cheapest_configuration_that_beats_the_teacher_is_by_cost_not_size():
    """The smallest winner is s at 50 %; a bigger student on 25 % of the data costs less (less teacher
    annotation) and is the cheapest."""
    trials = _trials()
    trials["cost_usd"] = trials.parameters / 1000 * trials.fraction * 4  # s@50%: 2.0, m@25%: 5.0, ...
    trials.loc[(trials.student == "m") & (trials.fraction == 0.25), "cost_usd"] = 1.5
    front = frontier(summarise(trials), {("svamp", "released"): (0.75, "test")}).set_index("method")
    row = front.loc["dsbs-gold"]
    assert row.student == "s (seq2seq)" and row.cost_usd == pytest.approx(2.0)
    assert row.cheapest_student == "m (causal)" and row.cheapest_fraction == 0.25
    assert row.cheapest_cost_usd == pytest.approx(1.5) and row.cheapest_accuracy == pytest.approx(0.80)
    text = markdown("x", summarise(trials), front.reset_index(), {("svamp", "released"): (0.75, "test")}, NO_PAIRS, 15)
    assert "| s (seq2seq) | 1,000 | 50% | 76.0 | $2.00 | m (causal) | 25% | 80.0 | $1.50 | 90.0 |" in text


def test_one_seed_says_so():
    one = _trials()[lambda d: d.seed == 0]
    summary = summarise(one)
    assert summary.ci95.isna().all()
    text = markdown("x", summary, frontier(summary, {}), {}, NO_PAIRS, 8)
    assert "One seed per cell: no interval over seeds" in text and "| 1 seed |" in text


def _log_trial(c, exp, method, seed, correct: dict):
    import json
    import tempfile
    from pathlib import Path

    run = c.create_run(exp, tags={"dsbs.role": "trial"}).info.run_id
    for k, v in {"task": "svamp", "teacher": "none" if method == "finetune" else "released", "student": "s",
                 "method": method, "fraction": 1.0, "seed": seed, "parameters": 10}.items():
        c.log_param(run, k, v)
    c.log_metric(run, "accuracy", sum(correct.values()) / len(correct))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "predictions_test.jsonl"
        path.write_text("".join(json.dumps({"id": i, "correct": ok}) + "\n" for i, ok in correct.items()))
        c.log_artifact(run, str(path))
    c.set_terminated(run, "FINISHED")


def test_paired_difference_over_test_rows_with_a_bootstrap_interval(tmp_path):
    """dsbs against finetune on the same rows, correctness averaged over seeds per row: the mean
    difference is exact, and the bootstrap interval holds it and is as wide as the rows allow."""
    import numpy as np

    from dsbs_ray import tracking
    from dsbs_ray.report import collect_trials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = c.create_experiment("paired", artifact_location=str(tmp_path / "artifacts"))
    rng = np.random.default_rng(1)
    n = 200
    base = {seed: dict(enumerate((rng.random(n) < 0.4).astype(int).tolist())) for seed in (0, 1)}
    dsbs = {seed: dict(enumerate((rng.random(n) < 0.6).astype(int).tolist())) for seed in (0, 1)}
    for seed in (0, 1):
        _log_trial(c, exp, "finetune", seed, {str(i): bool(v) for i, v in base[seed].items()})
        _log_trial(c, exp, "dsbs-gold", seed, {str(i): bool(v) for i, v in dsbs[seed].items()})
    paired = paired_differences(collect_trials("paired", uri), uri)
    assert len(paired) == 1
    r = paired.iloc[0]
    per_row = [(dsbs[0][i] + dsbs[1][i]) / 2 - (base[0][i] + base[1][i]) / 2 for i in range(n)]
    assert r.rows == n and r.seeds == 2 and r.method == "dsbs-gold"
    assert r.difference == pytest.approx(np.mean(per_row), abs=1e-12)
    se = np.std(per_row, ddof=1) / np.sqrt(n)
    assert r.low < r.difference < r.high
    assert (r.high - r.low) == pytest.approx(2 * 1.96 * se, rel=0.2)  # the bootstrap agrees with the normal width
    # each method's own accuracy on the same rows, with its interval
    for name, hits in (("finetune", base), ("accuracy", dsbs)):
        per_row = [(hits[0][i] + hits[1][i]) / 2 for i in range(n)]
        assert r[name] == pytest.approx(np.mean(per_row), abs=1e-12)
        assert r[f"{name}_low"] < r[name] < r[f"{name}_high"]
        assert (r[f"{name}_high"] - r[f"{name}_low"]) == pytest.approx(
            2 * 1.96 * np.std(per_row, ddof=1) / np.sqrt(n), rel=0.2)
    summary = summarise(collect_trials("paired", uri))
    text = markdown("paired", summary, frontier(summary, {}), {}, paired, 4)
    assert (f"| {100 * r.finetune:.1f} [{100 * r.finetune_low:.1f}, {100 * r.finetune_high:.1f}] | "
            f"{100 * r.accuracy:.1f} [{100 * r.accuracy_low:.1f}, {100 * r.accuracy_high:.1f}] | "
            f"{100 * r.difference:+.1f} [{100 * r.low:+.1f}, {100 * r.high:+.1f}] |") in text


def test_valid_curves_average_each_steps_accuracy_over_seeds(tmp_path):
    from dsbs_ray import tracking
    from dsbs_ray.report import collect_trials

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = c.create_experiment("curves", artifact_location=str(tmp_path / "artifacts"))
    history = {("finetune", 0): [0.2, 0.4, 0.5], ("finetune", 1): [0.3, 0.4, 0.45], ("dsbs-gold", 0): [0.1, 0.5, 0.6],
               ("dsbs-gold", 1): [0.3, 0.5, 0.6]}
    for (method, seed), values in history.items():
        _log_trial(c, exp, method, seed, {"0": True})
    for run in c.search_runs([exp], filter_string="tags.`dsbs.role` = 'trial'"):
        values = history[run.data.params["method"], int(run.data.params["seed"])]
        for step, v in zip((10, 20, 30), values):
            tracking.log_metrics(c, run.info.run_id, {"valid_accuracy": v}, step=step)
    curves = valid_curves(collect_trials("curves", uri), uri)
    got = {(r.method, r.step): (round(r.valid_accuracy, 6), r.seeds) for r in curves.itertuples()}
    assert got == {("finetune", 10): (0.25, 2), ("finetune", 20): (0.4, 2), ("finetune", 30): (0.475, 2),
                   ("dsbs-gold", 10): (0.2, 2), ("dsbs-gold", 20): (0.5, 2), ("dsbs-gold", 30): (0.6, 2)}
    lines = curve_section(curves)
    assert "| step 10 | step 20 | step 30 |" in lines[4]
    assert any(line.endswith("| finetune | 100% | 25.0 | 40.0 | 47.5 |") for line in lines), lines


def test_a_rerun_logging_the_same_steps_again_leaves_one_point_per_step(tmp_path):
    """A trial killed after logging step 10 and rerun into its reopened MLflow run (a fresh process:
    nothing cached) logs steps 10 and 20: the history holds each step once, the first value kept."""
    from dsbs_ray import tracking

    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("rerun", artifact_location=str(tmp_path / "artifacts"))
    run_id = c.create_run(exp).info.run_id
    tracking.log_metrics(c, run_id, {"loss": 2.0, "valid_accuracy": 0.1}, step=10)
    tracking._LOGGED_STEPS.clear()  # (the rerun's process)
    for step, loss in ((10, 1.5), (20, 1.0)):
        tracking.log_metrics(c, run_id, {"loss": loss, "valid_accuracy": 0.2}, step=step)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(10, 2.0), (20, 1.0)]
    assert [m.step for m in c.get_metric_history(run_id, "valid_accuracy")] == [10, 20]


def test_the_run_description_keeps_tables_and_names_figures_within_mlflows_limit():
    summary = summarise(pd.concat([_trials().assign(student=f"s{i}") for i in range(60)], ignore_index=True))
    text = markdown("x", summary, frontier(summary, {}), {}, NO_PAIRS, 8)
    assert len(text) > 8000
    desc = run_description(text)
    assert len(desc) <= 8000 and "![" not in desc and "`report/accuracy_vs_cost.png`" in desc
    assert desc.startswith("# Sweep report: x") and desc.endswith("the whole report is report/report.md)")
