"""Every process a command starts ends with it.

A local Ray starts GCS, raylet, dashboard and worker processes; a vLLM engine actor starts its own
EngineCore and worker processes. When their parent dies first (Ray torn down by Ctrl-C, an engine
actor killed, a process that ends with `os._exit`), Linux hands the orphans to init, where they keep
a core busy and hold the caller's stdout open. `adopt_orphans` makes this process their reaper
instead (PR_SET_CHILD_SUBREAPER), so they stay our descendants; `end_descendants` ends them. Only
processes this one started are ever touched: on a cluster joined through RAY_ADDRESS the Ray
processes are the cluster's, not ours, and are not our descendants.
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> bool:
    """Become the reaper of this process's orphaned descendants (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def descendants() -> set[int]:
    """PIDs of every process below this one now."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def end_descendants(grace_s: float = 10.0, spare: set[int] = frozenset(), settle_s: float = 0.0) -> list[str]:
    """SIGTERM every descendant still running (but those in `spare`, e.g. what ran before a
    measurement), SIGKILL what is left after `grace_s`; reap them all. Returns what had to be ended
    (name and pid), so a caller can say so. settle_s: first wait that long for them to exit on their
    own (Ray's dashboard modules take ~0.5 s after ray.shutdown)."""
    import psutil

    me = psutil.Process()
    left = [p for p in me.children(recursive=True) if p.is_running() and p.pid not in spare]
    if left and settle_s:
        _, left = psutil.wait_procs(left, timeout=settle_s)
        left = [p for p in left if _running(p)]
    if not left:
        return []
    names = []
    for p in left:
        try:
            names.append(f"{p.name()}[{p.pid}]")
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    for p in me.children(recursive=True):  # a descendant started while we were ending the others
        if p.pid in spare:
            continue
        try:
            p.kill()
        except psutil.Error:
            pass
    return names


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def record_stop_signals() -> list[int]:
    """Ctrl-C (SIGINT) and SIGTERM unwind the command like a KeyboardInterrupt, so its cleanup runs;
    returns the list the signals received are appended to (Ray's own SIGTERM handler, installed by
    ray.init, exits with code 15 instead, which unwinds too)."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return received
