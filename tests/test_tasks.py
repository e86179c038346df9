import json

import pytest

from dsbs_ray.errors import UserError
from dsbs_ray.task_spec import known_tasks
from dsbs_ray.tasks import get_task, load_examples, load_teacher_outputs
from dsbs_ray.teacher import teacher_report

TASKS = ["cqa", "svamp", "asdiv", "esnli", "anli1"]
parse_multiple_choice, parse_equation = get_task("cqa").parse, get_task("svamp").parse
parse_nli_answer_line, parse_nli_so_answer = get_task("esnli").parse, get_task("anli1").parse

# --- input formatting, exactly as the paper builds its inputs --------------------------------


def test_cqa_input_format(data_dir):
    first = load_examples("cqa", "test", data_dir)[0]
    assert first.input == (
        "A beaver is know for building prowess, their supplies come from where?\n"
        "Answer Choices:\n(a) british columbia\n(b) body of water\n(c) wooded area\n(d) pay debts\n(e) zoo"
    )
    assert first.gold == "wooded area"
    assert first.id == "080ef6941410139d6869e78122bc741e"


def test_nli_input_joined_by_eos_and_labels_as_text(data_dir):
    esnli = load_examples("esnli", "valid", data_dir)
    assert esnli[0].input == (
        "Two women are embracing while holding to go packages.</s>"
        "The sisters are hugging goodbye while holding to go packages after just eating lunch."
    )
    assert [e.gold for e in esnli[:3]] == ["neutral", "entailment", "contradiction"]
    anli = load_examples("anli1", "valid", data_dir, eos_token="<EOS>")
    assert "<EOS>Form and meaning are the only aspects" in anli[0].input
    assert anli[0].gold == "contradiction" and anli[0].id == "bf628cf5-6948-4595-a6d0-daf99beb47b9"


def test_svamp_input_is_body_newline_question(data_dir):
    first = load_examples("svamp", "train", data_dir)[0]
    assert first.input.endswith("the same number of points each round\nHow many points did he score per round?")
    assert first.gold == "( 84.0 / 2.0 )"


def test_svamp_split_rebuilt_from_original_matches_released(tmp_path, data_dir):
    """Without svamp_{train,test}.json, the paper's seed-0 split is rebuilt from SVAMP.json."""
    (tmp_path / "svamp").mkdir()
    (tmp_path / "svamp" / "SVAMP.json").write_text((data_dir / "svamp" / "SVAMP.json").read_text())
    for split in ("train", "test"):
        rebuilt = load_examples("svamp", split, tmp_path)
        released = load_examples("svamp", split, data_dir)
        assert [(e.input, e.gold) for e in rebuilt] == [(e.input, e.gold) for e in released]


def test_asdiv_is_svamp_plus_asdiv_train(tmp_path, data_dir):
    (tmp_path / "svamp").mkdir()
    for name in ("svamp_train.json", "svamp_test.json"):
        (tmp_path / "svamp" / name).write_text((data_dir / "svamp" / name).read_text())
    with pytest.raises(UserError, match="asdiv_train.json"):
        load_examples("asdiv", "train", tmp_path)
    (tmp_path / "asdiv").mkdir()
    rows = [{"Body": "Tom has 3 apples.", "Question": "He eats 1. How many are left?", "Formula": "3-1=2",
             "Answer": "2 (apples)"}]
    (tmp_path / "asdiv" / "asdiv_train.json").write_text("\n".join(json.dumps(r) for r in rows))
    train = load_examples("asdiv", "train", tmp_path)
    assert len(train) == 801
    assert train[-1].input == "Tom has 3 apples.\nHe eats 1. How many are left?" and train[-1].gold == "2"
    assert load_examples("asdiv", "test", tmp_path) == load_examples("svamp", "test", tmp_path)


# --- parsing teacher outputs ---------------------------------------------------------------


def test_parse_cuts_run_on_continuation():
    out = ("Beavers build dams. So the answer is (c) wooded area.\n\nQ: What is best?\nAnswer Choices:\n"
           "(a) x\nA: So the answer is (a) x.")
    p = parse_multiple_choice(out)
    assert (p.rationale, p.label, p.status) == ("Beavers build dams.", "wooded area", "ok")


def test_parse_equation():
    p = parse_equation("10 * 45 is 450. The answer is (10 * 45).\n\nQ: There are 15 trees. The answer is (1).")
    assert (p.rationale, p.label, p.ok) == ("10 * 45 is 450.", "(10 * 45)", True)
    assert parse_equation("no answer here").status == "no_answer"
    assert parse_equation("The answer is 450.").status == "bad_label"


def test_parse_nli():
    p = parse_nli_answer_line("The packages may not be from lunch.\nAnswer: neutral\n\nPremise: x\nHypothesis: y")
    assert (p.rationale, p.label, p.ok) == ("The packages may not be from lunch.", "neutral", True)
    truncated = parse_nli_answer_line("Different dogs.\nAnswer: contradiction\n\nPremise")
    assert truncated.label == "contradiction"
    q = parse_nli_so_answer("Context matters too. So the answer is contradiction.\n\nPremise: Franco...")
    assert (q.rationale, q.label, q.ok) == ("Context matters too.", "contradiction", True)


