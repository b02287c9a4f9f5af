"""Glue of the ``ct_clip_zeroshot`` bundle: prompt file, network and weights, datalists, raw-input checks,
image-latent export and retrieval summary.

The bundle configs wire these pieces into MONAI ``SupervisedEvaluator`` runs:

- ``inference.json``: :func:`build_zeroshot_network` (a :class:`~custom_nets.ZeroShotClassifier`: prompts
  encoded once, each volume encoded once, the reference's pairwise softmax) + :func:`load_pretrained`;
  raw NIfTI/DICOM (``--input``) or a preprocessed cohort (``--dataset_dir``); ``predictions.csv`` and,
  with ``--save_embeddings True``, ``embeddings.npz`` (:class:`ImageLatentsWriter`).
- ``evaluate.json``: validation then test split, test thresholds fitted on validation.
- ``retrieval.json``: :class:`~custom_nets.ImageReportLatents` gives image and report latents per volume;
  :class:`~workflows.handlers.RetrievalEvaluationHandler` computes the metrics.
- ``export.json``: :func:`workflows.bundle_export.export_bundle` packs the model into a bundle for another site.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch import nn

from ctclip_contract import CTRATE_PATHOLOGIES, atomic_path, read_json
from custom_nets import CTCLIP, ZeroShotClassifier, create_model, load_checkpoint

from .handlers import ClassificationEvaluationHandler, names_from_batch
from .writers import read_predictions_csv, write_json

__all__ = [
    "load_prompt_file",
    "build_zeroshot_network",
    "load_pretrained",
    "find_clip_model",
    "label_indices",
    "ImageLatentsWriter",
    "DeferredValidationEvaluationHandler",
    "JsonStateWriter",
]

logger = logging.getLogger("ct_clip_zeroshot")


# --------------------------------------------------------------------------------------------- prompts
def load_prompt_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a zero-shot prompt file.

    Format (JSON)::

        {"templates": [["{} is present.", "{} is not present."], ...],   # (present, absent) pairs, averaged
         "classes": ["Medical material", ..., {"name": "Pneumothorax", "prompt": "pneumothorax"}]}

    ``"templates": null`` (or left out) means the model config's ``prompts.templates``: the prompts the model
    was validated with during pretraining. A class is a name (used in the prompts and as the output column) or
    ``{"name", "prompt"}`` when the wording inside the prompts differs from the column name. Adding a class adds
    an output column; no training is involved.

    Args:
        path: the JSON file.

    Returns:
        ``{"path", "classes" (column names), "prompt_names" (text put into the templates), "templates"}``
        (``templates`` None: the model config's).

    Raises:
        FileNotFoundError / ValueError: naming the file and what is wrong.
    """
    path = Path(path)
    spec = read_json(path, "prompt file")
    templates = spec.get("templates")
    if templates is not None and (not templates or not isinstance(templates, list)):
        raise ValueError(f"prompt file {path}: 'templates' must be null (the model config's) or a non-empty list "
                         "of [present, absent] pairs")
    for t in templates or []:
        if not (isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) and s.count("{}") == 1 for s in t)):
            raise ValueError(f"prompt file {path}: template {t!r} is not a [present, absent] pair with one '{{}}' each")
    classes, prompt_names = [], []
    for c in spec.get("classes") or []:
        if isinstance(c, str):
            name, prompt = c, c
        elif isinstance(c, Mapping) and isinstance(c.get("name"), str):
            name, prompt = c["name"], str(c.get("prompt", c["name"]))
        else:
            raise ValueError(f"prompt file {path}: class entry {c!r} must be a name or {{'name', 'prompt'}}")
        if not name.strip():
            raise ValueError(f"prompt file {path}: empty class name")
        classes.append(name)
        prompt_names.append(prompt)
    if not classes:
        raise ValueError(f"prompt file {path}: 'classes' is empty")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ValueError(f"prompt file {path}: duplicate class names {dup}")
    return {"path": str(path), "classes": classes, "prompt_names": prompt_names,
            "templates": None if templates is None else [tuple(t) for t in templates]}


