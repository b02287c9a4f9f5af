"""Optimiser set-up shared by the training bundles: parameter groups, gradient clipping, mixed precision."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from custom_nets import ClassFineClassifier

__all__ = ["add_gradient_clipping", "decay_param_groups", "classfine_param_groups", "resolve_precision"]


def add_gradient_clipping(optimizer: torch.optim.Optimizer, max_norm: Optional[float]) -> torch.optim.Optimizer:
    """Clip the global gradient norm of the optimizer's parameters right before every ``optimizer.step()``.

    Implemented as an optimizer step pre-hook, so it works inside any trainer, only on real steps of gradient
    accumulation, and after ``GradScaler.step`` has unscaled fp16 gradients.

    Args:
        optimizer: the optimizer.
        max_norm: maximal L2 norm (None or <= 0: no clipping; CT-CLIP used 0.5).

    Returns:
        the optimizer (for use inside a config expression).
    """
    if max_norm is None or max_norm <= 0:
        return optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def _clip(opt, args, kwargs):
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], float(max_norm))

    optimizer.register_step_pre_hook(_clip)
    return optimizer


def decay_param_groups(network: nn.Module, weight_decay: float = 0.05, lr: Optional[float] = None,
                       lr_scales: Optional[Mapping[str, float]] = None) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only; biases, norms, embeddings' 1-D parameters and the
    temperature are not decayed (decaying the temperature pulls the logit scale towards 1). Frozen parameters
    are left out.

    Args:
        network: the trained module.
        weight_decay: decay of the matrix group.
        lr: the base learning rate (needed with ``lr_scales``).
        lr_scales: ``{parameter-name prefix: factor}``: those parameters learn at ``lr * factor`` in groups of their
            own, e.g. ``{"heads.salience.": 10}`` for a head that starts from scratch beside pretrained encoders.
    """
    scales = {k: float(v) for k, v in (lr_scales or {}).items() if float(v) != 1.0}
    if scales and lr is None:
        raise ValueError(f"lr_scales {scales} need the base lr")
    groups: dict[tuple[float, bool], list] = {}
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((f for prefix, f in scales.items() if name.startswith(prefix)), 1.0)
        decayed = not (p.ndim < 2 or name.endswith("temperature"))
        groups.setdefault((scale, decayed), []).append(p)
    out = []
    for decayed in (True, False):  # the two plain groups first, always present, as before
        out.append({"params": groups.pop((1.0, decayed), []), "weight_decay": weight_decay if decayed else 0.0})
    for (scale, decayed), params in groups.items():
        out.append({"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale})
    return out


def resolve_precision(precision: str = "auto", device: Optional[torch.device | str] = None) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` from a requested precision.

    ``"auto"``: bf16 on a CUDA device that supports it, else fp16 on CUDA, fp32 on CPU (CPU autocast is slower
    than fp32 for these models). fp16 on CPU is refused.

    Args:
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: the training device.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = str(precision).lower()
    if p not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if p == "auto":
        if dev.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if p == "fp16" and dev.type != "cuda":
        raise ValueError("fp16 mixed precision needs a CUDA device (use bf16 or fp32 on CPU)")
    return p


def classfine_param_groups(network: nn.Module, lr: float, backbone_lr: Optional[float] = None, weight_decay: float = 0.1,
                 backbone_weight_decay: Optional[float] = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the head at ``lr``, the image side of the backbone at ``backbone_lr``.

    Frozen backbone parameters are included from the start: an optimizer skips parameters without a
    gradient (no update, no weight decay), so the group starts working when :class:`ProgressiveUnfreezing`
    unfreezes them and the LR schedule covers both groups. The text encoder is left out (ClassFine never uses
    it). For a plain CTCLIP (VocabFine) every parameter goes into one group at ``lr``.

    Args:
        network: a :class:`ClassFineClassifier` or a model holding a CTCLIP.
        lr: head learning rate.
        backbone_lr: image-encoder learning rate (default ``lr / 10``).
        weight_decay: head weight decay.
        backbone_weight_decay: backbone weight decay (default ``weight_decay``).
    """
    backbone_lr = lr / 10 if backbone_lr is None else backbone_lr
    backbone_weight_decay = weight_decay if backbone_weight_decay is None else backbone_weight_decay
    if not isinstance(network, ClassFineClassifier):
        return [{"params": [p for p in network.parameters()], "lr": lr, "weight_decay": weight_decay}]
    clip = network.trained_model
    backbone = list(clip.visual_transformer.parameters()) + list(clip.to_visual_latent.parameters())
    return [
        {"params": list(network.classifier.parameters()), "lr": lr, "weight_decay": weight_decay, "name": "head"},
        {"params": backbone, "lr": backbone_lr, "weight_decay": backbone_weight_decay, "name": "image_encoder"},
    ]
