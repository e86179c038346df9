"""Helping a user write a task spec: `dsbs task check` (load every split, parse every exemplar, show
one teacher prompt and one student input) and `dsbs task new` (a starting spec from a data file's
columns)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from dsbs_ray.errors import UserError
from dsbs_ray.files import read_rows
from dsbs_ray.task_spec import NAME_PATTERN, get_task, render
from dsbs_ray.tasks import DEFAULT_EOS, is_labelled, load_examples, load_teacher_outputs, teacher_examples

TODO = "TODO: write the reasoning that leads to the answer."


def check_spec(ref: str, data_dir: str | None = None, show=sys.stderr) -> dict:
    """Every split loaded (rows, labelled, label counts), the prompt's exemplars parsed with the task's
    own parser; one rendered teacher prompt and one student input written to `show`. Raises a
    UserError naming the spec and field or row on the first mistake."""
    from dsbs_ray.data import valid_size
    from dsbs_ray.prompts import load_prompt

    task = get_task(ref)
    splits = {}
    for split in task.splits:
        examples = load_examples(ref, split, data_dir)
        if not examples:
            raise UserError(f"{task.path}: split {split} has no rows")
        line = {"rows": len(examples), "labelled": is_labelled(examples)}
        if task.answer.kind == "choice" and line["labelled"]:
            line["labels"] = dict(Counter(e.gold for e in examples).most_common())
        elif line["labelled"]:
            line["distinct_labels"] = len({e.gold for e in examples})
        try:
            line["teacher_outputs"] = len(load_teacher_outputs(ref, split, data_dir))
        except UserError:
            pass
        splits[split] = line
    if not task.has_valid:
        n = splits["train"]["rows"]
        splits["valid"] = {"carved_from_train": valid_size(n, task.spec.carve.valid.fraction), "of": n}
    prompt = load_prompt(ref)
    first = teacher_examples(ref, "train", data_dir)[0]
    student = load_examples(ref, "train", data_dir, DEFAULT_EOS)[0]
    print(f"--- teacher prompt (train row {first.id}) ---\n{prompt.render(first.input)}\n"
          f"--- student input (T5: predict: ..., {{join}} = {DEFAULT_EOS}) ---\npredict: {student.input}\n"
          f"--- gold ---\n{student.gold}", file=show)
    return {"task": task.name, "spec": str(task.path), "answer": task.answer.kind, "metric": task.metric,
            "splits": splits, "exemplars": len(prompt.exemplar_labels),
            "exemplar_labels": list(prompt.exemplar_labels),
            "exemplars_to_write": sum(TODO in ex.rationale for ex in task.prompt_spec.exemplars),
            "prompt_hash": prompt.hash}


# ---------------------------------------------------------------------------------------------

LABEL_NAMES = ("label", "answer", "target", "gold", "output", "category", "intent", "class")
ID_NAMES = ("id", "ID", "uid", "guid", "row_id")


def _is_number(value) -> bool:
    from dsbs_ray.answers import read_number

    return isinstance(value, (int, float)) or (isinstance(value, str) and read_number(value) is not None
                                                and value.strip().lstrip("-+").replace(",", "").replace(".", "", 1).isdigit())


def new_spec(name: str, data_file: Path, out: Path, label: str | None = None) -> dict:
    """A starting spec for data_file's columns: the label column (named, else the first of LABEL_NAMES,
    else the last), the answer kind from its values, an input template of the other columns, a test
    split carved from train, and a prompt whose exemplars are the first rows with a rationale to
    write. Never overwrites a file."""
    import re

    import yaml

    if not re.fullmatch(NAME_PATTERN, name):
        raise UserError(f"name {name!r}: use letters, digits, '.', '_' and '-'")
    if out.exists():
        raise UserError(f"{out} exists; choose another --out (dsbs task new never overwrites a file)")
    rows = read_rows(data_file)
    if not rows:
        raise UserError(f"{data_file}: no rows")
    columns = list(rows[0])
    label = label or next((c for c in columns if c.lower() in LABEL_NAMES), columns[-1])
    if label not in columns:
        raise UserError(f"--label {label}: not a column of {data_file} ({', '.join(columns)})")
    id_col = next((c for c in columns if c in ID_NAMES), None)
    inputs = [c for c in columns if c not in (label, id_col)]
    if not inputs:
        raise UserError(f"{data_file}: no column left for the input besides {label!r}")
    values = [r.get(label) for r in rows if r.get(label) not in (None, "")]
    distinct = sorted({str(v) for v in values})
    if values and all(_is_number(v) for v in values):
        answer = {"kind": "number", "marker": "The answer is"}
    elif 2 <= len(distinct) <= 20 and len(distinct) <= len(values) / 2:
        answer = {"kind": "choice", "labels": distinct, "marker": "So the answer is"}
    else:
        answer = {"kind": "text", "marker": "So the answer is"}
    template = "\n".join(f"{c.replace('_', ' ').capitalize()}: {{{c}}}" if len(inputs) > 1 else f"{{{c}}}"
                         for c in inputs)
    exemplars = [{"input": render(template, r, {"join": "\n"}), "rationale": TODO, "answer": str(r[label])}
                 for r in rows[:4]]
    relative = Path(_relative(data_file.resolve(), out.resolve().parent))
    spec = {"name": name, "description": f"written by dsbs task new from {data_file.name}; edit me",
            "data": {"train": str(relative)}, "carve": {"test": {"fraction": 0.2, "seed": 0}},
            "input": template, "label": label, **({"id": id_col} if id_col else {}), "answer": answer,
            "prompt": {"exemplar": "Q: {input}\nA: {rationale} " + answer["marker"] + " {answer}.\n\n",
                       "query": "Q: {input}\nA:", "stop": ["\n\nQ:", "\nQ:"], "exemplars": exemplars}}
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# A task spec written by `dsbs task new {name} --from {data_file}`. Check the label column, the\n"
            f"# answer kind and the input template; write each exemplar's rationale; then `dsbs task check {out}`.\n"
            + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=110))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(out)
    return {"spec": str(out), "rows": len(rows), "columns": columns, "label": label, "answer": answer["kind"],
            "input": template}


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)
