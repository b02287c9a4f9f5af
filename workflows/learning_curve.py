"""Per-epoch training statistics and the learning-curve picture."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch
from ignite.engine import Engine, Events
from torch import nn

from .distributed import rank, unwrap
from .plots import plot_learning_curve

__all__ = ["EpochStatsRecorder", "LearningCurvePlotter"]


class EpochStatsRecorder:
    """Per-epoch training statistics, put into the validator's metrics so the per-epoch file has them.

    Collects the loss (and each loss term of :class:`~custom_nets.losses.PretrainingLoss`) every iteration; at
    ``EPOCH_COMPLETED`` (list it *before* the ``ValidationHandler``) sets ``train_loss``, ``train_<term>``,
    ``lr``, ``logit_scale``, ``epoch_seconds`` and ``train_samples_per_s`` on the trainer's and the validator's
    ``state.metrics``.

    Args:
        validator: the evaluator run by the ``ValidationHandler`` (None: trainer metrics only).
        optimizer: for the learning rate.
        model: the CT-CLIP (for ``exp(temperature)``).
        loss: the loss module (for its ``last_terms``).
    """

    def __init__(self, validator: Optional[Engine] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 model: Optional[nn.Module] = None, loss: Optional[nn.Module] = None):
        self.validator, self.optimizer, self.model, self.loss = validator, optimizer, model, loss
        self._reset()

    def _reset(self, engine: Optional[Engine] = None) -> None:
        self._sum, self._n, self._samples = 0.0, 0, 0
        self._terms: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        loss = out["loss"] if isinstance(out, Mapping) else out[0]["loss"]
        self._sum += float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self._n += 1
        image = out.get("image") if isinstance(out, Mapping) else None
        self._samples += int(image.shape[0]) if isinstance(image, torch.Tensor) else 1
        for k, v in getattr(self.loss, "last_terms", {}).items():
            self._terms[k] = self._terms.get(k, 0.0) + v

    def __call__(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._t0
        stats = {"train_loss": self._sum / max(self._n, 1), "epoch_seconds": seconds,
                 "train_samples_per_s": self._samples / max(seconds, 1e-9)}
        if len(self._terms) > 1:
            stats.update({f"train_{k}": v / max(self._n, 1) for k, v in self._terms.items()})
        if self.optimizer is not None:
            stats["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self.model is not None:
            stats["logit_scale"] = float(unwrap(self.model).temperature.detach().exp())
        engine.state.metrics.update(stats)
        if self.validator is not None:
            self.validator.state.metrics.update(stats)


class LearningCurvePlotter:
    """Redraw the learning curve PNG from the per-epoch metrics file after each validation (rank 0; skipped with
    a warning when matplotlib is missing).

    Args:
        metrics_file: ``metrics_per_epoch.json``.
        path: PNG destination.
        keys: metric columns to draw.
        title: figure title.
    """

    def __init__(self, metrics_file: str | os.PathLike, path: str | os.PathLike,
                 keys: Sequence[str] = ("macro_auroc",), title: Optional[str] = None):
        self.metrics_file, self.path, self.keys, self.title = Path(metrics_file), Path(path), tuple(keys), title

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if rank() != 0 or not self.metrics_file.exists():
            return
        try:
            plot_learning_curve(self.metrics_file, self.path, keys=self.keys, title=self.title)
        except ImportError as err:
            engine.logger.warning(f"learning curve not drawn ({err})")
