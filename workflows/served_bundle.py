"""An exported zero-shot or ClassFine bundle held in memory to classify one scan per request (what the MONAI Label
app serves), and ClassFine's head fine-tuned from confirmed labels.

The bundle's own ``configs/inference.json`` builds everything (network, weights, preprocessing, postprocessing), so
a request gives the probabilities of ``python -m monai.bundle run --config_file configs/inference.json`` on the
same scan. The probabilities are calibrated when the bundle ships ``models/calibration.json`` (its postprocessing
applies it), and the decisions use the validation thresholds mapped through the same calibration, so they are the
decisions of the uncalibrated probability. What MONAI Label's generic bundle task does differently, and why this
class exists, is in ``monailabel_app/README.md``.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from ctclip_contract import read_json, verify_bundle
from custom_nets import ClassFineClassifier, load_checkpoint
from transforms import inference_items

from .calibration import Calibration
from .checkpoints import atomic_torch_save
from .classfine import load_thresholds

__all__ = ["ServedBundle", "read_confirmed_labels", "KINDS"]

logger = logging.getLogger(__name__)

#: the exported stages that can be served, by the ``exported.source_bundle`` of their metadata
KINDS = ("ct_clip_zeroshot", "ct_clip_classfine")


def read_confirmed_labels(path: str | os.PathLike, class_names: Sequence[str]) -> np.ndarray:
    """A radiologist's confirmed labels: a JSON ``{"<class>": 0 or 1, ...}`` (classes left out are unconfirmed).

    Returns:
        ``(C,)`` float array, NaN where unconfirmed.

    Raises:
        ValueError: a class that is not the model's, or a value other than 0/1, named with the file.
    """
    data = read_json(path, "label file")
    if not isinstance(data, Mapping):
        raise ValueError(f"label file {path}: expected {{\"<class>\": 0 or 1, ...}}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(class_names))
    if unknown:
        raise ValueError(f"label file {path}: {unknown} are not classes of this model ({list(class_names)})")
    labels = np.full(len(class_names), np.nan)
    for i, name in enumerate(class_names):
        if name in data:
            if data[name] not in (0, 1, True, False):
                raise ValueError(f"label file {path}: {name!r} is {data[name]!r}, expected 0 or 1")
            labels[i] = float(data[name])
    return labels


class ServedBundle:
    """One exported bundle, ready to classify a scan (a NIfTI file or a DICOM series folder) per call.

    Args:
        root: the exported bundle folder (checked with :func:`ctclip_contract.verify_bundle` first).
        device: torch device (default: the bundle config's, CUDA when available).
        weights: fine-tuned weights that replace the bundle's (loaded strictly, re-read when the file changes).

    Raises:
        BundleError: the bundle's files or packages (names the file or package).
        ValueError: a stage that cannot be served.
        RuntimeError: weights that do not match the network (strict load, keys named).
    """

    def __init__(self, root: str | os.PathLike, device: str | torch.device | None = None,
                 weights: str | os.PathLike | None = None):
        self.root = Path(root).resolve()
        meta = verify_bundle(self.root)
        self.kind = (meta.get("exported") or {}).get("source_bundle")
        if self.kind not in KINDS:
            raise ValueError(f"bundle {self.root}: an export of {self.kind!r}; only {list(KINDS)} can be served")
        self.name = meta.get("name", self.root.name)
        parser = ConfigParser()
        parser.read_config(str(self.root / "configs" / "inference.json"))
        parser.read_meta(str(self.root / "configs" / "metadata.json"))
        parser["bundle_root"] = str(self.root)
        parser["input"] = "served"  # any non-empty input: the raw-scan chain, as for --input
        if device is not None:
            parser["device"] = f"$torch.device('{device}')"
        self.device = parser.get_parsed_content("device")
        self.network = parser.get_parsed_content("network")
        parser.get_parsed_content("initialize")  # the bundle's own checks and weight loading (ClassFine)
        self.network.eval()
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.class_names = list(parser.get_parsed_content("class_names"))
        # the calibration the postprocessing applies (None: uncalibrated; a bundle exported before calibration
        # existed has no such id)
        self.calibration: Calibration | None = parser.get_parsed_content("calibration") if "calibration" in parser \
            else None
        self.thresholds, self.threshold_source = self._thresholds(parser)
        if self.thresholds is not None and self.calibration is not None:
            self.thresholds = self.calibration.thresholds(self.thresholds)
            self.threshold_source += ", mapped through models/calibration.json"
        self.weights = Path(weights) if weights else None
        self._weights_mtime: float | None = None
        self._lock = threading.Lock()
        self.refresh()

    def _thresholds(self, parser: ConfigParser) -> tuple[np.ndarray | None, str | None]:
        if self.kind == "ct_clip_classfine":
            path = parser.get_parsed_content("thresholds_path")
            return load_thresholds(path, self.class_names), "models/thresholds.json (fitted on validation)"
        metrics = self.root / "docs" / "metrics.json"  # zero-shot: the exported evaluation's validation thresholds
        if metrics.is_file():
            protocol = (read_json(metrics, "metrics file").get("protocols") or {}).get("val_youden")
            if protocol:
                per_class = protocol.get("per_class", {})
                values = [per_class.get(c, {}).get("threshold") for c in self.class_names]
                return np.asarray([np.nan if v is None else v for v in values]), "docs/metrics.json val_youden"
        return None, None

    def refresh(self) -> bool:
        """Load the fine-tuned weights file when it appeared or changed since the last call; returns whether it did."""
        if self.weights is None or not self.weights.is_file():
            return False
        mtime = self.weights.stat().st_mtime_ns
        if mtime == self._weights_mtime:
            return False
        with self._lock:
            load_checkpoint(self.network, self.weights, strict=True)
            self.network.eval()
            self._weights_mtime = mtime
        logger.info(f"{self.root.name}: serving the fine-tuned weights {self.weights}")
        return True

    def model_input(self, scan: str | os.PathLike) -> dict[str, Any]:
        """The bundle's preprocessing of one scan (a NIfTI file or a DICOM series folder).

        Raises:
            ValueError: not exactly one volume at ``scan``, or the scan is refused (the reason named).
        """
        items = inference_items(str(scan))
        if len(items) != 1:
            raise ValueError(f"{scan}: expected one volume (a NIfTI file or a DICOM series folder), found {len(items)}")
        return self.preprocessing(items[0])

    def predict(self, scan: str | os.PathLike) -> dict[str, Any]:
        """Probabilities (and decisions where thresholds exist) for one scan, as a JSON-able dict."""
        self.refresh()
        data = self.model_input(scan)
        with self._lock, torch.no_grad():
            pred = self.network(torch.as_tensor(data["image"])[None].to(self.device))
            probs = self.postprocessing({"pred": pred[0]})["pred"]
        probs = np.asarray(torch.as_tensor(probs).detach().cpu().float(), dtype=np.float64)
        result: dict[str, Any] = {
            "model": self.root.name, "kind": self.kind, "class_names": self.class_names,
            "probabilities": {c: float(p) for c, p in zip(self.class_names, probs)},
        }
        if self.thresholds is not None:
            result["decisions"] = {c: (None if np.isnan(t) else int(p >= t))
                                   for c, p, t in zip(self.class_names, probs, self.thresholds)}
            result["thresholds"] = {c: (None if np.isnan(t) else float(t)) for c, t in zip(self.class_names, self.thresholds)}
            result["threshold_source"] = self.threshold_source
        result["calibration"] = (self.calibration.describe() if self.calibration is not None
                                 else "none: the model's uncalibrated probabilities")
        result["weights"] = str(self.weights) if self._weights_mtime is not None else "models/model.pt"
        return result

    def fine_tune_head(self, cases: Sequence[tuple[str | os.PathLike, np.ndarray]], output: str | os.PathLike,
                       epochs: int = 100, lr: float = 1e-2, seed: int = 0) -> dict[str, Any]:
        """Fit ClassFine's linear head to confirmed labels with the encoder frozen, and write the weights.

        Each scan is encoded once (the frozen encoder's latents do not change); the head trains full-batch with
        binary cross-entropy over the confirmed entries only (NaN: unconfirmed), starting from the served head.
        The bundle's calibration (fitted on validation for the exported head) keeps being applied to the new head;
        refit it on a labelled validation set when the head has moved far.

        Args:
            cases: ``(scan, labels)`` pairs, labels as :func:`read_confirmed_labels` returns.
            output: the weights file written (atomically): the whole network's state dict, keys of ``network_def``.
            epochs, lr, seed: the head's training.

        Returns:
            a summary: cases, confirmed labels, loss before and after.
        """
        if not isinstance(self.network, ClassFineClassifier):
            raise ValueError(f"bundle {self.root}: only a ClassFine bundle has a head to fine-tune")
        if not cases:
            raise ValueError("no confirmed labels yet: save a label JSON with tag 'final' for at least one image")
        self.refresh()
        torch.manual_seed(seed)
        with torch.no_grad():  # the linear layer's input (latents or embeddings, activated), the rest frozen
            features = torch.cat([self.network.encode(torch.as_tensor(self.model_input(scan)["image"])[None]
                                                      .to(self.device)) for scan, _ in cases])
            features = self.network.dropout(self.network.head_activation(features))  # eval mode: fixed
        targets = torch.as_tensor(np.stack([labels for _, labels in cases]), dtype=torch.float32, device=self.device)
        confirmed = ~torch.isnan(targets)
        head = copy.deepcopy(self.network.classifier).train()
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)

        def loss_of() -> torch.Tensor:
            logits = head(features)
            return F.binary_cross_entropy_with_logits(logits[confirmed], targets[confirmed])

        with torch.no_grad():
            before = float(loss_of())
        for _ in range(int(epochs)):
            optimizer.zero_grad()
            loss = loss_of()
            loss.backward()
            optimizer.step()
        with self._lock:
            self.network.classifier.load_state_dict(head.state_dict())
            self.network.eval()
            atomic_torch_save(self.network.state_dict(), output)
        with torch.no_grad():
            after = float(loss_of())
        return {"cases": len(cases), "confirmed_labels": int(confirmed.sum()), "epochs": int(epochs),
                "loss_before": before, "loss_after": after, "weights": str(output)}
