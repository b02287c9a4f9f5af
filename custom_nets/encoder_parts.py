"""The parts the registered image encoders share: settings checks that name the config key, centred depth
positions, and the pre-norm transformer block (fused attention with optional rotary positions or additive bias)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SettingsError", "integer_setting", "number_setting", "flag_setting", "choice_setting", "known_keys",
           "centred_positions", "rotate_half", "PreNormBlock"]


class SettingsError(ValueError):
    """A bad setting of an image encoder; ``key`` is its path in the model config (``image_encoder.heads``)."""

    def __init__(self, key: str, expected: str, got: Any):
        super().__init__(f"{key}: expected {expected}, got {got!r}")
        self.key, self.expected, self.got = key, expected, got


def integer_setting(sec: Mapping, section: str, key: str, default: int, minimum: int) -> int:
    v = sec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise SettingsError(f"{section}.{key}", f"an integer >= {minimum}", v)
    return v


def number_setting(sec: Mapping, section: str, key: str, default: float, expected: str, ok) -> float:
    v = sec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or not ok(v):
        raise SettingsError(f"{section}.{key}", expected, v)
    return float(v)


def flag_setting(sec: Mapping, section: str, key: str, default: bool) -> bool:
    v = sec.get(key, default)
    if not isinstance(v, bool):
        raise SettingsError(f"{section}.{key}", "true or false", v)
    return v


def choice_setting(sec: Mapping, section: str, key: str, choices: Sequence[str], default: str) -> str:
    v = sec.get(key, default)
    if v not in choices:
        raise SettingsError(f"{section}.{key}", f"one of {list(choices)}", v)
    return v


def known_keys(sec: Any, section: str, known: Sequence[str]) -> Mapping:
    if not isinstance(sec, Mapping):
        raise SettingsError(section, "an object", sec)
    unknown = sorted(k for k in set(sec) - set(known) if not str(k).startswith("_"))  # "_doc": a comment
    if unknown:  # a misspelt option would otherwise silently keep its default
        raise SettingsError(f"{section}.{unknown[0]}", f"one of the keys {list(known)}", unknown[0])
    return sec


def centred_positions(depth: int, device=None) -> torch.Tensor:
    """Depth positions ``(D,)`` of the slices of a ``D``-slice volume, in slices, centred: ``k - (D - 1) / 2``."""
    return torch.arange(depth, device=device, dtype=torch.float32) - (depth - 1) / 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class PreNormBlock(nn.Module):
    """Pre-norm transformer block: fused attention (optional rotary q/k, optional additive bias), then the MLP.

    Args:
        dim, heads, mlp_ratio, dropout: width, heads, MLP ratio, dropout.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        hidden = int(round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` ``(B, N, dim)``; ``rotary`` the ``(cos, sin)`` of the positions; ``attn_bias`` added to the logits,
        e.g. ``(1, heads, N, N)`` (4-D: the fused CPU kernel takes it without materialising ``(B, heads, N, N)``)."""
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            cos, sin = (t.to(q.dtype) for t in rotary)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(out.transpose(1, 2).reshape(b, n, dim)))
        return x + self.drop(self.mlp(self.norm2(x)))
