"""Ignite handlers that turn an evaluator run into result files and per-epoch metric curves.

- :class:`ClassificationEvaluationHandler` collects the probabilities, labels and volume names of a
  MONAI ``SupervisedEvaluator`` run (all DDP ranks), computes :func:`~workflows.metrics.evaluate_classification`
  and writes ``predictions.csv``, ``metrics.json``, ``per_class.csv``/``.md``, ``roc_curves.png`` and
  ``reliability.png`` (the ECE before and after a calibration fitted on validation, when one is given).
- :class:`RetrievalEvaluationHandler` collects image and text latents (one report per volume) and
  writes ``retrieval.json`` (recall@k with random baseline, MRR, nDCG, mAP@k, alignment/uniformity),
  ``latents.npz`` and a 2-D map of the image latents.
- :class:`MetricsPerEpochWriter` appends the evaluator's scalar metrics after every validation to
  ``metrics_per_epoch.json`` and ``.csv`` (the data of a pretraining run's AUROC curve).

Bundle wiring (validation section of a train config, handlers run in list order)::

    "handlers": [
      {"_target_": "workflows.handlers.ClassificationEvaluationHandler", "output_dir": "@output_dir"},
      {"_target_": "workflows.checkpoints.BestModelSaver", "model": "@network", "save_path": "@ckpt_path",
       "metric_name": "macro_auroc"},
      {"_target_": "workflows.handlers.MetricsPerEpochWriter", "output_dir": "@output_dir"}
    ]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine
from monai.utils import evenly_divisible_all_gather, string_list_all_gather
from torch import nn

from ctclip_contract import CTRATE_PATHOLOGIES, atomic_path, read_json

from .calibration import Calibration, load_calibration
from .metrics import evaluate_classification, macro_ece, to_jsonable
from .plots import plot_latent_map, plot_reliability, plot_roc_curves
from .retrieval import retrieval_metrics
from .writers import read_predictions_csv, write_csv_rows, write_json, write_per_class_tables, write_predictions_csv

__all__ = [
    "ClassificationEvaluationHandler",
    "RetrievalEvaluationHandler",
    "MetricsPerEpochWriter",
    "names_from_batch",
    "labels_from_batch",
    "latents_from_pred",
    "probs_and_labels",
    "PromptRefresher",
    "ece_summary",
]


def names_from_batch(batch: Any, key: str = "name") -> list[str] | None:
    """Volume names of a (decollated or collated) batch, or None when the batch carries none.

    Args:
        batch: ``engine.state.batch``: a list of per-sample dicts after MONAI's decollation, or a dict
            with a list of names.
        key: the datalist key holding the volume name.

    Returns:
        One string per sample, or None.
    """
    if isinstance(batch, dict):
        names = batch.get(key)
        if names is None:
            return None
        return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict):
        if any(key not in b for b in batch):
            return None
        return [str(b[key]) for b in batch]
    return None


def labels_from_batch(batch: Any, key: str = "label") -> list[Any] | None:
    """Per-sample label vectors of a (decollated or collated) batch, or None when absent.

    Args:
        batch: ``engine.state.batch``.
        key: the datalist key of the 18-label vector.

    Returns:
        One label vector per sample, or None.
    """
    if isinstance(batch, dict):
        return None if batch.get(key) is None else _rows(batch[key])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict):
        if any(b.get(key) is None for b in batch):
            return None
        return [b[key] for b in batch]
    return None


def latents_from_pred(image_key: str = "image_latents", text_key: str = "text_latents") -> Callable:
    """An ``output_transform`` for a network whose output (``pred``) is a dict of latents.

    Args:
        image_key: key of the ``(D,)`` (per sample) image latent in ``pred``.
        text_key: key of the report latent.

    Returns:
        ``engine.state.output -> (image_latents, text_latents)``, each a list of tensors or a batch tensor.
    """

    def _transform(output: Any) -> tuple[Any, Any]:
        if isinstance(output, dict):
            pred = output["pred"]
            return pred[image_key], pred[text_key]
        return [o["pred"][image_key] for o in output], [o["pred"][text_key] for o in output]

    return _transform


def _rows(x: Any) -> list[torch.Tensor]:
    """Per-sample 1-D float tensors from a list of tensors or a batched ``(B, C)`` tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return list(x.reshape(1, -1) if x.ndim == 1 else x.reshape(x.shape[0], -1))
    return [torch.as_tensor(v).detach().reshape(-1) for v in x]


