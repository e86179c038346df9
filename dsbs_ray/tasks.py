"""The task registry: where each split lives, how an input is formatted, the gold label, how a
teacher's chain-of-thought output is parsed, and which metric scores it.

Everything here follows the paper's released data layout and input formats, so the PaLM outputs
shipped with the paper and our own teacher's annotations load and score the same way.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dsbs_ray.errors import UserError

NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}
DEFAULT_EOS = "</s>"  # T5's EOS; NLI inputs join premise and hypothesis with the student's EOS token


@dataclass(frozen=True)
class Example:
    id: str
    input: str
    gold: str


@dataclass(frozen=True)
class Parsed:
    """A teacher output split into rationale and label. status is 'ok' or why it failed."""

    rationale: str
    label: str
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------
# Teacher-output parsing. Each parser first cuts the run-on continuation (the teacher goes on to
# invent the next few-shot question), then splits rationale and label. They never raise.

_CUT_QA = re.compile(r"\n\s*Q\b")
_CUT_NLI = re.compile(r"\n\s*Premise\b")
_CHOICE = re.compile(r"\([a-e]\)")
_EQUATION = re.compile(r"\(.*\)")


def _cut(output: str, marker: re.Pattern) -> str:
    return marker.split(output, maxsplit=1)[0].rstrip()


def _split_once(text: str, marker: str) -> tuple[str, str] | None:
    """(before, after) when marker occurs exactly once, else None (ambiguous or absent)."""
    parts = text.split(marker)
    return (parts[0].rstrip(), parts[1]) if len(parts) == 2 else None


def parse_multiple_choice(output: str) -> Parsed:
    """'... So the answer is (c) wooded area.' -> ('...', 'wooded area')."""
    if not isinstance(output, str):
        return Parsed("", "", "not_text")
    split = _split_once(_cut(output, _CUT_QA), "So the answer is")
    if split is None:
        return Parsed("", "", "no_answer")
    rationale, tail = split
    pieces = _CHOICE.split(tail)
    label = pieces[1].strip().removesuffix(".") if len(pieces) > 1 else ""
    return Parsed(rationale, label, "ok" if label else "bad_label")


def parse_equation(output: str) -> Parsed:
    """'... The answer is (10 * 45).' -> ('...', '(10 * 45)')."""
    if not isinstance(output, str):
        return Parsed("", "", "not_text")
    split = _split_once(_cut(output, _CUT_QA), "The answer is")
    if split is None:
        return Parsed("", "", "no_answer")
    rationale, tail = split
    match = _EQUATION.search(tail)
    if match is None:
        return Parsed(rationale, "", "bad_label")
    return Parsed(rationale, match.group(0), "ok")


def parse_nli_answer_line(output: str) -> Parsed:
    """e-SNLI style: '<rationale>\\nAnswer: neutral'."""
    if not isinstance(output, str):
        return Parsed("", "", "not_text")
    text = _cut(output, _CUT_NLI)
    rationale, sep, tail = text.partition("Answer:")
    if not sep:
        return Parsed("", "", "no_answer")
    label = tail.strip()
    return Parsed(rationale.rstrip(), label, "ok" if label else "bad_label")


def parse_nli_so_answer(output: str) -> Parsed:
    """ANLI style: '<rationale> So the answer is contradiction.'"""
    if not isinstance(output, str):
        return Parsed("", "", "not_text")
    split = _split_once(_cut(output, _CUT_NLI), "So the answer is")
    if split is None:
        return Parsed("", "", "no_answer")
    rationale, tail = split
    label = tail.strip().removesuffix(".")
    return Parsed(rationale, label, "ok" if label else "bad_label")


# ---------------------------------------------------------------------------------------------
# Row formatting: one function per source layout, each returning Examples.


def _cqa_example(row: dict, index: int, eos: str) -> Example:
    choices = "\n".join(f"({letter}) {c}" for letter, c in zip("abcde", row["choices"]))
    return Example(str(row["id"]), f"{row['question']}\nAnswer Choices:\n{choices}", row["answer"])


def _svamp_example(row: dict, index: int, eos: str) -> Example:
    return Example(str(row.get("ID", index)), row["input"], row["label"])


def _asdiv_example(row: dict, index: int, eos: str) -> Example:
    return Example(f"asdiv-{index}", f"{row['Body']}\n{row['Question']}", str(row["Answer"]).split(" ")[0])


def _nli_example(row: dict, index: int, eos: str) -> Example:
    label = row["label"]
    if label not in NLI_LABELS:
        raise UserError(f"row {index}: NLI label {label!r} is not one of 0, 1, 2")
    row_id = row.get("uid", index)
    return Example(str(row_id), f"{row['premise']}{eos}{row['hypothesis']}", NLI_LABELS[label])


@dataclass(frozen=True)
class HubSource:
    """Where a split comes from on the Hugging Face hub when no local copy exists."""

    path: str
    name: str | None
    splits: dict[str, str]


@dataclass(frozen=True)
class Task:
    name: str
    splits: tuple[str, ...]
    has_valid: bool  # False: a validation split is carved from train, as the paper does
    metric: str  # a key of dsbs_ray.metrics.METRICS
    to_example: Callable[[dict, int, str], Example]
    parse: Callable[[str], Parsed]
    hub: HubSource | None
    answer_hint: str  # how the teacher must end its answer, for prompts and docs


TASKS: dict[str, Task] = {
    "cqa": Task(
        "cqa", ("train", "test"), False, "exact_match", _cqa_example, parse_multiple_choice,
        HubSource("cos_e", "v1.11", {"train": "train", "test": "validation"}),
        "So the answer is (c) <choice text>.",
    ),
    "svamp": Task(
        "svamp", ("train", "test"), False, "equation", _svamp_example, parse_equation,
        HubSource("tongyx361/svamp", None, {"all": "test"}),
        "The answer is (<equation>).",
    ),
    "asdiv": Task(  # SVAMP augmented with ASDiv for training; tested on SVAMP test, as in the paper
        "asdiv", ("train", "test"), False, "equation", _asdiv_example, parse_equation, None,
        "The answer is (<equation>).",
    ),
    "esnli": Task(
        "esnli", ("train", "valid", "test"), True, "exact_match", _nli_example, parse_nli_answer_line,
        HubSource("esnli", None, {"train": "train", "valid": "validation", "test": "test"}),
        "Answer: <entailment|neutral|contradiction>",
    ),
    "anli1": Task(
        "anli1", ("train", "valid", "test"), True, "exact_match", _nli_example, parse_nli_so_answer,
        HubSource("anli", None, {"train": "train_r1", "valid": "dev_r1", "test": "test_r1"}),
        "So the answer is <entailment|neutral|contradiction>.",
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def default_data_dir() -> Path | None:
    """DSBS_DATA_DIR, else ../shared/data beside the working directory when it exists."""
    env = os.environ.get("DSBS_DATA_DIR")
    if env:
        return Path(env)
    for candidate in (Path("../shared/data"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def _read_json_lines(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def read_json(path: Path):
    """A JSON file's content; one that is not JSON is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}; line {e.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid JSON (not UTF-8 text)") from None


