"""Calibrated probabilities: a per-finding map fitted on the validation split, stored beside the thresholds as
``calibration.json``, applied at inference.

A clinician reads 0.3 as "present in about 3 of 10 such scans". The raw outputs are not that: ClassFine is
trained with a prevalence ``pos_weight`` (which shifts every logit up by about ``log(pos_weight)``), and the
zero-shot pairwise softmax knows nothing of prevalence (0.5 means "the present-prompt is as similar as the
absent-prompt"). Each finding ``c`` gets its own strictly increasing map of the probability ``p``::

    z = logit(clip(p, EPS, 1 - EPS))
    platt:        p' = sigmoid(scale_c * z + bias_c)        (two parameters per finding)
    temperature:  p' = sigmoid(z / T_c)                      (scale_c = 1 / T_c, bias_c = 0)
    none:         p' = p                                     (the identity, written as a file all the same)

``scale_c >= MIN_SCALE > 0``, so the order of the cases, hence the AUROC, is unchanged, and a threshold ``t`` on
``p`` decides exactly as ``map(t)`` on ``p'`` (:meth:`Calibration.thresholds`). The parameters minimise the
cross-entropy on the validation predictions with Platt's target smoothing (positives ``(n+ + 1) / (n+ + 2)``,
negatives ``1 / (n- + 2)``), which keeps the fit finite when validation separates a finding perfectly. A finding
with a single label value in validation keeps the identity (noted in the file), as it keeps no threshold.

Platt is the default (``calibration_method`` in the bundle configs): both raw outputs need an offset, which
temperature scaling cannot give; two parameters per finding on the ~90 validation volumes of the demo (and
~1300 of CT-RATE) do not overfit.

The expected calibration error is :func:`workflows.metrics.expected_calibration_error`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from ctclip_contract import CTRATE_PATHOLOGIES, read_json

from .metrics import expected_calibration_error
from .writers import read_predictions_csv, write_json

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "Calibration",
    "fit_calibration",
    "save_validation_calibration",
    "load_calibration",
    "CalibrateProbabilitiesd",
]

logger = logging.getLogger(__name__)

#: the calibration maps a bundle config can ask for (``calibration_method``)
METHODS = ("platt", "temperature", "none")
#: the default, and why: see the module docstring
DEFAULT_METHOD = "platt"
#: probabilities are clipped to [EPS, 1 - EPS] before the logit (float64: no two float32 probabilities tie)
EPS = 1e-12
#: what the fit clips to: predictions.csv keeps 6 decimals, so a written 0.000000 is below 5e-7, not 1e-12
FIT_EPS = 5e-7
#: the smallest slope of a map: strictly increasing, so the ranking (AUROC) and the decisions survive
MIN_SCALE = 1e-3
#: ``format`` of the file
FORMAT = "ctclip-calibration/1"


def _logit(p: np.ndarray, eps: float = EPS) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


@dataclass
class Calibration:
    """One strictly increasing map per finding, ``p' = sigmoid(scale * logit(p) + bias)``.

    Args:
        method: one of :data:`METHODS`.
        class_names: the findings, in the order of the probability columns.
        scale: ``(C,)`` slopes, each ``>= MIN_SCALE``.
        bias: ``(C,)`` offsets (0 for temperature scaling and the identity).
        source: the file it was read from (for the log and the served result).
        info: the rest of the file (source predictions, validation size, notes).
    """

    method: str
    class_names: list[str]
    scale: np.ndarray
    bias: np.ndarray
    source: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.class_names = list(self.class_names)
        self.scale = np.asarray(self.scale, dtype=np.float64).reshape(-1)
        self.bias = np.asarray(self.bias, dtype=np.float64).reshape(-1)
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; expected one of {list(METHODS)}")
        n = len(self.class_names)
        if self.scale.shape != (n,) or self.bias.shape != (n,):
            raise ValueError(f"{n} classes but {self.scale.size} scales and {self.bias.size} biases")
        if not (np.all(np.isfinite(self.scale)) and np.all(np.isfinite(self.bias))):
            raise ValueError("calibration parameters must be finite numbers")
        if np.any(self.scale < MIN_SCALE * (1 - 1e-9)):
            bad = [c for c, a in zip(self.class_names, self.scale) if a < MIN_SCALE * (1 - 1e-9)]
            raise ValueError(f"calibration scale of {bad} is below {MIN_SCALE}: the map would not be strictly "
                             "increasing (it would change the ranking and the decisions)")

    def apply(self, probs: Any) -> np.ndarray:
        """Calibrated probabilities of ``(..., C)`` probabilities (float64)."""
        p = np.asarray(probs, dtype=np.float64)
        if p.shape[-1:] != (len(self.class_names),):
            raise ValueError(f"calibration{' ' + self.source if self.source else ''} is for "
                             f"{len(self.class_names)} classes; the probabilities have shape {tuple(p.shape)}")
        if self.method == "none":
            return p.copy()
        return expit(self.scale * _logit(p) + self.bias)

    def thresholds(self, thresholds: Any) -> np.ndarray:
        """Thresholds on the uncalibrated probability mapped to the calibrated one (NaN stays NaN): ``p >= t``
        exactly when ``apply(p) >= thresholds(t)``, the map being strictly increasing."""
        t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        out = self.apply(np.where(np.isnan(t), 0.5, t))
        return np.where(np.isnan(t), np.nan, out)

    def describe(self) -> str:
        """One line for logs and served results."""
        fitted = self.info.get("n_validation")
        where = f" fitted on {fitted} validation volumes" if fitted is not None else ""
        return f"{self.method} calibration{where}" + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict[str, Any]:
        """The ``calibration.json`` content."""
        params = {}
        for c, a, b in zip(self.class_names, self.scale, self.bias):
            entry = {"scale": float(a), "bias": float(b)}
            if self.method == "temperature":
                entry["temperature"] = float(1.0 / a)
            params[c] = entry
        return {"format": FORMAT, "method": self.method, "description": _DESCRIPTION[self.method], "eps": EPS,
                **{k: v for k, v in self.info.items() if k not in ("format", "method", "description", "eps")},
                "class_names": self.class_names, "parameters": params}


_MAP = "p' = sigmoid(scale * logit(clip(p, eps, 1 - eps)) + bias) per finding, scale > 0"
_DESCRIPTION = {
    "platt": f"Platt scaling fitted on the validation split: {_MAP}; strictly increasing, so the ranking (AUROC) "
             "and the decisions at the mapped thresholds are those of the uncalibrated probability",
    "temperature": f"temperature scaling fitted on the validation split: {_MAP} with bias 0 (temperature = "
                   "1 / scale); strictly increasing, so the ranking (AUROC) and the decisions are unchanged",
    "none": "no calibration: the identity (scale 1, bias 0)",
}


def _fit_one(z: np.ndarray, y: np.ndarray, fit_bias: bool) -> tuple[float, float]:
    """Minimise the smoothed cross-entropy of ``sigmoid(a z + b)`` over ``a >= MIN_SCALE`` (and ``b``)."""
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(x: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = x[0], (x[1] if fit_bias else 0.0)
        s = a * z + b
        value = -np.mean(t * log_expit(s) + (1.0 - t) * log_expit(-s))
        r = expit(s) - t
        grad = [np.mean(r * z)] + ([np.mean(r)] if fit_bias else [])
        return float(value), np.asarray(grad)

    x0 = np.array([1.0, 0.0] if fit_bias else [1.0])
    bounds = [(MIN_SCALE, None)] + ([(None, None)] if fit_bias else [])
    res = minimize(loss, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-14})
    a = float(max(res.x[0], MIN_SCALE))
    return a, float(res.x[1]) if fit_bias else 0.0


def fit_calibration(labels: Any, probs: Any, method: str = DEFAULT_METHOD,
                    class_names: Sequence[str] | None = None) -> Calibration:
    """Fit one map per finding on validation labels and probabilities.

    Args:
        labels: ``(N, C)`` 0/1 validation labels.
        probs: ``(N, C)`` validation probabilities (uncalibrated).
        method: ``"platt"`` (default), ``"temperature"`` or ``"none"``.
        class_names: the ``C`` findings (default: the 18 CT-RATE pathologies).

    Returns:
        The :class:`Calibration`; a finding with a single label value keeps the identity (noted in ``info``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {list(METHODS)}")
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"labels and probabilities must both be (N, C); got {y.shape} and {p.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(p)) or (p.size and (p.min() < 0 or p.max() > 1)):
        raise ValueError("calibration is fitted on probabilities in [0, 1]")
    names = list(CTRATE_PATHOLOGIES if class_names is None else class_names)
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} class names for {y.shape[1]} columns")
    scale, bias = np.ones(len(names)), np.zeros(len(names))
    notes = []
    for c, name in enumerate(names):
        if method == "none":
            continue
        if y.shape[0] == 0 or y[:, c].min() == y[:, c].max():
            notes.append(f"{name}: a single label value in validation; left uncalibrated (the identity)")
            continue
        scale[c], bias[c] = _fit_one(_logit(p[:, c], FIT_EPS), y[:, c], fit_bias=method == "platt")
    info: dict[str, Any] = {"n_validation": int(y.shape[0])}
    if notes:
        info["notes"] = notes
    return Calibration(method, names, scale, bias, info=info)