@pytest.mark.parametrize("parse", [parse_multiple_choice, parse_equation, parse_nli_answer_line, parse_nli_so_answer])
@pytest.mark.parametrize("garbage", ["", "\n\n\n", "Q:", "So the answer is", "Answer:", "((((", None, 17,
                                     "So the answer is (a) x. So the answer is (b) y.", "\x00\ufffd" * 50])
def test_parsers_never_raise_on_garbage(parse, garbage):
    p = parse(garbage)
    assert isinstance(p.status, str)
    assert p.ok == (p.status == "ok")
    if not p.ok:
        assert p.label == ""


def test_every_released_output_parses_without_error(data_dir):
    for name, split in [("cqa", "test"), ("svamp", "train"), ("esnli", "valid"), ("anli1", "valid")]:
        task = get_task(name)
        parsed = [task.parse(o) for o in load_teacher_outputs(name, split, data_dir)]
        assert sum(p.ok for p in parsed) / len(parsed) > 0.98
        assert all("\nQ:" not in p.rationale and "Premise:" not in p.rationale for p in parsed if p.ok)


# --- the released PaLM teacher's accuracy: the paper's own numbers -------------------------

PAPER_TEACHER_ACCURACY = [
    ("cqa", "test", 1221, 0.7723),
    ("cqa", "train", 9741, 0.7426),
    ("svamp", "test", 200, 0.7400),
    ("svamp", "train", 800, 0.7325),  # paper's eval()-based scorer: 0.7350, see README
    ("esnli", "valid", 9842, 0.7317),
    ("anli1", "valid", 1000, 0.6680),
]


@pytest.mark.parametrize("task, split, n, expected", PAPER_TEACHER_ACCURACY)
def test_teacher_report_matches_paper(task, split, n, expected, data_dir):
    report = teacher_report(task, split, data_dir)
    assert report["n"] == n
    assert report["accuracy"] == expected
    assert report["parse_failures"] < 0.02 * n


def test_svamp_and_answers_are_rejected_not_evaluated(data_dir):
    """Python's eval() reads '(a) and (b)' as b (a is non-zero), so the paper's scorer counts two such
    teacher answers as right (0.7350); the safe evaluator rejects all of them (0.7325)."""
    from dsbs_ray.metrics import eval_equation

    task = get_task("svamp")
    labels = [task.parse(o).label for o in load_teacher_outputs("svamp", "train", data_dir)]
    golds = [e.gold for e in load_examples("svamp", "train", data_dir)]
    and_rows = [(lab, gold) for lab, gold in zip(labels, golds) if " and " in lab]
    assert and_rows and all(eval_equation(lab) is None for lab, _ in and_rows)
    eval_would_accept = [lab for lab, gold in and_rows
                         if eval_equation(lab.rsplit(" and ", 1)[1].strip("() ")) == eval_equation(gold)]
    assert len(eval_would_accept) == 2
    assert round(0.7325 + len(eval_would_accept) / len(labels), 4) == 0.7350


# --- bad input ------------------------------------------------------------------------------


def test_the_built_in_tasks_are_spec_files():
    assert sorted(known_tasks()) == sorted(TASKS)
    assert all(get_task(t).builtin and get_task(t).path.suffix == ".yaml" for t in TASKS)


def test_unknown_task_lists_known():
    with pytest.raises(UserError) as e:
        get_task("gsm8k")
    assert all(name in str(e.value) for name in TASKS)


def test_unknown_split():
    with pytest.raises(UserError, match="no split 'dev'.*train, test"):
        load_examples("cqa", "dev")


def test_missing_split_file_names_path(tmp_path):
    (tmp_path / "asdiv").mkdir()
    with pytest.raises(UserError, match=str(tmp_path / "svamp")):
        load_examples("asdiv", "test", tmp_path)


def test_missing_teacher_outputs_name_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "cqa" / "llm" / "test_CoT_0.json")):
        load_teacher_outputs("cqa", "test", tmp_path)


def test_malformed_json_line_names_file_and_line(tmp_path):
    (tmp_path / "cqa").mkdir()
    (tmp_path / "cqa" / "cqa_test.json").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(UserError, match=r"cqa_test.json:2: not valid JSON"):
        load_examples("cqa", "test", tmp_path)


def test_row_missing_field_names_it(tmp_path):
    """A column the data lacks: named with the spec file and field; a later row without it: its row."""
    (tmp_path / "cqa").mkdir()
    (tmp_path / "cqa" / "cqa_test.json").write_text('{"id": "a", "question": "q", "answer": "x"}\n')
    with pytest.raises(UserError, match=r"cqa.yaml: input: \{choices\} is not a column of .*cqa_test.json"):
        load_examples("cqa", "test", tmp_path)
    (tmp_path / "cqa" / "cqa_test.json").write_text('{"id": "a", "question": "q", "answer": "x", "choices": ["x", "y"]}\n'
                                                    '{"id": "b", "question": "q", "answer": "x"}\n')
    with pytest.raises(UserError, match="cqa_test.json: row 1 has no field 'choices'"):
        load_examples("cqa", "test", tmp_path)
