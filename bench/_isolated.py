"""One measurement in its own spawned process, so its threads, memory and engines are its own, and
nothing it started outlives it."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing import resource_tracker
from queue import Empty as queue_empty
import sys

from dsbs_ray.processes import adopt_orphans, descendants, end_descendants


def run_isolated(target, *args):
    """target(*args, queue) in a fresh process; returns the first thing it puts on the queue.

    The bench is the reaper of whatever the child starts (engine cores, Ray), so what the child
    leaves behind is still ours: after it exits (or is killed a minute after its result), every
    process left is ended and named on stderr; a leak shows, and never outlives the bench."""
    adopt_orphans()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    resource_tracker.ensure_running()  # this process's own helper, started by spawn: not the child's to leave
    before = descendants()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:  # a child that dies before its result (an error, the OOM killer) ends the bench, not hangs it
        try:
            result = queue.get(timeout=5)
            break
        except queue_empty:
            if not proc.is_alive() and queue.empty():
                left = end_descendants(spare=before, settle_s=5.0)
                raise SystemExit(f"{target.__name__} exited with code {proc.exitcode} before its result"
                                 + (f"; ended: {', '.join(left)}" if left else ""))
    proc.join(60)
    if proc.is_alive():
        print(f"warning: {target.__name__} did not exit a minute after its result; killed", file=sys.stderr)
        proc.kill()
        proc.join()
    left = end_descendants(spare=before, settle_s=5.0)
    if left:
        print(f"warning: {target.__name__} left {len(left)} process(es) running; ended: {', '.join(left)}",
              file=sys.stderr)
    return result


def leave_nothing_behind() -> None:
    """For a bench's main: become the reaper of everything it starts, and at exit end (and name) what
    is still running, so no engine or Ray process outlives the bench, however its children ended.
    SIGTERM and SIGHUP (`timeout`, `kill`, a closed terminal) exit through the same path as Ctrl-C:
    their default action would end the bench alone and leave its children running."""
    import atexit
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    adopt_orphans()
    resource_tracker.ensure_running()  # run_isolated's helper, the bench's own: started first, it is spared
    before = descendants()

    def end():
        left = end_descendants(spare=before, settle_s=5.0)
        if left:
            print(f"warning: {len(left)} process(es) were still running at the end; ended: {', '.join(left)}",
                  file=sys.stderr)
    atexit.register(end)
