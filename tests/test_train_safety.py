"""Regression tests of the training core without Ray: every device/dtype decision is the training
process's own, checkpoints are atomic and record their layout, the token cache's temp files never
collide, and dsbs-gold trains on the same rows as finetune."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsbs_ray import backends, train as train_mod
from dsbs_ray.data import select_rows, tokenize_split
from dsbs_ray.families import seq2seq
from dsbs_ray.job import data_fingerprint, load_config, resolve_paths
from dsbs_ray.phases import PHASES
from dsbs_ray.sessions import LocalSession
from dsbs_ray.students import load_student
from dsbs_ray.train import train

COMMON = dict(task="svamp", method="dsbs", fraction=0.1, batch_size=8, lr=1e-2, eval_limit=4, test_limit=4, gen_max_length=4,
              max_input_length=128, max_target_length=48)


def _job(students, data_dir, tmp_path, **kw):
    return load_config(**(COMMON | dict(student=str(students["t5-tiny-s"]), data_dir=str(data_dir),
                                        output_dir=str(tmp_path / "runs")) | kw))


def test_no_ray_deepspeed_needs_no_launcher_and_scores_valid_at_every_evaluation_test_at_the_last(
        students, data_dir, tmp_path):
    """`dsbs train --no-ray` with the default ZeRO-2: no mpi4py, no launcher env; valid at every
    evaluation, test once, at the last step; checkpoints every checkpoint_every steps, none at the
    last (a finished run resumes nothing); every phase of the loop timed."""
    from dsbs_ray.phases import PHASES

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    job = _job(students, data_dir, tmp_path, zero="2", max_steps=6, eval_every=2, checkpoint_every=4)
    session = LocalSession(Path(job.output_dir).resolve() / job.name())
    metrics = train_mod.train_loop(resolve_paths(job).model_dump(), session)
    assert metrics["steps"] == 6 and metrics["device"] == "cpu" and metrics["deepspeed_accelerator"] == "cpu"
    assert [h["step"] for h in session.history] == [2, 4, 6]
    assert all({"valid_accuracy", "loss", "eval_seconds"} <= set(h) for h in session.history)
    assert ["test_accuracy" in h for h in session.history] == [False, False, True]
    assert sorted(p.name for p in (session.run_dir / "checkpoints").iterdir()) == ["step_4"]
    phases = metrics["phases"]
    assert set(phases) <= set(PHASES) and {"start", "load", "data", "steps", "eval", "checkpoint", "export"} <= set(phases)
    assert phases["steps"] == pytest.approx(metrics["train_seconds"]) and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= metrics["loop_seconds"]
    # 3 evaluations of the 4 valid rows, then the 4 test rows (test_limit 4)
    assert metrics["eval_rows"] == 3 * 4 + 4 and metrics["test_rows"] == 4


@pytest.mark.parametrize("keep", ["model", "none", "all"])
def test_a_finished_run_keeps_what_keep_says_and_a_rerun_returns_its_result(students, data_dir, tmp_path, keep):
    """Plain torch, a checkpoint at step 2 (AdamW's state in it, to resume). Once the run is finished
    (result.json written): keep model leaves the exported student and no checkpoint, none neither,
    all every checkpoint (the last one the weights only). A rerun trains nothing: it returns the
    stored result."""
    job = _job(students, data_dir, tmp_path, zero="off", max_steps=4, eval_every=2, checkpoint_every=2, keep=keep)
    first = train(job, use_ray=False)
    run = Path(first["run_dir"])
    assert first["skipped"] is False and (run / "result.json").exists() and (run / "predictions_test.jsonl").exists()
    assert set(first["phases"]) == set(PHASES) | {"other"}
    assert sum(first["phases"].values()) == pytest.approx(first["wall_seconds"])
    assert (run / "model" / "model.safetensors").exists() == (keep != "none")
    assert (run / "checkpoints").exists() == (keep == "all") and first["checkpoint"] is (
        None if keep != "all" else first["checkpoint"])
    if keep == "all":
        ckpts = run / "checkpoints"
        assert set(torch.load(ckpts / "step_2" / "state.pt", weights_only=True)) == {"model", "optimizer", "scheduler"}
        assert set(torch.load(ckpts / "step_4" / "state.pt", weights_only=True)) == {"model"}
        saved = load_file(run / "model" / "model.safetensors")  # the exported student is the last step's
        last = {k.removeprefix("student."): v for k, v in
                torch.load(ckpts / "step_4" / "state.pt", weights_only=True)["model"].items()}
        assert saved and all(torch.equal(v, last[k]) for k, v in saved.items())
    stamp = (run / "result.json").stat().st_mtime_ns
    again = train(job, use_ray=False)
    assert again["skipped"] is True and (again["accuracy"], again["valid_accuracy"]) == (first["accuracy"], first["valid_accuracy"])
    assert (run / "result.json").stat().st_mtime_ns == stamp


def test_a_run_killed_after_its_last_checkpoint_scores_the_same_on_rerun(students, data_dir, tmp_path):
    """keep all, the result lost (the run died after its last checkpoint): the rerun resumes at the
    last step, trains nothing, and scores the same."""
    job = _job(students, data_dir, tmp_path, zero="off", max_steps=4, eval_every=2, checkpoint_every=2, keep="all")
    first = train(job, use_ray=False)
    (Path(first["run_dir"]) / "result.json").unlink()
    again = train(job, use_ray=False)
    assert again["skipped"] is False and again["resumed_from_step"] == 4 and again["run_dir"] == first["run_dir"]
    assert (again["accuracy"], again["valid_accuracy"]) == (first["accuracy"], first["valid_accuracy"])


def test_no_ray_takes_this_process_gpu_whatever_gpus_per_worker_says(monkeypatch):
    """--no-ray trains on this process's GPU when it has one (gpus_per_worker is a Ray resource)."""
    session = LocalSession(Path("unused"))
    assert session.device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert session.device() == torch.device("cuda", 0)


def test_deepspeed_accelerator_follows_the_workers_device_not_an_inherited_env(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # e.g. inherited from a driver on a GPU box
    assert backends.pin_deepspeed_accelerator(torch.device("cpu")) == "cpu"
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_a_kill_mid_copy_never_leaves_a_checkpoint_that_a_later_run_loads(tmp_path, monkeypatch):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "state.pt").write_bytes(b"x" * 1000)
    (src / "trainer_state.json").write_text("{}")
    session = LocalSession(tmp_path / "run")
    session.report({"step": 2}, src)

    real_copytree = shutil.copytree

    def dies_after_one_file(s, d, *a, **k):
        if Path(s).name == "trainer_state.json":
            raise KeyboardInterrupt("killed mid-copy")
        return shutil.copy2(s, d)
    monkeypatch.setattr(shutil, "copytree", lambda src, dst, **k: real_copytree(src, dst, copy_function=dies_after_one_file))
    with pytest.raises(KeyboardInterrupt):
        session.report({"step": 4}, src)
    monkeypatch.undo()
    loaded = []
    assert LocalSession(tmp_path / "run").restore(lambda d: loaded.append(d) or True)
    assert [d.name for d in loaded] == ["step_2"] and (loaded[0] / "trainer_state.json").exists()
    session.report({"step": 6}, src)  # the next save clears the leftover temp dir
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_2", "step_6"]


def test_a_changed_layout_restarts_afresh_and_says_so_then_resumes(students, data_dir, tmp_path):
    """Same job, ZeRO stage changed between runs: the run name stays (the result does not depend on it),
    the plain-torch checkpoint is not fed to DeepSpeed: the run starts afresh and says so. Rerun with the
    same layout: it resumes."""
    base = dict(max_steps=4, eval_every=2, checkpoint_every=2, keep="all")

    def unfinished(result):  # as if each run had died after its last checkpoint
        (Path(result["run_dir"]) / "result.json").unlink()
        return result
    first = unfinished(train(_job(students, data_dir, tmp_path, zero="off", **base), use_ray=False))
    assert first["restarted_afresh"] is None and first["resumed_from_step"] == 0
    second = unfinished(train(_job(students, data_dir, tmp_path, zero="2", **base), use_ray=False))
    assert second["run_dir"] == first["run_dir"]
    assert "starting afresh" in second["restarted_afresh"] and second["resumed_from_step"] == 0
    third = train(_job(students, data_dir, tmp_path, zero="2", **base), use_ray=False)
    assert third["restarted_afresh"] is None and third["resumed_from_step"] == 4


def test_a_bf16_checkpoint_trains_fp32_master_weights(students, data_dir, tmp_path):
    """Weights load in fp32 whatever the checkpoint's dtype: a bf16 checkpoint trains exactly like the
    same weights stored in fp32."""
    model, tokenizer = load_student(str(students["t5-tiny-s"]))
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model.to(torch.bfloat16).to(dtype).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    runs = {name: train(load_config(**(COMMON | dict(student=str(tmp_path / name), data_dir=str(data_dir),
                                                     output_dir=str(tmp_path / f"runs-{name}"), zero="off",
                                                     max_steps=2, eval_every=2, precision="fp32"))), use_ray=False)
            for name in ("bf16", "fp32")}
    a = load_file(Path(runs["bf16"]["run_dir"]) / "model" / "model.safetensors")
    b = load_file(Path(runs["fp32"]["run_dir"]) / "model" / "model.safetensors")
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in b)
    assert runs["bf16"]["master_dtype"] == "float32"


