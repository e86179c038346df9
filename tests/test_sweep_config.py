from pathlib import Path

import pytest

from dsbs_ray.errors import UserError
from dsbs_ray.sweep import expand, load_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def test_paper_grid_expands_to_the_papers_experiments():
    cfg = load_sweep(SWEEPS / "paper.yaml")
    jobs = expand(cfg)
    assert len(jobs) == 4 * 3 * 5 * 4  # tasks x students x fractions x methods
    assert {(j.method, j.label_source) for j in jobs} == {("standard", "gold"), ("standard", "teacher"),
                                                           ("dsbs", "gold"), ("dsbs", "teacher")}
    assert {j.lr for j in jobs} == {5e-5} and {j.batch_size for j in jobs} == {64}
    assert {j.max_input_length for j in jobs} == {1024} and {j.max_target_length for j in jobs} == {256}
    xxl = [j for j in jobs if j.student.endswith("xxl")]
    assert {(j.workers, j.zero, j.grad_accum) for j in xxl} == {(8, "3", 2)}
    assert len({j.name() for j in jobs}) == len(jobs)  # every trial has its own run dir


def test_local_grid_is_8_cpu_trials():
    jobs = expand(load_sweep(SWEEPS / "local.yaml"))
    assert len(jobs) == 8 and {j.gpus_per_worker for j in jobs} == {0.0}


@pytest.mark.parametrize("text, needle", [
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [finetune]\nlearning_rate: 1\n",
     "learning_rate: unknown key"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a, gpu: 1}]\nfractions: [1.0]\nmethods: [finetune]\n",
     "students.0.gpu: unknown key"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [kd]\n", "methods.0"),
    ("name: x\ntasks: [gsm8k]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [finetune]\n", "unknown task"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.5]\nmethods: [finetune]\n", "fraction"),
    ("[oops", "not valid YAML"),
])
def test_bad_sweep_configs_are_one_line_errors(tmp_path, text, needle):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle):
        expand(load_sweep(path))


def test_empty_grid(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: []\nmethods: [finetune]\n")
    with pytest.raises(UserError, match="grid is empty"):
        expand(load_sweep(path))
