"""Task specs a user writes: the same rows through a user's spec score as the built-in; every entry
point takes a spec path; bad specs and data are one line naming the file and field or row (exit 2);
unlabelled train data trains from the teacher only; an edited spec is a new run. No Ray here."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsbs_ray.errors import UserError
from dsbs_ray.job import load_config, resolve_paths, validate
from dsbs_ray.task_authoring import check_spec
from dsbs_ray.tasks import get_task, load_examples, load_teacher_outputs
from dsbs_ray.teacher import teacher_report

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "tasks"

CQA_AS_CSV = """\
# The CQA test rows, as a user would keep them: a CSV with their own column names, the five choices
# in one cell separated by |, and the teacher outputs under DATA_DIR/my-cqa/llm/.
name: my-cqa
data:
  test: cqa_test.csv
  train: cqa_test.csv
input: "{question_text}\\nAnswer Choices:\\n{options}"
label: correct
id: qid
answer: {kind: choice, choices: options}
prompt: %s
"""


def _dsbs(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dsbs_ray", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.fixture()
def cqa_csv(tmp_path, data_dir):
    """A user's folder with the CQA test split as a CSV and its spec; a data dir with the released
    PaLM outputs under the user's task name."""
    rows = load_examples("cqa", "test", data_dir)  # (the built-in's reading, to write the CSV from)
    raw = [json.loads(line) for line in (data_dir / "cqa" / "cqa_test.json").read_text().splitlines()]
    with open(tmp_path / "cqa_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["qid", "question_text", "options", "correct"])
        for r in raw:
            writer.writerow([r["id"], r["question"], "|".join(r["choices"]), r["answer"]])
    (tmp_path / "my-cqa.yaml").write_text(CQA_AS_CSV % (REPO / "dsbs_ray" / "task_specs" / "prompts" / "cqa.yaml"))
    (tmp_path / "data" / "my-cqa" / "llm").mkdir(parents=True)
    for f in (data_dir / "cqa" / "llm").glob("test_CoT_*.json"):
        shutil.copy(f, tmp_path / "data" / "my-cqa" / "llm" / f.name)
    assert len(rows) == len(raw) == 1221
    return tmp_path


def test_cqa_rows_as_a_users_csv_score_exactly_as_the_built_in(cqa_csv, data_dir):
    spec = str(cqa_csv / "my-cqa.yaml")
    mine, builtin = load_examples(spec, "test", cqa_csv / "data"), load_examples("cqa", "test", data_dir)
    assert [(e.id, e.input, e.gold) for e in mine] == [(e.id, e.input, e.gold) for e in builtin]
    assert teacher_report(spec, "test", cqa_csv / "data") == teacher_report("cqa", "test", data_dir) | {"task": "my-cqa"}
    r = _dsbs("teacher-report", "--task", spec, "--split", "test", "--data-dir", cqa_csv / "data")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"task": "my-cqa", "split": "test", "n": 1221, "accuracy": 0.7723, "parse_failures": 0}


def test_task_check_and_tasks_list_a_users_specs(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "mine")
    r = _dsbs("task", "check", tmp_path / "mine" / "shop.yaml")
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout)
    assert line["splits"]["train"]["rows"] == 160 and line["splits"]["test"]["rows"] == 40
    assert line["splits"]["valid"] == {"carved_from_train": 16, "of": 160}
    assert line["exemplar_labels"] == ["12", "18", "15", "14"] and line["answer"] == "number"
    assert "Q: Maya buys 2 candles at 6 dollars each." in r.stderr and "predict: Maya buys 2" in r.stderr
    cities = check_spec(str(tmp_path / "mine" / "cities.yaml"), show=open("/dev/null", "w"))
    assert cities["splits"]["test"]["rows"] == 40 and cities["splits"]["train"]["rows"] == 160  # carve.test
    r = _dsbs("tasks", "--tasks-dir", tmp_path / "mine")
    listed = {json.loads(line)["task"]: json.loads(line) for line in r.stdout.splitlines()}
    assert {"cqa", "svamp", "asdiv", "esnli", "anli1", "shop", "cities"} <= set(listed)
    assert listed["shop"]["answer"] == "number" and listed["cities"]["metric"] == "normalized_match"
    assert listed["cqa"]["spec"] == "built-in"


