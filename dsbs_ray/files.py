"""Reading a user's files: data files (JSON lines, JSON, CSV, Parquet), JSON and YAML; every mistake
is one line naming the file (and the line or row)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dsbs_ray.errors import UserError


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


def _read_csv(path: Path) -> list[dict]:
    """Rows of a CSV with a header; every cell stays text ("007" is "007"); a row with another number
    of cells than the header is one line naming it."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            return []
        rows = []
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                raise UserError(f"{path}:{reader.line_num}: {len(record)} cells, but the header has {len(header)} "
                                f"columns ({', '.join(header)})")
            rows.append(dict(zip(header, record)))
    return rows


def read_rows(path: Path) -> list[dict]:
    """A data file's rows: .jsonl, .json (JSON lines, as the released layout, or one JSON list), .csv,
    .parquet."""
    if not path.is_file():
        raise UserError(f"missing file {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
        rows = read_json(path)
    elif suffix in (".json", ".jsonl"):
        rows = _read_json_lines(path)
    else:
        raise UserError(f"{path}: unknown data file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")
    if not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: every row must be a JSON object")
    return rows

