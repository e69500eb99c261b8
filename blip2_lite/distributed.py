"""Several processes, one model: the process group torchrun describes, and the few collectives training needs.

``torchrun --nproc_per_node N -m blip2_lite train ...`` starts N copies of the command and tells
each its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and, across machines, where to meet:
torchrun's rendezvous, nothing home-made). ``init_distributed`` joins that group: NCCL when the
processes train on GPUs, gloo on CPUs (the tests run 2 gloo ranks). A plain ``python -m`` run is a
group of one and touches no ``torch.distributed`` call, so single-process code needs no process group
(LAVIS's stage-1 model calls ``torch.distributed`` unconditionally and fails without one).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .losses import distributed_world

def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str | torch.device = "cpu") -> torch.device:
    """Join torchrun's process group if this process was launched by it; the device this rank trains on.

    ``device`` names the kind ("cpu", "cuda"): under torchrun each rank takes ``cuda:LOCAL_RANK``.
    """
    device = torch.device(device)
    if not _launched_by_torchrun():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                               "start at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return device


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0: the process that writes checkpoints and reports, and shows progress bars."""
    return distributed_world()[0] == 0


def barrier() -> None:
    if distributed_world()[1] > 1:
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. building a cache), the others after it finished (and then reuse it)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (picklable objects, e.g. random-number states)."""
    _, world = distributed_world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean over ranks (a copy; non-finite values stay non-finite)."""
    _, world = distributed_world()
    values = values.detach().float().clone()
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values
