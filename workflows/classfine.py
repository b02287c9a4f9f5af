"""Glue for the ClassFine / VocabFine bundle (``bundles/ct_clip_classfine``).

- :class:`ClassFineNetwork`: :class:`~custom_nets.ClassFineClassifier` (same ``trained_model.*`` +
  ``classifier.*`` keys) that caches the frozen backbone's per-volume output. With a frozen image encoder
  and no augmentation the image latents of a volume never change, so after the first epoch an epoch costs
  one small linear layer per volume instead of a CTViT pass.
- :class:`ProgressiveUnfreezing`: frozen backbone for N epochs, then the image encoder (or only its latent
  projection) trains with its own, lower learning rate (an optimizer group set up by :func:`param_groups`).
- :func:`freeze_vq_codebook`: keeps the VQ codebook fixed while the encoder trains (the reference lets the
  EMA codebook drift during fine-tuning).
- :func:`load_datalist`, :func:`inference_datalist`, :func:`inference_transforms`: data lists and the "one
  scan in" preprocessing of the inference config (the ct_preprocess chain, then the model's input contract).
- :class:`ThresholdPredictionWriter`, :func:`save_validation_thresholds`, :func:`write_comparison`: operating
  points fitted on validation and applied to new scans; the ClassFine vs zero-shot summary.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import CacheDataset
from torch import nn

from custom_nets import ClassFineClassifier
from custom_nets.ctvit import CosineSimCodebook, param_versions

from .datalist import load_datalist  # noqa: F401  (re-exported: bundle configs call it here)
from .metrics import fit_thresholds_youden
from .writers import atomic_write_text, read_predictions_csv, write_json, write_predictions_csv

__all__ = [
    "ClassFineNetwork",
    "LatentCacheDataset",
    "ProgressiveUnfreezing",
    "freeze_vq_codebook",
    "param_groups",
    "backbone_state",
    "load_datalist",
    "datalist_labels",
    "inference_datalist",
    "inference_transforms",
    "save_validation_thresholds",
    "load_thresholds",
    "ThresholdPredictionWriter",
    "write_comparison",
]

logger = logging.getLogger("ct_clip_classfine")

UNFREEZE_PARTS = ("projection", "image_encoder")


def _requires_grad(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


# ------------------------------------------------------------------------------------------------ network
class ClassFineNetwork(ClassFineClassifier):
    """ClassFine with an optional per-volume cache of the frozen backbone's output.

    What is cached depends on what is frozen: the l2-normalised image latent when the whole image side
    (CTViT and ``to_visual_latent``) is frozen, the pooled CTViT embedding when only the CTViT is frozen
    (``ProgressiveUnfreezing(parts="projection")``); nothing once the CTViT trains. Entries are keyed by
    volume name and dropped as soon as a cached module's weights change (loaded or stepped), so a stale
    latent is never used. The cache lives on the model's device; memory per volume is ``dim_latent`` floats
    (or ``dim_image`` for the embedding: 1.2 MB at CT-CLIP v2 size).

    Args:
        clip_model: the CTCLIP backbone (``trained_model``).
        num_classes: number of labels.
        dropout: dropout before the linear head.
        freeze_backbone: start frozen (no gradients, eval mode, no codebook update).
        cache_latents: enable the cache (only used when ``forward`` gets the volume ``names``; turn it off when
            the training transforms are random).
        freeze_codebook: keep the VQ codebook fixed even when the encoder trains (see :func:`freeze_vq_codebook`).
    """

    def __init__(self, clip_model: nn.Module, num_classes: int = 18, dropout: float = 0.3,
                 freeze_backbone: bool = True, cache_latents: bool = True, freeze_codebook: bool = True) -> None:
        super().__init__(clip_model, num_classes=num_classes, dropout=dropout, freeze_backbone=freeze_backbone)
        self.cache_latents = bool(cache_latents)
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_key: Optional[tuple] = None
        if freeze_codebook:
            freeze_vq_codebook(self)

    # -- cache --------------------------------------------------------------------------------------
    def _cache_stage(self) -> Optional[str]:
        """``"latent"``, ``"embedding"`` or None: the deepest frozen output of the image side."""
        clip = self.trained_model
        if _requires_grad(clip.visual_transformer):
            return None
        return "embedding" if _requires_grad(clip.to_visual_latent) else "latent"

    def clear_cache(self) -> None:
        """Forget every cached latent."""
        self._cache, self._cache_key = {}, None

    @property
    def cache_size(self) -> int:
        """Number of cached volumes."""
        return len(self._cache)

    def _current_key(self, stage: str, device) -> tuple:
        clip = self.trained_model
        frozen = [clip.visual_transformer] + ([clip.to_visual_latent] if stage == "latent" else [])
        return (stage, str(device)) + tuple(param_versions(m) for m in frozen)

    def is_cached(self, name: str) -> bool:
        """Whether ``forward`` can serve volume ``name`` without its image (used by :class:`LatentCacheDataset`)."""
        if not self.cache_latents or name not in self._cache:
            return False
        stage = self._cache_stage()
        return stage is not None and self._cache_key == self._current_key(stage, self.classifier.weight.device)

    def cache_state(self) -> tuple:
        """A token that changes whenever the set of cached volumes may have changed."""
        return (id(self._cache), len(self._cache), self._cache_key)

    def _cached(self, image: torch.Tensor, names: Sequence[str], stage: str) -> torch.Tensor:
        key = self._current_key(stage, image.device)
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        missing = [i for i, n in enumerate(names) if n not in self._cache]
        if missing and image.numel() == 0:
            raise RuntimeError(f"ClassFineNetwork: the batch came without images (LatentCacheDataset placeholders) "
                               f"but the latents of {[names[i] for i in missing][:5]} are not cached (the backbone "
                               "weights changed since they were cached?)")
        if missing:
            clip = self.trained_model
            idx = torch.as_tensor(missing, device=image.device)
            with torch.no_grad():
                sub = image.index_select(0, idx)
                out = clip.encode_image(sub) if stage == "latent" else clip.image_embedding(sub)
            for j, i in enumerate(missing):
                self._cache[names[i]] = out[j].detach()
        return torch.stack([self._cache[n] for n in names])

    def image_latents(self, image: torch.Tensor, names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """L2-normalised image latents ``(B, dim_latent)``, from the cache where allowed.

        Args:
            image: ``(B, 1, D, H, W)`` model input.
            names: volume names (cache keys), one per image; None disables the cache for this call.
        """
        clip = self.trained_model
        stage = self._cache_stage()
        if names is not None and isinstance(names, str):
            names = [names]
        use_cache = self.cache_latents and stage is not None and names is not None and len(names) == image.shape[0]
        if use_cache:
            names = [str(n) for n in names]
            if len(set(names)) != len(names):
                use_cache = False  # duplicate names in one batch: the names are not volume identities
        if not use_cache:
            if stage == "latent" or (self.freeze_backbone and stage is not None):
                with torch.no_grad():
                    return clip.encode_image(image)
            if stage == "embedding":
                with torch.no_grad():
                    emb = clip.image_embedding(image)
                return F.normalize(clip.to_visual_latent(emb), dim=-1)
            return clip.encode_image(image)
        out = self._cached(image, names, stage)
        if stage == "embedding":
            return F.normalize(clip.to_visual_latent(out), dim=-1)
        return out

    def forward(self, image: torch.Tensor, names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Class logits ``(B, num_classes)``.

        Args:
            image: ``(B, 1, D, H, W)`` model input.
            names: optional volume names (from ``PrepareBatchExtraInput(extra_keys={"names": "name"})``) that
                enable the latent cache.
        """
        return self.classifier(self.dropout(F.relu(self.image_latents(image, names))))

    # -- freezing -----------------------------------------------------------------------------------
    def unfreeze(self, parts: str = "image_encoder") -> list[nn.Parameter]:
        """Make the image side trainable (the text encoder, unused by ClassFine, stays frozen).

        Args:
            parts: ``"projection"`` (``to_visual_latent`` only) or ``"image_encoder"`` (CTViT and projection).

        Returns:
            The parameters that became trainable.
        """
        if parts not in UNFREEZE_PARTS:
            raise ValueError(f"parts must be one of {UNFREEZE_PARTS}, got {parts!r}")
        clip = self.trained_model
        modules = [clip.to_visual_latent] + ([clip.visual_transformer] if parts == "image_encoder" else [])
        params = [p for m in modules for p in m.parameters() if not p.requires_grad]
        for m in modules:
            m.requires_grad_(True)
        self.freeze_backbone = False
        self.clear_cache()
        self.train(self.training)
        return params


