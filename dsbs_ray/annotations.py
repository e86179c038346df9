"""The annotation store: a teacher's samples for task rows, shared by every sweep and `dsbs teacher`
run that uses the same teacher, so nothing is generated twice.

    STORE/TASK/SPLIT/KEY/teacher.json     what KEY hashes: teacher, prompt hash, sampling, task, split
    STORE/TASK/SPLIT/KEY/parts/*.parquet  samples: row_key, row_id, sample, raw, rationale, label,
                                          parse_status, output_tokens, error (thousands of rows a file;
                                          a refused request: parse_status failed, its reason in error)
    STORE/TASK/SPLIT/KEY/done/ROWS-kK.json  a finished request (these rows, K samples) and its report

A row is keyed by its content (id and input), so a request for more rows, or more samples, reuses
every sample already there. Resume reads two columns of the parts (no pandas, no per-batch files);
a finished request is one small file, so its rerun reads nothing else; there is no final rewrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Sequence

from dsbs_ray.cache import read_json_object
from dsbs_ray.errors import UserError
from dsbs_ray.tasks import Example, Parsed

DEFAULT_STORE = "work/annotation-store"
COLUMNS = ("row_key", "row_id", "sample", "raw", "rationale", "label", "parse_status", "output_tokens", "error")
FAILED = "failed"  # parse_status of a sample the engine or endpoint refused (its reason in `error`)


def _schema():
    """The parts' columns. Parts written before `error` existed read it as null."""
    import pyarrow as pa

    return pa.schema([("row_key", pa.string()), ("row_id", pa.string()), ("sample", pa.int64()), ("raw", pa.string()),
                      ("rationale", pa.string()), ("label", pa.string()), ("parse_status", pa.string()),
                      ("output_tokens", pa.int64()), ("error", pa.string())])


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def row_key(example: Example) -> str:
    return hashlib.sha256(f"{example.id}\0{example.input}".encode()).hexdigest()[:16]


def rows_digest(examples: Sequence[Example]) -> str:
    return hashlib.sha256("".join(row_key(e) for e in examples).encode()).hexdigest()[:16]


def entry_path(store: Path | str, identity: dict) -> Path:
    """Where the entry of a teacher identity (teacher, prompt hash, sampling, task, split) lives."""
    return Path(store).resolve() / identity["task"] / identity["split"] / _digest(identity)


def open_entry(store: Path | str, identity: dict) -> Path:
    """The entry of a teacher identity, created with its teacher.json on first use."""
    path = entry_path(store, identity)
    if not (path / "teacher.json").exists():
        (path / "parts").mkdir(parents=True, exist_ok=True)
        tmp = path / f".teacher.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(identity, indent=1))
        os.replace(tmp, path / "teacher.json")
    return path


def _dataset(entry: Path):
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in (entry / "parts").glob("*.parquet"))  # names start with a time: oldest first
    return pads.dataset(files, format="parquet", schema=_schema()) if files else None


def done_samples(entry: Path, keys: Sequence[str], samples: int):
    """A bool array [rows, samples]: which (row, sample) the entry holds already (two columns read)."""
    import numpy as np

    done = np.zeros((len(keys), samples), dtype=bool)
    ds = _dataset(entry)
    if ds is None:
        return done
    index: dict = {}
    for i, k in enumerate(keys):  # identical rows share a key, and its samples
        index.setdefault(k, []).append(i)
    table = _scan(ds, ["row_key", "sample"])
    for key, k in zip(table.column("row_key").to_pylist(), table.column("sample").to_pylist()):
        if k < samples:
            done[index.get(key, []), k] = True
    return done


def write_part(entry: Path, records: list[dict]) -> None:
    """One part file (temp name, then renamed: a kill never leaves half a file that a reader sees)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not records:
        return
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in records], schema=_schema())
    tmp = entry / "parts" / f".{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, entry / "parts" / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")


def read_samples(entry: Path, examples: Sequence[Example], samples: int,
                 columns: Sequence[str] | None = None) -> list[list]:
    """Each example's first `samples` samples in sample order: Parsed (rationale, label, status), or
    with `columns` a dict of those columns. A row that lacks a sample is an error naming the counts."""
    import pyarrow.compute as pc

    keys = [row_key(e) for e in examples]
    wanted = list(columns) if columns else ["rationale", "label", "parse_status"]
    out: list[list] = [[None] * samples for _ in keys]
    ds = _dataset(entry)
    if ds is not None and keys:
        table = _scan(ds, ["row_key", "sample"] + wanted,
                            filter=pc.field("row_key").isin(sorted(set(keys))) & (pc.field("sample") < samples))
        by_key: dict = {}
        for i, k in enumerate(keys):
            by_key.setdefault(k, []).append(i)
        values = [table.column(c).to_pylist() for c in ["row_key", "sample"] + wanted]
        for key, k, *rest in zip(*values):
            value = dict(zip(wanted, rest)) if columns else Parsed(rest[0] or "", rest[1] or "", rest[2])
            for i in by_key[key]:
                if out[i][k] is None:  # the first written wins (two writers of one row agree on the key)
                    out[i][k] = value
    missing = sum(any(s is None for s in row) for row in out)
    if missing:
        raise UserError(f"annotation store {entry}: {missing} of {len(examples)} rows lack some of their "
                        f"{samples} samples; rerun the sweep (or dsbs teacher) to finish the annotation")
    return out


def done_path(entry: Path, examples: Sequence[Example], samples: int) -> Path:
    return entry / "done" / f"{rows_digest(examples)}-k{samples}.json"


def finished_report(entry: Path, examples: Sequence[Example], samples: int) -> dict | None:
    """The report of a finished request for these rows and samples, or None. A damaged marker is a
    miss (one warning line): the request is finished again from the parts, which rewrites it."""
    path = done_path(entry, examples, samples)
    if not path.exists():
        return None
    return read_json_object(path, "the request is checked against the store's samples again")


def _scan(ds, columns: list[str], **kw):
    """An entry's parts (its _dataset) as one table; a part that cannot be read is one line naming
    it and what to do (its samples were paid for: it is never rebuilt or removed here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return ds.to_table(columns=columns, **kw)
    except (pa.ArrowException, OSError):
        bad = []
        for f in ds.files:
            try:
                pq.read_metadata(f)
                pq.read_table(f, columns=["row_key", "sample"])
            except (pa.ArrowException, OSError) as e:
                bad.append((f, str(e).splitlines()[0][:120]))
        if not bad:
            raise
        raise UserError(f"annotation store: part {bad[0][0]} cannot be read ({bad[0][1]})"
                        + (f" nor {len(bad) - 1} other part(s)" if len(bad) > 1 else "")
                        + "; restore it from a backup, or move it out of the store and rerun to generate its rows "
                          "again (they will be drawn anew)") from None


def mark_finished(entry: Path, examples: Sequence[Example], samples: int, report: dict) -> None:
    path = done_path(entry, examples, samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
