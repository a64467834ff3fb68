"""Data-parallel training across processes (``torchrun`` / ``accelerate launch``): one copy of the model each.

Launched by torchrun, every process reads the same data, builds the same batches in the same order
and takes its share of each global batch (rows ``rank::world``): ``--batch-size`` stays the global
batch, so a 2-process run takes the same optimiser steps as a 1-process run. Each process scales its
loss by its share of the batch, gradients are summed across processes after backward (one flat
all-reduce per step), and every process applies the same update to identical weights. Validation and
test sets are split the same way and their logits gathered, so every process sees the same metrics
(and agrees on the best epoch and on early stopping). Only rank 0 writes the output and checkpoints.

With ``--shard full`` or ``grad-op`` (or an ``accelerate launch`` whose config turns FSDP on) the model
is sharded with PyTorch FSDP (``fully_shard``, one unit per transformer block plus the root): each
process keeps 1/world of every weight, gradient and optimiser state, and gathers a block's weights
only while it computes. Batches are split the same way, so a sharded run takes the same steps as an
unsharded one. FSDP's collectives need every process in every forward, so a process whose share of a
batch is empty runs one row at weight 0, and evaluation splits each (global) batch instead of the
rows. Saving gathers the full weights to rank 0 (the head included: a shard of a head is not a head).

Backends: NCCL on GPUs, gloo on CPUs. Without torchrun's environment this is all a no-op.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adaptext.batching import inference_batches, predict_logits
from adaptext.config import TrainConfig
from adaptext.errors import AdaptextError

# accelerate's FSDP1 strategy names and numbers, as its config writes them, and what they mean here.
ACCELERATE_STRATEGIES = {
    "FULL_SHARD": "full", "1": "full", "SHARD_GRAD_OP": "grad-op", "2": "grad-op", "NO_SHARD": "none", "3": "none",
    "HYBRID_SHARD": None, "4": None, "HYBRID_SHARD_ZERO2": None, "5": None,
}  # fmt: skip


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    shard: str = "none"  # FSDP: "full" or "grad-op" (see adaptext.config.SHARDING)

    @property
    def sharded(self) -> bool:
        return self.active and self.shard != "none"

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


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "").lower() in ("true", "1", "yes")


def sharding(requested: str) -> str:
    """The FSDP sharding to use: ``--shard``, or what an ``accelerate launch`` FSDP config asked for.

    DeepSpeed is refused in one line rather than run unsharded without a word; so are FSDP settings
    adaptext does not carry out (hybrid sharding, parameter offload)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise AdaptextError(
            "accelerate launch asked for DeepSpeed (ACCELERATE_USE_DEEPSPEED); adaptext does not run DeepSpeed: "
            "for ZeRO-3-style sharding use an accelerate config with distributed_type: FSDP, or torchrun with --shard full"
        )
    if not _flag("ACCELERATE_USE_FSDP"):
        return requested
    # accelerate's default "RAM-efficient loading" has transformers load the weights on rank 0 only and
    # leave the others on the meta device, for accelerate to broadcast later: adaptext shards the model
    # itself, so every process reads the weights (a base model is small next to the memory it trains in).
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    if _flag("FSDP_OFFLOAD_PARAMS"):
        raise AdaptextError(
            "the accelerate FSDP config offloads parameters to the CPU (fsdp_offload_params), which adaptext does "
            "not do; set it to false (an adapter's optimiser state is small)"
        )
    if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise AdaptextError(
            "the accelerate FSDP config asks for activation checkpointing, which adaptext does not do; set "
            "fsdp_activation_checkpointing to false (or lower --batch-size / --max-length to save memory)"
        )
    if os.environ.get("FSDP_VERSION", "1") == "2":  # FSDP2 configs: fsdp_reshard_after_forward true (full) or false
        chosen = "full" if os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("true", "1") else "grad-op"
    else:
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
        if strategy.upper() not in ACCELERATE_STRATEGIES:
            raise AdaptextError(f"unknown FSDP_SHARDING_STRATEGY {strategy!r}; use FULL_SHARD or SHARD_GRAD_OP")
        chosen = ACCELERATE_STRATEGIES[strategy.upper()]
        if chosen is None:
            raise AdaptextError(
                f"FSDP {strategy} (hybrid sharding across nodes) is not supported; use FULL_SHARD or SHARD_GRAD_OP"
            )
    if requested not in ("none", chosen):
        raise AdaptextError(f"--shard {requested} contradicts the accelerate FSDP config ({chosen}); drop one of them")
    return chosen


def setup(shard: str = "none") -> Group:
    """Join the process group torchrun described in the environment (no-op for a single process)."""
    shard = sharding(shard)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(shard=shard)
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
    return Group(rank, world, local_rank, shard)


def teardown(group: Group, clean: bool = True) -> None:
    """Leave the group; after a failure, without waiting for the others (torchrun stops them)."""
    if group.active:
        import torch.distributed as dist

        if dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def broadcast_params(group: Group, params: list[torch.Tensor]) -> None:
    """Start every process from rank 0's weights (the seed makes them equal already; this makes it certain).
    (A sharded model had its weights broadcast before it was sharded, by ``shard_model``.)"""
    if group.active and not group.sharded:
        import torch.distributed as dist

        for param in params:
            dist.broadcast(param.data, src=0)