def _codebook_eval(module: nn.Module, args: tuple) -> None:
    module.train(False)


class LatentCacheDataset(CacheDataset):
    """A ``CacheDataset`` that skips reading volumes whose latents the network already holds.

    Once every volume of the dataset is in :class:`ClassFineNetwork`'s latent cache, items are returned without
    their image (a ``(0,)`` placeholder): an epoch then costs no disk reads and no preprocessing. The decision is
    all-or-nothing per dataset (a batch never mixes images and placeholders) and is re-checked whenever the
    network's cache changes. With a network that has no latent cache (e.g. VocabFine) it is a plain
    ``CacheDataset``.

    Args:
        data: datalist items with a unique ``name``.
        transform: the full preprocessing (used when the image is needed).
        network: the network whose cache is consulted.
        label_key: key of the label vector (converted to a float32 tensor on the placeholder path).
        name_key: key of the volume name.
        **kwargs: ``CacheDataset`` arguments (``cache_rate``, ``num_workers``, ...).
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], transform: Any, network: nn.Module, label_key: str = "label",
                 name_key: str = "name", **kwargs) -> None:
        super().__init__(data=data, transform=transform, **kwargs)
        self.network = network
        self.label_key, self.name_key = label_key, name_key
        self._names = [str(d.get(name_key)) for d in data]
        self._memo: Optional[tuple] = None

    def all_cached(self) -> bool:
        """Whether every volume of the dataset can be served from the network's latent cache."""
        net = self.network
        if not hasattr(net, "is_cached") or len(set(self._names)) != len(self._names):
            return False
        state = net.cache_state()
        if self._memo is None or self._memo[0] != state:
            self._memo = (state, all(net.is_cached(n) for n in self._names))
        return self._memo[1]

    def _transform(self, index: int):
        if not self.all_cached():
            return super()._transform(index)
        item = self.data[index]
        out = {self.name_key: item[self.name_key], "image": torch.zeros(0)}
        if item.get(self.label_key) is not None:
            out[self.label_key] = torch.as_tensor(item[self.label_key], dtype=torch.float32)
        return out


