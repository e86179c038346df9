"""A task's splits and teacher outputs, as its spec (dsbs_ray.task_spec) says: the rows of each split
(a file, the data dir, the hub, another task's split, or carved from train), the Examples a model
sees, and the teacher's raw outputs.

Splits without a `data` entry are read from DATA_DIR/NAME/NAME_SPLIT.json (the paper's released
layout, JSON lines), teacher outputs always from DATA_DIR/NAME/llm/SPLIT_CoT_K.json, so the PaLM
outputs shipped with the paper and our own annotations load and score the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsbs_ray.answers import Parsed  # noqa: F401 (what a task's parse returns)
from dsbs_ray.errors import UserError
from dsbs_ray.files import read_json, read_rows
from dsbs_ray.task_spec import Carve, Example, HubSource, Source, Task, get_task, placeholders, render

DEFAULT_EOS = "</s>"  # T5's EOS; two-text inputs join their texts with the student's EOS token ({join})


def default_data_dir() -> Path | None:
    """DSBS_DATA_DIR, else ../shared/data beside the working directory when it exists."""
    env = os.environ.get("DSBS_DATA_DIR")
    if env:
        return Path(env)
    for candidate in (Path("../shared/data"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None



# ---------------------------------------------------------------------------------------------
# Where a split comes from: its own sources (data.SPLIT, else DATA_DIR/NAME/NAME_SPLIT.json, else a
# hub split), or carved from train (or data.all) where the spec says how (carve.test).


def released_path(task: Task, split: str, data_dir: Path | None) -> Path | None:
    return data_dir / task.name / f"{task.name}_{split}.json" if data_dir is not None else None


def _own_sources(task: Task, split: str, data_dir: Path | None) -> list[Source] | None:
    if getattr(task.spec.data, split):
        return getattr(task.spec.data, split)
    released = released_path(task, split, data_dir)
    if released is not None and released.exists():
        return [Source(file=str(released.resolve()))]
    hub = task.spec.data.hub
    if hub is not None and split in hub.splits:
        return [Source(hub=HubSource(path=hub.path, name=hub.name, split=hub.splits[split]))]
    return None


def _source_rows(task: Task, src: Source, split: str, data_dir: Path | None) -> tuple[list[dict], str]:
    if src.hub is not None:
        import datasets

        where = f"hub dataset {src.hub.path} split {src.hub.split}"
        try:
            rows = list(datasets.load_dataset(src.hub.path, src.hub.name, split=src.hub.split))
        except (ConnectionError, OSError, ValueError) as e:
            fell_back = not getattr(task.spec.data, split, None) and data_dir is not None  # (data.hub, no file)
            no_file = f"no {released_path(task, split, data_dir)} and " if fell_back else ""
            raise UserError(f"{task.path}: {no_file}could not load {where}: {str(e).splitlines()[0]}") from None
    else:
        path = task.resolve(src.file, data_dir)
        where = str(path)
        rows = read_rows(path)
    if src.columns:
        made = []
        for i, row in enumerate(rows):
            try:
                made.append({k: render(t, row, {"_row": str(i)}) for k, t in src.columns.items()})
            except KeyError as e:
                raise UserError(f"{where}: row {i} has no field {e.args[0]!r} (data columns of {task.path})") from None
        rows = made
    return rows, where


def carve_test(n_rows: int, carve: Carve) -> tuple[list[int], list[int]]:
    """(train, test) indices: a RandomState(seed) permutation whose last rows are test (the paper's
    SVAMP split: seed 0, 200 of 1000)."""
    import numpy as np

    n_test = carve.rows if carve.rows is not None else max(1, round(carve.fraction * n_rows))
    if n_test >= n_rows:
        raise UserError(f"carve.test: {n_test} test rows of {n_rows} leave no training rows")
    order = np.random.RandomState(seed=carve.seed).permutation(n_rows).tolist()
    return order[:n_rows - n_test], order[n_rows - n_test:]


Part = tuple  # ("rows", rows, where) | ("task", ref)


def _plan(task: Task, split: str, data_dir: Path | None) -> tuple[list[Source], bool]:
    """(the sources a split reads, whether the split is carved out of them by carve.test)."""
    if split not in task.splits:
        raise UserError(f"task {task.name} has no split {split!r}; its splits: {', '.join(task.splits)}")
    own = _own_sources(task, split, data_dir)
    carve = task.spec.carve.test
    if split == "valid" or carve is None or _own_sources(task, "test", data_dir) is not None or (
            split == "train" and own is not None and task.spec.data.all is not None):
        if own is None:
            missing = released_path(task, split, data_dir)
            if missing is None:
                raise UserError(f"task {task.name} needs a data dir for split {split}: pass --data-dir or set "
                                f"DSBS_DATA_DIR")
            raise UserError(f"missing file {missing} (task {task.name}, split {split})")
        return own, False
    base = task.spec.data.all or _own_sources(task, "train", data_dir)
    if base is None:
        raise UserError(f"task {task.name}: no train rows to carve the {split} split from "
                        f"(missing file {released_path(task, 'train', data_dir)})")
    if any(src.task is not None for src in base):
        raise UserError(f"{task.path}: carve.test cannot carve from another task's split")
    return base, True


def split_parts(task: Task, split: str, data_dir: Path | None) -> list[Part]:
    """What a split is made of, in order: rows of a source (with where they came from) or another
    task's split."""
    sources, carved = _plan(task, split, data_dir)
    parts = [_part(task, src, split, data_dir) for src in sources]
    if not carved:
        return parts
    rows = [r for p in parts for r in p[1]]
    train_idx, test_idx = carve_test(len(rows), task.spec.carve.test)
    where = ", ".join(p[2] for p in parts) + f" (carve.test, {split})"
    return [("rows", [rows[i] for i in (test_idx if split == "test" else train_idx)], where)]