def _world() -> tuple[int, int]:
    return idist.get_world_size(), idist.get_rank()


class ClassificationEvaluationHandler:
    """Accumulate an evaluator's predictions and write every classification result at the end of a run.

    On ``EPOCH_STARTED`` the buffers are cleared; on every ``ITERATION_COMPLETED`` the probabilities
    and labels (``output_transform``) and volume names (``batch_transform``) are collected; at
    ``event`` (default ``EPOCH_COMPLETED``, which for an evaluator is the end of the run) they are
    gathered from all DDP ranks, evaluated on every rank (so every rank sees the same
    ``engine.state.metrics``), and written by rank ``save_rank``.

    Results exposed on the engine:

    - ``engine.state.metrics[metric_name]``: macro AUROC (and ``<metric_name>_ci_low``/``_ci_high``);
      a :class:`~workflows.checkpoints.BestModelSaver` listed after this handler keeps the best model.
    - ``setattr(engine.state, state_key, results)``: the full :func:`evaluate_classification` dict.

    Predictions are expected to be probabilities: apply the sigmoid in the network or the
    evaluator's ``postprocessing`` (``Activationsd(keys="pred", sigmoid=True)``). Without labels in
    the batch only ``predictions.csv`` is written (inference).

    Args:
        output_dir: folder for the result files.
        class_names: the C class names (default: the 18 CT-RATE pathologies).
        output_transform: extracts ``(pred, label)`` from ``engine.state.output``; MONAI style, default
            ``from_engine(["pred", "label"])``.
        batch_transform: extracts the list of volume names from ``engine.state.batch`` (default: the
            ``"name"`` entry; volumes are numbered ``case_<i>`` when absent).
        val_labels: ``(M, C)`` validation labels for the ``val_youden`` thresholds.
        val_scores: ``(M, C)`` validation probabilities.
        val_predictions: path of a validation ``predictions.csv`` written with ``write_labels=True``;
            its probabilities and ``<class>_label`` columns replace ``val_labels``/``val_scores``.
        val_thresholds: ``(C,)`` thresholds already fitted on validation.
        calibration: a ``calibration.json`` fitted on validation (:mod:`workflows.calibration`), read when the run
            ends (so an earlier step of the same config may write it), or a :class:`~workflows.calibration.Calibration`;
            the metrics stay those of the uncalibrated probabilities, and the ECE of the calibrated ones is added.
            A path without a file is an error that names it.
        ece_bins: equal-width bins of the expected calibration error and the reliability diagram.
        n_bootstrap: bootstrap resamples for the AUROC CIs (0 disables them).
        seed: bootstrap seed.
        ci: confidence level.
        save_rank: the rank that writes files.
        write_plots: write ``roc_curves.png`` and ``reliability.png`` (skipped with a warning when matplotlib is
            missing).
        write_labels: add ``<class>_label`` columns to predictions.csv (lets a later test run fit its
            thresholds on this run's output via ``val_predictions``).
        decision_protocols: protocols whose thresholds become decision columns in predictions.csv.
        subdir_per_epoch: write into ``output_dir/epoch_<n>`` instead of overwriting ``output_dir``.
        metric_name: key of the macro AUROC in ``engine.state.metrics``.
        state_key: attribute of ``engine.state`` that receives the result dict.
        event: event name at which to evaluate (``"EPOCH_COMPLETED"`` or ``"COMPLETED"``).
        name: logger name (default: the engine's logger).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        output_transform: Callable = from_engine(["pred", "label"]),
        batch_transform: Callable = names_from_batch,
        val_labels: Any = None,
        val_scores: Any = None,
        val_predictions: str | os.PathLike | None = None,
        val_thresholds: Any = None,
        calibration: str | os.PathLike | Calibration | None = None,
        ece_bins: int = 10,
        n_bootstrap: int = 1000,
        seed: int = 0,
        ci: float = 0.95,
        save_rank: int = 0,
        write_plots: bool = True,
        write_labels: bool = False,
        decision_protocols: Sequence[str] = ("val_youden",),
        subdir_per_epoch: bool = False,
        metric_name: str = "macro_auroc",
        state_key: str = "classification_results",
        event: str = "EPOCH_COMPLETED",
        name: str | None = None,
    ) -> None:
        if class_names is None:
            class_names = CTRATE_PATHOLOGIES
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.output_transform = output_transform
        self.batch_transform = batch_transform
        if val_predictions is not None:
            if val_labels is not None or val_scores is not None:
                raise ValueError("give val_predictions or val_labels/val_scores, not both")
            _, val_scores, val_labels = read_predictions_csv(val_predictions, self.class_names, with_labels=True)
        self.val_labels, self.val_scores, self.val_thresholds = val_labels, val_scores, val_thresholds
        self.calibration, self.ece_bins = calibration, int(ece_bins)
        self.n_bootstrap, self.seed, self.ci = n_bootstrap, seed, ci
        self.save_rank = save_rank
        self.write_plots, self.write_labels = write_plots, write_labels
        self.decision_protocols = tuple(decision_protocols)
        self.subdir_per_epoch = subdir_per_epoch
        self.metric_name, self.state_key = metric_name, state_key
        self.event = Events[event.upper()] if isinstance(event, str) else event
        self.logger = logging.getLogger(name)
        self._name = name
        self._preds: list[torch.Tensor] = []
        self._labels: list[torch.Tensor | None] = []
        self._names: list[str] = []
        self._names_complete = True

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on ``engine`` (an evaluator).

        Args:
            engine: the Ignite engine.
        """
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(self.event, self.completed)

    def reset(self, engine: Engine | None = None) -> None:
        """Clear the buffers (start of every evaluator run)."""
        self._preds, self._labels, self._names = [], [], []
        self._names_complete = True

    def __call__(self, engine: Engine) -> None:
        """Collect one iteration's probabilities, labels and volume names."""
        out = self.output_transform(engine.state.output)
        pred, label = (out[0], out[1]) if isinstance(out, (tuple, list)) and len(out) == 2 else (out, None)
        preds = _rows(pred)
        self._preds += [p.float().cpu() for p in preds]
        if label is None or (isinstance(label, (list, tuple)) and any(v is None for v in label)):
            self._labels += [None] * len(preds)
        else:
            self._labels += [lab.float().cpu() for lab in _rows(label)]
        names = self.batch_transform(engine.state.batch)
        if names is None or len(names) != len(preds):
            self._names_complete = False
        else:
            self._names += list(names)

    def _gathered(self) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
        n_classes = len(self.class_names)
        preds = torch.stack(self._preds) if self._preds else torch.zeros((0, n_classes))
        has_labels = bool(self._labels) and all(lab is not None for lab in self._labels)
        labels = torch.stack(self._labels) if has_labels else torch.zeros((0, n_classes))
        names = self._names if self._names_complete else []
        ws, _ = _world()
        if ws > 1:
            preds = evenly_divisible_all_gather(preds, concat=True)
            labels = evenly_divisible_all_gather(labels, concat=True)
            names = [n for n in string_list_all_gather(names) if n]  # an empty rank yields ""
            flags = evenly_divisible_all_gather(torch.tensor([int(has_labels), int(self._names_complete)]), concat=False)
            has_labels = all(int(f[0]) for f in flags)
            names_ok = all(int(f[1]) for f in flags)
        else:
            names_ok = self._names_complete
        p = preds.numpy().astype(np.float64)
        y = labels.numpy().astype(np.float64) if has_labels else None
        if p.shape[1:] != (n_classes,):
            raise ValueError(f"predictions have shape {tuple(p.shape)}; expected (N, {n_classes}) for {n_classes} classes")
        if not names_ok or len(names) != len(p):
            return p, y, None
        # DistributedSampler(even_divisible=True) repeats volumes to pad ranks: keep the first copy
        _, first = np.unique(np.asarray(names), return_index=True)
        if first.size < len(names):
            keep = np.sort(first)
            self.logger.info(f"{len(names) - keep.size} duplicated volumes (sampler padding) dropped before evaluation")
            p, y, names = p[keep], (y[keep] if y is not None else None), [names[i] for i in keep]
        return p, y, names

    def completed(self, engine: Engine) -> None:
        """Gather, evaluate, expose on ``engine.state`` and write the files (rank ``save_rank``)."""
        ws, rank = _world()
        if self.save_rank >= ws:
            raise ValueError(f"save_rank {self.save_rank} >= world size {ws}")
        probs, labels, names = self._gathered()
        if names is None:
            names = [f"case_{i}" for i in range(len(probs))]
        results, calibrated = None, None
        if labels is not None and len(labels):
            calibration = self._calibration()
            calibrated = calibration.apply(probs) if calibration is not None else None
            results = evaluate_classification(
                labels,
                probs,
                self.class_names,
                val_labels=self.val_labels,
                val_scores=self.val_scores,
                val_thresholds=self.val_thresholds,
                n_bootstrap=self.n_bootstrap,
                seed=self.seed,
                ci=self.ci,
                calibrated_scores=calibrated,
                n_bins=self.ece_bins,
            )
            if calibration is not None and "calibrated" in results["calibration"]:
                results["calibration"]["calibrated"].update(
                    method=calibration.method, file=calibration.source, description=calibration.describe())
            results["epoch"] = int(engine.state.epoch)
            auc = results["auroc"]
            for suffix, key in (("", "macro"), ("_ci_low", "macro_ci_low"), ("_ci_high", "macro_ci_high")):
                v = auc[key]
                engine.state.metrics[f"{self.metric_name}{suffix}"] = float("nan") if v is None else float(v)
        setattr(engine.state, self.state_key, results)
        if rank == self.save_rank:
            self._write(engine, probs, labels, names, results, calibrated)

    def _calibration(self) -> Calibration | None:
        if self.calibration is None or isinstance(self.calibration, Calibration):
            return self.calibration
        return load_calibration(self.calibration, self.class_names, required=True)

    def _write(self, engine: Engine, probs: np.ndarray, labels: np.ndarray | None, names: list[str], results: dict | None,
               calibrated: np.ndarray | None = None) -> None:
        out = self.output_dir / f"epoch_{engine.state.epoch}" if self.subdir_per_epoch else self.output_dir
        thresholds = {}
        for proto in self.decision_protocols:
            if results is not None and proto in results["protocols"]:
                pc = results["protocols"][proto]["per_class"]
                thresholds[proto] = [np.nan if pc[c]["threshold"] is None else pc[c]["threshold"] for c in self.class_names]
        write_predictions_csv(
            out / "predictions.csv",
            names,
            probs,
            self.class_names,
            thresholds=thresholds or None,
            labels=labels if self.write_labels else None,
        )
        if results is None:
            self.logger.info(f"no labels in the batches: wrote {out / 'predictions.csv'} only")
            return
        write_json(out / "metrics.json", results)
        write_per_class_tables(results, out)
        if self.write_plots:
            try:
                plot_roc_curves(labels, probs, out / "roc_curves.png", self.class_names, title=f"ROC, {len(probs)} volumes")
                plot_reliability(labels, probs, out / "reliability.png", calibrated, self.class_names, self.ece_bins,
                                 title=f"Reliability, {len(probs)} volumes")
            except ImportError as e:
                self.logger.warning(f"ROC and reliability plots skipped ({e})")
        self.logger.info(f"macro AUROC {results['auroc']['macro']} on {len(probs)} volumes; {ece_summary(results)}; "
                         f"results in {out}")