def sum_gradients(group: Group, params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over all processes, in one flat buffer (FSDP sums its own)."""
    if not group.active or group.sharded:
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


def gather_rows(group: Group, rows: list[int], local: np.ndarray, total: int) -> np.ndarray:
    """Reassemble the ``total`` rows computed across processes (each its ``rows``, as ``local``), in order."""
    if not group.active:
        return local
    import torch.distributed as dist

    parts: list[tuple[list[int], np.ndarray] | None] = [None] * group.world
    dist.all_gather_object(parts, (rows, local))
    out = np.zeros((total, *local.shape[1:]), dtype=local.dtype)
    for part_rows, part in parts:  # type: ignore[misc]
        out[part_rows] = part
    return out


def agree(group: Group, decision: bool) -> bool:
    """Rank 0's decision, on every process (for steps that are collective under FSDP, like a checkpoint)."""
    if not group.active:
        return decision
    import torch.distributed as dist

    flag = torch.tensor([int(decision)], device=group.device() if torch.cuda.is_available() else "cpu")
    dist.broadcast(flag, src=0)
    return bool(flag.item())


# ---------------------------------------------------------------- FSDP


def shard_model(model: torch.nn.Module, group: Group) -> dict[str, int]:
    """Shard ``model`` in place with FSDP: one unit per block the architecture names as indivisible
    (transformers' ``_no_split_modules``: its layers, often its embeddings), then the rest as the root.
    Returns how many units of each class. Trainable weights are broadcast from rank 0 first."""
    from torch.distributed.fsdp import fully_shard

    broadcast_params(
        Group(group.rank, group.world, group.local_rank), [p for p in model.parameters() if p.requires_grad]
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_classes = set(getattr(base, "_no_split_modules", None) or [])
    if not block_classes:
        raise AdaptextError(f"{type(base).__name__} names no transformer block class (_no_split_modules) to shard by")
    reshard = group.shard == "full"
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes and m is not model]
    units = dict(Counter(type(block).__name__ for block in blocks))  # (sharding renames the classes)
    for block in reversed(blocks):  # inner units before the units around them
        fully_shard(block, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return units


def shard_for_training(model: torch.nn.Module, cfg: TrainConfig, group: Group, echo: Callable[[str], None]) -> None:
    """--shard: the model sharded with FSDP, after checking the run's options allow it; said in one line."""
    if cfg.method == "adalora":
        raise AdaptextError(
            "--method adalora reallocates ranks from whole gradients, which FSDP shards; use lora or --shard none"
        )
    if cfg.compile:
        raise AdaptextError("--compile with FSDP sharding (--shard) is not supported; drop one of them")
    units = shard_model(model, group)
    blocks = ", ".join(f"{count} {name}" for name, count in sorted(units.items()))
    what = "weights, gradients and optimiser state" if cfg.shard == "full" else "gradients and optimiser state"
    echo(
        f"shard: FSDP {cfg.shard} over {group.world} processes ({what}; {sum(units.values())} units: {blocks}, and the root)"
    )


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights FSDP keeps after a forward with no backward (grad-op, evaluation), so
    the module holds its shards again (as its optimiser and state dicts expect)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensors(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of ``values`` (sharded ones are gathered: collective, so every process calls it)."""
    return {n: (v.full_tensor() if _is_sharded(v) else v).detach().cpu().clone() for n, v in values.items()}


def load_params(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` (whole tensors, or shards like the parameters') into the parameters of the same name."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            param = params[name]
            if _is_sharded(param) and not _is_sharded(value):
                from torch.distributed.tensor import distribute_tensor

                # Every process holds the whole value: each takes its own shard, no communication.
                value = distribute_tensor(
                    value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                )
            param.copy_(value)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: Group) -> dict:
    """The optimiser's state for a checkpoint: whole tensors (gathered to rank 0 under FSDP)."""
    if not group.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, group: Group) -> None:
    if not group.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a sharded model, whole, on rank 0's CPU (empty on the others; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_logits(
    model: nn.Module,
    encoded: list[list[int]],
    pad_id: int,
    batch_size: int,
    precision: str,
    device: torch.device,
    group: Group,
    feed: Callable[[list[int], int], None] | None = None,
) -> np.ndarray:
    """``predict_logits`` with every batch split over the processes of ``group``, gathered back in order.

    Every process runs the same number of forward passes (FSDP's collectives need that): one whose share
    of a short batch is empty computes the batch's first row and drops it."""
    if not group.active:
        return predict_logits(model, encoded, pad_id, batch_size, precision, device, feed)
    batches = inference_batches([len(x) for x in encoded], batch_size, device)
    shares = [batch[group.rank :: group.world] for batch in batches]
    mine = [i for share in shares for i in share]
    computed = [share or batch[:1] for share, batch in zip(shares, batches)]
    local = predict_logits(model, encoded, pad_id, batch_size, precision, device, feed, computed)
    if group.sharded:
        reshard(model)
    return gather_rows(group, mine, local[mine], len(encoded))
