"""The `dsbs` command line: parse flags, call one stage, print one JSON line where asked."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from dsbs_ray.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distilling step-by-step scaling sweeps on Ray.",
)

DataDir = typer.Option(None, "--data-dir", envvar="DSBS_DATA_DIR", help="Data in the paper's layout "
                       "(default: ../shared/data when it exists, else the HF hub).")


@app.command("teacher-report")
def teacher_report_cmd(
    task: str = typer.Option(..., help="Task: cqa, svamp, asdiv, esnli, anli1."),
    split: str = typer.Option(..., help="Split whose teacher outputs (TASK/llm/SPLIT_CoT_K.json) to score."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Score a split's teacher outputs against gold; prints one JSON line."""
    from dsbs_ray.teacher import teacher_report

    print(json.dumps(teacher_report(task, split, data_dir)))


@app.command("tasks")
def tasks_cmd() -> None:
    """List the known tasks, their splits and metric; one JSON line each."""
    from dsbs_ray.tasks import TASKS

    for t in TASKS.values():
        print(json.dumps({"task": t.name, "splits": list(t.splits), "metric": t.metric, "answer": t.answer_hint}))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
