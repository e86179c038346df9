"""Where a trial's time goes: named phases, timed where they happen and added up in one place, so
the training loop, the job around it and the sweep fill one table (the result, MLflow metrics, the
sweep summary, the report and bench/sweep_overhead.py all read it).

    start       Ray Train's controller and worker group, the process group, DeepSpeed's init
    load        the student: fetch (a conversion), weights, the optimizer
    data        rows chosen and tokenized (or read from the token cache), on the driver and the worker
    steps       optimizer steps (forward, backward, update): what the trial is for
    eval        generation and scoring of valid and test, the predictions files
    checkpoint  saving checkpoints and handing them to the session (Ray Train persists them)
    export      the finished student written as a model directory
    logging     MLflow: the trial's run, params, step and final metrics, artifacts
    other       the rest of the trial's wall time: checks, locks, waiting for resources, Python
"""

from __future__ import annotations

import time
from contextlib import contextmanager

PHASES = ("start", "load", "data", "steps", "eval", "checkpoint", "export", "logging")


class Phases:
    """Seconds per phase, added to as the work happens."""

    def __init__(self, seconds: dict | None = None):
        self.seconds = {k: float(v) for k, v in (seconds or {}).items()}

    def add(self, name: str, seconds: float):
        assert name in PHASES, name
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def time(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def merge(self, other: dict | None):
        for name, seconds in (other or {}).items():
            self.add(name, seconds)

    def table(self, wall: float) -> dict:
        """Every phase (0 where none ran) and `other`: the wall time no phase accounts for."""
        out = {name: self.seconds.get(name, 0.0) for name in PHASES}
        return out | {"other": max(0.0, wall - sum(out.values()))}


def phase_metrics(phases: dict) -> dict:
    """MLflow metric names of a trial's phases: phase_<name>_seconds."""
    return {f"phase_{name}_seconds": seconds for name, seconds in phases.items()}


def phase_rows(trials: list[dict]) -> list[tuple[str, float, float]]:
    """(phase, seconds summed over the trials, share of their summed wall time), in PHASES order,
    `other` last. trials: each a phase table (Phases.table)."""
    names = PHASES + ("other",)
    totals = {name: sum(t.get(name, 0.0) for t in trials) for name in names}
    wall = sum(totals.values()) or 1.0
    return [(name, totals[name], totals[name] / wall) for name in names]


def format_phase_table(trials: list[dict]) -> str:
    """The per-phase table as aligned text lines (seconds and share of the trials' wall time)."""
    rows = phase_rows(trials)
    lines = [f"{'phase':<11} {'seconds':>9} {'share':>6}"]
    lines += [f"{name:<11} {seconds:>9.1f} {share:>6.1%}" for name, seconds, share in rows]
    lines.append(f"{'trials':<11} {sum(s for _, s, _ in rows):>9.1f} {len(trials):>6d}")
    return "\n".join(lines)
