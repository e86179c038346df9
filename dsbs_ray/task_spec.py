"""Task specs: a task is a YAML file (name, data, input, label, answer, prompt, carve) that says where
its splits live, how a row becomes the model's input and gold label, which answer kind parses the
teacher's outputs and scores predictions, and the teacher's few-shot prompt. The paper's tasks are
spec files in dsbs_ray/task_specs/ and load exactly like a user's: a task is named by a built-in's
name, a spec NAME.yaml in $DSBS_TASKS_DIR, or the path of its spec file (get_task).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsbs_ray import answers
from dsbs_ray.answers import AnswerSpec, Parsed
from dsbs_ray.errors import UserError, build
from dsbs_ray.files import read_yaml

BUILTIN_DIR = Path(__file__).resolve().parent / "task_specs"
SPLITS = ("train", "valid", "test")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


@dataclass(frozen=True)
class Example:
    id: str
    input: str
    gold: str  # "" in a split without labels


# ---------------------------------------------------------------------------------------------
# The spec file


class HubSource(BaseModel):
    """A split on the Hugging Face hub."""

    model_config = ConfigDict(extra="forbid")
    path: str
    name: str | None = None
    split: str


class Source(BaseModel):
    """Where (part of) a split's rows come from: a local file, a hub split, or another task's split
    (its rows, ids, gold and teacher outputs, as that task makes them). `columns` makes new columns
    from the source's own with templates (the source's columns are then replaced by these)."""

    model_config = ConfigDict(extra="forbid")
    file: str | None = None
    hub: HubSource | None = None
    task: str | None = None
    columns: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_place(self):
        if sum(x is not None for x in (self.file, self.hub, self.task)) != 1:
            raise ValueError("a data source is exactly one of file, hub or task")
        if self.task and self.columns:
            raise ValueError("columns: a task source brings its task's own examples")
        return self


class HubData(BaseModel):
    """Hub splits for the splits that neither a file nor the data dir has."""

    model_config = ConfigDict(extra="forbid")
    path: str
    name: str | None = None
    splits: dict[Literal["train", "valid", "test"], str]


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: list[Source] | None = None
    valid: list[Source] | None = None
    test: list[Source] | None = None
    all: list[Source] | None = Field(None, description="every row in one source: train and test are carved "
                                     "from it (carve.test) where the data dir has no file of theirs")
    hub: HubData | None = None

    @field_validator("train", "valid", "test", "all", mode="before")
    @classmethod
    def _sources(cls, value):  # "file.csv" | {file: ...} | a list of these (concatenated in order)
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        return [{"file": v} if isinstance(v, str) else v for v in items]


class Carve(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float | None = Field(None, gt=0, lt=1)
    rows: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self):
        if (self.fraction is None) == (self.rows is None):
            raise ValueError("give exactly one of fraction or rows")
        return self


class CarveSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    valid: Carve = Field(default_factory=lambda: Carve(fraction=0.1, seed=0),
                         description="a task without a valid split: held out of train when a job starts "
                         "(the paper's train_test_split(test_size=0.1, seed=0)); a fraction")
    test: Carve | None = Field(None, description="a task without a test split: held out of train (or of "
                               "`all`) once, by a seeded permutation whose last rows are the test split")

    @model_validator(mode="after")
    def _valid_by_fraction(self):  # the validation carve is a share of whatever train a job reads
        if self.valid.fraction is None:
            raise ValueError("carve.valid: give fraction (rows is for carve.test)")
        return self


class Exemplar(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str
    rationale: str
    answer: str


class PromptSpec(BaseModel):
    """The teacher's few-shot chain-of-thought prompt (also the format of a prompt file)."""

    model_config = ConfigDict(extra="forbid")
    task: str | None = None  # a prompt file may say which task it was written for
    exemplar: str
    query: str
    stop: list[str] = []
    exemplars: list[Exemplar] = Field(min_length=1)

    @model_validator(mode="after")
    def _placeholders(self):
        if "{input}" not in self.query or not all(f in self.exemplar for f in ("{input}", "{rationale}", "{answer}")):
            raise ValueError("'query' needs {input}; 'exemplar' needs {input}, {rationale}, {answer}")
        return self