def test_bf16_is_compute_only_under_deepspeed(students, data_dir, tmp_path):
    """precision bf16 with ZeRO-2: autocast compute, fp32 master weights and gradients (not DeepSpeed's
    bf16 mode, which trains bf16 weights and accumulates bf16 gradients)."""
    cfg = _job(students, data_dir, tmp_path, zero="2", precision="bf16", max_steps=2, eval_every=2)
    ds = backends.deepspeed_config(cfg, bf16=True)
    assert "bf16" not in ds and ds["torch_autocast"]["enabled"] and ds["torch_autocast"]["lower_precision_safe_modules"] == []
    bf16 = train(cfg, use_ray=False)
    fp32 = train(cfg.model_copy(update={"precision": "fp32", "output_dir": str(tmp_path / "fp32")}), use_ray=False)
    assert bf16["precision"] == "bf16" and bf16["master_dtype"] == "float32" and fp32["precision"] == "fp32"
    weights = load_file(Path(bf16["run_dir"]) / "model" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert abs(bf16["final_loss"] - fp32["final_loss"]) < 0.05 * fp32["final_loss"]


def test_token_cache_temp_files_never_collide_across_nodes(students, tmp_path, monkeypatch):
    """Two nodes sharing DSBS_CACHE can run writers with the same PID: neither touches the other's temp file."""
    monkeypatch.setenv("DSBS_CACHE", str(tmp_path / "cache"))
    _, tokenizer = load_student(str(students["t5-tiny-s"]))
    rows = [{"id": "1", "input": "a b c", "label": "(1 + 2)"}]
    kw = dict(prefixes=False, explain_inputs=False, rationale=False, max_input_length=32, max_target_length=16)
    tokenize_split(rows, tokenizer, seq2seq, **kw)
    (path,) = (tmp_path / "cache" / "tokens").glob("*.pt")
    path.unlink()
    other = path.with_suffix(f".{os.getpid()}.tmp")  # another node's writer, same PID, mid-write
    other.write_bytes(b"the other node's half-written file")
    out = tokenize_split(rows, tokenizer, seq2seq, **kw)
    assert other.read_bytes() == b"the other node's half-written file"
    assert torch.load(path, weights_only=True) == out


def test_dsbs_gold_trains_on_the_same_rows_as_finetune(data_dir):
    """A row whose teacher label does not parse keeps its rationale under dsbs-gold (as in the paper's
    code); only methods that train on the teacher's label drop it."""
    common = dict(task="svamp", student="unused", fraction=1.0, data_dir=str(data_dir))
    finetune = select_rows(load_config(**common, method="standard", label_source="gold"), "</s>")
    gold = select_rows(load_config(**common, method="dsbs", label_source="gold"), "</s>")
    teacher = select_rows(load_config(**common, method="dsbs", label_source="teacher"), "</s>")
    assert [r["id"] for r in gold["train"]] == [r["id"] for r in finetune["train"]]
    assert [r["label"] for r in gold["train"]] == [r["label"] for r in finetune["train"]]
    assert gold["dropped_unparsed"] == 0 and teacher["dropped_unparsed"] > 0
    assert len(teacher["train"]) == len(gold["train"]) - teacher["dropped_unparsed"]
    kept = {r["id"] for r in gold["train"]} - {r["id"] for r in teacher["train"]}
    by_id = {r["id"]: r for r in gold["train"]}
    assert any(by_id[i]["rationale"].strip() for i in kept)  # bad-label rows keep a usable rationale
    assert gold["rows_without_rationale"] == sum(not by_id[i]["rationale"].strip() for i in kept)


def test_edited_data_is_a_new_run_never_a_stale_resume(students, data_dir, tmp_path):
    """Re-annotating a data dir between two runs of the same command (here: one teacher output
    changed) trains again on the new data instead of resuming, or returning, the old run."""
    data = tmp_path / "data"
    shutil.copytree(data_dir / "svamp", data / "svamp")
    job = dict(zero="off", max_steps=2, eval_every=2)
    first = train(_job(students, data, tmp_path, **job), use_ray=False)
    same = train(_job(students, data, tmp_path, **job), use_ray=False)
    assert same["run_dir"] == first["run_dir"] and same["skipped"] is True  # unchanged data: its finished result
    outputs_file = data / "svamp" / "llm" / "train_CoT_0.json"
    outputs = json.loads(outputs_file.read_text())
    outputs[0] = outputs[0] + " "
    outputs_file.write_text(json.dumps(outputs))
    edited = train(_job(students, data, tmp_path, **job), use_ray=False)
    assert edited["run_dir"] != first["run_dir"] and edited["skipped"] is False and edited["resumed_from_step"] == 0
    # a method that does not read teacher outputs is not affected by them
    finetune = dict(job, method="standard")
    assert (resolve_paths(_job(students, data, tmp_path, **finetune)).data_fingerprint
            == data_fingerprint("svamp", str(data), uses_teacher=False))


def _fetch(student: str) -> str:
    from dsbs_ray.students import fetch_student
    return fetch_student(student)


def test_a_hub_student_is_downloaded_once_per_node(students, tmp_path, monkeypatch):
    """Four processes of one node (a trial's workers) ask for the same hub student at once: one
    downloads, the others wait for it and read the cache. The hub is a stand-in that counts downloads."""
    import multiprocessing
    import time

    import huggingface_hub
    from huggingface_hub import constants

    cache, calls = tmp_path / "hub", tmp_path / "downloads"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def snapshot_download(repo_id, local_files_only=False, allow_patterns=None):
        target = cache / repo_id.replace("/", "--")
        if (target / "config.json").exists():
            return str(target)
        if local_files_only:
            raise FileNotFoundError(repo_id)
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # a slow download: the others arrive meanwhile
        shutil.copytree(students["t5-tiny-s"], target)
        return str(target)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        paths = pool.map(_fetch, ["org/t5-tiny"] * 4)
    assert len(calls.read_text().splitlines()) == 1
    assert len(set(paths)) == 1 and (Path(paths[0]) / "config.json").exists()
    assert _fetch(str(students["t5-tiny-s"])) == str(students["t5-tiny-s"])  # a local path is used as it is


def test_a_second_run_of_the_same_job_is_refused_while_the_first_runs(students, data_dir, tmp_path):
    """Two runs of one job would share one run dir and its checkpoints: the second is refused in one
    line naming the first, and the first finishes untouched."""
    import subprocess
    import sys
    import time

    steps = 300  # ~17 s of training: the first run must outlive the second's start-up (~7 s), or both finish
    cmd = [sys.executable, "-m", "dsbs_ray", "train", "--task", "svamp", "--student", str(students["t5-tiny-s"]),
           "--fraction", "0.1", "--max-steps", str(steps), "--batch-size", "8", "--eval-every", str(steps),
           "--eval-limit", "4", "--test-limit", "4",
           "--gen-max-length", "4", "--max-input-length", "128", "--max-target-length", "48", "--zero", "off",
           "--no-ray", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "runs")]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(f"pid {first.pid} " in p.read_text()
                                             for p in (tmp_path / "runs").glob("*/.lock")):
        assert first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.1)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=300)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr[-2000:]
    assert "in use by another run of this job" in second.stderr and f"pid {first.pid} " in second.stderr
    assert first.returncode == 0 and json.loads(out.strip().splitlines()[-1])["steps"] == steps, err[-2000:]


def test_no_ray_with_several_workers_is_one_line_before_anything_is_written(students, data_dir, tmp_path):
    from dsbs_ray.errors import UserError

    with pytest.raises(UserError, match=r"^workers: more than one worker needs Ray"):
        train(_job(students, data_dir, tmp_path, zero="off", workers=2, max_steps=2), use_ray=False)
    assert not (tmp_path / "runs").exists()