def save_validation_calibration(val_predictions: str | os.PathLike, output_path: str | os.PathLike,
                                class_names: Sequence[str] | None = None, method: str = DEFAULT_METHOD,
                                n_bins: int = 10) -> dict[str, Any]:
    """Fit the calibration on a validation ``predictions.csv`` (written with labels) and write ``calibration.json``.

    Args:
        val_predictions: the validation split's predictions with ``<class>_label`` columns.
        output_path: the calibration file (ClassFine: ``models/calibration.json`` beside ``thresholds.json``).
        class_names: the findings (default: the 18 CT-RATE pathologies).
        method: see :func:`fit_calibration`.
        n_bins: bins of the validation ECE recorded in the file (in-sample: it is what the fit minimised).

    Returns:
        The written dict.
    """
    names = list(CTRATE_PATHOLOGIES if class_names is None else class_names)
    _, probs, labels = read_predictions_csv(val_predictions, names, with_labels=True)
    cal = fit_calibration(labels, probs, method, names)
    cal.info["source"] = str(val_predictions)
    before = expected_calibration_error(labels, probs, n_bins, names)["macro"] if len(probs) else float("nan")
    after = expected_calibration_error(labels, cal.apply(probs), n_bins, names)["macro"] if len(probs) else float("nan")
    cal.info["validation_ece_macro"] = {"n_bins": int(n_bins), "uncalibrated": before, "calibrated": after,
                                        "note": "in-sample (the split the map was fitted on); see the test split's "
                                                "metrics.json for held-out ECE"}
    out = cal.to_dict()
    write_json(output_path, out)
    logger.info(f"wrote {output_path}: {method} calibration fitted on {len(probs)} validation volumes "
                f"(validation macro ECE {before:.3f} -> {after:.3f}, in-sample)")
    return out