class TaskSpec(BaseModel):
    """A task spec file. README: "Your own task" documents every field."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    splits: list[Literal["train", "valid", "test"]] | None = Field(None, description="default: train and test, "
                                                                  "and valid where data names one")
    data: DataSpec = Field(default_factory=DataSpec)
    input: str = Field(min_length=1, description="template over the row's columns; {join} is what stands "
                       "between two texts (the student's EOS, a newline, or teacher_join for the teacher)")
    teacher_join: str = "\n"
    label: str = Field(min_length=1, description="the gold column (a split without it is unlabelled)")
    id: str | None = Field(None, description="the id column (rows without it: their position); default: a "
                           "hash of the row")
    answer: AnswerSpec
    prompt: str | PromptSpec
    carve: CarveSpec = Field(default_factory=CarveSpec)

    @model_validator(mode="after")
    def _consistent(self):
        if self.data.all is not None and self.carve.test is None:
            raise ValueError("data.all needs carve.test (how the test split is held out of it)")
        for name, template in [("input", self.input)] + [(f"data.{s}.columns.{k}", t) for s in ("train", "valid",
                               "test", "all") for src in (getattr(self.data, s) or []) for k, t in
                               (src.columns or {}).items()]:
            check_template(template, name)
        return self


# ---------------------------------------------------------------------------------------------
# Templates: {column}, {column|filter}, {join}; {{ and }} are literal braces. No expressions.

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
FILTERS = {"first_word": lambda s: s.split(" ")[0], "strip": str.strip, "lower": str.lower}


def check_template(template: str, field: str) -> None:
    for m in _PLACEHOLDER.finditer(template):
        inner = m.group(1)
        if inner is None:
            continue
        name, _, filt = inner.partition("|")
        if not re.fullmatch(r"[A-Za-z_][\w.-]*|_row", name) or (filt and filt not in FILTERS):
            raise ValueError(f"{field}: bad placeholder {{{inner}}} (write {{column}} or {{column|filter}}, filters: "
                             f"{', '.join(FILTERS)}; {{{{ and }}}} for literal braces)")
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise ValueError(f"{field}: unbalanced brace (write {{{{ or }}}} for a literal one)")


def placeholders(template: str) -> list[str]:
    return [m.group(1).partition("|")[0] for m in _PLACEHOLDER.finditer(template) if m.group(1) is not None]


def show(value) -> str:
    """A cell as text: a list as lettered options, one a line ("(a) x\\n(b) y")."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(f"({answers.LETTERS[i]}) {show(v)}" for i, v in enumerate(value))
    if isinstance(value, float) and value.is_integer():
        return repr(value)  # 84.0 stays 84.0, as json writes it
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else str(value)


def render(template: str, row: dict, extra: dict | None = None) -> str:
    """The template filled from the row; a missing column raises KeyError(column)."""
    def fill(m):
        if m.group(1) is None:
            return m.group(0)[0]
        name, _, filt = m.group(1).partition("|")
        value = (extra or {})[name] if name in (extra or {}) else show(row[name])
        return FILTERS[filt](value) if filt else value

    return _PLACEHOLDER.sub(fill, template)


# ---------------------------------------------------------------------------------------------
# A loaded task


