"""Rank and wrapper helpers for code that runs alone or under torchrun (DDP)."""

from __future__ import annotations

import socket

import torch.distributed as dist
from torch import nn

__all__ = ["rank", "unwrap", "free_port"]


def rank() -> int:
    """Global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel wrappers."""
    while hasattr(module, "module") and isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (a DDP rendezvous, a local server); another process may take it
    before it is used, which a caller that binds it soon after accepts."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
