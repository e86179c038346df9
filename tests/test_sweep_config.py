import subprocess
import sys
from pathlib import Path

import pytest

from dsbs_ray.errors import UserError
from dsbs_ray.ledger import TRIAL_FIXED_SECONDS
from dsbs_ray.sweep import expand, load_sweep
from ports import free_port

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


def test_local_grid_is_12_cpu_trials_with_the_filter_an_axis_of_dsbs_only():
    jobs = expand(load_sweep(SWEEPS / "local.yaml"))
    assert len(jobs) == 12 and {j.gpus_per_worker for j in jobs} == {0.0}
    assert len({j.name() for j in jobs}) == 12
    # both families on the size axis; the pretrained student has its own learning rate and steps
    by_student = {j.student: (j.lr, j.max_steps) for j in jobs}
    assert by_student == {"work/students/t5-tiny-s": (3e-3, 60), "embedded:smollm2-135m-instruct": (1e-4, 4)}
    finetune = [j for j in jobs if j.method == "standard"]
    assert len(finetune) == 4 and {(j.teacher, j.annotations, j.rationale_filter) for j in finetune} == \
        {("released", None, "none")}  # finetune reads no teacher: one trial per point, whatever the teachers
    dsbs = [j for j in jobs if j.method == "dsbs"]
    assert {j.rationale_filter for j in dsbs} == {"none", "agree-gold"} and {j.teacher for j in dsbs} == \
        {"smollm2-135m-instruct"} and len({j.annotations for j in dsbs}) == 1 and {j.train_limit for j in jobs} == {64}


def test_teachers_are_an_axis_and_each_names_its_store_entry(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [finetune, distill]\n"
                    "teachers: [released, {model: 'embedded:smollm2-135m-instruct', temperature: 0.7, samples: 5},"
                    " {model: 'embedded:smollm2-135m-instruct', temperature: 0.7, samples: 5, name: other,"
                    " max_new_tokens: 64}]\nrationale_filter: [none, agree-gold]\n")
    jobs = expand(load_sweep(path))
    distill = {j.teacher: j for j in jobs if j.label_source == "teacher"}
    assert len(jobs) == 4 and set(distill) == {"released", "smollm2-135m-instruct-t0.7-k5", "other"}
    assert distill["released"].annotations is None and distill["other"].samples == 5
    assert distill["other"].annotations != distill["smollm2-135m-instruct-t0.7-k5"].annotations  # other sampling


@pytest.mark.parametrize("text, needle", [
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [finetune]\nlearning_rate: 1\n",
     "learning_rate: unknown key"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a, gpu: 1}]\nfractions: [1.0]\nmethods: [finetune]\n",
     "students.0.gpu: unknown key"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [kd]\n", "methods.0"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a, lr: 0}]\nfractions: [1.0]\nmethods: [finetune]\n", "students.0.lr"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a, max_steps: 0}]\nfractions: [1.0]\nmethods: [finetune]\n",
     "students.0.max_steps"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [finetune]\nprices: {gpu_hour: -1}\n",
     "prices.gpu_hour"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [finetune]\nprices: {per_token: 1}\n",
     "prices.per_token: unknown key"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a, parameters: 0}]\nfractions: [1.0]\nmethods: [finetune]\n",
     "students.0.parameters"),
    ("name: x\ntasks: [gsm8k]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [finetune]\n", "unknown task"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.5]\nmethods: [finetune]\n", "fraction"),
    ("name: \"it's mine\"\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [finetune]\n", "name"),
    ("[oops", "not valid YAML"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [distill]\n"
     "teacher: {temperature: 0, samples: 5}\n", "teacher: samples: 5 samples at temperature 0"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [distill]\n"
     "teachers: [{temperature: 0.7}, {temperature: 0.7}]\n", "two teachers share a name"),
    ("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: [1.0]\nmethods: [distill]\n"
     "rationale_filter: [agree-everyone]\n", "rationale_filter"),
])
def test_bad_sweep_configs_are_one_line_errors(tmp_path, text, needle):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle):
        expand(load_sweep(path))


def test_grad_accum_sets_the_micro_batch(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\ntasks: [svamp]\nstudents: [{id: a, workers: 2, grad_accum: 4}]\nfractions: [1.0]\n"
                    "methods: [finetune]\nbatch_size: 64\n")
    (job,) = expand(load_sweep(path))
    assert (job.micro, job.grad_accum, job.workers) == (8, 4, 2)
    path.write_text("name: x\ntasks: [svamp]\nstudents: [{id: a, workers: 2, grad_accum: 4, micro_batch_size: 16}]\n"
                    "fractions: [1.0]\nmethods: [finetune]\nbatch_size: 64\n")
    with pytest.raises(UserError, match="batch_size 64 is not micro_batch_size 16 x workers 2 x grad_accum 4"):
        expand(load_sweep(path))


