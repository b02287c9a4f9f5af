"""Engine glue of the ClassFine / VocabFine bundle (``bundles/ct_clip_classfine``).

- :class:`ProgressiveUnfreezing`: frozen backbone for N epochs, then the image encoder (or only its latent
  projection) trains with its own, lower learning rate (an optimizer group set up by
  :func:`workflows.optim.classfine_param_groups`).
- :class:`ThresholdPredictionWriter`, :func:`save_validation_thresholds`, :func:`load_thresholds`: operating points
  fitted on validation and applied to new scans (on the calibrated probability when a calibration is loaded:
  :mod:`workflows.calibration`); :func:`write_comparison`: the ClassFine vs zero-shot summary.

The network (:class:`custom_nets.classfine.ClassFineNetwork`), its dataset (:class:`workflows.datasets.LatentCacheDataset`)
and the "one scan in" inputs (:func:`transforms.inference_items`, :func:`transforms.inference_transforms`) live where
their kinds live.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from ignite.engine import Engine, Events

from ctclip_contract import CTRATE_PATHOLOGIES, atomic_write_text, read_json
from custom_nets.classfine import UNFREEZE_PARTS, ClassFineNetwork

from .calibration import Calibration, load_calibration
from .handlers import names_from_batch
from .metrics import fit_thresholds_youden, macro_ece
from .writers import read_predictions_csv, write_json, write_predictions_csv

__all__ = [
    "ProgressiveUnfreezing",
    "save_validation_thresholds",
    "load_thresholds",
    "ThresholdPredictionWriter",
    "write_comparison",
]

logger = logging.getLogger("ct_clip_classfine")

class ProgressiveUnfreezing:
    """Frozen backbone for ``freeze_epochs`` epochs, then the image side trains (at its optimizer group's LR).

    Attach to the trainer. At the start of epoch ``freeze_epochs + 1`` (also after a resume) the network's
    :meth:`ClassFineNetwork.unfreeze` runs; the parameters are already in the optimizer
    (:func:`workflows.optim.classfine_param_groups`), so nothing else changes.

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


def save_validation_thresholds(val_predictions: str | os.PathLike, output_path: str | os.PathLike,
                               class_names: Optional[Sequence[str]] = None,
                               calibration_path: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """Fit per-class Youden thresholds on validation predictions and write them as JSON.

    ``thresholds`` are on the uncalibrated probability (what the validation predictions hold). Youden's J depends
    only on the order of the cases, and a calibration is strictly increasing per finding, so thresholds fitted on
    the calibrated validation probabilities split validation the same way; ``thresholds_calibrated`` (written when
    ``calibration_path`` is given) are these thresholds mapped through the calibration, which decide every case
    as ``thresholds`` do. Inference maps ``thresholds`` through the calibration it loads (so the two files cannot
    disagree) and compares them with the calibrated probability it writes.

    Args:
        val_predictions: ``predictions.csv`` of the validation split written with labels.
        output_path: the thresholds file (e.g. ``models/thresholds.json`` next to ``model.pt``).
        class_names: classes (default the 18 CT-RATE pathologies).
        calibration_path: the ``calibration.json`` fitted on the same validation predictions (optional).

    Returns:
        The written dict ``{"protocol", "description", "source", "class_names", "thresholds"}`` (NaN → null
        for classes without both label values in validation), plus ``"calibration", "thresholds_calibrated"``.
    """
    if class_names is None:
        class_names = CTRATE_PATHOLOGIES
    names, probs, labels = read_predictions_csv(val_predictions, class_names, with_labels=True)
    thr = fit_thresholds_youden(labels, probs)
    out = {
        "protocol": "val_youden",
        "description": "per-class Youden-J thresholds fitted on the validation split; decision = probability >= "
                       "threshold, thresholds on the uncalibrated probability (thresholds_calibrated: the same "
                       "decisions on the calibrated probability)",
        "source": str(val_predictions),
        "n_validation": len(names),
        "class_names": list(class_names),
        "thresholds": [None if not np.isfinite(t) else float(t) for t in thr],
    }
    calibration = load_calibration(calibration_path, class_names, required=True) if calibration_path else None
    if calibration is not None:
        out["calibration"] = Path(calibration_path).name
        out["thresholds_calibrated"] = [None if not np.isfinite(t) else float(t) for t in calibration.thresholds(thr)]
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
    data = read_json(path, "thresholds file")
    if class_names is not None and list(data["class_names"]) != list(class_names):
        raise ValueError(f"{path}: thresholds are for classes {data['class_names']}, not {list(class_names)}")
    return np.asarray([np.nan if t is None else t for t in data["thresholds"]], dtype=np.float64)


class ThresholdPredictionWriter:
    """Write ``predictions.csv`` of an inference run: ``VolumeName``, 18 probabilities and decisions.

    Decisions (``<class>_pred_val_youden``) use the thresholds fitted on validation
    (:func:`save_validation_thresholds`); without a thresholds file only probabilities are written. With a
    ``calibration``, the probabilities the evaluator hands over are the calibrated ones (the config's
    postprocessing applies the same calibration) and the thresholds are mapped through it: the decisions are
    those of the uncalibrated probability at the validation thresholds.

    Args:
        output_dir: folder of ``predictions.csv``.
        thresholds_path: the thresholds JSON (optional).
        class_names: classes (default the 18 CT-RATE pathologies).
        filename: output file name.
        calibration: the :class:`~workflows.calibration.Calibration` the postprocessing applied (None: none).
    """

    def __init__(self, output_dir: str | os.PathLike, thresholds_path: Optional[str | os.PathLike] = None,
                 class_names: Optional[Sequence[str]] = None, filename: str = "predictions.csv",
                 calibration: Optional[Calibration] = None) -> None:
        if class_names is None:
            class_names = CTRATE_PATHOLOGIES
        self.class_names = list(class_names)
        self.path = Path(output_dir) / filename
        self.thresholds_path = thresholds_path
        self.calibration = calibration
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
        elif self.calibration is not None:
            thr = self.calibration.thresholds(thr)
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
        ``{split: {model: {"macro_auroc", "ci_low", "ci_high", "n_cases", "ece_uncalibrated", "ece_calibrated",
        "protocols": {...}}}}``.
    """
    eval_dir = Path(eval_dir)
    models = dict(models or {"ClassFine": ".", "Zero-shot": "zeroshot"})
    table: dict[str, Any] = {}
    lines = ["# ClassFine vs zero-shot", "",
             "Macro AUROC with bootstrap 95% CI; decision metrics (macro over classes) under the three threshold "
             "protocols: `val_youden` (thresholds fitted on validation, applied here; honest), `ctclip_paper` "
             "(thresholds tuned on the evaluated split itself: optimistic, the CT-CLIP scripts' protocol), `vlm3d` "
             "(fixed 0.5). Then the macro expected calibration error (equal-width bins) of the probabilities as the "
             "model gives them and after the calibration fitted on validation, where there is one.", ""]
    for split in splits:
        table[split] = {}
        rows = []
        for label, folder in models.items():
            path = eval_dir / folder / split / "metrics.json"
            if not path.is_file():
                continue
            m = read_json(path, "metrics file")
            auc = m["auroc"]
            ece_uncalibrated, ece_calibrated = macro_ece(m)
            entry = {"macro_auroc": auc["macro"], "ci_low": auc.get("macro_ci_low"), "ci_high": auc.get("macro_ci_high"),
                     "n_cases": m.get("n_cases"), "metrics": str(path),
                     "ece_uncalibrated": ece_uncalibrated, "ece_calibrated": ece_calibrated,
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
        lines += ["", "| model | macro ECE uncalibrated | macro ECE calibrated |", "|---|---|---|"]
        lines += [f"| {label} | {f(e['ece_uncalibrated']) or 'n/a'} | {f(e['ece_calibrated']) or 'n/a'} |"
                  for label, e in table[split].items()]
        lines.append("")
    write_json(eval_dir / "comparison.json", table)
    atomic_write_text(eval_dir / "comparison.md", "\n".join(lines) + "\n")
    return table