def read_yaml(path: Path, what: str):
    """A YAML file's content; a missing or malformed file is one line naming it."""
    import yaml

    if not path.exists():
        raise UserError(f"missing file {path} ({what})")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def _svamp_paper_split(problems: list[dict], split: str) -> list[dict]:
    """The paper's SVAMP split of the 1000 original problems (a seed-0 permutation, 800 train / 200
    test), as rows in the released layout (input, label)."""
    import numpy as np

    order = np.random.RandomState(seed=0).permutation(len(problems))
    chosen = order[:800] if split == "train" else order[800:]
    return [{"input": f"{problems[i]['Body']}\n{problems[i]['Question']}", "label": problems[i]["Equation"],
             "ID": problems[i]["ID"]} for i in chosen]


def _to_examples(rows: list[dict], convert, eos: str, where: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(convert(row, i, eos))
        except KeyError as e:
            raise UserError(f"{where}: row {i} has no field {e.args[0]!r}") from None
    return out


def _local_rows(task: Task, split: str, data_dir: Path) -> tuple[list[dict], str]:
    path = data_dir / task.name / f"{task.name}_{split}.json"
    original = data_dir / "svamp" / "SVAMP.json"
    if not path.exists() and task.name == "svamp" and original.exists():
        return _svamp_paper_split(read_json(original), split), str(original)
    if not path.exists():
        raise UserError(f"missing file {path} (task {task.name}, split {split})")
    return _read_json_lines(path), str(path)


def _hub_rows(task: Task, split: str, data_dir: Path | None) -> tuple[list[dict], str]:
    if task.hub is None:
        raise UserError(f"task {task.name} has no hub source; give --data-dir with its files")
    import datasets

    where = f"hub dataset {task.hub.path}"
    try:
        if task.name == "svamp":  # the mirror holds all 1000 problems; rebuild the paper's split
            ds = datasets.load_dataset(task.hub.path, task.hub.name, split=task.hub.splits["all"])
            problems = sorted(ds, key=lambda r: int(str(r["ID"]).rsplit("-", 1)[-1]))
            return _svamp_paper_split(problems, split), where
        ds = datasets.load_dataset(task.hub.path, task.hub.name, split=task.hub.splits[split])
    except (ConnectionError, OSError, ValueError) as e:
        local = f"no {data_dir / task.name / f'{task.name}_{split}.json'} and " if data_dir else ""
        raise UserError(f"{local}could not load {where} split {split}: {str(e).splitlines()[0]}") from None
    return list(ds), where


def has_local(task: Task, split: str, data_dir: Path) -> bool:
    """Whether the data dir holds this split (else it would come from the hub)."""
    if task.name == "svamp" and (data_dir / "svamp" / "SVAMP.json").exists():
        return True
    return (data_dir / task.name / f"{task.name}_{split}.json").exists()


def load_rows(task_name: str, split: str, data_dir: Path | str | None = None) -> tuple[list[dict], str]:
    """(rows in the paper's released layout, where they came from) for a single-source task.

    A local file always wins; the hub is only asked for a split the data dir lacks (e.g. e-SNLI train).
    """
    task = get_task(task_name)
    if split not in task.splits:
        raise UserError(f"task {task.name} has no split {split!r}; its splits: {', '.join(task.splits)}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} does not exist")
    if task.hub is None or (data_dir is not None and has_local(task, split, data_dir)):
        if data_dir is None:
            raise UserError(f"task {task.name} needs a data dir: pass --data-dir or set DSBS_DATA_DIR")
        return _local_rows(task, split, data_dir)
    return _hub_rows(task, split, data_dir)


def load_examples(
    task_name: str, split: str, data_dir: Path | str | None = None, eos_token: str = DEFAULT_EOS
) -> list[Example]:
    """A task split as Examples (model input formatted as the paper does, gold label as text)."""
    task = get_task(task_name)
    if task.name == "asdiv":  # SVAMP train + ASDiv train for training; SVAMP test for testing
        svamp = load_examples("svamp", split, data_dir, eos_token)
        if split == "test":
            return svamp
        data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        path = (data_dir or Path(".")) / "asdiv" / "asdiv_train.json"
        if not path.exists():
            raise UserError(f"missing file {path} (ASDiv training rows in the paper's layout)")
        return svamp + _to_examples(_read_json_lines(path), _asdiv_example, eos_token, str(path))
    rows, where = load_rows(task.name, split, data_dir)
    return _to_examples(rows, task.to_example, eos_token, where)


def _teacher_files(data_dir: Path, task_dir: str, split: str) -> list[Path]:
    """TASK/llm/SPLIT_CoT_K.json for K = 0, 1, ... with no gaps."""
    files, k = [], 0
    while (data_dir / task_dir / "llm" / f"{split}_CoT_{k}.json").exists():
        files.append(data_dir / task_dir / "llm" / f"{split}_CoT_{k}.json")
        k += 1
    return files


def load_teacher_outputs(task_name: str, split: str, data_dir: Path | str | None = None) -> list[str]:
    """The raw teacher completions of a split, in row order (the CoT_K files concatenated)."""
    task = get_task(task_name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is None:
        raise UserError("no data dir: pass --data-dir or set DSBS_DATA_DIR")
    parts = ["svamp", "asdiv"] if task.name == "asdiv" and split == "train" else [
        "svamp" if task.name == "asdiv" else task.name
    ]
    outputs: list[str] = []
    for part in parts:
        files = _teacher_files(data_dir, part, split)
        if not files:
            raise UserError(f"missing file {data_dir / part / 'llm' / f'{split}_CoT_0.json'} (teacher outputs)")
        for path in files:
            chunk = read_json(path)
            if not isinstance(chunk, list) or not all(isinstance(o, str) for o in chunk):
                raise UserError(f"{path}: expected a JSON list of strings")
            outputs.extend(chunk)
    return outputs
