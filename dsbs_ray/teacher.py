"""Teacher annotations: scoring a teacher's outputs against gold.

(The Ray Data + vLLM annotation pipeline lands here too; this part needs neither.)
"""

from __future__ import annotations

from pathlib import Path

from dsbs_ray.data import attach_teacher
from dsbs_ray.metrics import accuracy
from dsbs_ray.tasks import get_task, load_examples, load_teacher_outputs


def teacher_report(task_name: str, split: str, data_dir: Path | str | None = None) -> dict:
    """Accuracy of the teacher's labels in TASK/llm/ against the split's gold labels.

    A row whose output does not parse counts as wrong and as a parse failure.
    """
    task = get_task(task_name)
    examples = load_examples(task.name, split, data_dir)
    outputs = load_teacher_outputs(task.name, split, data_dir)
    rows = attach_teacher(examples, outputs, task, where=f"{task.name}/{split}")
    acc = accuracy([r.teacher_label for r in rows], [r.gold for r in rows], task.metric)
    return {
        "task": task.name,
        "split": split,
        "n": len(rows),
        "accuracy": round(acc, 4),
        "parse_failures": sum(r.parse_status != "ok" for r in rows),
    }
