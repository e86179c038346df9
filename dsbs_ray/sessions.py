"""Sessions: where rank, world and the device come from, and where checkpoints and metrics go.
LocalSession is one process with no Ray; RaySession is a Ray Train worker."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch


class LocalSession:
    """One process, no Ray: this process's device (the first visible GPU, else the CPU);
    checkpoints under run_dir/checkpoints, each written to a hidden temp dir and renamed into place,
    so a kill mid-copy never leaves a partial step_N for a later run to load."""

    rank, world, local_rank = 0, 1, 0

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.history: list[dict] = []

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def node_id(self) -> str | None:
        return None

    def _checkpoints(self) -> list[Path]:
        found = [p for p in (self.run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def restore(self, load) -> bool:
        ckpts = self._checkpoints()
        return bool(ckpts) and load(ckpts[-1])

    def report(self, metrics: dict, checkpoint_dir: Path | None):
        self.history.append(metrics)
        if checkpoint_dir is None:
            return
        root = self.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        dest = root / f"step_{metrics['step']}"
        partial = root / f".partial-{uuid.uuid4().hex}"
        shutil.copytree(checkpoint_dir, partial)
        if dest.exists():  # the same step saved again (a run restarted afresh): set the old copy aside
            dest.rename(root / f".old-{uuid.uuid4().hex}")
        os.replace(partial, dest)
        for old in self._checkpoints()[:-2] + [p for p in root.glob(".*-*") if p.is_dir()]:
            shutil.rmtree(old, ignore_errors=True)  # ours only: step_N and our hidden temp dirs

    def checkpoint_path(self) -> str | None:
        ckpts = self._checkpoints()
        return str(ckpts[-1]) if ckpts else None


class RaySession:
    """Inside a Ray Train worker: rank, world and device from the train context (the device Ray
    Train assigned to this worker, on its own node), checkpoints through ray.train.report (every rank
    reports; DeepSpeed shards from all ranks land in one checkpoint)."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def node_id(self) -> str | None:
        import ray

        return ray.get_runtime_context().get_node_id()

    def restore(self, load) -> bool:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as d:
            return load(Path(d))

    def report(self, metrics: dict, checkpoint_dir: Path | None):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
