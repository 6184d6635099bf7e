"""Data-parallel training under torchrun: one process per device (gloo on CPU, nccl on CUDA), gradients averaged
by torch's DistributedDataParallel.

Conventions the engine relies on:
- `train.batch_size` stays the GLOBAL batch (images per optimiser step): each of N processes takes batch_size / N,
  so a run's hyper-parameters, schedule and resumable state do not depend on how many processes run it.
- Every rank sees the same (seed, epoch) permutation and takes interleaved slices of it (EpochSampler), so the
  images of one global step are those of the single-process step with the same number.
- Only rank 0 writes (checkpoints, MLflow, DVC outputs); metrics are summed over ranks (training) or computed from
  logits gathered from all ranks (validation), so every rank holds the same numbers.
Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op and nothing is initialised.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment; returns this rank and its device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    d = Dist(
        int(os.environ["RANK"]),
        world,
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
        # One group for the whole process: the train stage trains one run per seed (pipeline/seeds.py), and a group
        # destroyed after the first could not rejoin torchrun's rendezvous for the next.
        atexit.register(_destroy)
    return d, device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def teardown(d: Dist) -> None:
    """The end of one run: nothing to undo, the group lives until the process exits (setup registered that)."""


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def wrap(model: nn.Module, d: Dist, device: torch.device, sync_bn: bool) -> nn.Module:
    """DDP around the model (the caller keeps the bare model for state dicts and evaluation)."""
    if not d.enabled:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("train.sync_bn: torch's SyncBatchNorm runs on CUDA only; set it false on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_all(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64, so counts and loss sums stay exact enough to match one process)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(x: np.ndarray, n: int, d: Dist, device: torch.device) -> np.ndarray:
    """Rows predicted by each rank on its EpochSampler(pad=True) shard -> all n rows in dataset order, on every rank.

    Rank r held padded positions r, r + world, ...; stacking the ranks' rows side by side restores the padded order,
    and cutting at n drops the repeated padding keys."""
    if not d.enabled:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t)
    out = torch.stack(parts, dim=1).reshape(-1, *t.shape[1:])[:n]
    return out.cpu().numpy()


def sync_buffers(model: nn.Module, d: Dist) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to all ranks: after the last training step each rank's
    BatchNorm has seen only its own shard, and evaluation and the saved checkpoint must use one set."""
    if d.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)
