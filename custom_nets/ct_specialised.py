"""CT-specialised 3D image encoder: 3D patches, a slice-distance attention bias, region-aware cross-attention.

A ``(B, 1, D, H, W)`` volume is cut into ``pd x ph x pw`` voxel patches by one strided ``Conv3d`` (the demo's
``[4, 16, 16]``: four 4 mm slices of 16 x 16 pixels), with fixed 3D sine-cosine positions counted in tokens and
centred on the volume (a volume padded or cropped symmetrically keeps its tokens' positions). Then:

* **Transformer blocks with a slice-distance bias.** Every block adds a learned bias per head and per z-distance
  between two tokens (in depth tokens, clamped at ``max_slice_distance``: farther pairs share the last entry) to
  the attention logits, as the additive mask of ``scaled_dot_product_attention``. Axial CT is anisotropic and its
  findings follow the slices (effusion layers, a nodule's few slices), so how far apart two slices are is worth a
  parameter of its own, beyond what the 3D positions say. The table starts as a per-head linear decay
  (``-slope_h * distance``, slopes ``2^-8h/H`` as in ALiBi), so heads start from different reaches.
* **Region-aware cross-attention** (with an anatomical mask, ``encode_volume(image, seg)``). The mask's region ids
  give each patch a soft assignment to the regions (the fraction of its voxels with each id,
  :func:`patch_region_fractions`). After the blocks named in ``region_layers``, each volume's region embeddings
  (its tokens averaged with those weights, plus a learned embedding per region id) are keys and values for the
  patch tokens, and the log of each patch's overlap with each region is added to the logits: a patch's attention
  weights are its overlaps times ``exp(q.k)``, renormalised, so a patch reads the regions it lies in. Without a
  mask the encoder runs with regions off (no cross-attention, no region outputs) and says so once in the log.
* **Outputs** (:class:`~custom_nets.image_encoders.ImageEncoding`): the global ``embedding`` (mean, or max, of
  the final tokens), the ``tokens`` and their ``positions``, and with a mask ``regions (B, R, dim)`` (the final
  tokens pooled per region, plus the id embedding, normed), ``region_mask (B, R)`` and ``patch_regions``.
* **Auxiliary segmentation head** (``aux_segmentation``): a linear head predicting each patch's region id from its
  token, ``segmentation_logits (B, N, R + 1)``; its loss is
  :class:`custom_nets.multilevel_alignment.PatchSegmentationLoss` against ``patch_regions``.

Region ids are ``0..num_regions``, 0 the background (outside every region); ``regions`` row ``r`` is id ``r + 1``.

The config section (``image_encoder``, registered as ``"ct_specialised"``)::

    {"type": "ct_specialised",
     "patch_size": [4, 16, 16],     # (d, h, w) voxels of the model input; the input must divide by it
     "dim": 128, "depth": 4, "heads": 4, "mlp_ratio": 4.0, "dropout": 0.0,
     "max_slice_distance": 8,       # in depth tokens: the bias table has max_slice_distance + 1 entries per head
     "num_regions": 0,              # region ids 1..num_regions in the mask; 0: no regions at all
     "region_layers": null,         # block indices followed by region cross-attention (default: every block)
     "aux_segmentation": false,     # the per-patch region head (needs num_regions > 0)
     "pooling": "mean",             # or "max": the global embedding from the final tokens
     "gradient_checkpointing": false}
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctclip_contract import ModelConfig, ModelConfigError

from .image_encoders import ImageEncoding, grid_positions, register_image_encoder
from .encoder_parts import (PreNormBlock, SettingsError, centred_positions, choice_setting, flag_setting,
                            integer_setting, known_keys, number_setting)

__all__ = ["CTSpecialisedEncoder", "SliceDistanceBlock", "RegionCrossAttention", "build_ct_specialised",
           "resolve_settings", "patch_region_fractions", "sincos_positions", "slice_distances", "POOLINGS"]

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "max")
DEFAULTS: dict[str, Any] = {"patch_size": [4, 16, 16], "dim": 128, "depth": 4, "heads": 4, "mlp_ratio": 4.0,
                            "dropout": 0.0, "max_slice_distance": 8, "num_regions": 0, "region_layers": None,
                            "aux_segmentation": False, "pooling": "mean", "gradient_checkpointing": False}
SINCOS_BASE = 10000.0


def resolve_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder's settings checked and completed with their defaults (:data:`DEFAULTS`).

    Raises:
        SettingsError: naming the key, what was expected and what was given.
    """
    sec = known_keys(settings, "image_encoder", list(DEFAULTS))
    patch = sec.get("patch_size", DEFAULTS["patch_size"])
    if (not isinstance(patch, Sequence) or isinstance(patch, str) or len(patch) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in patch)):
        raise SettingsError("image_encoder.patch_size", "three integers >= 1, (d, h, w) voxels", patch)
    out = {
        "patch_size": [int(v) for v in patch],
        "dim": integer_setting(sec, "image_encoder", "dim", DEFAULTS["dim"], 1),
        "depth": integer_setting(sec, "image_encoder", "depth", DEFAULTS["depth"], 1),
        "heads": integer_setting(sec, "image_encoder", "heads", DEFAULTS["heads"], 1),
        "mlp_ratio": number_setting(sec, "image_encoder", "mlp_ratio", DEFAULTS["mlp_ratio"], "a number > 0",
                             lambda v: v > 0),
        "dropout": number_setting(sec, "image_encoder", "dropout", DEFAULTS["dropout"], "a number in [0, 1)",
                           lambda v: 0 <= v < 1),
        "max_slice_distance": integer_setting(sec, "image_encoder", "max_slice_distance", DEFAULTS["max_slice_distance"], 0),
        "num_regions": integer_setting(sec, "image_encoder", "num_regions", DEFAULTS["num_regions"], 0),
        "aux_segmentation": flag_setting(sec, "image_encoder", "aux_segmentation", DEFAULTS["aux_segmentation"]),
        "pooling": choice_setting(sec, "image_encoder", "pooling", POOLINGS, DEFAULTS["pooling"]),
        "gradient_checkpointing": flag_setting(sec, "image_encoder", "gradient_checkpointing",
                                        DEFAULTS["gradient_checkpointing"]),
    }
    if out["dim"] % out["heads"]:
        raise SettingsError("image_encoder.heads", f"a divisor of image_encoder.dim ({out['dim']})", out["heads"])
    layers = sec.get("region_layers", None)
    if layers is None:
        layers = list(range(out["depth"])) if out["num_regions"] else []
    if (not isinstance(layers, Sequence) or isinstance(layers, str)
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < out["depth"] for i in layers)
            or len(set(layers)) != len(layers)):
        raise SettingsError("image_encoder.region_layers",
                            f"distinct block indices in 0..{out['depth'] - 1} (or null: every block)", layers)
    if layers and not out["num_regions"]:
        raise SettingsError("image_encoder.region_layers", "empty or null when num_regions is 0", layers)
    if out["aux_segmentation"] and not out["num_regions"]:
        raise SettingsError("image_encoder.aux_segmentation", "false when num_regions is 0 (no region to predict)",
                            True)
    out["region_layers"] = sorted(int(i) for i in layers)
    return out


