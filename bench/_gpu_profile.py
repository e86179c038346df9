"""Where one of our training steps spends its time on a GPU (diagnosis only, not a bench).

    python _gpu_profile.py bf16 base groups1 eager compile
"""
import sys
import tempfile
import time

import torch

from dsbs_ray.backends import TorchBackend
from dsbs_ray.data import bucketed_batches, prepare_data
from dsbs_ray.families import seq2seq
from dsbs_ray.job import load_config, resolve_paths
from dsbs_ray.loss import multitask_loss
from dsbs_ray.students import T5_V1_1_BASE, load_student, write_random_t5

precision, variants = sys.argv[1], sys.argv[2:]
with tempfile.TemporaryDirectory() as d:
    cuda = torch.cuda.is_available()  # a CPU run is a smoke test of this script, on a tiny shape
    path = str(write_random_t5(f"{d}/s", T5_V1_1_BASE if cuda else (64, 2, 128, 2), vocab_size=32128))
    cfg = resolve_paths(load_config(task="cqa", student=path, method="dsbs", label_source="gold", fraction=0.25,
                                    max_steps=100, batch_size=64, seed=0, max_input_length=1024,
                                    max_target_length=256, lr=5e-5, zero="off", precision=precision, output_dir=d))
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _, tok = load_student(path, device.type)
    tokens = prepare_data(cfg, tok, seq2seq)["train"]
    keys = [seq2seq.length_key(tokens, i) for i in range(len(tokens["labels"]))]
    batches = bucketed_batches(keys, 64, 0, 0)

    for variant in variants:
        student, _ = load_student(path, device.type)
        if variant == "eager":
            student.set_attn_implementation("eager")
        module = seq2seq.MultiTask(student, rationale_groups=1 if variant == "groups1" else 2)
        backend = TorchBackend(module, cfg, 1, device)
        if variant == "compile":
            backend.model = torch.compile(module, dynamic=True)

        def step(i):
            rows = batches[i]
            n_l = sum(len(tokens["labels"][r]) for r in rows)
            n_r = sum(len(tokens["rationale_ids"][r]) for r in rows)
            batch = {k: v.to(device) for k, v in seq2seq.collate(tokens, rows, 0).items()}
            loss = backend.accumulate(batch, lambda p, e: multitask_loss(p, e, 0.5, n_l, n_r), last_micro=True)
            backend.step()
            return loss

        t0 = time.perf_counter()
        for i in range(3):
            step(i)
        sync()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        losses = [step(i) for i in range(3, 23)]
        sync()
        per_step = (time.perf_counter() - t0) / 20
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for i in range(23, 26):
                step(i)
            sync()
        kernel_s = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 / 3
        print(f"{variant} {precision} attn={student.config._attn_implementation}: warm-up 3 steps {warm:.1f} s; "
              f"{per_step * 1000:.1f} ms/step, GPU kernels {kernel_s * 1000:.1f} ms/step "
              f"({kernel_s / per_step:.0%} busy); loss[3] {losses[0]:.4f}; peak "
              f"{torch.cuda.max_memory_allocated() / 2**30 if cuda else 0:.1f} GiB", flush=True)
        if variant == variants[0]:
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=50),
                  flush=True)
        del module, backend, student
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