def split_is_local(task_ref: str, split: str, data_dir: Path | None) -> bool:
    """Whether a split loads without the hub (an estimate never waits on it)."""
    try:
        sources, _ = _plan(get_task(task_ref), split, data_dir)
    except UserError:
        return False
    return all(s.hub is None and (s.task is None or split_is_local(s.task, split, data_dir)) for s in sources)


def _part(task: Task, src: Source, split: str, data_dir: Path | None) -> Part:
    if src.task is not None:
        return ("task", src.task)
    rows, where = _source_rows(task, src, split, data_dir)
    return ("rows", rows, where)


def _data_dir(data_dir) -> Path | None:
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} does not exist")
    return data_dir


def load_rows(task_ref: str, split: str, data_dir: Path | str | None = None) -> tuple[list[dict], str]:
    """(the split's rows as its sources hold them, where they came from): what `dsbs teacher`
    annotates and writes back in the released layout."""
    task = get_task(task_ref)
    parts = split_parts(task, split, _data_dir(data_dir))
    if any(p[0] == "task" for p in parts):
        raise UserError(f"task {task.name} takes split {split} from other tasks "
                        f"({', '.join(p[1] for p in parts if p[0] == 'task')}): annotate each of those on its own")
    return [r for p in parts for r in p[1]], ", ".join(p[2] for p in parts)


def _to_examples(task: Task, rows: list[dict], join: str, where: str) -> list[Example]:
    if not rows:
        return []
    missing = [c for c in placeholders(task.spec.input) if c not in ("join", "_row") and c not in rows[0]]
    if missing:
        raise UserError(f"{task.path}: input: {{{missing[0]}}} is not a column of {where} "
                        f"(its columns: {', '.join(rows[0])})")
    labelled = task.spec.label in rows[0]
    out = []
    for i, row in enumerate(rows):
        if labelled != (task.spec.label in row):
            raise UserError(f"{where}: row {i} {'has no' if labelled else 'has a'} label column {task.spec.label!r}, "
                            f"unlike row 0")
        try:
            out.append(task.to_example(row, i, join))
        except KeyError as e:
            raise UserError(f"{where}: row {i} has no field {e.args[0]!r}") from None
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return out


def load_examples(task_ref: str, split: str, data_dir: Path | str | None = None,
                  eos_token: str = DEFAULT_EOS) -> list[Example]:
    """A task split as Examples: the model input ({join} is eos_token: the student's EOS, or the
    task's teacher_join for the teacher) and the gold label as text."""
    task = get_task(task_ref)
    out = []
    for part in split_parts(task, split, _data_dir(data_dir)):
        if part[0] == "task":
            out += load_examples(part[1], split, data_dir, eos_token)
        else:
            out += _to_examples(task, part[1], eos_token, part[2])
    return out


def teacher_examples(task_ref: str, split: str, data_dir: Path | str | None = None) -> list[Example]:
    """The split as the teacher sees it (two texts joined by the task's teacher_join): what the
    annotation store keys its rows by."""
    return load_examples(task_ref, split, data_dir, get_task(task_ref).spec.teacher_join)


def is_labelled(examples: list[Example]) -> bool:
    return bool(examples) and all(e.gold != "" for e in examples)


def _teacher_files(data_dir: Path, task_dir: str, split: str) -> list[Path]:
    """TASK/llm/SPLIT_CoT_K.json for K = 0, 1, ... with no gaps."""
    files, k = [], 0
    while (data_dir / task_dir / "llm" / f"{split}_CoT_{k}.json").exists():
        files.append(data_dir / task_dir / "llm" / f"{split}_CoT_{k}.json")
        k += 1
    return files


def source_tasks(task_ref: str, split: str) -> list[str]:
    """Task names whose DATA_DIR folders a split reads, in order: other tasks it takes rows from,
    then its own (the data dir holds the task's own teacher outputs)."""
    task = get_task(task_ref)
    sources = getattr(task.spec.data, split) or []
    names = [n for s in sources if s.task for n in source_tasks(s.task, split)]
    if not sources or any(s.task is None for s in sources):
        names.append(task.name)
    return list(dict.fromkeys(names))


def load_teacher_outputs(task_ref: str, split: str, data_dir: Path | str | None = None) -> list[str]:
    """The raw teacher completions of a split, in row order (the CoT_K files concatenated; a split
    made of other tasks' splits reads theirs, in order)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is None:
        raise UserError("no data dir: pass --data-dir or set DSBS_DATA_DIR")
    outputs: list[str] = []
    for part in source_tasks(task_ref, split):
        files = _teacher_files(data_dir, part, split)
        if not files:
            raise UserError(f"missing file {data_dir / part / 'llm' / f'{split}_CoT_0.json'} (teacher outputs)")
        for path in files:
            chunk = read_json(path)
            if not isinstance(chunk, list) or not all(isinstance(o, str) for o in chunk):
                raise UserError(f"{path}: expected a JSON list of strings")
            outputs.extend(chunk)
    return outputs