def _calibration_from_dict(data: Any, path: Path, class_names: Sequence[str] | None) -> Calibration:
    what = f"calibration file {path}"
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}: expected a JSON object, got {type(data).__name__}")
    method = data.get("method")
    if method not in METHODS:
        raise ValueError(f"{what}: 'method' is {method!r}; expected one of {list(METHODS)}")
    params = data.get("parameters")
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"{what}: 'parameters' must be an object {{\"<class>\": {{\"scale\", \"bias\"}}, ...}}")
    for name, entry in params.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"{what}: parameters of {name!r} must be {{\"scale\", \"bias\"}}, got {entry!r}")
        for key in ("scale", "bias"):
            v = entry.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ValueError(f"{what}: {name!r} {key} is {v!r}, expected a finite number")
        if entry["scale"] < MIN_SCALE * (1 - 1e-9):
            raise ValueError(f"{what}: {name!r} scale is {entry['scale']!r}; it must be >= {MIN_SCALE} (a map that "
                             "is not strictly increasing would change the ranking and the decisions)")
    names = list(params) if class_names is None else list(class_names)
    known = [n for n in names if n in params]
    if not known:
        raise ValueError(f"{what}: calibrates {sorted(params)}, none of this model's classes {names}")
    missing = [n for n in names if n not in params]
    if missing:
        logger.warning(f"{what} has no map for {missing}: their probabilities stay uncalibrated")
    scale = [float(params[n]["scale"]) if n in params else 1.0 for n in names]
    bias = [float(params[n]["bias"]) if n in params else 0.0 for n in names]
    info = {k: v for k, v in data.items() if k not in ("parameters", "class_names")}
    return Calibration(method, names, scale, bias, source=str(path), info=info)


def load_calibration(path: str | os.PathLike | None, class_names: Sequence[str] | None = None,
                     required: bool = False) -> Calibration | None:
    """The calibration written by :func:`save_validation_calibration`, for ``class_names`` (matched by name).

    Args:
        path: the ``calibration.json``; empty or None: no calibration (nothing logged).
        class_names: the model's output columns; a class the file does not name stays uncalibrated (one warning,
            e.g. a class added to the zero-shot prompt file after the fit).
        required: raise when the file is missing instead of returning None with one warning.

    Returns:
        The :class:`Calibration`, or None (the model's uncalibrated probabilities).

    Raises:
        FileNotFoundError: ``required`` and no file at ``path``.
        ValueError: a corrupt file (invalid JSON, unknown method, a missing, non-finite or non-positive parameter,
            no class in common with the model), naming the file and the reason.
    """
    if not path:
        return None
    path = Path(path)
    if not path.exists():
        if required:
            raise FileNotFoundError(f"calibration file not found: {path} (fit it on validation with the bundle's "
                                    "evaluate.json)")
        logger.warning(f"no calibration file at {path}: the probabilities are the model's uncalibrated ones (the "
                       "bundle's evaluate.json fits one on validation)")
        return None
    cal = _calibration_from_dict(read_json(path, "calibration file"), path, class_names)
    logger.info(f"probabilities calibrated by {cal.describe()}")
    return cal


class CalibrateProbabilitiesd(MapTransform):
    """Postprocessing: replace the probabilities under ``keys`` (last dimension: the classes) by calibrated ones.

    With ``calibration`` None it passes the data through (the uncalibrated probabilities; :func:`load_calibration`
    has said so once). The output keeps the input's type, dtype and device.

    Args:
        keys: the prediction key(s), e.g. ``"pred"``.
        calibration: a :class:`Calibration` or None.
        allow_missing_keys: don't fail on a missing key.
    """

    def __init__(self, keys: KeysCollection, calibration: Calibration | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.calibration = calibration

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.calibration is None:
            return d
        for key in self.key_iterator(d):
            value = d[key]
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            d[key] = convert_to_dst_type(self.calibration.apply(arr), value, dtype=getattr(value, "dtype", None))[0]
        return d
