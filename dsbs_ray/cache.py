"""Where work is cached (DSBS_CACHE: token ids, converted models), content hashes of files, and how a
damaged entry is told apart from a good one.

A cache entry may be truncated or overwritten (a crash, a full disk, a user): whoever reads one checks
it, and a damaged entry is a cache miss, named in one warning line and rebuilt. Never a traceback,
never a silently wrong result."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path


def hash_file(path: Path, digest=None):
    """sha256 of a file's bytes, read in blocks (or fed into `digest`, returned)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def cache_dir() -> Path:
    return Path(os.environ.get("DSBS_CACHE", Path.home() / ".cache" / "dsbs"))


def warn_damaged(path: Path, why: str, action: str = "rebuilt") -> None:
    print(f"warning: {path} is damaged ({why}); {action}", file=sys.stderr, flush=True)


def read_json(path: Path):
    """A JSON file's value; ValueError (with a short reason) when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON: {str(e)[:80]}") from None


def read_json_object(path: Path, action: str) -> dict | None:
    """A JSON object file's value; None, after one warning line saying `action`, when it is damaged
    (not JSON, or JSON but not an object)."""
    try:
        value = read_json(path)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except ValueError as e:
        warn_damaged(path, str(e), action)
        return None


def check_safetensors(path: Path) -> None:
    """ValueError unless the file is a whole safetensors file: its header parses and its size is
    exactly what the header's tensor offsets say (a truncated or overwritten file fails)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, no header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ValueError("header length past the end of the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("header is not JSON") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{size} bytes where its header says {8 + n + end}")


def check_model_dir(path: Path) -> None:
    """ValueError naming the first damaged file of a checkpoint or tokenizer directory: a JSON file
    that does not parse, a safetensors file that is not whole, or no config/tokenizer at all."""
    names = {p.name for p in path.iterdir()}
    if not names & {"config.json", "tokenizer.json", "tokenizer_config.json"}:
        raise ValueError("no config.json or tokenizer files")
    for p in sorted(path.iterdir()):
        try:
            if p.suffix == ".json":
                read_json(p)
            elif p.suffix == ".safetensors":
                check_safetensors(p)
        except (ValueError, OSError) as e:
            raise ValueError(f"{p.name}: {e}") from None
