"""Where work is cached (DSBS_CACHE: token ids, converted models) and content hashes of files."""

from __future__ import annotations

import hashlib
import os
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
