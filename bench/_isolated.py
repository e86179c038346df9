"""One measurement in its own spawned process, so its threads, memory and engines are its own."""

from __future__ import annotations

import multiprocessing as mp


def run_isolated(target, *args):
    """target(*args, queue) in a fresh process; returns the first thing it puts on the queue. A child
    still alive a minute later (an engine that will not exit) is killed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
    return result
