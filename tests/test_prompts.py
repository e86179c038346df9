import pytest

from dsbs_ray.errors import UserError
from dsbs_ray.prompts import load_prompt
from dsbs_ray.tasks import get_task, load_examples

TASKS = ["cqa", "svamp", "esnli", "anli1"]


@pytest.mark.parametrize("task", TASKS)
def test_prompt_has_8_to_10_exemplars_in_the_parsers_format(task):
    prompt = load_prompt(task)
    n = prompt.prefix.count(prompt.query.split("{input}")[0])
    assert 8 <= n <= 10
    assert prompt.stop and len(prompt.hash) == 12


@pytest.mark.parametrize("task, split", [("cqa", "test"), ("esnli", "valid"), ("svamp", "test")])
def test_prefix_is_byte_identical_across_rows(task, split, data_dir):
    prompt = load_prompt(task)
    rendered = [prompt.render(e.input) for e in load_examples(task, split, data_dir)[:5]]
    assert all(r.startswith(prompt.prefix) for r in rendered)
    assert len(set(r[len(prompt.prefix):] for r in rendered)) == 5


def test_every_exemplar_parses_back_to_its_answer():
    for task in TASKS:
        prompt, parse = load_prompt(task), get_task(task).parse
        for block in prompt.prefix.strip().split("\n\n"):
            completion = block.split("\nA:", 1)[-1] if "\nA:" in block else block.split("\nReasonings:", 1)[-1]
            assert parse(completion).ok, (task, block)


@pytest.mark.parametrize("content, needle", [
    ("exemplar: x\n", "query: Field required"),
    ("[unclosed", "not valid YAML"),
    ('exemplar: "{input} {rationale} {answer}"\nquery: "{input}"\nexemplars:\n  - input: a\n    rationale: b\n', "exemplars.0.answer: Field required"),
    ('exemplar: "Q: {input}\\nA: {rationale} {answer}"\nquery: "Q: {input}\\nA:"\nexemplars:\n'
     '  - input: a\n    rationale: b\n    answer: c\n', "does not parse"),
])
def test_broken_prompt_file_is_one_clear_error(tmp_path, content, needle):
    (tmp_path / "svamp.yaml").write_text(content)
    with pytest.raises(UserError, match=needle) as e:
        load_prompt("svamp", tmp_path)
    assert str(tmp_path / "svamp.yaml") in str(e.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(UserError, match="missing file"):
        load_prompt("cqa", tmp_path)