def ece_summary(results: Mapping[str, Any] | None) -> str:
    """``"macro ECE (10 bins) 0.213 uncalibrated -> 0.061 platt-calibrated"`` from an evaluation's results (or
    its ``metrics.json``); ``"macro ECE n/a"`` when it has none."""
    before, after = macro_ece(results)
    if before is None:
        return "macro ECE n/a"
    cal = results["calibration"]
    text = f"macro ECE ({cal.get('n_bins')} bins) {before:.3f} uncalibrated"
    if after is not None:
        text += f" -> {after:.3f} {cal['calibrated'].get('method', '')}-calibrated"
    return text


def _gather_rows(rows: list[torch.Tensor], width: int | None) -> torch.Tensor:
    """Stack per-sample vectors and concatenate them over DDP ranks (rank order)."""
    local = torch.stack(rows) if rows else torch.zeros((0, width or 0))
    if _world()[0] > 1:
        local = evenly_divisible_all_gather(local, concat=True)
    return local


class RetrievalEvaluationHandler:
    """Cross-modal retrieval of an evaluator run from image and report latents (one report per volume).

    Collects ``(image_latents, text_latents)`` per sample (``output_transform``), the label vectors
    (``label_transform``, optional, for volume→volume mAP@k) and the names; at ``event`` gathers them
    over ranks, computes :func:`~workflows.retrieval.retrieval_metrics`, stores scalars such as
    ``engine.state.metrics["report_to_volume_recall@5"]`` and the full dict on
    ``engine.state.<state_key>``, and on rank ``save_rank`` writes ``retrieval.json``, optionally
    ``latents.npz`` (names, image and text latents) and ``latent_map.png`` (coloured by the number of
    findings).

    Args:
        output_dir: folder of the files.
        output_transform: ``engine.state.output -> (image_latents, text_latents)``; default
            :func:`latents_from_pred` (``pred`` is a dict with ``image_latents``/``text_latents``).
        label_transform: ``engine.state.batch -> label vectors or None`` (default the ``"label"`` entry).
        batch_transform: ``engine.state.batch -> names or None``.
        ks: recall@k cut-offs.
        map_ks: volume→volume mAP@k cut-offs.
        relevance: ``"exact"`` or ``"overlap"`` (see :func:`~workflows.retrieval.label_relevance`).
        save_latents: write ``latents.npz``.
        write_plots: write ``latent_map.png``.
        map_method: projection of the map (``"pca"`` by default: cheap enough for every validation
            epoch; ``"auto"``/``"tsne"`` use scikit-learn's t-SNE when installed).
        save_rank: the rank that writes files.
        state_key: attribute of ``engine.state`` that receives the result dict.
        event: event name at which to evaluate.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        output_transform: Callable = latents_from_pred(),
        label_transform: Callable = labels_from_batch,
        batch_transform: Callable = names_from_batch,
        ks: Sequence[int] = (1, 5, 10, 50, 100),
        map_ks: Sequence[int] = (1, 5, 10, 50),
        relevance: str = "exact",
        save_latents: bool = True,
        write_plots: bool = True,
        map_method: str = "pca",
        save_rank: int = 0,
        state_key: str = "retrieval_results",
        event: str = "EPOCH_COMPLETED",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_transform, self.label_transform, self.batch_transform = output_transform, label_transform, batch_transform
        self.ks, self.map_ks, self.relevance = tuple(ks), tuple(map_ks), relevance
        self.save_latents, self.write_plots, self.save_rank = save_latents, write_plots, save_rank
        self.map_method = map_method
        self.state_key = state_key
        self.event = Events[event.upper()] if isinstance(event, str) else event
        self.logger = logging.getLogger(__name__)
        self.reset()

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (an evaluator).

        Args:
            engine: the Ignite engine.
        """
        self.logger = engine.logger
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(self.event, self.completed)

    def reset(self, engine: Engine | None = None) -> None:
        """Clear the buffers."""
        self._img: list[torch.Tensor] = []
        self._txt: list[torch.Tensor] = []
        self._lab: list[torch.Tensor] = []
        self._names: list[str] = []
        self._labels_ok = self._names_ok = True

    def __call__(self, engine: Engine) -> None:
        """Collect one iteration's latents, labels and names."""
        img, txt = self.output_transform(engine.state.output)
        img_rows, txt_rows = _rows(img), _rows(txt)
        if len(img_rows) != len(txt_rows):
            raise ValueError("one report latent per image latent is required")
        self._img += [r.float().cpu() for r in img_rows]
        self._txt += [r.float().cpu() for r in txt_rows]
        labels = self.label_transform(engine.state.batch)
        if labels is None or len(labels) != len(img_rows):
            self._labels_ok = False
        else:
            self._lab += [r.float().cpu() for r in _rows(labels)]
        names = self.batch_transform(engine.state.batch)
        if names is None or len(names) != len(img_rows):
            self._names_ok = False
        else:
            self._names += list(names)

    def completed(self, engine: Engine) -> None:
        """Gather, compute, expose and write."""
        ws, rank = _world()
        width = self._img[0].numel() if self._img else None
        img = _gather_rows(self._img, width).numpy()
        txt = _gather_rows(self._txt, width).numpy()
        labels_ok, names_ok = self._labels_ok, self._names_ok
        lab = _gather_rows(self._lab, self._lab[0].numel() if self._lab else None) if labels_ok else None
        names = self._names if names_ok else []
        if ws > 1:
            flags = evenly_divisible_all_gather(torch.tensor([int(labels_ok), int(names_ok)]), concat=False)
            labels_ok = all(int(f[0]) for f in flags)
            names_ok = all(int(f[1]) for f in flags)
            names = [n for n in string_list_all_gather(names) if n]
        y = lab.numpy() if labels_ok and lab is not None and len(lab) == len(img) else None
        if not names_ok or len(names) != len(img):
            names = [f"case_{i}" for i in range(len(img))]
        keep = np.sort(np.unique(np.asarray(names), return_index=True)[1])  # drop sampler padding repeats
        img, txt, names = img[keep], txt[keep], [names[i] for i in keep]
        y = y[keep] if y is not None else None
        results = retrieval_metrics(img, txt, labels=y, ks=self.ks, map_ks=self.map_ks, relevance=self.relevance)
        results["epoch"] = int(engine.state.epoch)
        for direction in ("report_to_volume", "volume_to_report"):
            for key, v in results[direction].items():
                if key.startswith(("recall@", "mrr", "ndcg")):
                    engine.state.metrics[f"{direction}_{key}"] = float("nan") if v is None else float(v)
        setattr(engine.state, self.state_key, results)
        if rank != self.save_rank:
            return
        write_json(self.output_dir / "retrieval.json", results)
        if self.save_latents:
            with atomic_path(self.output_dir / "latents.npz", suffix=".npz") as tmp:
                np.savez(tmp, names=np.asarray(names), image_latents=img, text_latents=txt)
        if self.write_plots and len(img) >= 2:
            try:
                counts = y.sum(axis=1) if y is not None else np.zeros(len(img))
                plot_latent_map(img, counts, self.output_dir / "latent_map.png", method=self.map_method)
            except ImportError as e:
                self.logger.warning(f"latent map skipped ({e})")
        r5 = results["report_to_volume"].get("recall@5")
        self.logger.info(f"report-to-volume recall@5 {r5} on {len(img)} volumes; results in {self.output_dir}")


