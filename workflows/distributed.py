"""Rank and wrapper helpers for code that runs alone or under torchrun (DDP)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

__all__ = ["rank", "unwrap"]


def rank() -> int:
    """Global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel wrappers."""
    while hasattr(module, "module") and isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module