def freeze_vq_codebook(module: nn.Module) -> nn.Module:
    """Keep every VQ codebook inside ``module`` fixed, also while its encoder trains.

    The codebook is put in eval mode right before each of its forwards (a forward pre-hook), so the EMA
    update never runs; the enclosing ``VectorQuantize`` still uses the straight-through estimator in train
    mode, so gradients reach the encoder. Without this, every training forward moves the codebook (decay 0.8).

    Args:
        module: a model containing :class:`~custom_nets.ctvit.CosineSimCodebook` modules.

    Returns:
        ``module`` (for config chaining).
    """
    for m in module.modules():
        if isinstance(m, CosineSimCodebook) and not getattr(m, "_codebook_frozen", False):
            m.register_forward_pre_hook(_codebook_eval)
            m._codebook_frozen = True
    return module


def param_groups(network: nn.Module, lr: float, backbone_lr: Optional[float] = None, weight_decay: float = 0.1,
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


def backbone_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every backbone parameter and buffer (VQ codebook included), for bit-identity checks."""
    clip = network.trained_model if isinstance(network, ClassFineClassifier) else network
    return {k: v.detach().clone() for k, v in clip.state_dict().items()}


class ProgressiveUnfreezing:
    """Frozen backbone for ``freeze_epochs`` epochs, then the image side trains (at its optimizer group's LR).

    Attach to the trainer. At the start of epoch ``freeze_epochs + 1`` (also after a resume) the network's
    :meth:`ClassFineNetwork.unfreeze` runs; the parameters are already in the optimizer
    (:func:`param_groups`), so nothing else changes.

    Args:
        network: the :class:`ClassFineNetwork` being trained.
        freeze_epochs: epochs with the frozen backbone; None or a value >= the number of epochs never unfreezes.
        parts: ``"projection"`` or ``"image_encoder"``.
    """

    def __init__(self, network: ClassFineNetwork, freeze_epochs: Optional[int] = None,
                 parts: str = "image_encoder") -> None:
        if parts not in UNFREEZE_PARTS:
            raise ValueError(f"parts must be one of {UNFREEZE_PARTS}, got {parts!r}")
        self.network = network
        self.freeze_epochs = None if freeze_epochs is None or int(freeze_epochs) < 0 else int(freeze_epochs)
        self.parts = parts
        self.unfrozen_at: Optional[int] = None

    def attach(self, engine: Engine) -> None:
        """Register on the trainer.

        Args:
            engine: the trainer.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if self.freeze_epochs is None or self.unfrozen_at is not None or engine.state.epoch <= self.freeze_epochs:
            return
        params = self.network.unfreeze(self.parts)
        self.unfrozen_at = int(engine.state.epoch)
        groups = [g.get("name", str(i)) + f" lr {g['lr']:.3g}" for i, g in enumerate(engine.optimizer.param_groups)] \
            if hasattr(engine, "optimizer") else []
        engine.logger.info(f"epoch {engine.state.epoch}: unfroze the {self.parts} ({sum(p.numel() for p in params)} "
                           f"parameters); optimizer groups: {', '.join(groups)}")


# ------------------------------------------------------------------------------------------------ data
def datalist_labels(items: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """``(N, C)`` label matrix of datalist items."""
    return np.asarray([it["label"] for it in items], dtype=np.float64)


def inference_datalist(input_path: str | os.PathLike, splits: Sequence[str] = ("training", "validation", "test"),
                       patient_pattern: Optional[str] = None) -> list[dict[str, Any]]:
    """Items ``{"image", "name", ...}`` for inference from whatever the user points at.

    Args:
        input_path: a NIfTI file, a DICOM series folder, a folder of NIfTI files and DICOM series folders (or a
            CT-RATE-layout cohort, whose metadata slope/intercept are carried along), or a ``datalist.json``.
        splits: splits taken from a datalist.
        patient_pattern: see :func:`workflows.preprocess.discover_inputs`.

    Raises:
        FileNotFoundError: the path does not exist or holds no volume.
    """
    from transforms.ctrate import volume_stem
    from transforms.qc import NIFTI_SUFFIXES, is_dicom_file

    p = Path(input_path)
    if not p.exists():
        raise FileNotFoundError(f"inference input not found: {p}")
    if p.is_file() and p.suffix == ".json":
        items = []
        for split in splits:
            try:
                items += load_datalist(p.parent, split, datalist=str(p.resolve()), require_labels=False)
            except KeyError:
                continue
        return [{k: v for k, v in it.items() if k in ("image", "name", "label")} for it in items]
    if p.is_file():
        if not p.name.lower().endswith(NIFTI_SUFFIXES) and not is_dicom_file(p):
            raise FileNotFoundError(f"{p}: not a NIfTI file (.nii/.nii.gz), a DICOM folder or a datalist.json")
        if is_dicom_file(p):
            p = p.parent  # one file of a series: read the whole series
        else:
            return [{"image": str(p.resolve()), "name": volume_stem(p.name)}]
    files = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
    if any(is_dicom_file(f) for f in files if not f.name.lower().endswith(NIFTI_SUFFIXES)):
        return [{"image": str(p.resolve()), "name": p.name}]
    from .preprocess import discover_inputs

    found, rejected = discover_inputs(p, patient_pattern)
    for r in rejected:
        logger.warning(f"skipped {r.get('input') or r.get('name')}: {r.get('reason')}")
    if not found:
        raise FileNotFoundError(f"{p}: no NIfTI file or DICOM series found")
    return [{"image": it["path"], "name": it["name"], "rescale_slope": it.get("rescale_slope"),
             "rescale_intercept": it.get("rescale_intercept")} for it in found]


def inference_transforms(model_config: str | Mapping[str, Any], raw: bool = True, hu_source: str = "auto",
                         qc: Optional[Mapping[str, Any]] = None, resampler: str = "separable"):
    """The transform chain of "one scan in, probabilities out".

    ``raw=True``: :func:`transforms.raw_to_model_input_transforms` (header checks, then the ct_preprocess chain
    at the model config's spacing and size, then :class:`~transforms.ToModelInputd`). ``raw=False``: for volumes
    already written by ct_preprocess at this model's geometry (loader, channel first, ToModelInputd only). Both
    end with a plain float32 tensor (no metadata) and keep only ``image``, ``name`` (and ``label`` when present).

    Args:
        model_config: model config name, path or dict (its ``input`` section is the contract).
        raw: run the full preprocessing.
        hu_source: see :class:`~transforms.RescaleToHUd`.
        qc: ``CTQualityCheckd`` keyword arguments.
        resampler: ``"separable"`` or ``"monai"`` (see ct_preprocess).
    """
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, SelectItemsd

    from custom_nets import load_model_config
    from transforms import ToModelInputd, raw_to_model_input_transforms

    cfg = load_model_config(model_config) if not isinstance(model_config, Mapping) else model_config
    if raw:
        head = raw_to_model_input_transforms(cfg, hu_source, qc, resampler)
    else:
        head = [LoadImaged(keys="image", reader="ITKReader", image_only=True), EnsureChannelFirstd(keys="image"),
                ToModelInputd.from_model_config("image", cfg)]
    return Compose(head + [
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        SelectItemsd(keys=["image", "name", "label"], allow_missing_keys=True),
    ])


# ------------------------------------------------------------------------------------------------ thresholds
def save_validation_thresholds(val_predictions: str | os.PathLike, output_path: str | os.PathLike,
                               class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Fit per-class Youden thresholds on validation predictions and write them as JSON.

    Args:
        val_predictions: ``predictions.csv`` of the validation split written with labels.
        output_path: the thresholds file (e.g. ``models/thresholds.json`` next to ``model.pt``).
        class_names: classes (default the 18 CT-RATE pathologies).

    Returns:
        The written dict ``{"protocol", "description", "source", "class_names", "thresholds"}`` (NaN → null
        for classes without both label values in validation).
    """
    if class_names is None:
        from transforms import CTRATE_PATHOLOGIES

        class_names = CTRATE_PATHOLOGIES
    names, probs, labels = read_predictions_csv(val_predictions, class_names, with_labels=True)
    thr = fit_thresholds_youden(labels, probs)
    out = {
        "protocol": "val_youden",
        "description": "per-class Youden-J thresholds fitted on the validation split; decision = probability >= "
                       "threshold",
        "source": str(val_predictions),
        "n_validation": len(names),
        "class_names": list(class_names),
        "thresholds": [None if not np.isfinite(t) else float(t) for t in thr],
    }
    write_json(output_path, out)
    return out


def load_thresholds(path: Optional[str | os.PathLike], class_names: Optional[Sequence[str]] = None
                    ) -> Optional[np.ndarray]:
    """Thresholds written by :func:`save_validation_thresholds` (None when ``path`` is empty or missing).

    Raises:
        ValueError: the file's classes differ from ``class_names``.
    """
    if not path or not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if class_names is not None and list(data["class_names"]) != list(class_names):
        raise ValueError(f"{path}: thresholds are for classes {data['class_names']}, not {list(class_names)}")
    return np.asarray([np.nan if t is None else t for t in data["thresholds"]], dtype=np.float64)


class ThresholdPredictionWriter:
    """Write ``predictions.csv`` of an inference run: ``VolumeName``, 18 probabilities and decisions.

    Decisions (``<class>_pred_val_youden``) use the thresholds fitted on validation
    (:func:`save_validation_thresholds`); without a thresholds file only probabilities are written.

    Args:
        output_dir: folder of ``predictions.csv``.
        thresholds_path: the thresholds JSON (optional).
        class_names: classes (default the 18 CT-RATE pathologies).
        filename: output file name.
    """

    def __init__(self, output_dir: str | os.PathLike, thresholds_path: Optional[str | os.PathLike] = None,
                 class_names: Optional[Sequence[str]] = None, filename: str = "predictions.csv") -> None:
        if class_names is None:
            from transforms import CTRATE_PATHOLOGIES

            class_names = CTRATE_PATHOLOGIES
        self.class_names = list(class_names)
        self.path = Path(output_dir) / filename
        self.thresholds_path = thresholds_path
        self._names: list[str] = []
        self._probs: list[np.ndarray] = []

    def attach(self, engine: Engine) -> None:
        """Register on the evaluator.

        Args:
            engine: the evaluator.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Optional[Engine] = None) -> None:
        self._names, self._probs = [], []

    def collect(self, engine: Engine) -> None:
        from .handlers import names_from_batch

        out = engine.state.output
        preds = [o["pred"] for o in out] if isinstance(out, list) else list(out["pred"])
        names = names_from_batch(engine.state.batch)
        if names is None or len(names) != len(preds):
            names = [f"case_{len(self._names) + i}" for i in range(len(preds))]
        self._names += names
        self._probs += [torch.as_tensor(p).detach().float().cpu().reshape(-1).numpy() for p in preds]

    def write(self, engine: Optional[Engine] = None) -> Path:
        probs = np.stack(self._probs) if self._probs else np.zeros((0, len(self.class_names)))
        thr = load_thresholds(self.thresholds_path, self.class_names)
        if thr is None:
            logger.warning(f"no thresholds file at {self.thresholds_path!r}: predictions.csv has probabilities only "
                           "(run the evaluate config to fit thresholds on validation)")
        path = write_predictions_csv(self.path, self._names, probs, self.class_names,
                                     thresholds=None if thr is None else {"val_youden": thr})
        logger.info(f"wrote {path} ({len(self._names)} volumes)")
        return path


# ------------------------------------------------------------------------------------------------ summary
def _protocol_row(metrics: Mapping[str, Any], protocol: str) -> dict[str, Any]:
    proto = metrics.get("protocols", {}).get(protocol)
    if proto is None:
        return {}
    m = proto["macro"]
    return {"f1": m.get("f1"), "precision": m.get("precision"), "recall": m.get("recall"),
            "accuracy": m.get("accuracy"), "hamming_accuracy": proto.get("hamming_accuracy"),
            "positive_rate": proto.get("positive_rate")}


def write_comparison(eval_dir: str | os.PathLike, models: Optional[Mapping[str, str]] = None,
                     splits: Sequence[str] = ("validation", "test")) -> dict[str, Any]:
    """Collect macro AUROC (with CI) and the three threshold protocols of several evaluated models.

    Reads ``<eval_dir>/<model folder>/<split>/metrics.json`` and writes ``comparison.json`` and
    ``comparison.md`` into ``eval_dir``.

    Args:
        eval_dir: the bundle's ``eval`` folder.
        models: display name → folder relative to ``eval_dir`` (default ``{"ClassFine": ".",
            "Zero-shot": "zeroshot"}``).
        splits: splits to report.

    Returns:
        ``{split: {model: {"macro_auroc", "ci_low", "ci_high", "n_cases", "protocols": {...}}}}``.
    """
    eval_dir = Path(eval_dir)
    models = dict(models or {"ClassFine": ".", "Zero-shot": "zeroshot"})
    table: dict[str, Any] = {}
    lines = ["# ClassFine vs zero-shot", "",
             "Macro AUROC with bootstrap 95% CI; decision metrics (macro over classes) under the three threshold "
             "protocols: `val_youden` (thresholds fitted on validation, applied here; honest), `ctclip_paper` "
             "(thresholds tuned on the evaluated split itself: optimistic, the CT-CLIP scripts' protocol), `vlm3d` "
             "(fixed 0.5).", ""]
    for split in splits:
        table[split] = {}
        rows = []
        for label, folder in models.items():
            path = eval_dir / folder / split / "metrics.json"
            if not path.is_file():
                continue
            m = json.loads(path.read_text(encoding="utf-8"))
            auc = m["auroc"]
            entry = {"macro_auroc": auc["macro"], "ci_low": auc.get("macro_ci_low"), "ci_high": auc.get("macro_ci_high"),
                     "n_cases": m.get("n_cases"), "metrics": str(path),
                     "protocols": {p: _protocol_row(m, p) for p in ("val_youden", "ctclip_paper", "vlm3d")}}
            table[split][label] = entry
            for proto, r in entry["protocols"].items():
                if r:
                    rows.append((label, proto, entry, r))
        if not rows:
            continue

        def f(v):
            return "" if v is None else f"{v:.3f}"

        lines += [f"## {split} ({next(iter(table[split].values()))['n_cases']} volumes)", "",
                  "| model | macro AUROC [95% CI] | protocol | F1 | precision | recall | accuracy | Hamming acc. "
                  "| positive rate |", "|---|---|---|---|---|---|---|---|---|"]
        for label, proto, e, r in rows:
            lines.append(f"| {label} | {f(e['macro_auroc'])} [{f(e['ci_low'])}, {f(e['ci_high'])}] | {proto} | "
                         f"{f(r['f1'])} | {f(r['precision'])} | {f(r['recall'])} | {f(r['accuracy'])} | "
                         f"{f(r['hamming_accuracy'])} | {f(r['positive_rate'])} |")
        lines.append("")
    write_json(eval_dir / "comparison.json", table)
    atomic_write_text(eval_dir / "comparison.md", "\n".join(lines) + "\n")
    return table
