"""Data-parallel training across processes (``torchrun`` / ``accelerate launch``): one copy of the model each.

Launched by torchrun, every process reads the same data, builds the same batches in the same order
and takes its share of each global batch (rows ``rank::world``): ``--batch-size`` stays the global
batch, so a 2-process run takes the same optimiser steps as a 1-process run. Each process scales its
loss by its share of the batch, gradients are summed across processes after backward (one flat
all-reduce per step), and every process applies the same update to identical weights. Validation and
test sets are split the same way and their logits gathered, so every process sees the same metrics
(and agrees on the best epoch and on early stopping). Only rank 0 writes the output and checkpoints.

Backends: NCCL on GPUs, gloo on CPUs. Without torchrun's environment this is all a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from adaptext.errors import AdaptextError


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def share(self, rows: list[int]) -> list[int]:
        """This process's rows of a global batch."""
        return rows[self.rank :: self.world] if self.active else rows


# Set by ``accelerate launch`` when its config asks for sharded training.
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def setup() -> Group:
    """Join the process group torchrun described in the environment (no-op for a single process).

    A launch that asks for FSDP or DeepSpeed ZeRO is refused rather than silently run unsharded: every
    process here holds the whole model, which an adapter run rarely outgrows (the frozen base is the
    bulk, and bf16 MPNet-size bases fit any GPU), but a user who configured sharding should know."""
    for variable, engine in SHARDED_LAUNCHES.items():
        if os.environ.get(variable, "").lower() in ("true", "1"):
            raise AdaptextError(
                f"accelerate launch asked for {engine} ({variable}); adaptext trains data-parallel with the whole "
                "model in every process and does not shard it: use an accelerate config without "
                f"{engine} (multi-GPU), or torchrun"
            )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).splitlines()[0][:200]
            raise AdaptextError(f"cannot join the torchrun process group ({first}); check MASTER_ADDR/PORT") from None
    return Group(rank, world, local_rank)


def teardown(group: Group, clean: bool = True) -> None:
    """Leave the group; after a failure, without waiting for the others (torchrun stops them)."""
    if group.active:
        import torch.distributed as dist

        if dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def broadcast_params(group: Group, params: list[torch.Tensor]) -> None:
    """Start every process from rank 0's weights (the seed makes them equal already; this makes it certain)."""
    if group.active:
        import torch.distributed as dist

        for param in params:
            dist.broadcast(param.data, src=0)


def sum_gradients(group: Group, params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over all processes, in one flat buffer."""
    if not group.active:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param, grad in zip(params, grads):
        n = grad.numel()
        param.grad = flat[offset : offset + n].view_as(grad).clone()
        offset += n


def gather_rows(group: Group, local: np.ndarray, total: int) -> np.ndarray:
    """Reassemble rows computed as ``rows[rank::world]`` on each process, in the original order."""
    if not group.active:
        return local
    import torch.distributed as dist

    parts: list[np.ndarray | None] = [None] * group.world
    dist.all_gather_object(parts, local)
    out = np.zeros((total, *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        out[rank :: group.world] = part
    return out
