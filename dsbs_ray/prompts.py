"""Few-shot chain-of-thought prompts: a task spec's `prompt` (inline, or a prompt file), building the
byte-identical exemplar prefix, and the prompt hash that keys resumable annotation runs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from dsbs_ray.errors import UserError
from dsbs_ray.task_spec import BUILTIN_DIR, PromptSpec, get_task, load_prompt_file

PROMPTS_DIR = BUILTIN_DIR / "prompts"  # the built-in tasks' prompt files


@dataclass(frozen=True)
class Prompt:
    task: str
    prefix: str  # every exemplar, rendered; identical for all rows
    query: str  # template with {input}
    stop: tuple[str, ...]
    path: str
    exemplar_labels: tuple[str, ...] = ()  # each exemplar's answer as the task's parser reads it back

    @property
    def hash(self) -> str:
        return hashlib.sha256((self.prefix + "\x00" + self.query).encode()).hexdigest()[:12]

    def render(self, model_input: str) -> str:
        return self.prefix + self.query.format(input=model_input)


def load_prompt(task_ref: str, prompts_dir: Path | str | None = None) -> Prompt:
    """The task's prompt (prompts_dir/NAME.yaml instead, where given), checked: every exemplar,
    written out and cut after its rationale, must parse with the task's own parser (a fixed label
    set's exemplars to one of its labels)."""
    task = get_task(task_ref)
    if prompts_dir is not None:
        path = Path(prompts_dir) / f"{task.name}.yaml"
        spec = load_prompt_file(path, f"few-shot prompt for task {task.name}")
    elif isinstance(task.spec.prompt, PromptSpec):
        path, spec = task.path, task.spec.prompt
    else:
        path, spec = task.resolve(task.spec.prompt), task.prompt_spec
    parts, labels = [], []
    for i, ex in enumerate(spec.exemplars):
        text = spec.exemplar.format(**ex.model_dump())
        completion = text[len(spec.query.format(input=ex.input)):]
        parsed = task.parse(completion)
        if not parsed.ok:
            raise UserError(f"{path}: exemplar {i} does not parse with the {task.name} parser ({parsed.status}; the "
                            f"answer must follow {task.answer.marker!r} once, as {task.answer_hint!r})")
        if task.answer.labels and parsed.label not in task.answer.labels:
            raise UserError(f"{path}: exemplar {i} answers {parsed.label!r}, not one of {', '.join(task.answer.labels)}")
        if not task.answer.choices and not task.match(parsed.label, ex.answer):
            raise UserError(f"{path}: exemplar {i}: its answer {ex.answer!r} reads back as {parsed.label!r} with the "
                            f"{task.answer.kind} parser")
        parts.append(text)
        labels.append(parsed.label)
    return Prompt(task.name, "".join(parts), spec.query, tuple(spec.stop), str(path), tuple(labels))
