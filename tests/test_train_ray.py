"""Training on Ray Train workers: DDP and DeepSpeed ZeRO-2 match one worker; kill and resume."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dsbs_ray.job import load_config
from dsbs_ray.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_shutdown")]


def _params(run_dir: str) -> dict:
    from safetensors.torch import load_file
    return load_file(Path(run_dir) / "model" / "model.safetensors")


def test_two_workers_ddp_zero2_zero3_match_one_worker(students, data_dir, tmp_path):
    """Same global batches, split over 2 workers: the weights after the steps match one worker."""
    common = dict(task="svamp", student=str(students["t5-tiny-s"]), method="dsbs", fraction=0.1, max_steps=2,
                  batch_size=8, lr=1e-2, eval_every=1, eval_limit=2, test_limit=2, gen_max_length=2, max_input_length=128,
                  max_target_length=48, data_dir=str(data_dir))
    one = train(load_config(**common, zero="off", output_dir=str(tmp_path / "one")), use_ray=False)
    ddp = train(load_config(**common, zero="off", workers=2, cpus_per_worker=0.5, output_dir=str(tmp_path / "ddp")))
    zero2 = train(load_config(**common, zero="2", workers=2, cpus_per_worker=0.5, output_dir=str(tmp_path / "z2")))
    zero3 = train(load_config(**common, zero="3", workers=2, cpus_per_worker=0.5, output_dir=str(tmp_path / "z3")))
    init = _params_from_student(students["t5-tiny-s"])
    ref = _params(one["run_dir"])
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    assert moved > 1e-3  # the step really changed the weights
    assert zero3["parameters"] == one["parameters"]  # counted in full, not the rank's ZeRO-3 shard
    # ZeRO-3 builds the student partitioned: no rank ever held more than about half of it
    assert zero3["max_rank_loaded_parameters"] <= one["parameters"] // 2 + 1000
    assert zero2["max_rank_loaded_parameters"] == one["parameters"]
    for other in (ddp, zero2, zero3):
        got = _params(other["run_dir"])
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        # Adam turns float noise in near-zero gradients into ~0.1 % of a step; a wrong shard or a
        # missing gradient average moves weights by a whole step
        assert worst < 1e-2 * moved, (other["run_dir"], worst, moved)
    assert all(abs(run["final_loss"] - one["final_loss"]) < 1e-4 for run in (ddp, zero2, zero3))


def test_decoder_only_student_two_workers_zero2_match_one_worker(data_dir, tmp_path):
    """The embedded SmolLM2 (pretrained, 135M) for one step of dsbs: 2 workers under ZeRO-2 end with
    the weights of 1 plain-torch worker."""
    from dsbs_ray.embedded import SMOLLM2, smollm2_path

    common = dict(task="svamp", student=SMOLLM2, method="dsbs", fraction=0.01, max_steps=1, batch_size=4, lr=1e-4,
                  eval_every=1, eval_limit=2, test_limit=2, gen_max_length=2, max_input_length=96, max_target_length=48,
                  data_dir=str(data_dir))
    one = train(load_config(**common, zero="off", output_dir=str(tmp_path / "one")), use_ray=False)
    zero2 = train(load_config(**common, zero="2", workers=2, cpus_per_worker=0.5, output_dir=str(tmp_path / "z2")))
    assert one["family"] == zero2["family"] == "causal" and zero2["world"] == 2
    init = _params_from_student(smollm2_path())
    ref, got = _params(one["run_dir"]), _params(zero2["run_dir"])
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    assert 0.9e-4 < moved < 1.1e-4  # Adam's first step: lr x sign(gradient)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    # measured ~2 % of a step (Adam's first step magnifies float-order noise in tiny gradients); a
    # missing gradient average or a wrong shard moves weights by a whole step
    assert worst < 0.1 * moved, (worst, moved)
    assert abs(zero2["final_loss"] - one["final_loss"]) < 1e-4


def _params_from_student(path) -> dict:
    from safetensors.torch import load_file
    return load_file(Path(path) / "model.safetensors")


def _run_dir_checkpoints(out: Path) -> list[Path]:
    """Registered checkpoints: Ray Train writes its snapshot after a checkpoint dir is complete, so a
    checkpoint_* dir alone may still be in flight (a kill then restarts from step 0)."""
    return sorted(out.glob("*/checkpoint_manager_snapshot.json"))


def test_killed_job_resumes_from_its_last_checkpoint(students, data_dir, tmp_path):
    out = tmp_path / "runs"
    cmd = [str(Path(sys.executable).with_name("dsbs")), "train", "--task", "svamp",
           "--student", str(students["t5-tiny-s"]), "--fraction", "0.2", "--max-steps", "40", "--batch-size", "8",
           "--lr", "3e-3", "--eval-every", "5", "--checkpoint-every", "5", "--eval-limit", "4", "--test-limit", "4", "--gen-max-length", "4",
           "--max-input-length", "128", "--max-target-length", "48", "--workers", "2", "--cpus-per-worker", "0.5",
           "--zero", "2", "--data-dir", str(data_dir), "--output-dir", str(out)]
    env = dict(os.environ)
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.time() + 240
    while not _run_dir_checkpoints(out) and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert _run_dir_checkpoints(out), first.stdout.read().decode()[-3000:] if first.poll() is not None else "timeout"
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its local Ray and the workers
    first.wait()
    assert first.returncode != 0
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads(second.stdout.strip().splitlines()[-1])
    assert metrics["steps"] == 40
    assert metrics["resumed_from_step"] >= 5 and metrics["resumed_from_step"] % 5 == 0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    # a quiet log: its step lines, once each; no line on repeat but each worker's own start-up lines
    # (DeepSpeed's, torch's: one per worker); none of Ray Train's (its cleaner's warning, its reports)
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    repeated = {ln: n for ln, n in Counter(lines).items() if n > 2 and "%|" not in ln}  # (progress bars' frames)
    assert not repeated and "Failed to query Ray Train Controller" not in second.stderr, repeated
    assert "Reporting training result" not in second.stderr and "PreemptionWatcher" not in second.stderr
    assert "process(es) this command had started" not in second.stderr  # a clean end: nothing for the exit net
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert len(steps) == len(set(steps)) and steps[-1].startswith("step 40/40 ")
    # finished: Ray Train's checkpoints (ZeRO-2 shards with optimizer state) are gone, the model stays
    assert metrics["checkpoint"] is None and not [d for d in out.glob("*/checkpoint_*") if d.is_dir()]
    assert len(list(out.glob("*/model/model.safetensors"))) == 1


def test_a_changed_world_size_never_loads_a_deepspeed_checkpoint_of_another(students, data_dir, tmp_path):
    """A student's `workers` changed between two runs of the same job (ZeRO-2): the run name stays, the
    world-2 DeepSpeed checkpoint is not loaded by one worker: the job starts afresh and says so."""
    common = dict(task="svamp", student=str(students["t5-tiny-s"]), method="dsbs", fraction=0.1, max_steps=4,
                  batch_size=8, lr=1e-2, eval_every=2, checkpoint_every=2, eval_limit=2, test_limit=2, gen_max_length=2,
                  max_input_length=128, max_target_length=48, zero="2", data_dir=str(data_dir),
                  output_dir=str(tmp_path / "runs"), keep="all")

    def unfinished(result):  # as if the run had died after its last checkpoint (a finished one is not rerun)
        (Path(result["run_dir"]) / "result.json").unlink()
        return result
    two = unfinished(train(load_config(**common, workers=2, cpus_per_worker=0.5)))
    one = unfinished(train(load_config(**common, workers=1, cpus_per_worker=1.0)))
    assert one["run_dir"] == two["run_dir"] and two["world"] == 2 and one["world"] == 1
    assert one["resumed_from_step"] == 0 and "'world': 2" in one["restarted_afresh"]
    again = train(load_config(**common, workers=1, cpus_per_worker=1.0))
    assert again["resumed_from_step"] == 4 and again["restarted_afresh"] is None
