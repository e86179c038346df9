"""Finding every process a command started, wherever it was re-parented: each test run of a command
gets a unique marker in its environment, which Ray and vLLM processes inherit; /proc says who has it."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

MARK = "DSBS_TEST_PROCESS_MARK"


def marked_env() -> tuple[dict, str]:
    marker = uuid.uuid4().hex
    return dict(os.environ, **{MARK: marker}), marker


def marked(marker: str) -> list[str]:
    """'name[pid] cmdline' of every live (not zombie) process whose environment holds the marker."""
    found = []
    needle = f"{MARK}={marker}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle not in Path(f"/proc/{pid}/environ").read_bytes():
                continue
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{comm}[{pid}] {cmd}")
        except OSError:
            continue
    return found


def marked_pids(marker: str) -> list[int]:
    return [int(p.split("[", 1)[1].split("]", 1)[0]) for p in marked(marker)]


def survivors(marker: str, settle_s: float = 5.0) -> list[str]:
    """Processes of the marked command still alive `settle_s` after it exited (none is the goal)."""
    deadline = time.time() + settle_s
    while (left := marked(marker)) and time.time() < deadline:
        time.sleep(0.25)
    return left


def wait_for(marker: str, needle: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until a marked process whose name or command line contains `needle` runs."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if any(needle in p for p in marked(marker)):
            return True
        time.sleep(0.25)
    return False