# --------------------------------------------------------------------------------------------- network
def build_zeroshot_network(model_config: str | Mapping[str, Any], prompt_file: str | os.PathLike,
                           model_overrides: Mapping[str, Any] | None = None, pad_to_max_length: bool = False):
    """A :class:`~custom_nets.ZeroShotClassifier` around a (randomly initialised) CT-CLIP.

    Args:
        model_config: shipped name, JSON path or dict (``ctclip_contract/configs``) or ModelConfig.
        prompt_file: see :func:`load_prompt_file`; without templates of its own, the model config's are used.
        model_overrides: merged into the model config (e.g. a local CXR-BERT tokenizer folder).
        pad_to_max_length: tokenise prompts to the model's max length like the reference (same result).

    Returns:
        the classifier; its ``model.config`` is the merged model config and ``column_names`` the output columns.
    """
    model = create_model(model_config, **dict(model_overrides or {}))
    prompts = load_prompt_file(prompt_file)
    net = ZeroShotClassifier.from_config(model, model.config, class_names=prompts["prompt_names"],
                                         templates=prompts["templates"], pad_to_max_length=pad_to_max_length)
    net.column_names = prompts["classes"]
    return net.eval()


def find_clip_model(network: nn.Module):
    """The :class:`~custom_nets.CTCLIP` inside a wrapper (zero-shot ``.model``, ClassFine ``.trained_model``, DDP
    ``.module``), or the network itself."""
    for m in network.modules():
        if isinstance(m, CTCLIP):
            return m
    raise TypeError(f"no CTCLIP model inside {type(network).__name__}")


def load_pretrained(network: nn.Module, path: str | os.PathLike | None, strict: bool = True,
                    required: bool = False) -> nn.Module:
    """Load weights into the CT-CLIP inside ``network`` and return ``network``.

    Accepts the published ``CT-CLIP_v2.pt`` / ``CT_VocabFine_v2.pt`` (with or without ``position_ids``),
    ``CT_LiPro_v2.pt`` (its backbone), our pretraining checkpoints (bare or ``CheckpointSaver`` dicts) and
    files written by :func:`export_network` (keys of the wrapper, ``model.*``).

    Args:
        network: a wrapper with a ``model`` attribute (ZeroShotClassifier, ImageReportLatents) or a CTCLIP.
        path: checkpoint file; empty or None keeps the current (random) weights, with a warning.
        strict: fail on missing/unexpected keys (see :func:`custom_nets.load_checkpoint`).
        required: raise instead of warning when ``path`` is empty.

    Raises:
        FileNotFoundError, RuntimeError: naming the file and the reason.
    """
    if not path:
        if required:
            raise ValueError("no pretrained weights given: pass --pretrained <checkpoint>")
        logger.warning("no pretrained weights given: the CT-CLIP keeps its random initialisation")
        return network
    path = Path(path)
    clip = find_clip_model(network)
    load_checkpoint(clip, path, strict=strict)
    if hasattr(network, "refresh_prompts"):
        network.refresh_prompts()
    logger.info(f"loaded weights from {path}")
    return network


def label_indices(class_names: Sequence[str], source: str = "prompt file", strict: bool = True) -> list[int] | None:
    """Column of each class in the CT-RATE 18-label vector (matched by name, case-insensitive).

    Args:
        class_names: the output columns.
        source: named in the error.
        strict: raise when a class has no label column; otherwise return None.

    Raises:
        ValueError: a class has no label column (inference works for it; evaluation cannot).
    """
    lookup = {n.lower(): i for i, n in enumerate(CTRATE_PATHOLOGIES)}
    missing = [c for c in class_names if c.lower() not in lookup]
    if missing and not strict:
        return None
    if missing:
        raise ValueError(f"{source}: class(es) {missing} have no CT-RATE label column, so they cannot be evaluated "
                         "(inference works for any class); evaluate with a prompt file of labelled classes")
    return [lookup[c.lower()] for c in class_names]


