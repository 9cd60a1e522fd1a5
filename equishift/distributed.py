"""torch.distributed plumbing for ``torchrun -m equishift evaluate``: init from the environment, shard
the images, sum the counts. Results equal the single-process run because every random choice is a
function of (seed, image index) and only integer counts cross processes."""
from __future__ import annotations

import os
from typing import Tuple

import torch

__all__ = ["world_from_env", "init_from_env", "is_active", "rank_and_world", "shard", "all_reduce_sum",
           "shutdown"]


def world_from_env() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1.

    Returns the device this rank should use: ``cuda:LOCAL_RANK`` for CUDA, else ``device``."""
    if world_from_env() <= 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def is_active() -> bool:
    """True inside an initialised process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> Tuple[int, int]:
    if not is_active():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def shard(n: int, rank: int, world: int) -> torch.Tensor:
    """This rank's image indices: every ``world``-th one starting at ``rank`` (balanced to within one)."""
    return torch.arange(rank, n, world, dtype=torch.long)


def all_reduce_sum(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum an int64 count vector over all ranks (a no-op outside a process group)."""
    if not is_active():
        return counts
    import torch.distributed as dist

    # nccl reduces only CUDA tensors; gloo only CPU ones.
    t = counts.to(device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def shutdown(sync: bool = True) -> None:
    """Leave the process group (if any), so torchrun workers exit cleanly.

    ``sync``: wait for every rank first (a rank that tears gloo down while another still talks to it
    aborts in C++). Pass False on an error path: the other ranks may be inside another collective, and
    a barrier there would not match it (a hang until the timeout); leaving at once lets torchrun stop
    the job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()
