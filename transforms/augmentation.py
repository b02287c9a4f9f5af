"""Augmentation that keeps the anatomy: the second view of multiview / visual-SSL pretraining."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (Compose, CopyItemsd, RandAffined, RandGaussianNoised, RandScaleIntensityd,
                              RandShiftIntensityd)

__all__ = ["view_transforms"]


def view_transforms(enabled: bool = True, source: str = "image", key: str = "image_view", prob: float = 1.0,
                    rotate_deg: float = 5.0, translate_vox: float = 3.0, scale: float = 0.05,
                    intensity_shift: float = 0.03, intensity_scale: float = 0.05, noise_std: float = 0.01,
                    mask_keys: Sequence[str] = ()):
    """Anatomy-preserving augmentation: copies ``source`` to ``key`` (or, with ``key == source``, augments it in
    place) and applies a small rotation/translation/scaling and intensity jitter.

    No flips: left-right and anterior-posterior are anatomical facts (heart, aortic arch, vertebrae). Values are
    model-input units (HU / 1000 for the shipped configs). Returns an empty ``Compose`` when not enabled.

    Args:
        enabled: build the transforms.
        source: the model-input image entry.
        key: the view's entry.
        prob: probability of the spatial transform.
        rotate_deg: maximal rotation per axis in degrees.
        translate_vox: maximal translation in voxels.
        scale: maximal relative scaling.
        intensity_shift: maximal additive shift.
        intensity_scale: maximal relative intensity scaling.
        noise_std: Gaussian noise standard deviation.
        mask_keys: label maps on ``source``'s grid (``seg``) that take the same rotation/translation/scaling by
            nearest neighbour, padded with 0, when ``source`` is augmented in place (``key == source``); a copied
            view has no mask.
    """
    if not enabled:
        return Compose([])
    r = math.radians(rotate_deg)
    ts = [] if key == source else [CopyItemsd(keys=source, names=key)]
    masks = [str(k) for k in mask_keys] if key == source else []
    ts += [
        RandAffined(keys=[key, *masks], prob=prob, rotate_range=(r, r, r), translate_range=(translate_vox,) * 3,
                    scale_range=(scale,) * 3, padding_mode=["border"] + ["zeros"] * len(masks),
                    mode=["bilinear"] + ["nearest"] * len(masks), allow_missing_keys=bool(masks)),
        RandShiftIntensityd(keys=key, offsets=intensity_shift, prob=1.0),
        RandScaleIntensityd(keys=key, factors=intensity_scale, prob=1.0),
        RandGaussianNoised(keys=key, std=noise_std, prob=1.0),
    ]
    return Compose(ts)