def sincos_positions(grid: Sequence[int], dim: int, device=None) -> torch.Tensor:
    """Fixed 3D sine-cosine position embeddings ``(n_d * n_h * n_w, dim)`` of a token grid, in the row-major
    order of :func:`~custom_nets.image_encoders.grid_positions`. Positions are counted in tokens and centred on
    each axis (:func:`~custom_nets.slice_fusion.centred_positions`); each axis gets ``2 * (dim // 6)`` channels
    (sines then cosines over geometric frequencies), the few channels left over are zero."""
    per_axis = 2 * (dim // 6)
    half = per_axis // 2
    freq = 1.0 / SINCOS_BASE ** (torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
    axes = [centred_positions(n, device=device) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)
    angles = coords[:, :, None] * freq  # (N, 3, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(coords.shape[0], 3 * per_axis)
    return F.pad(emb, (0, dim - 3 * per_axis))


def slice_distances(grid: Sequence[int], max_distance: int, device=None) -> torch.Tensor:
    """``(N, N)`` long: the z-distance between every two tokens of a ``(n_d, n_h, n_w)`` grid, in depth tokens,
    clamped at ``max_distance`` (the index into a block's bias table)."""
    n_d, n_h, n_w = grid
    z = torch.arange(n_d, device=device).repeat_interleave(n_h * n_w)
    return (z[:, None] - z[None, :]).abs().clamp(max=max_distance)


def patch_region_fractions(seg: torch.Tensor, patch_size: Sequence[int], num_regions: int) -> torch.Tensor:
    """Soft patch-to-region assignment ``(B, N, R + 1)``: the fraction of each patch's voxels with each region id.

    Args:
        seg: ``(B, 1, D, H, W)`` (or ``(B, D, H, W)``) region ids ``0..num_regions`` on the model input's grid
            (integers; a float map from nearest-neighbour resampling is rounded).
        patch_size: ``(d, h, w)`` voxels per patch; ``D, H, W`` must divide by it.
        num_regions: ``R``, the largest region id.

    Returns:
        float32 fractions, patches in the row-major order of the token grid; each row sums to 1.

    Raises:
        ValueError: the mask's shape does not tile into patches, or it holds an id outside ``0..num_regions``.
    """
    seg = seg.as_subclass(torch.Tensor)
    if seg.ndim == 5:
        if seg.shape[1] != 1:
            raise ValueError(f"segmentation mask: expected (B, 1, D, H, W) region ids, got {tuple(seg.shape)}")
        seg = seg[:, 0]
    if seg.ndim != 4:
        raise ValueError(f"segmentation mask: expected (B, 1, D, H, W) region ids, got {tuple(seg.shape)}")
    b, d, h, w = seg.shape
    pd, ph, pw = patch_size
    if d % pd or h % ph or w % pw:
        raise ValueError(f"segmentation mask of {(d, h, w)} voxels does not tile into patches of {tuple(patch_size)}")
    labels = (seg.round() if seg.is_floating_point() else seg).long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > num_regions:
        raise ValueError(f"segmentation mask holds region ids {low}..{high}; the encoder knows 0..{num_regions} "
                         "(image_encoder.num_regions)")
    n_d, n_h, n_w, voxels = d // pd, h // ph, w // pw, pd * ph * pw
    labels = labels.reshape(b, n_d, pd, n_h, ph, n_w, pw).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, -1, voxels)
    counts = torch.zeros(b, labels.shape[1], num_regions + 1, device=labels.device)
    counts.scatter_add_(2, labels, torch.ones(labels.shape, device=labels.device))  # a histogram per patch
    return counts / voxels


def _alibi_slopes(heads: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


class SliceDistanceBlock(PreNormBlock):
    """Pre-norm transformer block whose attention logits get a learned bias per head and per clamped z-distance.

    Args:
        dim, heads, mlp_ratio, dropout: width, heads, MLP ratio, dropout.
        max_slice_distance: the largest distance with its own entry (in depth tokens); ``slice_bias`` is
            ``(heads, max_slice_distance + 1)``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 max_slice_distance: int = 8):
        super().__init__(dim, heads, mlp_ratio, dropout)
        distance = torch.arange(max_slice_distance + 1, dtype=torch.float32)
        self.slice_bias = nn.Parameter(-_alibi_slopes(heads)[:, None] * distance)

    def attention_bias(self, distances: torch.Tensor) -> torch.Tensor:
        """``(1, heads, N, N)`` additive attention bias from the ``(N, N)`` clamped distances (a gather: no loop)."""
        return self.slice_bias[:, distances].unsqueeze(0)

    def forward(self, x: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, attn_bias=self.attention_bias(distances))


def pool_regions(tokens: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """``(B, R + 1, C)``: each region's tokens averaged with the patches' overlap fractions as weights (zero for a
    region absent from the volume). ``tokens`` ``(B, N, C)``, ``fractions`` ``(B, N, R + 1)``."""
    weights = fractions.to(tokens.dtype)
    return weights.transpose(1, 2) @ tokens / weights.sum(1).clamp(min=1e-6).unsqueeze(-1)


class RegionCrossAttention(nn.Module):
    """Patch tokens attend to the volume's region embeddings, weighted by each patch's overlap with each region.

    Keys and values are the regions ``0..R`` (the background included, so every patch overlaps at least one): the
    tokens pooled per region (:func:`pool_regions`) plus the region's id embedding. The log of each patch's
    overlap is added to its logits (``-inf`` where it does not overlap), so a patch's attention weights are its
    overlaps times ``exp(q.k)``, renormalised. Pre-norm, residual.

    Args:
        dim, heads, dropout: width, heads, dropout.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, fractions: torch.Tensor, region_ids: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, N, C)``, ``fractions`` ``(B, N, R + 1)``, ``region_ids`` ``(R + 1, C)`` id embeddings."""
        b, n, dim = x.shape
        hd = dim // self.heads
        regions = self.norm_kv(pool_regions(x, fractions) + region_ids.to(x.dtype))  # (B, R + 1, C)
        q = self.q(self.norm_q(x)).reshape(b, n, self.heads, hd).transpose(1, 2)
        k, v = self.kv(regions).reshape(b, -1, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        overlap = fractions.to(q.dtype).unsqueeze(1)  # (B, 1, N, R + 1)
        bias = overlap.clamp(min=1e-12).log().masked_fill(overlap <= 0, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return x + self.drop(self.proj(out.transpose(1, 2).reshape(b, n, dim)))


class CTSpecialisedEncoder(nn.Module):
    """The CT-specialised encoder (module docstring); arguments are the checked settings of
    :func:`resolve_settings` (``patch_size`` is ``(d, h, w)`` voxels).

    Attributes:
        embedding_dim, token_dim: ``dim``.
        num_regions: ``R``; the encoder reads an anatomical mask when it is above 0.
        uses_segmentation: True (the contract's flag: ``encode_volume(image, seg=None)``).
    """

    uses_segmentation = True

    def __init__(self, patch_size: Sequence[int] = (4, 16, 16), dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, max_slice_distance: int = 8, num_regions: int = 0,
                 region_layers: Optional[Sequence[int]] = None, aux_segmentation: bool = False,
                 pooling: str = "mean", gradient_checkpointing: bool = False):
        super().__init__()
        self.settings = resolve_settings(dict(
            patch_size=list(patch_size), dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout,
            max_slice_distance=max_slice_distance, num_regions=num_regions, region_layers=region_layers,
            aux_segmentation=aux_segmentation, pooling=pooling, gradient_checkpointing=gradient_checkpointing))
        s = self.settings
        self.patch_size = tuple(s["patch_size"])
        self.dim, self.heads, self.max_slice_distance = s["dim"], s["heads"], s["max_slice_distance"]
        self.num_regions, self.region_layers, self.pooling = s["num_regions"], s["region_layers"], s["pooling"]
        self.gradient_checkpointing = s["gradient_checkpointing"]
        self.embedding_dim = self.token_dim = s["dim"]

        self.patch_embedding = nn.Conv3d(1, s["dim"], kernel_size=self.patch_size, stride=self.patch_size)
        self.blocks = nn.ModuleList(SliceDistanceBlock(s["dim"], s["heads"], s["mlp_ratio"], s["dropout"],
                                                       s["max_slice_distance"]) for _ in range(s["depth"]))
        # ModuleDict keys are strings: the block index after which each cross-attention runs
        self.region_attention = nn.ModuleDict({str(i): RegionCrossAttention(s["dim"], s["heads"], s["dropout"])
                                               for i in self.region_layers})
        self.norm = nn.LayerNorm(s["dim"])
        if self.num_regions:
            self.region_embedding = nn.Embedding(self.num_regions + 1, s["dim"])
            nn.init.trunc_normal_(self.region_embedding.weight, std=0.02)
            self.region_norm = nn.LayerNorm(s["dim"])
        self.segmentation_head = nn.Linear(s["dim"], self.num_regions + 1) if s["aux_segmentation"] else None
        self._said_regions_off = False

    # ------------------------------------------------------------------------------------------------ options
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block (and its region cross-attention) in backward (the contract's switch)."""
        self.gradient_checkpointing = bool(enabled)

    def exportable_settings(self) -> dict[str, Any]:
        """The ``image_encoder`` settings (without ``type``) that rebuild this architecture: all of them, resolved."""
        return copy.deepcopy({**self.settings, "gradient_checkpointing": self.gradient_checkpointing})

    # ------------------------------------------------------------------------------------------------ forward
    def token_grid(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The ``(n_d, n_h, n_w)`` token grid of a ``(D, H, W)`` input (which must divide by the patch size)."""
        if any(n % p for n, p in zip(shape, self.patch_size)):
            raise ValueError(f"CTSpecialisedEncoder: an input of {tuple(shape)} voxels (D, H, W) does not divide "
                             f"into patches of {self.patch_size} (image_encoder.patch_size)")
        return tuple(n // p for n, p in zip(shape, self.patch_size))

    def _run(self, i: int, x: torch.Tensor, distances: torch.Tensor, fractions: Optional[torch.Tensor],
             mapped: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.blocks[i](x, distances)
        if fractions is not None and str(i) in self.region_attention:
            attended = self.region_attention[str(i)](x, fractions, self.region_embedding.weight)
            # volumes without a mask keep their tokens: each volume of a mixed batch is what it would be alone
            x = attended if mapped is None else torch.where(mapped[:, None, None], attended, x)
        return x

    def encode_volume(self, image: torch.Tensor, seg: Optional[torch.Tensor] = None) -> ImageEncoding:
        """Encode ``(B, 1, D, H, W)`` volumes in model-input units, with their anatomical masks when given.

        Args:
            image: ``(B, 1, D, H, W)``; ``D, H, W`` divisible by the patch size (any depth: positions and the
                slice-distance bias do not depend on a fixed slice count).
            seg: optional ``(B, 1, D, H, W)`` region ids ``0..num_regions`` on the image's grid. Without it (or
                with ``num_regions`` 0) regions are off: no cross-attention and no region outputs. A volume whose
                map is all background (0: the data side's stand-in for a volume without a mask, so that a batch
                collates) runs regions-off too: its tokens and embedding are those of ``seg=None``, its
                ``region_mask`` row is all False and its ``patch_regions`` all background; a batch of only such
                maps is ``seg=None``.

        Returns:
            :class:`~custom_nets.image_encoders.ImageEncoding`: ``embedding (B, dim)``, ``tokens (B, N, dim)`` with
            their ``positions (N, 3)`` (patch centres in voxels); with a mask also ``regions (B, R, dim)``,
            ``region_mask (B, R)`` and ``patch_regions (B, N, R + 1)``; with ``aux_segmentation``,
            ``segmentation_logits (B, N, R + 1)``.
        """
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"CTSpecialisedEncoder expects (B, 1, D, H, W), got a tensor of shape "
                             f"{tuple(image.shape)}")
        image = image.as_subclass(torch.Tensor)  # a collated MetaTensor's metadata does not follow the tokens
        b, _, d, h, w = image.shape
        grid = self.token_grid((d, h, w))
        fractions = None
        if seg is not None and self.num_regions:
            if tuple(seg.shape[-3:]) != (d, h, w) or seg.shape[0] != b:
                raise ValueError(f"segmentation mask of shape {tuple(seg.shape)} does not match the image "
                                 f"{tuple(image.shape)}: expected (B, 1, D, H, W) on the image's grid")
            fractions = patch_region_fractions(seg.to(image.device), self.patch_size, self.num_regions)
        mapped = None  # (B,) volumes whose map holds a region; an all-background map is "no mask"
        if fractions is not None:
            mapped = fractions[:, :, 1:].sum((1, 2)) > 0
            if not bool(mapped.any()):
                fractions = None
            elif bool(mapped.all()):
                mapped = None
        if fractions is None and self.num_regions and not self._said_regions_off:
            logger.warning("ct_specialised encoder: no segmentation mask given (or only empty, all-background "
                           "ones), regions off (no region cross-attention, no region embeddings); said once")
            self._said_regions_off = True

        x = self.patch_embedding(image).flatten(2).transpose(1, 2)  # (B, N, dim), row-major (d, h, w)
        x = x + sincos_positions(grid, self.dim, device=x.device).to(x.dtype)
        distances = slice_distances(grid, self.max_slice_distance, device=x.device)
        for i in range(len(self.blocks)):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self._run, i, x, distances, fractions, mapped, use_reentrant=False)
            else:
                x = self._run(i, x, distances, fractions, mapped)
        tokens = self.norm(x)
        embedding = tokens.amax(dim=1) if self.pooling == "max" else tokens.mean(dim=1)
        positions = grid_positions(grid, tuple(float(p) for p in self.patch_size), device=x.device)
        encoding = ImageEncoding(embedding, tokens, positions)
        if fractions is not None:
            regions = self.region_norm(pool_regions(tokens, fractions) + self.region_embedding.weight.to(x.dtype))
            encoding.regions = regions[:, 1:]
            encoding.region_mask = fractions[:, :, 1:].sum(1) > 0
            encoding.patch_regions = fractions
        if self.segmentation_head is not None:
            encoding.segmentation_logits = self.segmentation_head(tokens)
        return encoding

    def forward(self, image: torch.Tensor, seg: Optional[torch.Tensor] = None) -> ImageEncoding:
        return self.encode_volume(image, seg)


@register_image_encoder("ct_specialised")
def build_ct_specialised(settings: dict, config: ModelConfig) -> CTSpecialisedEncoder:
    """A :class:`CTSpecialisedEncoder` from the ``image_encoder`` settings (without ``type``) of a model config,
    checked against its input contract (the input must divide into patches).

    Raises:
        ModelConfigError: naming the config file and the key, for bad settings.
    """
    try:
        resolved = resolve_settings(settings)
    except SettingsError as err:  # err.key is the key's path in the config, "image_encoder.<key>"
        raise ModelConfigError(f"model config {config.source}: {err.key}: expected {err.expected}, "
                               f"got {err.got!r}") from None
    _, d, h, w = config.input.model_input_shape
    if any(n % p for n, p in zip((d, h, w), resolved["patch_size"])):
        raise ModelConfigError(f"model config {config.source}: image_encoder.patch_size {resolved['patch_size']} "
                               f"(d, h, w) does not divide the model input (D, H, W) = {(d, h, w)} "
                               "(input.spatial_size)")
    return CTSpecialisedEncoder(**resolved)