class MetricsPerEpochWriter:
    """Append the engine's scalar metrics to ``metrics_per_epoch.json`` and ``.csv`` after each validation.

    One row per epoch: ``epoch`` then the metrics. A row for an epoch that already exists is replaced
    (a resumed run does not duplicate the curve), and the first row a run writes drops the earlier rows of its
    epoch and later ones (a run that starts over, or resumes before the end of a killed one, keeps no rows of the
    other run past its start). Both files are rewritten atomically from the JSON
    list, so they always agree. Attach it to the evaluator: its ``engine.state.epoch`` is the
    trainer's epoch when run by MONAI's ``ValidationHandler``.

    Args:
        output_dir: folder of the two files.
        filename: file stem (``<filename>.json`` and ``<filename>.csv``).
        metric_names: the ``engine.state.metrics`` keys to record (default: every scalar one).
        epoch_transform: ``engine -> epoch number`` (default ``engine.state.epoch``).
        save_rank: the rank that writes.
        event: event name (default ``"COMPLETED"``: after all epoch-completed handlers, so metrics
            computed by them are included).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        filename: str = "metrics_per_epoch",
        metric_names: Sequence[str] | None = None,
        epoch_transform: Callable[[Engine], int] | None = None,
        save_rank: int = 0,
        event: str = "COMPLETED",
    ) -> None:
        self.json_path = Path(output_dir) / f"{filename}.json"
        self.csv_path = Path(output_dir) / f"{filename}.csv"
        self.metric_names = None if metric_names is None else list(metric_names)
        self.epoch_transform = epoch_transform or (lambda e: e.state.epoch)
        self.save_rank = save_rank
        self.event = Events[event.upper()] if isinstance(event, str) else event
        self._first_row = True

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``.

        Args:
            engine: the Ignite engine (normally the evaluator).
        """
        engine.add_event_handler(self.event, self)

    def read(self) -> list[dict[str, Any]]:
        """The rows written so far (empty list when the file does not exist)."""
        if not self.json_path.exists():
            return []
        data = read_json(self.json_path, "metrics file")
        return list(data)

    def __call__(self, engine: Engine) -> None:
        """Add the current epoch's row and rewrite both files."""
        if _world()[1] != self.save_rank:
            return
        metrics = engine.state.metrics
        keys = self.metric_names if self.metric_names is not None else list(metrics)
        row: dict[str, Any] = {"epoch": int(self.epoch_transform(engine))}
        for k in keys:
            v = metrics.get(k)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                row[k] = float(v)
            elif self.metric_names is not None:
                row[k] = None  # requested but missing or not a scalar: keep the column
        # this run's first row: nothing of an earlier run from this epoch on stays (a rerun that starts over
        # with fewer epochs would otherwise keep the tail of the killed run's curve)
        keep = (lambda e: e < row["epoch"]) if self._first_row else (lambda e: e != row["epoch"])
        self._first_row = False
        rows = [r for r in self.read() if keep(int(r.get("epoch") or 0))] + [row]
        rows.sort(key=lambda r: r["epoch"])
        write_json(self.json_path, rows)
        fields = list(dict.fromkeys(k for r in rows for k in r))
        write_csv_rows(self.csv_path, to_jsonable(rows), fields)


def probs_and_labels(output: Any, key: str = "probs") -> tuple[list, list]:
    """``output_transform`` for :class:`~workflows.handlers.ClassificationEvaluationHandler` on the output of
    :class:`~custom_nets.pretraining.ZeroShotValidationNetwork` (decollated list of per-sample dicts, or one batch dict).

    Args:
        output: the evaluator's ``engine.state.output``.
        key: ``"probs"`` (image zero-shot) or ``"report_probs"`` (reports scored by the prompts).
    """
    if isinstance(output, Mapping):
        return output["pred"][key], output["label"]
    return [o["pred"][key] for o in output], [o["label"] for o in output]


class PromptRefresher:
    """Re-encode the zero-shot prompts at the start of every validation (the text encoder is training).

    Args:
        zero_shot: the :class:`~custom_nets.ZeroShotClassifier`.
    """

    def __init__(self, zero_shot: nn.Module):
        self.zero_shot = zero_shot

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.zero_shot.refresh_prompts()
