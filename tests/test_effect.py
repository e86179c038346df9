"""sweeps/effect-cpu.yaml, the effect sweep `make effect` runs, at a few steps: its grid as the file
says (task, student, methods, seeds, teacher), only the sizes shrunk; its report carries what the
README's effect table is read from (both methods with intervals, the paired difference, the valid
curve)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_effect_sweep_runs_at_a_few_steps_and_reports_its_intervals_and_curve(data_dir, tmp_path):
    cfg = yaml.safe_load((REPO / "sweeps" / "effect-cpu.yaml").read_text())
    assert (cfg["tasks"], cfg["methods"], cfg["seeds"], cfg["teacher"]) == (["cqa"], ["finetune", "dsbs-gold"], [0, 1],
                                                                            "released")
    assert cfg["students"][0]["id"] == "embedded:smollm2-135m-instruct" and "test_limit" not in cfg  # whole test split
    small = {"fractions": [0.25], "train_limit": 100, "max_steps": 4, "eval_every": 2, "batch_size": 4,
             "test_limit": 16, "data_dir": str(data_dir), "output_dir": str(tmp_path / "sweeps"),
             "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    path = tmp_path / "effect-small.yaml"
    path.write_text(yaml.safe_dump(cfg | small))
    r = subprocess.run([sys.executable, "-m", "dsbs_ray", "sweep", str(path)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (summary["trials"], summary["finished"], summary["failed"]) == (4, 4, 0)
    results = [json.loads(p.read_text()) for p in (tmp_path / "sweeps").glob("*/*/result.json")]
    assert len(results) == 4 and {(x["method"], x["seed"]) for x in results} == {
        ("finetune", 0), ("finetune", 1), ("dsbs-gold", 0), ("dsbs-gold", 1)}
    # 90 train rows after the 10-row valid carve; 25 %: 22 rows, the same for both methods
    assert {(x["family"], x["steps"], x["test_rows"], x["valid_rows"], x["train_rows"]) for x in results} == {
        ("causal", 4, 16, 10, 22)}
    assert all(not (Path(x["run_dir"]) / "model").exists() for x in results)  # keep: none
    text = Path(summary["report"]).read_text()
    paired = next(ln for ln in text.splitlines() if ln.startswith("| cqa | released | smollm2-135m-instruct | 25% |"))
    cells = [c.strip() for c in paired.strip("|").split("|")]
    assert cells[4:7] == ["dsbs-gold", "16", "2"]  # method, test rows, seeds
    for cell in cells[7:10]:  # finetune, dsbs, difference: each a value and its [low, high]
        value, interval = cell.split(" [")
        low, high = (float(v) for v in interval.rstrip("]").split(","))
        assert low <= float(value) <= high
    curve = next(ln for ln in text.splitlines() if ln.startswith("| cqa | smollm2-135m-instruct | dsbs-gold | 25% |"))
    assert "## Valid accuracy by step" in text and "| step 2 | step 4 |" in text and curve.count("|") == 7