# --------------------------------------------------------------------------------------------- handlers
class ImageLatentsWriter:
    """Collect the image latents a zero-shot evaluator computes anyway and write ``embeddings.npz``.

    The latents are taken with a forward hook on the CT-CLIP's ``to_visual_latent`` (then L2-normalised,
    exactly :meth:`CTCLIP.encode_image`), so the volume is not encoded a second time. The file has one
    float32 ``(dim_latent,)`` array per volume, keyed by VolumeName (``np.load(f)["valid_1_a_1"]``).

    Args:
        path: destination ``.npz``.
        network: the evaluator's network (a wrapper with ``.model`` or a CTCLIP).
        name_key: batch entry holding the volume names.
        enabled: attach nothing when False (lets a config switch it with one flag).
    """

    def __init__(self, path: str | os.PathLike, network: nn.Module, name_key: str = "name", enabled: bool = True):
        self.path, self.network, self.name_key, self.enabled = Path(path), network, name_key, bool(enabled)
        self._pending: list[torch.Tensor] = []
        self._latents: dict[str, np.ndarray] = {}

    def attach(self, engine) -> None:
        """Register the hook and the events on ``engine``."""
        if not self.enabled:
            return
        find_clip_model(self.network).to_visual_latent.register_forward_hook(self._hook)
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _hook(self, module, inputs, output) -> None:
        self._pending.append(F.normalize(output.detach().float(), dim=-1).cpu())

    def reset(self, engine=None) -> None:
        """Clear the buffers."""
        self._pending, self._latents = [], {}

    def collect(self, engine) -> None:
        """Pair this iteration's latents with the batch's volume names."""
        latents = torch.cat(self._pending) if self._pending else torch.zeros((0, 0))
        self._pending = []
        names = names_from_batch(engine.state.batch, self.name_key)
        if names is None or len(names) != len(latents):
            raise ValueError(f"embeddings: {len(latents)} latents but names {names!r} in the batch")
        for n, z in zip(names, latents.numpy()):
            self._latents[str(n)] = z.astype(np.float32)

    def write(self, engine=None) -> None:
        """Write the ``.npz`` atomically."""
        with atomic_path(self.path, suffix=".npz") as tmp:
            np.savez(tmp, **self._latents)
        logger.info(f"wrote {len(self._latents)} image latents to {self.path}")


class DeferredValidationEvaluationHandler(ClassificationEvaluationHandler):
    """:class:`~workflows.handlers.ClassificationEvaluationHandler` whose validation predictions file is read when
    the run ends, not when the handler is built.

    ``evaluate.json`` builds both evaluators before the validation one has written its ``predictions.csv``
    (``check_properties`` does, for one); reading the file at the end of the test run removes that ordering
    constraint.

    Args:
        output_dir: folder for the result files.
        val_predictions: validation ``predictions.csv`` written with ``write_labels=True`` (None: no
            validation-fitted thresholds).
        **kwargs: the other :class:`~workflows.handlers.ClassificationEvaluationHandler` arguments.
    """

    def __init__(self, output_dir: str | os.PathLike, val_predictions: str | os.PathLike | None = None, **kwargs):
        super().__init__(output_dir, **kwargs)
        self.deferred_val_predictions = val_predictions

    def completed(self, engine) -> None:
        """Read the validation predictions, then gather, evaluate and write."""
        path = self.deferred_val_predictions
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"validation predictions not found: {path} (evaluate the validation split "
                                        "first)")
            _, self.val_scores, self.val_labels = read_predictions_csv(path, self.class_names, with_labels=True)
        super().completed(engine)


class JsonStateWriter:
    """Write ``engine.state.<state_key>`` (a JSON-able dict) to a file when the run completes.

    Args:
        path: destination JSON.
        state_key: attribute of ``engine.state`` (e.g. ``retrieval_results``).
        extra: entries added to the written dict (e.g. split, model config, checkpoint).
    """

    def __init__(self, path: str | os.PathLike, state_key: str, extra: Mapping[str, Any] | None = None):
        self.path, self.state_key, self.extra = Path(path), state_key, dict(extra or {})

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        results = getattr(engine.state, self.state_key, None)
        if results is None:
            raise RuntimeError(f"engine.state.{self.state_key} is not set: attach the handler that computes it first")
        write_json(self.path, {**self.extra, **results})