class Task:
    """A task spec, loaded and checked: what every stage asks of a task."""

    def __init__(self, spec: TaskSpec, path: Path, builtin: bool):
        self.spec, self.path, self.builtin = spec, path, builtin
        self.name = spec.name
        self.ref = spec.name if builtin else str(path)  # what names it to another process
        self.answer = spec.answer
        declared = {s for s in SPLITS if getattr(spec.data, s)} | set(spec.data.hub.splits if spec.data.hub else ())
        self.splits = tuple(s for s in SPLITS if s in (spec.splits or declared | {"train", "test"}))
        self.has_valid = "valid" in self.splits  # else a validation split is carved from train (carve.valid)
        self._cut = answers.cut_pattern(self.prompt_spec.query)

    @cached_property
    def prompt_spec(self) -> PromptSpec:
        if isinstance(self.spec.prompt, PromptSpec):
            return self.spec.prompt
        return load_prompt_file(self.resolve(self.spec.prompt), f"{self.path}: prompt")

    @cached_property
    def content_hash(self) -> str:
        """The spec's content (and its prompt file's): an edited spec is a new run."""
        digest = hashlib.sha256(self.path.read_bytes())
        if isinstance(self.spec.prompt, str):
            digest.update(self.resolve(self.spec.prompt).read_bytes())
        return digest.hexdigest()[:16]

    @property
    def metric(self) -> str:
        return answers.metric_name(self.answer)

    @property
    def answer_regex(self) -> str:
        return answers.answer_regex(self.answer)

    @property
    def answer_hint(self) -> str:
        return answers.answer_hint(self.answer)

    def parse(self, output) -> Parsed:
        return answers.parse_output(output, self.answer, self._cut)

    def match(self, prediction: str, gold: str) -> bool:
        return answers.match(self.answer, prediction, gold)

    def vote_key(self, label: str):
        return answers.vote_key(self.answer, label)

    def resolve(self, path: str, data_dir: Path | None = None) -> Path:
        """A data or prompt path: {data_dir}/... in the data dir, else relative to the spec file."""
        if path.startswith("{data_dir}"):
            if data_dir is None:
                raise UserError(f"{self.path}: {path} needs a data dir: pass --data-dir or set DSBS_DATA_DIR")
            return data_dir / path.removeprefix("{data_dir}").lstrip("/")
        return (self.path.parent / Path(path).expanduser()).resolve()

    def choices_of(self, row: dict, where: str) -> list[str]:
        value = row[self.answer.choices]
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise UserError(f"{where}: column {self.answer.choices!r} is not a JSON list") from None
            else:
                value = [c.strip() for c in text.split(self.answer.choices_separator)]
        if not isinstance(value, list) or len(value) < 2:
            raise UserError(f"{where}: column {self.answer.choices!r} holds {value!r}, not a list of 2+ choices")
        return [show(v) for v in value]

    def to_example(self, row: dict, index: int, join: str) -> Example:
        """A row as an Example: input from the template ({join} between two texts), gold label as text
        (label_map applied; a choice label must be one of its set), id from the id column."""
        row = dict(row)
        if self.answer.choices:
            row[self.answer.choices] = self.choices_of(row, f"row {index}")
        text = render(self.spec.input, row, {"join": join, "_row": str(index)})
        gold = row.get(self.spec.label)
        gold = "" if gold is None else show(gold)
        if self.answer.label_map is not None and gold:
            if gold not in self.answer.label_map:
                raise UserError(f"row {index}: label {gold!r} is not a key of answer.label_map "
                                f"({', '.join(self.answer.label_map)})")
            gold = self.answer.label_map[gold]
        allowed = self.answer.labels or (row[self.answer.choices] if self.answer.choices else None)
        if gold and allowed is not None and gold not in allowed:
            raise UserError(f"row {index}: label {gold!r} is not one of {', '.join(map(repr, allowed))}")
        if self.spec.id is not None:
            row_id = show(row[self.spec.id]) if self.spec.id in row else str(index)
        else:
            row_id = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Example(row_id, text, gold)


def load_prompt_file(path: Path, what: str) -> PromptSpec:
    raw = read_yaml(path, what)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with exemplar, query, stop, exemplars")
    return build(PromptSpec, where=f"{path}: ", **raw)


def spec_path(ref: str) -> Path:
    """The spec file a task reference names: a path (it ends in .yaml/.yml or holds a /), a built-in
    task, or a spec NAME.yaml in $DSBS_TASKS_DIR."""
    if ref.endswith((".yaml", ".yml")) or "/" in ref or os.sep in ref:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise UserError(f"missing file {ref} (task spec)")
        return path.resolve()
    for folder in [BUILTIN_DIR] + ([Path(os.environ["DSBS_TASKS_DIR"])] if os.environ.get("DSBS_TASKS_DIR") else []):
        if (folder / f"{ref}.yaml").is_file():
            return (folder / f"{ref}.yaml").resolve()
    raise UserError(f"unknown task {ref!r}; known tasks: {', '.join(known_tasks())} (or give the path of a spec file)")


def get_task(ref: str) -> Task:
    """The task a name or spec path names, loaded and checked (one line naming the file if not)."""
    path = spec_path(str(ref))
    stat = path.stat()
    return _load_task(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _load_task(path: Path, mtime_ns: int, size: int) -> Task:
    raw = read_yaml(path, "task spec")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping (name, data, input, label, answer, prompt)")
    return Task(build(TaskSpec, where=f"{path}: ", **raw), path, path.parent == BUILTIN_DIR)


def known_tasks(tasks_dir: Path | str | None = None) -> list[str]:
    """Built-in task names, then the specs of a tasks dir (default $DSBS_TASKS_DIR) by path."""
    names = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
    folder = tasks_dir or os.environ.get("DSBS_TASKS_DIR")
    if folder:
        names += [str(p) for p in sorted(Path(folder).glob("*.yaml")) if p.stem not in names]
    return names

