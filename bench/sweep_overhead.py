"""Sweep overhead: how much of the sweep's wall time, times its concurrent trial slots, the trials
spend training. efficiency = sum of trial training seconds / (sweep wall seconds x concurrent trials).

Runs the grid of sweeps/local.yaml (2 tiny students x 2 fractions x 2 methods on SVAMP, 60 steps,
2 trials at a time) from scratch: a fresh local Ray, a fresh MLflow SQLite store, no finished trials.
The wall clock covers everything `dsbs sweep` does: checks, Ray start, Tune, every trial, MLflow
logging, the report. Two readings of "trial training seconds", both printed:

- job: each trial's Ray Train job, from the job's checks to its result (what the sweep layer schedules);
- loop: the time inside the training function on the worker (model and data loading, steps, evaluation),
  which leaves out the Train worker start as well.

The headline (last line) is the job reading; the goal is >= 0.75.

    python bench/sweep_overhead.py [--config sweeps/local.yaml] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _isolated import leave_nothing_behind

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "sweeps" / "local.yaml"))
    ap.add_argument("--data-dir", default=None, help="default: the config's if it exists, else the tasks' default")
    args = ap.parse_args()
    leave_nothing_behind()

    from dsbs_ray.students import make_tiny_students
    from dsbs_ray.sweep import load_sweep, run_sweep
    from dsbs_ray.tasks import default_data_dir

    cfg = load_sweep(args.config)
    with tempfile.TemporaryDirectory(prefix="dsbs_sweep_bench_") as tmp:
        tiny = make_tiny_students(Path(tmp) / "students")
        students = [s.model_copy(update={"id": str(tiny.get(Path(s.id).name, s.id))}) for s in cfg.students]
        data_dir = args.data_dir or (cfg.data_dir if cfg.data_dir and Path(cfg.data_dir).is_dir() else None) \
            or default_data_dir()
        cfg = cfg.model_copy(update={"students": students, "data_dir": str(data_dir), "output_dir": str(Path(tmp) / "out"),
                                     "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "name": "bench"})
        t0 = time.time()
        summary = run_sweep(cfg)
        wall = time.time() - t0
        import ray

        ray.shutdown()  # flush forwarded worker logs before the summary lines
    rows = summary["results"]
    assert summary["failed"] == 0 and summary["finished"] == len(rows), json.dumps(summary)[:2000]
    slots = cfg.max_concurrent_trials
    job = sum(r["wall_seconds"] for r in rows)
    loop = sum(r["loop_seconds"] for r in rows)
    steps = sum(r["train_seconds"] for r in rows)
    print(f"{len(rows)} trials, {slots} at a time, data {cfg.data_dir}, sweep wall {wall:.1f} s")
    for r in rows:
        print(f"  {r['trial']}: job {r['wall_seconds']:.1f} s, loop {r['loop_seconds']:.1f} s, "
              f"optimizer steps {r['train_seconds']:.1f} s")
    print(f"sum of trial seconds: job {job:.1f}, loop {loop:.1f}, optimizer steps only {steps:.1f}")
    print(f"efficiency by loop seconds: {loop / (wall * slots):.2f}; by optimizer-step seconds: {steps / (wall * slots):.2f}")
    print(f"sweep efficiency (sum of trial job seconds / (wall x {slots} slots)): {job / (wall * slots):.2f} (goal >= 0.75)")


if __name__ == "__main__":
    main()
