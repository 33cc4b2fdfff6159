"""Small Python objects shared between ranks: rank 0's to everyone, or everyone's to everyone.

No-ops without a process group or with one rank, so the same code runs single-process.  On NCCL
the objects travel through the current CUDA device (the trainer sets it before they are used).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def broadcast(obj: Any, world_size: int) -> Any:
    """Rank 0's ``obj`` on every rank (what other ranks pass is ignored)."""
    if _distributed(world_size):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def gather(obj: Any, world_size: int) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if _distributed(world_size):
        out: list = [None] * world_size
        dist.all_gather_object(out, obj)
        return out
    return [obj]
