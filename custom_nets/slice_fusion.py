"""Slice-fusion image encoder: a 2D DINOv2 backbone on every axial slice, a small transformer across depth.

A ``(B, 1, D, H, W)`` volume is cut into its ``B * D`` axial slices (one reshape, no loop over slices). Each slice
is windowed (one HU window replicated to RGB, or three windows, one per channel: lung / mediastinal / bone),
normalised with the ImageNet statistics the backbone was trained with, resized to the backbone's input size and
encoded by a :class:`transformers.Dinov2Model` into one feature vector (its CLS token, optionally with the mean
patch token). A pre-norm transformer over depth fuses the ``D`` slice features; its CLS output is the volume
embedding and its slice outputs are the tokens (:class:`~custom_nets.image_encoders.ImageEncoding`).

The config section (``image_encoder``, registered as ``"slice_fusion"``)::

    {"type": "slice_fusion",
     "hu_windows": [[-1350, 150], [-160, 240], [-450, 1050]],  # 1 or 3 [low, high] in HU (default: input.hu_window)
     "backbone": {
        "pretrained": "facebook/dinov2-small",  # hub id, local dir or "package:<pkg>/<subdir>" (optional)
        "load_pretrained_weights": true,        # default true when pretrained is given; false: architecture only
        "config": {...},                        # Dinov2Config kwargs: the architecture without pretrained weights,
                                                # or config overrides of the pretrained one (e.g. drop_path_rate)
        "image_size": 224,                      # backbone input size (default: the Dinov2Config's image_size)
        "freeze": false, "unfreeze_top_blocks": 0,  # with freeze: the top N blocks and the final layernorm train
        "slice_chunk": 32,                      # slices through the backbone at once (bounded memory)
        "gradient_checkpointing": false,
        "slice_features": "cls"},               # or "cls_mean": CLS and the mean patch token, concatenated
     "fusion": {"dim": 256, "depth": 2, "heads": 8, "mlp_ratio": 4.0, "dropout": 0.0,
                "position": "rotary",           # or "learned": a table of max_slices embeddings
                "max_slices": 256}}

Depth positions are counted in slices of the configured spacing and centred on the volume (slice ``k`` of ``D`` is
at ``k - (D - 1) / 2``), so the slices of a volume cropped or padded to another depth keep the positions they had
in training.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctclip_contract import ModelConfig, ModelConfigError

from .encoder_parts import (PreNormBlock, SettingsError, centred_positions, choice_setting, flag_setting,
                            integer_setting, known_keys, number_setting)
from .image_encoders import ImageEncoding, grid_positions, register_image_encoder
from .text_encoder import resolve_pretrained

__all__ = ["SliceFusionEncoder", "DepthFusion", "SettingsError", "build_slice_fusion", "centred_positions",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SLICE_FEATURES = ("cls", "cls_mean")
POSITIONS = ("rotary", "learned")
ROTARY_BASE = 10000.0

_BACKBONE_KEYS = ("pretrained", "load_pretrained_weights", "config", "image_size", "freeze", "unfreeze_top_blocks",
                  "slice_chunk", "gradient_checkpointing", "slice_features")
_FUSION_DEFAULTS = {"dim": 256, "depth": 2, "heads": 8, "mlp_ratio": 4.0, "dropout": 0.0, "position": "rotary",
                    "max_slices": 256}
# config.to_dict() entries that are not architecture: a version stamp and the folder it was read from (a path
# in an exported bundle's config would point at the machine that exported it)
_NOT_ARCHITECTURE = ("transformers_version", "_name_or_path")


def _pair(size: Any) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


class DepthFusion(nn.Module):
    """Pre-norm transformer over the slices of a volume, with a learned CLS token.

    Args:
        in_dim: width of the per-slice features.
        dim, depth, heads, mlp_ratio, dropout: the transformer's width, blocks, heads, MLP ratio and dropout.
        position: ``"rotary"`` (rotary q/k, relative: the CLS token sits at the centre of the slices) or
            ``"learned"`` (a table of ``max_slices`` embeddings indexed by centred position, interpolated linearly
            between entries; the CLS token has none).
        max_slices: size of the learned table (unused with rotary).
    """

    def __init__(self, in_dim: int, dim: int = 256, depth: int = 2, heads: int = 8, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, position: str = "rotary", max_slices: int = 256):
        super().__init__()
        if dim % heads:
            raise SettingsError("fusion.heads", f"a divisor of fusion.dim ({dim})", heads)
        if position not in POSITIONS:
            raise SettingsError("fusion.position", f"one of {list(POSITIONS)}", position)
        head_dim = dim // heads
        if position == "rotary" and head_dim % 2:
            raise SettingsError("fusion.heads", f"a head count giving an even head width for rotary positions "
                                f"(fusion.dim / heads = {dim}/{heads})", heads)
        self.position, self.max_slices = position, max_slices
        self.in_proj = nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if position == "learned":
            self.position_table = nn.Parameter(torch.zeros(max_slices, dim))
            nn.init.trunc_normal_(self.position_table, std=0.02)
        else:
            inv_freq = 1.0 / ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.blocks = nn.ModuleList(PreNormBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def learned_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(D, dim)`` of (centred) slice positions from the learned table, linearly interpolated."""
        index = positions.float() + (self.max_slices - 1) / 2
        if len(index) and (index.min() < 0 or index.max() > self.max_slices - 1):
            raise ValueError(f"slice positions {positions.min().item():g}..{positions.max().item():g} exceed the "
                             f"learned depth-position table (fusion.max_slices = {self.max_slices}, positions "
                             f"{-(self.max_slices - 1) / 2:g}..{(self.max_slices - 1) / 2:g}): a {len(positions)}-"
                             "slice volume needs max_slices >= its slice count (or position 'rotary')")
        low = index.floor().long().clamp(max=self.max_slices - 1)
        high = (low + 1).clamp(max=self.max_slices - 1)
        frac = (index - low).unsqueeze(-1).to(self.position_table.dtype)
        return self.position_table[low] * (1 - frac) + self.position_table[high] * frac

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``(1 + D, head_dim)`` for the CLS token (at the centre of the slices) and the slices."""
        positions = torch.cat([positions.float().mean().reshape(1), positions.float()])
        angles = positions[:, None] * self.inv_freq[None]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, features: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse ``(B, D, in_dim)`` slice features.

        Args:
            features: per-slice features.
            positions: ``(D,)`` slice positions in slices; default :func:`centred_positions`.

        Returns:
            ``(embedding (B, dim), tokens (B, D, dim))``: the CLS output and the slice outputs, after the final norm.
        """
        b, d, _ = features.shape
        if positions is None:
            positions = centred_positions(d, features.device)
        x = self.in_proj(features)
        rotary = None
        if self.position == "learned":
            x = x + self.learned_positions(positions).to(x.dtype)
        else:
            rotary = self.rotary(positions)
        x = torch.cat([self.cls_token.to(x.dtype).expand(b, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x, rotary)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]


def _build_backbone(settings: Mapping[str, Any]) -> transformers.Dinov2Model:
    """The :class:`transformers.Dinov2Model` a ``backbone`` section names (pretrained weights or random init)."""
    pretrained = settings.get("pretrained")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise SettingsError("backbone.pretrained", "a hub id, a local folder or 'package:<pkg>/<subdir>'", pretrained)
    config = settings.get("config")
    if config is not None and not isinstance(config, Mapping):
        raise SettingsError("backbone.config", "an object of Dinov2Config kwargs", config)
    load = flag_setting(settings, "backbone", "load_pretrained_weights", pretrained is not None)
    if load and pretrained is None:
        raise SettingsError("backbone.pretrained", "a pretrained backbone when load_pretrained_weights is true", None)
    if load:
        path = resolve_pretrained(pretrained)
        # a local folder never goes to the hub (offline machines); config entries override the pretrained config
        return transformers.Dinov2Model.from_pretrained(path, local_files_only=os.path.isdir(path),
                                                        **dict(config or {}))
    if config is not None:
        try:
            dino_config = transformers.Dinov2Config(**config)
        except (TypeError, ValueError) as err:
            raise SettingsError("backbone.config", f"Dinov2Config kwargs ({err})", dict(config)) from None
    elif pretrained is not None:
        # the architecture of a saved backbone; its weights come from the CLIP checkpoint
        path = resolve_pretrained(pretrained)
        dino_config = transformers.Dinov2Config.from_pretrained(path, local_files_only=os.path.isdir(path))
    else:
        raise SettingsError("backbone", "'config' (Dinov2Config kwargs) or 'pretrained' (hub id or folder)",
                            dict(settings))
    return transformers.Dinov2Model(dino_config)


class SliceFusionEncoder(nn.Module):
    """3D image encoder: DINOv2 on every axial slice, a transformer across depth (module docstring).

    Args:
        windows: 1 or 3 ``(low, high)`` intensity windows in model-input units (the builder converts the config's
            HU windows); each maps to [0, 1], clamped. One window is replicated to the three backbone channels.
        backbone: the ``backbone`` settings (module docstring).
        fusion: the ``fusion`` settings (module docstring); missing keys take their defaults.
        hu_windows: the windows in HU as the config gives them, only echoed by :meth:`exportable_settings`.

    Raises:
        SettingsError: (a ``ValueError``) naming the setting, for bad settings.
    """

    def __init__(self, windows: Sequence[Sequence[float]], backbone: Mapping[str, Any],
                 fusion: Optional[Mapping[str, Any]] = None, *,
                 hu_windows: Optional[Sequence[Sequence[float]]] = None):
        super().__init__()
        backbone = known_keys(backbone, "backbone", _BACKBONE_KEYS)
        fusion = known_keys(fusion or {}, "fusion", tuple(_FUSION_DEFAULTS))
        # checked in Python: the encoder may be built on the meta device (sizing without memory)
        windows = [[float(v) for v in w] for w in windows]
        if len(windows) not in (1, 3) or any(len(w) != 2 for w in windows):
            raise SettingsError("hu_windows", "1 or 3 [low, high] windows", windows)
        if any(low == high for low, high in windows):
            raise SettingsError("hu_windows", "windows with low != high", windows)
        windows_t = torch.tensor(windows, dtype=torch.float32)
        self._backbone_settings = copy.deepcopy(dict(backbone))
        self.hu_windows = None if hu_windows is None else [list(map(float, w)) for w in hu_windows]
        self.slice_features_kind = choice_setting(backbone, "backbone", "slice_features", SLICE_FEATURES, "cls")
        self.slice_chunk = integer_setting(backbone, "backbone", "slice_chunk", 32, 1)
        self.gradient_checkpointing = flag_setting(backbone, "backbone", "gradient_checkpointing", False)
        freeze = flag_setting(backbone, "backbone", "freeze", False)
        top = integer_setting(backbone, "backbone", "unfreeze_top_blocks", 0, 0)
        if top and not freeze:
            raise SettingsError("backbone.unfreeze_top_blocks", "0 unless backbone.freeze is true", top)

        self.backbone = _build_backbone(backbone)
        cfg = self.backbone.config
        if cfg.num_channels != 3:
            raise SettingsError("backbone.config.num_channels", "3 (RGB, as DINOv2 is trained)", cfg.num_channels)
        if top > cfg.num_hidden_layers:
            raise SettingsError("backbone.unfreeze_top_blocks", f"at most the {cfg.num_hidden_layers} backbone blocks",
                                top)
        size = backbone.get("image_size", cfg.image_size)
        sizes = list(size) if isinstance(size, (list, tuple)) else [size, size]
        if (len(sizes) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes)
                or min(sizes) < max(_pair(cfg.patch_size))):
            raise SettingsError("backbone.image_size", f"an integer or [height, width] >= the patch size "
                                f"{cfg.patch_size}", size)
        self.image_size = _pair(size)
        # DINOv2's masked-image-modelling token is never used here: trainable, it would be a parameter without
        # gradient, which DDP refuses
        if self.backbone.embeddings.mask_token is not None:
            self.backbone.embeddings.mask_token.requires_grad_(False)
        if freeze:
            self.backbone.requires_grad_(False)
            if top:
                for module in (*self.backbone.encoder.layer[-top:], self.backbone.layernorm):
                    module.requires_grad_(True)

        self.fusion_settings = {**_FUSION_DEFAULTS, **{k: v for k, v in fusion.items() if k in _FUSION_DEFAULTS}}
        self.fusion_settings.update(
            dim=integer_setting(fusion, "fusion", "dim", _FUSION_DEFAULTS["dim"], 1),
            depth=integer_setting(fusion, "fusion", "depth", _FUSION_DEFAULTS["depth"], 0),
            heads=integer_setting(fusion, "fusion", "heads", _FUSION_DEFAULTS["heads"], 1),
            mlp_ratio=number_setting(fusion, "fusion", "mlp_ratio", _FUSION_DEFAULTS["mlp_ratio"], "a number > 0",
                              lambda v: v > 0),
            dropout=number_setting(fusion, "fusion", "dropout", _FUSION_DEFAULTS["dropout"], "a number in [0, 1)",
                            lambda v: 0 <= v < 1),
            position=choice_setting(fusion, "fusion", "position", POSITIONS, _FUSION_DEFAULTS["position"]),
            max_slices=integer_setting(fusion, "fusion", "max_slices", _FUSION_DEFAULTS["max_slices"], 1))
        width = cfg.hidden_size * (2 if self.slice_features_kind == "cls_mean" else 1)
        self.fusion = DepthFusion(width, **self.fusion_settings)
        self.embedding_dim = self.token_dim = self.fusion_settings["dim"]

        self.register_buffer("windows", windows_t, persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train(self.training)

    # ------------------------------------------------------------------------------------------------ options
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the trainable part of the backbone chunk by chunk in backward (the contract's switch)."""
        self.gradient_checkpointing = bool(enabled)

    def _stages(self) -> list[nn.Module]:
        return [self.backbone.embeddings, *self.backbone.encoder.layer, self.backbone.layernorm]

    def _first_trainable_stage(self) -> int:
        """Index into :meth:`_stages` of the first stage with a trainable parameter (``len`` when none): the stages
        below it run without autograd."""
        stages = self._stages()
        return next((i for i, m in enumerate(stages) if any(p.requires_grad for p in m.parameters())), len(stages))

    def train(self, mode: bool = True) -> "SliceFusionEncoder":
        # frozen means frozen: the frozen bottom of the backbone (all of it when frozen) never leaves eval mode
        if mode and not any(p.requires_grad for p in self.parameters()):
            mode = False
        super().train(mode)
        if mode:
            stages, first = self._stages(), self._first_trainable_stage()
            for module in stages[:first]:
                module.eval()
            if first == len(stages):
                self.backbone.eval()
        return self

    def exportable_settings(self) -> dict[str, Any]:
        """The ``image_encoder`` settings (without ``type``) that rebuild this architecture offline: the backbone
        as its full ``Dinov2Config`` with ``load_pretrained_weights: false`` (the weights are in the CLIP
        checkpoint), no ``pretrained``, the fusion settings resolved, everything else as given."""
        backbone = {k: v for k, v in self._backbone_settings.items() if k != "pretrained"}
        config = self.backbone.config.to_dict()
        for key in _NOT_ARCHITECTURE:
            config.pop(key, None)
        backbone.update(config=config, load_pretrained_weights=False)
        settings = {"backbone": backbone, "fusion": dict(self.fusion_settings)}
        if self.hu_windows is not None:
            settings = {"hu_windows": self.hu_windows, **settings}
        return copy.deepcopy(settings)

    # ------------------------------------------------------------------------------------------------ forward
    def backbone_input(self, slices: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` slices in model-input units -> ``(N, 3, *image_size)`` backbone pixels: windowed to
        [0, 1], resized, ImageNet-normalised."""
        low = self.windows[:, 0].view(1, -1, 1, 1).to(slices.dtype)
        high = self.windows[:, 1].view(1, -1, 1, 1).to(slices.dtype)
        x = ((slices - low) / (high - low)).clamp(0.0, 1.0)
        if tuple(x.shape[-2:]) != self.image_size:
            down = self.image_size[0] < x.shape[-2] or self.image_size[1] < x.shape[-1]
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=down)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # after the resize: one channel to resample, not three
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def _run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for module in self._stages()[start:stop]:
            x = module(x)
            if isinstance(x, tuple):  # transformers 4.x Dinov2Layer returns a tuple, 5.x a tensor
                x = x[0]
        return x

    def _features(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.slice_features_kind == "cls_mean":
            return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1)
        return hidden[:, 0]

    def _top(self, x: torch.Tensor, first: int) -> torch.Tensor:
        return self._features(self._run_stages(x, first, len(self._stages())))

    def slice_features(self, slices: torch.Tensor) -> torch.Tensor:
        """Backbone features ``(N, width)`` of ``(N, 1, H, W)`` slices, ``slice_chunk`` slices at a time."""
        stages, first = self._stages(), self._first_trainable_stage()
        # the frozen bottom keeps no activations, unless the caller wants gradients w.r.t. the input (saliency)
        bottom = torch.no_grad if first > 0 and not slices.requires_grad else nullcontext
        out = []
        for start in range(0, slices.shape[0], self.slice_chunk):  # chunks of slices, each chunk vectorised
            x = slices[start:start + self.slice_chunk]
            with bottom():
                x = self._run_stages(self.backbone_input(x), 0, first)
            if first == len(stages):
                out.append(self._features(x))
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                out.append(checkpoint(self._top, x, first, use_reentrant=False))
            else:
                out.append(self._top(x, first))
        return torch.cat(out)

    def encode_volume(self, image: torch.Tensor) -> ImageEncoding:
        """Encode ``(B, 1, D, H, W)`` volumes in model-input units.

        Returns:
            :class:`~custom_nets.image_encoders.ImageEncoding`: ``embedding (B, dim)``, the fused slice
            ``tokens (B, D, dim)`` and their ``positions (D, 3)``: slice centres ``(d + 0.5, H / 2, W / 2)``.
        """
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"SliceFusionEncoder expects (B, 1, D, H, W), got a tensor of shape {tuple(image.shape)}")
        # a batched MONAI MetaTensor carries per-volume metadata that slicing into chunks cannot keep consistent
        image = image.as_subclass(torch.Tensor)
        b, _, d, h, w = image.shape
        slices = image.transpose(1, 2).reshape(b * d, 1, h, w)
        features = self.slice_features(slices).reshape(b, d, -1)
        embedding, tokens = self.fusion(features)
        positions = grid_positions((d, 1, 1), (1.0, float(h), float(w)), device=image.device)
        return ImageEncoding(embedding, tokens, positions)

    def forward(self, image: torch.Tensor) -> ImageEncoding:
        return self.encode_volume(image)


@register_image_encoder("slice_fusion")
def build_slice_fusion(settings: dict, config: ModelConfig) -> SliceFusionEncoder:
    """A :class:`SliceFusionEncoder` from the ``image_encoder`` settings (without ``type``) of a model config, its
    HU windows converted to model-input units with the config's input contract.

    Raises:
        ModelConfigError: naming the config file and the key, for bad settings.
    """
    def fail(key: str, message: str) -> ModelConfigError:
        return ModelConfigError(f"model config {config.source}: image_encoder.{key}: {message}")

    unknown = sorted(k for k in set(settings) - {"hu_windows", "backbone", "fusion"} if not str(k).startswith("_"))
    if unknown:
        raise fail(unknown[0], "unknown key (slice_fusion settings: hu_windows, backbone, fusion)")
    hu_windows = settings.get("hu_windows", [list(config.input.hu_window)])
    ok = (isinstance(hu_windows, Sequence) and not isinstance(hu_windows, str) and len(hu_windows) in (1, 3)
          and all(isinstance(w, Sequence) and not isinstance(w, str) and len(w) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w) and w[0] < w[1]
                  for w in hu_windows))
    if not ok:
        raise fail("hu_windows", f"expected 1 or 3 [low, high] HU windows with low < high, got {hu_windows!r}")
    # not sorted: with a negative hu_scale the window's low HU edge is its high model value, and still maps to 0
    windows = [(config.input.hu_to_model(lo), config.input.hu_to_model(hi)) for lo, hi in hu_windows]
    if "backbone" not in settings:
        raise fail("backbone", "missing (a DINOv2 backbone: 'pretrained' and/or 'config')")
    try:
        encoder = SliceFusionEncoder(windows, settings["backbone"], settings.get("fusion"),
                                     hu_windows=[list(w) for w in hu_windows])
    except SettingsError as err:
        raise fail(err.key, f"expected {err.expected}, got {err.got!r}") from None
    depth = config.input.model_input_shape[1]
    fusion = encoder.fusion_settings
    if fusion["position"] == "learned" and fusion["max_slices"] < depth:
        raise fail("fusion.max_slices", f"expected at least the {depth} slices of the model input "
                   f"(input.spatial_size), got {fusion['max_slices']}")
    return encoder