def test_the_example_data_is_what_its_generator_writes(tmp_path):
    subprocess.run([sys.executable, EXAMPLES / "make_data.py", tmp_path], check=True)
    for name in ("shop_train.csv", "shop_test.csv", "cities.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes()


def test_carve_test_is_fixed_and_disjoint_from_train():
    spec = str(EXAMPLES / "cities.yaml")
    train, test = load_examples(spec, "train"), load_examples(spec, "test")
    assert len(train) == 160 and len(test) == 40 and not {e.id for e in train} & {e.id for e in test}
    assert [e.id for e in load_examples(spec, "test")] == [e.id for e in test]


def test_answer_kinds_score_as_documented():
    shop, cities = get_task(str(EXAMPLES / "shop.yaml")), get_task(str(EXAMPLES / "cities.yaml"))
    assert shop.match("12.0", "12") and shop.match("1,200", "1200") and not shop.match("12.1", "12")
    assert not shop.match("twelve", "12")
    assert shop.parse("4 times 3 is 12. The answer is 12.\n\nQ: next").label == "12"
    assert cities.match("  paris. ", "Paris") and not cities.match("Paris France", "Paris")
    p = cities.parse("It says Oslo. So the city is Oslo.\nSentence: Another one. So the city is Lima.")
    assert (p.rationale, p.label, p.status) == ("It says Oslo.", "Oslo", "ok")
    assert cities.parse("no marker").status == "no_answer"


def _write_spec(folder: Path, **changes) -> Path:
    spec = json.loads(json.dumps(_SPEC))
    for key, value in changes.items():
        target, *path = key.split(".")
        node = spec
        for part in [target, *path][:-1]:
            node = node.setdefault(part, {})
        node[[target, *path][-1]] = value
    import yaml

    (folder / "t.yaml").write_text(yaml.safe_dump(spec))
    return folder / "t.yaml"


_SPEC = {"name": "tickets", "data": {"train": "t.csv", "test": "t.csv"}, "input": "{text}", "label": "team",
         "answer": {"kind": "choice", "labels": ["billing", "tech"]},
         "prompt": {"exemplar": "Q: {input}\nA: {rationale} So the answer is {answer}.\n\n", "query": "Q: {input}\nA:",
                    "exemplars": [{"input": "I was charged twice", "rationale": "Money.", "answer": "billing"}]}}


@pytest.mark.parametrize("changes, csv_text, needle", [
    ({}, "text,team\nhello,billing\nbye,sales\n", r"t.csv: row 1: label 'sales' is not one of 'billing', 'tech'"),
    ({"input": "{body}"}, "text,team\nhello,billing\n", r"t.yaml: input: \{body\} is not a column of .*t.csv"),
    ({"input": "{text|shout}"}, "text,team\nhello,billing\n", r"t.yaml: input: bad placeholder \{text\|shout\}"),
    ({"prompt.exemplars": [{"input": "x", "rationale": "r", "answer": "refund"}]}, "text,team\nhello,billing\n",
     r"t.yaml: exemplar 0 answers 'refund', not one of billing, tech"),
    ({"prompt.exemplar": "Q: {input}\nA: {rationale} Answer: {answer}.\n\n"}, "text,team\nhello,billing\n",
     r"t.yaml: exemplar 0 does not parse with the tickets parser \(no_answer"),
    ({}, "text,team\n", r"t.yaml: split train has no rows"),
    ({}, "text,team\nhello,billing\nbye,tech,extra\n", r"t.csv:3: 3 cells, but the header has 2 columns"),
    ({"answer.kind": "colour"}, "text,team\nhello,billing\n", r"t.yaml: answer.kind: Input should be"),
    ({"carve": {"test": {"fraction": 0.2, "rows": 3}}}, "text,team\nhello,billing\n", r"t.yaml: carve.test: give exactly one"),
    ({"carve": {"valid": {"rows": 3}}}, "text,team\nhello,billing\n", r"t.yaml: carve: carve.valid: give fraction"),
    ({"data.train": "t.txt"}, "text,team\nhello,billing\n", r"t.txt: unknown data file type '.txt'"),
    ({"data.all": "t.csv"}, "text,team\nhello,billing\n", r"t.yaml: data.all needs carve.test"),
    ({"data.test": None, "carve": {"test": {"rows": 5}}}, "text,team\nhello,billing\n",
     r"carve.test: 5 test rows of 1 leave no training rows"),
    ({"answer.label_map": {"1": "billing"}}, "text,team\nhello,2\n", r"t.csv: row 0: label '2' is not a key of "
                                                                       r"answer.label_map"),
    ({"answer": {"kind": "choice", "choices": "opts"}, "input": "{text}\n{opts}"}, "text,team,opts\nhello,a,a\n",
     r"t.csv: row 0: column 'opts' holds \['a'\], not a list of 2\+ choices"),
    ({"data.train": "{data_dir}/t.csv"}, "text,team\nhello,billing\n", r"^missing file \S*/t\.csv$"),  # in the data dir
])
def test_bad_specs_and_data_are_one_line_naming_file_and_field(tmp_path, changes, csv_text, needle):
    (tmp_path / "t.csv").write_text(csv_text)
    (tmp_path / "t.txt").write_text(csv_text)
    spec = _write_spec(tmp_path, **changes)
    with pytest.raises(UserError, match=needle):
        check_spec(str(spec), show=open("/dev/null", "w"))
    r = _dsbs("task", "check", spec)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")


def test_unlabelled_train_trains_from_the_teacher_only(tmp_path, students):
    """The paper's distillation setting: train rows without labels. finetune/dsbs-gold are refused in
    one line before anything starts; distill reads the teacher's labels."""
    (tmp_path / "t.csv").write_text("text,team\nI was charged twice,billing\nThe app crashes,tech\n"
                                    "Refund please,billing\nLogin fails,tech\n")
    (tmp_path / "u.csv").write_text("text\nDouble charge\nApp freezes\nWrong invoice\nPassword reset broken\n")
    spec = _write_spec(tmp_path, **{"data.train": "u.csv"})
    data = tmp_path / "data"
    (data / "tickets" / "llm").mkdir(parents=True)
    (data / "tickets" / "llm" / "train_CoT_0.json").write_text(json.dumps(
        [f"{why} So the answer is {team}." for why, team in [("Money.", "billing"), ("A bug.", "tech"),
                                                              ("Money.", "billing"), ("Access.", "tech")]]))
    common = dict(task=str(spec), student=str(students["t5-tiny-s"]), data_dir=str(data), zero="off", batch_size=2)
    with pytest.raises(UserError, match="split train has no gold labels .*use distill or dsbs-teacher"):
        validate(load_config(method="dsbs", label_source="gold", **common))
    r = _dsbs("train", "--task", spec, "--student", students["t5-tiny-s"], "--method", "standard",
              "--label-source", "gold", "--data-dir", data, "--zero", "off", "--batch-size", "2", "--no-ray")
    assert r.returncode == 2 and "split train has no gold labels" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    cfg = load_config(method="standard", label_source="teacher", **common)
    validate(cfg)
    from dsbs_ray.data import select_rows

    rows = select_rows(cfg, "</s>")
    teacher_labels = {"Double charge": "billing", "App freezes": "tech", "Wrong invoice": "billing",
                      "Password reset broken": "tech"}
    assert all(r["label"] == teacher_labels[r["input"]] for r in rows["train"] + rows["valid"])  # valid: carved
    assert len(rows["train"]) + len(rows["valid"]) == 4 and rows["test"][0]["label"] == "billing"
    assert len(load_teacher_outputs(str(spec), "train", data)) == 4


def test_an_edited_spec_is_a_new_run_and_a_moved_one_is_not(tmp_path, students):
    shutil.copytree(EXAMPLES, tmp_path / "a")
    cfg = dict(student=str(students["t5-tiny-s"]), method="standard", zero="off")
    first = resolve_paths(load_config(task=str(tmp_path / "a" / "shop.yaml"), **cfg)).name()
    assert first.startswith("shop-t5-tiny-s-standard-gold-")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert resolve_paths(load_config(task=str(tmp_path / "b" / "shop.yaml"), **cfg)).name() == first
    spec = tmp_path / "b" / "shop.yaml"
    spec.write_text(spec.read_text().replace("tolerance: 0.001", "tolerance: 0.5"))
    assert resolve_paths(load_config(task=str(spec), **cfg)).name() != first
    csv_file = tmp_path / "a" / "shop_train.csv"
    csv_file.write_text(csv_file.read_text() + "shop-9999,Ann has 1 cup and buys 1 more. How many cups?,2\n")
    assert resolve_paths(load_config(task=str(tmp_path / "a" / "shop.yaml"), **cfg)).name() != first


def test_task_new_writes_a_spec_that_checks(tmp_path):
    (tmp_path / "tickets.csv").write_text("id,text,team\n" + "".join(
        f"{i},message {i},{'billing' if i % 2 else 'tech'}\n" for i in range(20)))
    r = _dsbs("task", "new", "tickets", "--from", tmp_path / "tickets.csv")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["label"] == "team" and made["answer"] == "choice" and made["input"] == "{text}"
    line = check_spec(made["spec"], show=open("/dev/null", "w"))
    assert line["splits"]["test"]["rows"] == 4 and line["splits"]["train"]["labels"] == {"billing": 8, "tech": 8}
    assert line["exemplars_to_write"] == 4
    again = _dsbs("task", "new", "tickets", "--from", tmp_path / "tickets.csv")
    assert again.returncode == 2 and "exists" in again.stderr


def test_dsbs_train_takes_a_spec_path(tmp_path, students):
    shutil.copytree(EXAMPLES, tmp_path / "mine")
    r = _dsbs("train", "--task", "./shop.yaml", "--student", students["t5-tiny-s"], "--method", "standard",
              "--max-steps", 2, "--batch-size", 4, "--eval-every", 2, "--eval-limit", 4, "--test-limit", 4, "--max-input-length", 64,
              "--zero", "off", "--no-ray", "--output-dir", tmp_path / "runs", cwd=tmp_path / "mine")
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert (line["task"], line["task_spec"], line["steps"]) == ("shop", str(tmp_path / "mine" / "shop.yaml"), 2)
    assert line["train_rows"] == 144  # 160 rows less the 16 carved for validation
    preds = [json.loads(x) for x in Path(line["predictions"]).read_text().splitlines()]
    assert [p["gold"] for p in preds] == [e.gold for e in load_examples(str(tmp_path / "mine" / "shop.yaml"), "test")[:4]]