def test_empty_grid(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\ntasks: [svamp]\nstudents: [{id: a}]\nfractions: []\nmethods: [finetune]\n")
    with pytest.raises(UserError, match="grid is empty"):
        expand(load_sweep(path))


def _sweep_file(tmp_path, tiny, data, **overrides) -> Path:
    import yaml

    cfg = {"name": "bad", "tasks": ["svamp"], "students": [{"id": str(tiny["t5-tiny-s"]), "zero": "off"}],
           "fractions": [0.25], "methods": ["finetune"], "max_steps": 2, "batch_size": 4, "data_dir": str(data),
           "output_dir": str(tmp_path / "out"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"} | overrides
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("override, needle", [
    ({"students": [{"id": "/nonexistent/t5-student"}]}, "student checkpoint /nonexistent/t5-student does not exist"),
    ({"tracking_uri": "http://127.0.0.1:{port}"}, "tracking_uri: cannot reach the MLflow server"),
    ({"tracking_uri": "sqlite:////nonexistent/dir/mlflow.db"}, "tracking_uri: directory /nonexistent/dir"),
    ({"tracking_uri": "file:///tmp/mlruns"}, "file store"),
    ({"methods": ["dsbs-teacher"], "data_dir": "{tmp}/no_teacher"}, "svamp/llm/train_CoT_0.json (teacher outputs)"),
    ({"students": [{"id": "embedded:gpt-17"}]}, "student embedded:gpt-17: unknown embedded student"),
])
def test_bad_sweeps_fail_before_any_trial(tmp_path, students, data_dir, override, needle):
    """Each mistake is one line on stderr, exit 2, and nothing launched (no Tune dir, no MLflow store)."""
    import json as _json

    closed = free_port()  # a port nothing listens on
    override = _json.loads(_json.dumps(override).replace("{port}", str(closed)).replace("{tmp}", str(tmp_path)))
    path = _sweep_file(tmp_path, students, data_dir, **override)
    exe = Path(sys.executable).with_name("dsbs")
    r = subprocess.run([str(exe), "sweep", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_longest_trials_go_first(students, data_dir, tmp_path):
    from dsbs_ray.sweep import check_sweep, load_sweep

    path = _sweep_file(tmp_path, students, data_dir, methods=["finetune", "dsbs-gold"],
                       students=[{"id": str(students[n]), "zero": "off"} for n in ("t5-tiny-s", "t5-tiny-l", "t5-tiny-m")])
    jobs, _, _ = check_sweep(load_sweep(path))
    order = [(Path(j.student).name, j.method) for j in jobs]
    assert order[0] == ("t5-tiny-l", "dsbs") and order[-1] == ("t5-tiny-s", "standard")


def test_a_teacher_the_sweep_cannot_reach_or_load_is_one_line_before_any_engine(tmp_path, students, data_dir):
    from dsbs_ray.sweep import check_sweep

    for teacher, needle in (({"endpoint": "http://127.0.0.1:9", "model": "m"}, "endpoint http://127.0.0.1:9 is not reachable"),
                            ({"model": str(tmp_path / "no-model")}, "does not exist"),
                            ({"model": "nobody/no-such-teacher"}, "cannot load it from the Hugging Face hub")):
        path = _sweep_file(tmp_path, students, data_dir, methods=["finetune", "dsbs-gold"], teacher=teacher,
                           annotation_store=str(tmp_path / "store"))
        with pytest.raises(UserError, match=needle):
            check_sweep(load_sweep(path))
    assert not (tmp_path / "store").exists()  # nothing was generated, not even an entry


def test_agree_gold_on_a_train_split_without_gold_is_one_line(tmp_path, students, data_dir):
    import json
    import shutil

    from dsbs_ray.sweep import check_sweep

    data = tmp_path / "D" / "svamp"
    data.mkdir(parents=True)
    shutil.copy(data_dir / "svamp" / "svamp_test.json", data / "svamp_test.json")
    rows = [json.loads(line) for line in (data_dir / "svamp" / "svamp_train.json").read_text().splitlines()[:20]]
    for row in rows[:7]:
        row["label"] = ""  # a user's rows the teacher should label, with no gold
    (data / "svamp_train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = _sweep_file(tmp_path, students, tmp_path / "D", methods=["dsbs-teacher"],
                       rationale_filter=["none", "agree-gold"], teacher={"model": "embedded:smollm2-135m-instruct"},
                       annotation_store=str(tmp_path / "store"))
    with pytest.raises(UserError, match="agree-gold needs gold labels, but 7 of 20 rows of svamp/train have none"):
        check_sweep(load_sweep(path))
    # gold-label methods on those rows: refused before any engine starts, naming the count
    path = _sweep_file(tmp_path, students, tmp_path / "D", methods=["dsbs-gold"], rationale_filter="none",
                       teacher={"model": "embedded:smollm2-135m-instruct"}, annotation_store=str(tmp_path / "store"))
    with pytest.raises(UserError, match="split train has 7 of 20 rows without a gold label .*use distill or dsbs-teacher"):
        check_sweep(load_sweep(path))


def test_the_papers_dry_run_prints_the_bill_of_its_full_grid_before_any_check(tmp_path, data_dir):
    """No hub here: the bill still prints (student sizes from paper.yaml, row counts and lengths from
    the data, e-SNLI's 549k train rows from the hub's count), then the hub check fails in one line."""
    import json

    cfg = (SWEEPS / "paper.yaml").read_text() + f"data_dir: {data_dir}\ntracking_uri: sqlite:///{tmp_path}/mlflow.db\n"
    (tmp_path / "paper.yaml").write_text(cfg)
    r = subprocess.run([str(Path(sys.executable).with_name("dsbs")), "sweep", str(tmp_path / "paper.yaml"), "--dry-run"],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    estimates = [ln["estimate"] for ln in lines if "estimate" in ln]
    ledger = next(ln["ledger"] for ln in lines if "ledger" in ln)
    assert len(estimates) == 240 and ledger["trials"] == 240 and ledger["students_without_a_size"] == []
    full = {(e["task"], e["method"], e["label_source"]): e for e in estimates
            if e["fraction"] == 1.0 and e["student"] == "t5-v1_1-base"}
    assert full[("esnli", "dsbs", "gold")]["teacher_rows"] == 549_367  # a valid split of its own: no carve
    assert full[("svamp", "dsbs", "gold")]["teacher_rows"] == 720  # 800 train rows less the 10 % carve
    assert full[("svamp", "standard", "gold")]["teacher_tokens_counted"] == "estimated"
    assert full[("svamp", "standard", "gold")]["teacher_rows"] == 0  # finetune reads no teacher
    e = full[("cqa", "dsbs", "teacher")]
    assert e["accelerator"] == "gpu" and e["parameters"] == 247_577_856
    # the steps' FLOPs at the assumed utilisation, plus the trial's fixed seconds on its one GPU
    assert e["accelerator_seconds"] == pytest.approx(6 * e["parameters"] * e["train_tokens"] / (989e12 * 0.4)
                                                     + TRIAL_FIXED_SECONDS)
    assert e["fixed_accelerator_seconds"] == TRIAL_FIXED_SECONDS
    xxl = next(x for x in estimates if x["student"] == "t5-v1_1-xxl")
    assert xxl["fixed_accelerator_seconds"] == 8 * TRIAL_FIXED_SECONDS  # 8 workers of 1 GPU wait through it
    fixed_usd = sum(x["fixed_accelerator_seconds"] / 3600 * 2.49 for x in estimates)
    assert ledger["fixed_usd"] == pytest.approx(fixed_usd) and ledger["fixed_share"] == pytest.approx(
        fixed_usd / ledger["total_usd"])
    assert e["cost_usd"] == pytest.approx(e["accelerator_seconds"] / 3600 * 2.49
                                          + (e["teacher_prompt_tokens"] + e["teacher_output_tokens"]) / 1e6 * 3.5)
    # dsbs trains the rationale too: more tokens than standard on the same rows and steps
    assert e["train_tokens"] > full[("cqa", "standard", "teacher")]["train_tokens"]
    assert ledger["gpu_hours"] == pytest.approx(sum(x["accelerator_seconds"] for x in estimates) / 3600)
    # each task's annotation once: the largest fraction of each (task, teacher), not the sum over trials
    once = sum(x["teacher_prompt_tokens"] + x["teacher_output_tokens"] for x in estimates
               if x["fraction"] == 1.0 and x["student"] == "t5-v1_1-base" and x["method"] == "dsbs"
               and x["label_source"] == "gold")
    assert ledger["teacher_tokens"] == once
    assert "estimated bill of 240 trials" in r.stderr
    assert f"{100 * ledger['fixed_share']:.1f}% of the bill" in r.stderr
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: student google/t5-v1_1-base")
