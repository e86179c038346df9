"""Backends: plain torch (one process or DDP) and DeepSpeed ZeRO, behind one small interface
(accumulate, step, lr, save, load, full_state_dict). Both keep fp32 master weights, fp32 gradients and
fp32 optimizer state; bf16 is compute only (torch autocast). Also what the process that trains
decides on its own node: DeepSpeed's accelerator, its process group, its checkpoint layout.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch

from dsbs_ray.job import TrainConfig


def _linear_schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def use_bf16(cfg: TrainConfig, device) -> bool:
    """bf16 compute on GPU, fp32 on CPU unless asked; decided by the worker from its own device."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


class TorchBackend:
    """torch AdamW with a linear warmup/decay schedule; DDP when world > 1."""

    def __init__(self, module, cfg: TrainConfig, world: int, device):
        self.module = module.to(device)
        self.model = module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        # on a GPU, AdamW's fused kernel: one launch for every parameter instead of a few per tensor
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=True if device.type == "cuda" else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _linear_schedule(cfg.warmup_steps, cfg.max_steps))
        self.max_grad_norm = cfg.max_grad_norm
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(cfg, device)
                         else contextlib.nullcontext())
        self.world = world

    def accumulate(self, batch: dict, loss_fn, last_micro: bool) -> float:
        """Forward and backward of one micro-batch; DDP syncs gradients only on the last one."""
        sync = contextlib.nullcontext() if (self.world == 1 or last_micro) else self.model.no_sync()
        with sync:
            with self.autocast:
                outputs = self.model(**batch)
            loss = loss_fn(*outputs)
            loss.backward()
        return loss.item()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, rank: int, last: bool = False):
        """The last step's checkpoint holds the weights only: nothing trains after it (max_steps is in
        the run name), and AdamW's state is twice the weights (1 GB of 1.6 for SmolLM2-135M)."""
        if rank == 0:
            state = {"model": self.module.state_dict()}
            if not last:
                state |= {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            torch.save(state, directory / "state.pt")

    def load(self, directory: Path):
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self, rank: int) -> dict | None:
        return self.module.student.state_dict() if rank == 0 else None


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    """DeepSpeed's config for a job. bf16 through DeepSpeed's torch_autocast mode, not its bf16 mode
    (which keeps bf16 weights and accumulates gradients in bf16); no module is marked safe for
    bf16 gradient communication, so gradients are reduced and accumulated in fp32."""
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": int(cfg.zero)},
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    """DeepSpeed engine (ZeRO stage 0-3) over the job's process group, with torch AdamW so nothing
    needs a JIT-compiled op on CPU."""

    def __init__(self, module, cfg: TrainConfig, ds_config: dict, device):
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the CPU shm op
        self.stage = int(cfg.zero)
        self.module = module.to(device)
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(cfg.warmup_steps, cfg.max_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=not torch.distributed.is_initialized())

    def accumulate(self, batch: dict, loss_fn, last_micro: bool) -> float:
        """Forward and backward of one micro-batch; DeepSpeed steps the optimizer itself at the
        accumulation boundary. Our loss is already normalised per global batch: no 1/GAS scaling."""
        loss = loss_fn(*self.engine(**batch))
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()
        return loss.item()

    def step(self):
        pass

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, directory: Path, rank: int, last: bool = False):
        self.engine.save_checkpoint(str(directory), tag="state")  # always whole: ZeRO keeps weights in its shards

    def load(self, directory: Path):
        self.engine.load_checkpoint(str(directory), tag="state")

    def full_state_dict(self, rank: int) -> dict | None:
        """The student's full weights on rank 0 (None elsewhere). Under ZeRO-3 a collective that
        gathers one layer at a time onto rank 0 only: no rank ever holds the whole model twice."""
        if self.stage != 3:
            return self.module.student.state_dict() if rank == 0 else None
        full = self.engine._zero3_consolidated_16bit_state_dict()  # named for fp16; our params are fp32
        if rank != 0:
            return None
        return {k.removeprefix("student."): v for k, v in full.items()}


def pin_deepspeed_accelerator(device: torch.device) -> str:
    """DeepSpeed's accelerator for this process, from this process's device (never the driver's):
    a DS_ACCELERATOR inherited from elsewhere, or an accelerator DeepSpeed already picked, is replaced
    when it disagrees."""
    name = "cuda" if device.type == "cuda" else "cpu"
    os.environ["DS_ACCELERATOR"] = name
    from deepspeed.accelerator import real_accelerator

    if real_accelerator.ds_accelerator is not None and real_accelerator.ds_accelerator._name != name:
        real_accelerator.ds_accelerator = None  # picked before we knew the device: pick again
    return real_accelerator.get_accelerator()._name


def single_process_group(device: torch.device) -> None:
    """A world-1 process group for DeepSpeed outside a launcher (else it looks for MPI). It lives as
    long as the process: DeepSpeed's comm layer keeps a handle on it for later jobs in this process."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # what a launcher would have set, and DeepSpeed asserts on
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def checkpoint_layout(cfg: TrainConfig, world: int) -> dict:
    """What a checkpoint's format depends on: plain torch state is whole (any world size resumes it);
    DeepSpeed's is partitioned by ZeRO stage and world size."""
    if cfg.zero == "off":
        return {"backend": "torch"}
    return {"backend": "deepspeed", "zero": cfg.zero, "world": world}


def local_parameters(model) -> int:
    """Parameter elements this rank holds (its shard under ZeRO-3)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
