"""Training state and model weights on disk, safe against a kill at any moment.

- :func:`atomic_torch_save` (through the one atomic writer, :func:`ctclip_contract.atomic_path`);
- the resumable training state: :class:`TrainingStateSaver`, :func:`latest_checkpoint`, :class:`ResumeFromLatest`;
- the model a run hands on: :class:`BestModelSaver` (best validation metric -> ``models/model.pt`` in the CT-CLIP
  key layout) and :class:`FinalModelSaver`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from ignite.engine import Engine, Events
from torch import nn

from ctclip_contract import atomic_path, atomic_write_json, read_json

from .distributed import rank, unwrap

__all__ = ["atomic_torch_save", "TrainingStateSaver", "latest_checkpoint", "list_checkpoints", "ResumeFromLatest",
           "BestModelSaver", "FinalModelSaver", "save_model_weights"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through the atomic writer (a temporary file in the same folder, fsync, rename): a SIGKILL at
    any moment leaves either the old file or the new one, never a truncated one.

    torch writes into a Python file object here, not to a file name: its own C++ writer reports a full disk as
    ``RuntimeError: basic_ios::clear: iostream error``, while Python's write raises ``OSError(ENOSPC)``, which
    stays in the chain (a fault of the machine, and :func:`~ctclip_contract.atomic_path` names ``path`` in it).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


_STATE_RE = re.compile(r"^state_iter(\d+)\.pt$")


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the training-state files in ``save_dir``, oldest first."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STATE_RE.match(p.name))]
    return sorted(found)


def _load_state(path: Path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "trainer" not in obj or "model" not in obj:
        raise ValueError(f"{path}: not a training-state checkpoint (needs 'model' and 'trainer' entries)")
    return obj


def latest_checkpoint(save_dir: str | os.PathLike) -> Optional[Path]:
    """The newest readable training-state file in ``save_dir`` (None when there is none). An unreadable newest
    file (e.g. a disk filled up) is skipped with a warning in favour of the previous one."""
    for _, path in reversed(list_checkpoints(save_dir)):
        try:
            _load_state(path)
            return path
        except Exception as err:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            logger.warning(f"skipping unreadable training state {path}: {err}")
    return None


class TrainingStateSaver:
    """Save the full training state every ``interval`` iterations and at the end of training.

    Files ``save_dir/state_iter<iteration>.pt`` hold ``{name: obj.state_dict()}`` for every object (model,
    optimizer, scheduler, trainer, ...) plus ``"iteration"``/``"epoch"``; written atomically by rank
    ``save_rank``; the newest ``n_saved`` are kept (older ones are deleted only after the new one is in place).

    Args:
        save_dir: the checkpoint folder.
        save_dict: ``{name: object with state_dict()}``; must include ``"trainer"`` and ``"model"``.
        interval: iterations between saves (0: only at the end).
        n_saved: how many state files to keep.
        save_rank: the rank that writes.
        save_final: also save at ``COMPLETED``.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, Any], interval: int = 100,
                 n_saved: int = 2, save_rank: int = 0, save_final: bool = True):
        if "model" not in save_dict:
            raise ValueError("save_dict needs 'model' for a resumable training state")
        if n_saved < 1:
            raise ValueError(f"n_saved must be >= 1, got {n_saved}")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.interval, self.n_saved, self.save_rank, self.save_final = int(interval), n_saved, save_rank, save_final

    def attach(self, engine: Engine) -> None:
        # the trainer (and its GradScaler) join the state here: the config cannot reference the trainer from
        # its own handler list without a cycle
        self.save_dict.setdefault("trainer", engine)
        if getattr(engine, "scaler", None) is not None:
            self.save_dict.setdefault("scaler", engine.scaler)
        if self.interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self._on_interval)
        # after the epoch's validation (list this handler after ValidationHandler): a resume at an epoch
        # boundary then does not skip that validation
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        if self.save_final:
            engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_interval(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        if length and engine.state.iteration % length == 0:
            return  # the epoch-end save follows
        self(engine)

    def _on_completed(self, engine: Engine) -> None:
        if getattr(self, "_last", None) != engine.state.iteration:
            self(engine)

    def __call__(self, engine: Engine) -> Optional[Path]:
        if rank() != self.save_rank:
            return None
        it = int(engine.state.iteration)
        path = self.save_dir / f"state_iter{it:08d}.pt"
        obj = {name: unwrap(o).state_dict() if isinstance(o, nn.Module) else o.state_dict()
               for name, o in self.save_dict.items() if o is not None}
        obj["iteration"], obj["epoch"] = it, int(engine.state.epoch)
        atomic_torch_save(obj, path)
        self._last = it
        for _, old in list_checkpoints(self.save_dir)[: -self.n_saved]:
            old.unlink(missing_ok=True)
        engine.logger.info(f"training state saved: {path}")
        return path


class ResumeFromLatest:
    """At ``STARTED``, load the newest training state from ``save_dir`` into every object of ``load_dict``, so a
    killed run started again with the same command continues from the saved iteration.

    The configured ``max_epochs`` wins over the saved one (a finished run can be extended with ``--epochs``).
    Each resume is appended to ``save_dir/resume_log.json``.

    Args:
        save_dir: the checkpoint folder of :class:`TrainingStateSaver`.
        load_dict: ``{name: object with load_state_dict()}`` (same names as the saver's ``save_dict``).
        enabled: False: always start from scratch (existing state files are left alone).
        strict: strict model loading.
    """

    def __init__(self, save_dir: str | os.PathLike, load_dict: Mapping[str, Any], enabled: bool = True,
                 strict: bool = True):
        self.save_dir = Path(save_dir)
        self.load_dict = {k: v for k, v in load_dict.items() if v is not None}
        self.enabled, self.strict = enabled, strict
        self.resumed_from: Optional[Path] = None

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault("trainer", engine)
        if getattr(engine, "scaler", None) is not None:
            self.load_dict.setdefault("scaler", engine.scaler)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.save_dir)
        if path is None:
            return
        state = _load_state(path)
        max_epochs = engine.state.max_epochs
        for name, obj in self.load_dict.items():
            if name not in state:
                raise KeyError(f"{path}: no {name!r} entry (entries: {sorted(state)}); was it written by another "
                               "config?")
            if isinstance(obj, nn.Module):
                unwrap(obj).load_state_dict(state[name], strict=self.strict)
            elif isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
                # the schedule length comes from this run's config (--epochs may extend a finished run); only the
                # position in the schedule comes from the checkpoint
                keep = {k: getattr(obj, k) for k in ("t_total", "warmup_steps", "T_max", "total_steps")
                        if hasattr(obj, k)}
                obj.load_state_dict(state[name])
                for k, v in keep.items():
                    setattr(obj, k, v)
            else:
                obj.load_state_dict(state[name])
        engine.state.max_epochs = max_epochs
        self.resumed_from = path
        engine.logger.info(f"resumed from {path} at iteration {engine.state.iteration} (epoch {engine.state.epoch})")
        if rank() == 0:
            log_path = self.save_dir / "resume_log.json"
            log = read_json(log_path, "resume log") if log_path.exists() else []
            log.append({"checkpoint": path.name, "iteration": int(engine.state.iteration),
                        "epoch": int(engine.state.epoch), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            atomic_write_json(log_path, log, indent=1)


def save_model_weights(model: nn.Module, path: Path) -> None:
    m = unwrap(model)
    sd = m.reference_state_dict() if hasattr(m, "reference_state_dict") else m.state_dict()
    atomic_torch_save({k: v.detach().cpu() for k, v in sd.items()}, path)


class BestModelSaver:
    """After each validation, write the CT-CLIP weights to ``save_path`` when ``metric_name`` improved.

    The weights are written in the published CT-CLIP key layout (``reference_state_dict``: loads with
    :func:`custom_nets.load_checkpoint` and into the reference code). The best value survives restarts
    (``<save_path>.json``), so a resumed run does not overwrite a better model. Optionally the evaluation files of
    the best epoch are copied to ``best_dir``.

    Args:
        model: the :class:`~custom_nets.CTCLIP` being trained.
        save_path: e.g. ``OUT/models/model.pt``.
        metric_name: key in the evaluator's ``state.metrics`` (higher is better).
        eval_dir: folder the evaluation handlers wrote this epoch's files to (copied to ``best_dir``).
        best_dir: destination of the best epoch's files.
        save_rank: the rank that writes.
        reset: forget a best value recorded by an earlier run in the same folder (a run that does not resume).
    """

    def __init__(self, model: nn.Module, save_path: str | os.PathLike, metric_name: str = "macro_auroc",
                 eval_dir: Optional[str | os.PathLike] = None, best_dir: Optional[str | os.PathLike] = None,
                 save_rank: int = 0, reset: bool = False):
        self.model, self.save_path, self.metric_name = model, Path(save_path), metric_name
        self.eval_dir = Path(eval_dir) if eval_dir else None
        self.best_dir = Path(best_dir) if best_dir else None
        self.save_rank = save_rank
        self.state_path = self.save_path.with_suffix(self.save_path.suffix + ".json")
        if reset and rank() == save_rank:
            self.state_path.unlink(missing_ok=True)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def best(self) -> Optional[dict]:
        """``{"epoch", "metric", "value"}`` of the best model so far, or None."""
        if not self.state_path.exists():
            return None
        return read_json(self.state_path, "best-model record")

    def __call__(self, engine: Engine) -> None:
        if rank() != self.save_rank:
            return
        value = engine.state.metrics.get(self.metric_name)
        if value is None or value != value:  # missing or NaN (e.g. a class without positives everywhere)
            engine.logger.warning(f"no finite {self.metric_name} this epoch: best model not updated")
            return
        best = self.best()
        if best is not None and value <= best["value"]:
            return
        save_model_weights(self.model, self.save_path)
        epoch = int(engine.state.epoch)
        if self.eval_dir is not None and self.best_dir is not None and self.eval_dir.is_dir():
            with atomic_path(self.best_dir, directory=True) as tmp:
                shutil.copytree(self.eval_dir, tmp, dirs_exist_ok=True)
        record = {"epoch": epoch, "metric": self.metric_name, "value": float(value), "path": self.save_path.name}
        atomic_write_json(self.state_path, record, indent=1)
        engine.logger.info(f"new best {self.metric_name} {value:.4f} at epoch {epoch}: saved {self.save_path}")


class FinalModelSaver:
    """At the end of training write the last CT-CLIP weights to ``final_path`` and, when no validation ever
    produced a best model, also to ``best_path`` (so ``models/model.pt`` always exists after a run).

    Args:
        model: the :class:`~custom_nets.CTCLIP`.
        final_path: e.g. ``OUT/models/model_final.pt``.
        best_path: e.g. ``OUT/models/model.pt``.
        save_rank: the rank that writes.
    """

    def __init__(self, model: nn.Module, final_path: str | os.PathLike, best_path: Optional[str | os.PathLike] = None,
                 save_rank: int = 0):
        self.model, self.final_path = model, Path(final_path)
        self.best_path = Path(best_path) if best_path else None
        self.save_rank = save_rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if rank() != self.save_rank:
            return
        save_model_weights(self.model, self.final_path)
        if self.best_path is not None and not self.best_path.exists():
            with atomic_path(self.best_path) as tmp:
                shutil.copyfile(self.final_path, tmp)
            engine.logger.info(f"no validated best model: {self.best_path} holds the final weights")
