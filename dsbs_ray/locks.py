"""One writer per directory: a sweep dir is held by one sweep, a run dir by one training job."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from dsbs_ray.errors import UserError


@contextlib.contextmanager
def hold(directory: Path, what: str, field: str, wait: bool = False):
    """An exclusive lock on `directory` while the block runs; a second holder is refused in one line
    naming the first (pid, host, start, command) and the setting to change (`field`), or with
    wait=True waits for it (saying so on stderr). An flock: the kernel drops it when its holder dies,
    so a killed run never leaves a stale lock behind."""
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        if wait:
            print(f"waiting for {directory}: in use by another {what} ({holder})", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            f.close()
            raise UserError(f"{field}: {directory} is in use by another {what} ({holder}); wait for it to "
                            f"end or use another {field}") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)}\n")
        f.flush()
        yield
    finally:
        f.close()
