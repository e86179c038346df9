"""Sweep overhead: how much of the sweep's wall time, times its concurrent trial slots, the trials
spend in optimizer steps. Headline: optimizer-step efficiency = sum of the trials' optimizer-step
seconds / (sweep wall seconds x concurrent trial slots); the goal is >= 0.6.

Runs the grid of sweeps/local.yaml (2 students x 2 fractions x finetune / dsbs-gold with 2 rationale
filters on SVAMP, 12 trials, 2 at a time) from scratch: a fresh local Ray, a fresh MLflow SQLite
store, no finished trials. The teacher's samples are generated first, untimed, into the sweep's
annotation store (shared and resumable: a second run finds them there): this measures the trials,
not the teacher. The wall clock covers everything else `dsbs sweep` does: checks, Ray start, Tune,
every trial, MLflow logging, the report.

Prints each trial's phases, the per-phase table (dsbs_ray.phases), evaluation seconds per 100 rows
per student family, three readings of efficiency (job, loop, optimizer steps) and the headline last.

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

    import ray

    from dsbs_ray.phases import format_phase_table
    from dsbs_ray.students import make_tiny_students
    from dsbs_ray.sweep import annotate_teachers, check_sweep, load_sweep, run_sweep
    from dsbs_ray.tasks import default_data_dir

    cfg = load_sweep(args.config)
    with tempfile.TemporaryDirectory(prefix="dsbs_sweep_bench_") as tmp:
        tiny = make_tiny_students(Path(tmp) / "students")
        students = [s.model_copy(update={"id": str(tiny.get(Path(s.id).name, s.id))}) for s in cfg.students]
        data_dir = args.data_dir or (cfg.data_dir if cfg.data_dir and Path(cfg.data_dir).is_dir() else None) \
            or default_data_dir()
        cfg = cfg.model_copy(update={"students": students, "data_dir": str(data_dir), "output_dir": str(Path(tmp) / "out"),
                                     "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "name": "bench"})
        jobs, _, requests = check_sweep(cfg)
        annotate_teachers(cfg, jobs, requests)  # untimed: the teacher's samples, stored for the sweep to find
        ray.shutdown()
        t0 = time.time()
        summary = run_sweep(cfg)
        wall = time.time() - t0
        ray.shutdown()  # flush forwarded worker logs before the summary lines
    rows = summary["results"]
    assert summary["failed"] == 0 and summary["finished"] == len(rows), json.dumps(summary)[:2000]
    slots = cfg.max_concurrent_trials
    job = sum(r["wall_seconds"] for r in rows)
    loop = sum(r["loop_seconds"] for r in rows)
    steps = sum(r["train_seconds"] for r in rows)
    print(f"{len(rows)} trials, {slots} at a time, data {cfg.data_dir}, sweep wall {wall:.1f} s")
    for r in rows:
        p = r["phases"]
        print(f"  {r['trial']}: trial {r['trial_seconds']:.1f} s = " + ", ".join(f"{k} {v:.1f}" for k, v in p.items() if v >= 0.05))
    print("per phase, summed over the trials:")
    print(format_phase_table([r["phases"] for r in rows]))
    for family in sorted({r["family"] for r in rows}):
        mine = [r["eval_seconds_per_100_rows"] for r in rows if r["family"] == family]
        print(f"evaluation, {family} students: {sum(mine) / len(mine):.1f} s per 100 rows (mean of {len(mine)} trials)")
    print(f"sum of trial seconds: job {job:.1f}, loop {loop:.1f}, optimizer steps {steps:.1f}")
    print(f"efficiency by job seconds: {job / (wall * slots):.2f}; by loop seconds: {loop / (wall * slots):.2f}")
    print(f"optimizer-step efficiency (sum of optimizer-step seconds / (wall x {slots} slots)): "
          f"{steps / (wall * slots):.2f} (goal >= 0.6)")


if __name__ == "__main__":
    main()
