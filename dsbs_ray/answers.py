"""Answer kinds: how a teacher's chain-of-thought output is split into rationale and label, how a
prediction is scored against gold, and what two sampled labels must share to be one vote.

A task spec names its kind (`answer: {kind: ...}`); there is one parser per kind and the spec only
sets its words (the answer marker, the cut before an invented next exemplar). Parsers never raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsbs_ray.metrics import equation_match, eval_equation

Kind = Literal["choice", "text", "number", "equation"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Parsed:
    """A teacher output split into rationale and label. status is 'ok' or why it failed."""

    rationale: str
    label: str
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class AnswerSpec(BaseModel):
    """The spec's `answer` field."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    labels: list[str] | None = Field(None, min_length=2, description="choice: the fixed label set")
    choices: str | None = Field(None, description="choice: the column holding each row's own choices (a list, a "
                                "JSON list, or text split at choices_separator); shown lettered (a) (b) ...")
    choices_separator: str = "|"
    label_map: dict[str, str] | None = Field(None, description="gold values as stored -> label text (NLI: 0 -> "
                                             "entailment); keys are compared as text")
    marker: str = Field("So the answer is", min_length=1, description="the words before the answer in a teacher "
                        "output; they must occur exactly once")
    tolerance: float = Field(1e-6, ge=0, description="number: |prediction - gold| <= tolerance counts as right")
    regex: str | None = Field(None, description="what a completion must match under structured output (teacher "
                              "--structured); default: from the kind and marker")

    @field_validator("labels", "label_map", mode="before")
    @classmethod
    def _as_text(cls, value):  # YAML reads `0: entailment` and `labels: [1, 2]` as numbers; labels are text
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return [str(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _choice_has_a_set(self):
        if self.kind == "choice" and (self.labels is None) == (self.choices is None):
            raise ValueError("kind choice needs exactly one of labels (a fixed list) or choices (a column)")
        if self.kind != "choice" and (self.labels or self.choices):
            raise ValueError(f"labels and choices are for kind choice, not {self.kind}")
        return self


# ---------------------------------------------------------------------------------------------
# Parsing: cut the run-on continuation, split at the one answer marker, read the label per kind.

_LETTER = re.compile(r"\([a-z]\)")
_EQUATION = re.compile(r"\(.*\)")
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def cut_pattern(query: str) -> re.Pattern:
    """The start of an invented next exemplar: a new line that begins with the query's first word
    ("Q: {input}\\nA:" -> a line starting with Q; "Premise: ..." -> Premise)."""
    head = re.match(r"\s*(\w+)", query)
    word = head.group(1) if head else "Q"
    return re.compile(r"\n\s*" + re.escape(word) + r"\b")


def _label(kind: Kind, lettered: bool, tail: str) -> str:
    if kind == "equation":
        match = _EQUATION.search(tail)
        return match.group(0) if match else ""
    if kind == "number":
        match = _NUMBER.search(tail)
        return match.group(0).replace(",", "").lstrip("+") if match else ""
    if lettered:  # "(c) wooded area." -> "wooded area": the text after the first letter
        pieces = _LETTER.split(tail)
        return pieces[1].strip().removesuffix(".") if len(pieces) > 1 else ""
    return tail.strip().removesuffix(".").strip()


def parse_output(output, answer: AnswerSpec, cut: re.Pattern) -> Parsed:
    """'<rationale> <marker> <answer>' -> Parsed; never raises."""
    if not isinstance(output, str):
        return Parsed("", "", "not_text")
    parts = cut.split(output, maxsplit=1)[0].rstrip().split(answer.marker)
    if len(parts) != 2:  # no marker, or an ambiguous answer
        return Parsed("", "", "no_answer")
    label = _label(answer.kind, answer.choices is not None, parts[1])
    return Parsed(parts[0].rstrip(), label, "ok" if label else "bad_label")


# ---------------------------------------------------------------------------------------------
# Scoring and voting


def normalize_text(text: str) -> str:
    """text answers: case-folded, whitespace collapsed, surrounding quotes and . , ; : ! ? dropped."""
    return " ".join(text.split()).casefold().strip(" .,;:!?\"'")


def read_number(text: str) -> Fraction | None:
    """The first number in text, exactly ("1,200.5" -> 2401/2); None if there is none."""
    match = _NUMBER.search(text) if isinstance(text, str) else None
    if match is None:
        return None
    return Fraction(match.group(0).replace(",", "").rstrip(","))


def match(answer: AnswerSpec, prediction: str, gold: str) -> bool:
    """Whether a prediction scores right against gold under the task's answer kind."""
    if answer.kind == "equation":
        return equation_match(prediction, gold)
    if answer.kind == "number":
        pred_value, gold_value = read_number(prediction), read_number(gold)
        return pred_value is not None and gold_value is not None and abs(pred_value - gold_value) <= answer.tolerance
    if answer.kind == "text":
        return normalize_text(prediction) == normalize_text(gold)
    return prediction == gold


def vote_key(answer: AnswerSpec, label: str):
    """What two labels must share to be one vote: an equation's or number's value, else the text."""
    if answer.kind in ("equation", "number"):
        value = eval_equation(label) if answer.kind == "equation" else read_number(label)
        if value is not None:
            return ("value", value)
    return ("text", normalize_text(label) if answer.kind == "text" else label.strip())


def metric_name(answer: AnswerSpec) -> str:
    """How the kind scores, for `dsbs tasks`."""
    return {"choice": "exact_match", "text": "normalized_match", "equation": "equation",
            "number": f"number (tolerance {answer.tolerance:g})"}[answer.kind]


def answer_regex(answer: AnswerSpec) -> str:
    """A completion under structured output: a one-line rationale, the marker, the answer's format."""
    if answer.regex:
        return answer.regex
    what = {"equation": r"\([0-9+\-*/(). ]{1,80}\)\.", "number": r"-?[0-9][0-9,]*(\.[0-9]+)?\.",
            "text": r"[^\n]{1,80}\."}.get(answer.kind)
    if what is None:
        what = r"\([a-z]\) [^\n.]{1,80}\." if answer.choices else "(" + "|".join(map(re.escape, answer.labels)) + r")\."
    return r"[^\n]{1,600} " + re.escape(answer.marker) + " " + what


def answer_hint(answer: AnswerSpec) -> str:
    """How a teacher output must end, for `dsbs tasks` and the docs."""
    what = {"equation": "(<equation>)", "number": "<number>", "text": "<answer>"}.get(answer.kind)
    if what is None:
        what = "(a) <choice text>" if answer.choices else "<" + "|".join(answer.labels) + ">"
    return f"{answer.marker} {what}"
