"""Few-shot chain-of-thought prompts: loading `prompts/<task>.yaml`, building the byte-identical
exemplar prefix, and the prompt hash that keys resumable annotation runs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from dsbs_ray.errors import UserError
from dsbs_ray.tasks import get_task, read_yaml

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
NLI_PROMPT_JOIN = "\nHypothesis: "  # NLI rows are shown to the teacher as premise, then this, then hypothesis


@dataclass(frozen=True)
class Prompt:
    task: str
    prefix: str  # every exemplar, rendered; identical for all rows
    query: str  # template with {input}
    stop: tuple[str, ...]
    path: str

    @property
    def hash(self) -> str:
        return hashlib.sha256((self.prefix + "\x00" + self.query).encode()).hexdigest()[:12]

    def render(self, model_input: str) -> str:
        return self.prefix + self.query.format(input=model_input)


def load_prompt(task_name: str, prompts_dir: Path | str | None = None) -> Prompt:
    """The task's prompt, checked: every exemplar must parse back to its answer with the task parser."""
    task = get_task(task_name)
    path = Path(prompts_dir or PROMPTS_DIR) / f"{task.name}.yaml"
    spec = read_yaml(path, f"few-shot prompt for task {task.name}; see prompts/README.md")
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with exemplar, query, stop, exemplars")
    for key in ("exemplar", "query", "exemplars"):
        if key not in spec:
            raise UserError(f"{path}: missing field {key!r}")
    exemplar, query = spec["exemplar"], spec["query"]
    if "{input}" not in query or not all(f in exemplar for f in ("{input}", "{rationale}", "{answer}")):
        raise UserError(f"{path}: 'query' needs {{input}}; 'exemplar' needs {{input}}, {{rationale}}, {{answer}}")
    parts = []
    for i, ex in enumerate(spec["exemplars"]):
        missing = [k for k in ("input", "rationale", "answer") if k not in (ex or {})]
        if missing:
            raise UserError(f"{path}: exemplar {i} has no field {missing[0]!r}")
        text = exemplar.format(**ex)
        completion = text[len(query.format(input=ex["input"])):]
        parsed = task.parse(completion)
        if not parsed.ok:
            raise UserError(f"{path}: exemplar {i} does not parse with the {task.name} parser ({parsed.status})")
        parts.append(text)
    return Prompt(task.name, "".join(parts), query, tuple(spec.get("stop", ())), str(path))
