"""Data parallelism under torchrun: the device of this rank, the process group, and the few
collectives the training loop needs.  With one process (no ``WORLD_SIZE``) every helper is a no-op,
so the loop reads the same on one CPU, one GPU or several GPUs."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn


def device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def distributed() -> tuple[int, int]:
    """``(rank, world_size)``: joins the process group when started by torchrun (NCCL on GPUs,
    gloo on CPUs), else ``(0, 1)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _collective_device(dev: torch.device) -> torch.device | str:
    # NCCL reduces CUDA tensors, gloo CPU ones
    return dev if dev.type == "cuda" else "cpu"


def all_sum(values: list[float], world: int, dev: torch.device) -> list[float]:
    if world <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(dev))
    dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(flag: bool, world: int, dev: torch.device) -> bool:
    """Rank 0's decision (early stop) for every rank."""
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=_collective_device(dev))
    dist.broadcast(t, 0)
    return bool(t.item())


def wrap(module: nn.Module, dev: torch.device) -> nn.Module:
    """A DistributedDataParallel replica.  DDP registers the parameters that need gradients when
    it is built, so the loop wraps again whenever the frozen/unfrozen phase changes."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   broadcast_buffers=False)


def join(ddp: nn.Module, world: int):
    """Uneven shards: ranks that run out of batches shadow the others' all-reduces (DDP Join)."""
    if world <= 1:
        return contextlib.nullcontext()
    from torch.distributed.algorithms.join import Join

    return Join([ddp])


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def finish(world: int) -> None:
    """Leave the process group (the train stage, once the ranks are done)."""
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
