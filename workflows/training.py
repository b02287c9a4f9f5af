"""Training glue for the contrastive pretraining bundle (and any bundle that trains a CT-CLIP).

- :class:`PretrainingNetwork`: wraps a :class:`~custom_nets.CTCLIP` for the trainer; returns the dict the
  :class:`~custom_nets.losses.PretrainingLoss` terms need (global latents, tokens, second view, MLM, SSL heads).
- :class:`ZeroShotValidationNetwork` + :class:`PromptRefresher`: zero-shot probabilities and report/volume
  latents in one evaluator forward (the evaluator handlers compute macro AUROC and recall@k from them).
- SIGKILL-safe training state: :func:`atomic_torch_save`, :class:`TrainingStateSaver`,
  :func:`latest_checkpoint`, :class:`ResumeFromLatest`.
- Model outputs: :class:`BestModelSaver` (best macro AUROC -> ``models/model.pt`` in the CT-CLIP key layout),
  :class:`FinalModelSaver`.
- Curves and small helpers: :class:`EpochStatsRecorder`, :class:`LearningCurvePlotter`,
  :func:`add_gradient_clipping`, :func:`resolve_precision`, :func:`make_dataset`, :func:`load_datalist`,
  :func:`view_transforms`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

from .datalist import load_datalist  # noqa: F401  (re-exported: bundle configs call it here)

__all__ = [
    "PretrainingNetwork", "ZeroShotValidationNetwork", "PromptRefresher", "probs_and_labels",
    "atomic_torch_save", "TrainingStateSaver", "latest_checkpoint", "list_checkpoints", "ResumeFromLatest",
    "BestModelSaver", "FinalModelSaver", "EpochStatsRecorder", "LearningCurvePlotter",
    "add_gradient_clipping", "param_groups", "resolve_precision", "make_dataset", "load_datalist", "view_transforms",
    "unwrap", "rank",
]

logger = logging.getLogger(__name__)


def rank() -> int:
    """Global rank (0 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel wrappers."""
    while hasattr(module, "module") and isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


# ================================================================================================ networks
class PretrainingNetwork(nn.Module):
    """A CT-CLIP as the trainer's network: ``forward(image, text_input_ids, text_attention_mask, image_view=None)``
    returns a dict of features for :class:`~custom_nets.losses.PretrainingLoss`.

    Always: ``image_latents``, ``text_latents`` (L2-normalised, ``(B, dim_latent)``), ``logit_scale``
    (``exp(temperature)``). Depending on the loss's :meth:`~custom_nets.losses.PretrainingLoss.needs`:
    ``image_tokens``/``text_tokens``/``text_token_mask`` (FILIP), ``image_latents_view`` (second view),
    ``mlm_logits``/``mlm_labels`` (masked LM), ``ssl_z1``/``ssl_z2``/``ssl_p1``/``ssl_p2`` (visual SSL).

    The CT-CLIP is kept as ``self.model`` (its state dict is what ``models/model.pt`` holds); the auxiliary heads
    (FILIP image-token projection, MLM head, visual-SSL projector/predictor) live in ``self.heads`` so that DDP
    synchronises their gradients; they are saved with the training state only.

    Args:
        model: the :class:`~custom_nets.CTCLIP` (any image encoder whose ``image_embedding`` works; FILIP needs
            5-D ``(B, T, H, W, C)`` encoder tokens like CTViT's).
        loss: the :class:`~custom_nets.losses.PretrainingLoss` (decides which outputs and heads exist).
        temperature_init: set ``model.temperature`` (log of the logit scale) at construction; None keeps the
            model's (1.0 for a new CT-CLIP v2, or the checkpoint's). CLIP's choice is ``log(1/0.07)``.
        temperature_range: ``(min, max)`` clamp of ``model.temperature`` before every training forward, e.g.
            ``(log(1/30), log(100))``; None: no clamping (CT-CLIP v2).
        mask_token_id: the tokenizer's ``[MASK]`` id (MLM).
        special_token_ids: ids never masked (MLM).
        trim_padding: cut the batch's common right padding before the text encoder (same result, less work);
            skipped under DDP so token tensors keep one length across ranks.
        gradient_checkpointing: activation checkpointing in both encoders.
        autocast_dtype: ``"bfloat16"``/``"float16"``/None: run the encoders under ``torch.autocast``.
    """

    def __init__(self, model: nn.Module, loss: Optional[nn.Module] = None, temperature_init: Optional[float] = None,
                 temperature_range: Optional[Sequence[float]] = None, mask_token_id: Optional[int] = None,
                 special_token_ids: Sequence[int] = (), trim_padding: bool = True,
                 gradient_checkpointing: bool = False, autocast_dtype: Optional[str] = None):
        super().__init__()
        from custom_nets.losses import MLMHead, VisualSSLHead

        self.model = model
        self.needs = set(loss.needs()) if loss is not None and hasattr(loss, "needs") else set()
        self.mlm_probability = float(getattr(loss, "mlm_probability", 0.15))
        if temperature_init is not None:
            with torch.no_grad():
                model.temperature.fill_(float(temperature_init))
        if temperature_range is not None:
            lo, hi = (float(v) for v in temperature_range)
            if lo > hi:
                raise ValueError(f"temperature_range must be (min, max), got {temperature_range}")
            self.temperature_range: Optional[tuple[float, float]] = (lo, hi)
        else:
            self.temperature_range = None
        self.trim_padding = trim_padding
        if gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        if autocast_dtype is not None:
            model.autocast_dtype = getattr(torch, autocast_dtype) if isinstance(autocast_dtype, str) else autocast_dtype
        heads = nn.ModuleDict()
        if "tokens" in self.needs:
            token_dim = getattr(model.visual_transformer, "dim", None)
            if token_dim is None:
                raise ValueError("FILIP needs an image encoder with token width attribute 'dim' (CTViT)")
            heads["image_tokens"] = nn.Linear(token_dim, model.dim_latent, bias=False)
        if "mlm" in self.needs:
            if mask_token_id is None:
                raise ValueError("the MLM loss needs mask_token_id (the tokenizer's [MASK] id)")
            heads["mlm"] = MLMHead(model.dim_text, model.text_transformer.get_input_embeddings())
        if "visual_ssl" in self.needs:
            heads["visual_ssl"] = VisualSSLHead(model.dim_latent, loss.visual_ssl_dim, loss.visual_ssl)
        self.heads = heads
        self.mask_token_id = mask_token_id
        self.register_buffer("special_ids", torch.as_tensor(sorted(set(int(i) for i in special_token_ids)),
                                                            dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------------------------------- features
    def _image(self, image: torch.Tensor, with_tokens: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        tokens = self.model.image_tokens(image)  # the model config's depth pooling, shared with the global embedding
        return tokens.flatten(1), (tokens if with_tokens else None)

    def _mask_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # BERT recipe: of the chosen tokens 80% [MASK], 10% a random token, 10% unchanged
        candidates = mask.bool() & ~torch.isin(ids, self.special_ids.to(ids.device))
        chosen = (torch.rand(ids.shape, device=ids.device) < self.mlm_probability) & candidates
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        r = torch.rand(ids.shape, device=ids.device)
        vocab = self.model.text_transformer.get_input_embeddings().weight.shape[0]
        masked = torch.where(chosen & (r < 0.8), torch.full_like(ids, int(self.mask_token_id)), ids)
        random_ids = torch.randint(0, vocab, ids.shape, device=ids.device)
        masked = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, masked)
        return masked, labels

    def forward(self, image: torch.Tensor, text_input_ids: torch.Tensor,
                text_attention_mask: Optional[torch.Tensor] = None,
                image_view: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Features of a batch of (volume, report) pairs.

        Args:
            image: ``(B, 1, D, H, W)`` model input.
            text_input_ids: ``(B, L)`` report token ids.
            text_attention_mask: ``(B, L)``.
            image_view: ``(B, 1, D, H, W)`` second augmented view (multiview / visual SSL).
        """
        from custom_nets.losses import _world_size

        m = self.model
        if text_attention_mask is None:
            text_attention_mask = torch.ones_like(text_input_ids)
        sentences = text_input_ids.ndim == 3  # (B, S, L): text_pooling "sentence_mean"
        if sentences and self.needs & {"tokens", "mlm"}:
            raise ValueError("FILIP and MLM need one token sequence per report; with text_pooling 'sentence_mean' "
                             "reports come as sentences: turn those losses off or pool 'mean'")
        if self.trim_padding and _world_size() == 1:
            length = max(int(text_attention_mask.sum(dim=-1).max()), 1)
            text_input_ids, text_attention_mask = text_input_ids[..., :length], text_attention_mask[..., :length]
        if self.training and self.temperature_range is not None:
            with torch.no_grad():
                m.temperature.clamp_(*self.temperature_range)

        emb, tokens = self._image(image, "tokens" in self.needs)
        image_raw = m.to_visual_latent(emb)
        if sentences or "tokens" not in self.needs:
            text = m.text_embedding(text_input_ids, text_attention_mask)
        else:  # FILIP also needs the token states: encode once
            hidden = m.encode_text_tokens(text_input_ids, text_attention_mask).float()
            text = m.pool_text(hidden, text_attention_mask)
        out = {
            "image_latents": F.normalize(image_raw, dim=-1),
            "text_latents": F.normalize(m.to_text_latent(text), dim=-1),
            "logit_scale": m.temperature.exp(),
        }
        if "tokens" in self.needs:
            out["image_tokens"] = F.normalize(self.heads["image_tokens"](tokens), dim=-1)
            out["text_tokens"] = F.normalize(m.to_text_latent(hidden), dim=-1)
            out["text_token_mask"] = text_attention_mask
        if "view" in self.needs:
            if image_view is None:
                raise ValueError("the multiview / visual-SSL losses need a second view: add 'image_view' to the "
                                 "batch (workflows.training.view_transforms) and to prepare_batch")
            view_raw = m.to_visual_latent(m.image_embedding(image_view))
            out["image_latents_view"] = F.normalize(view_raw, dim=-1)
            if "visual_ssl" in self.needs:
                z1, p1 = self.heads["visual_ssl"](image_raw)
                z2, p2 = self.heads["visual_ssl"](view_raw)
                out.update(ssl_z1=z1, ssl_z2=z2)
                if p1 is not None:
                    out.update(ssl_p1=p1, ssl_p2=p2)
        if "mlm" in self.needs:
            masked, labels = self._mask_tokens(text_input_ids, text_attention_mask)
            mlm_hidden = m.encode_text_tokens(masked, text_attention_mask).float()
            out["mlm_logits"] = self.heads["mlm"](mlm_hidden)
            out["mlm_labels"] = labels
        return out


class ZeroShotValidationNetwork(nn.Module):
    """Evaluator network: zero-shot probabilities plus image and report latents in one forward.

    ``forward(image, text_input_ids=None, text_attention_mask=None)`` returns ``{"probs": (B, C),
    "image_latents": (B, D)[, "text_latents": (B, D), "report_probs": (B, C)]}``; each volume is encoded once.

    ``report_probs`` scores each volume's own report latent against the prompt pairs, as if the report were
    the image: the zero-shot AUROC a perfectly aligned image encoder would reach with this text encoder and
    these prompts. It tells a text-side failure (prompts that do not separate the reports) from an
    image-side one.

    Args:
        zero_shot: a :class:`~custom_nets.ZeroShotClassifier` on the model being trained.
    """

    def __init__(self, zero_shot: nn.Module):
        super().__init__()
        self.zero_shot = zero_shot

    def forward(self, image: torch.Tensor, text_input_ids: Optional[torch.Tensor] = None,
                text_attention_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        model = self.zero_shot.model
        image_latents = model.encode_image(image)
        out = {"probs": self.zero_shot.probabilities(image_latents), "image_latents": image_latents}
        if text_input_ids is not None:
            out["text_latents"] = model.encode_text(text_input_ids, text_attention_mask)
            out["report_probs"] = self.zero_shot.probabilities(out["text_latents"])
        return out


def probs_and_labels(output: Any, key: str = "probs") -> tuple[list, list]:
    """``output_transform`` for :class:`~workflows.handlers.ClassificationEvaluationHandler` on the output of
    :class:`ZeroShotValidationNetwork` (decollated list of per-sample dicts, or one batch dict).

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


# ================================================================================================ state files
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a SIGKILL at any moment
    leaves either the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


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
            log = json.loads(log_path.read_text()) if log_path.exists() else []
            log.append({"checkpoint": path.name, "iteration": int(engine.state.iteration),
                        "epoch": int(engine.state.epoch), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            tmp = log_path.with_name(".resume_log.json.tmp")
            tmp.write_text(json.dumps(log, indent=1))
            os.replace(tmp, log_path)


# ================================================================================================ model outputs
def _save_model(model: nn.Module, path: Path) -> None:
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
        return json.loads(self.state_path.read_text(encoding="utf-8"))

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
        _save_model(self.model, self.save_path)
        epoch = int(engine.state.epoch)
        if self.eval_dir is not None and self.best_dir is not None and self.eval_dir.is_dir():
            tmp = self.best_dir.with_name(f".{self.best_dir.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.eval_dir, tmp)
            shutil.rmtree(self.best_dir, ignore_errors=True)
            os.replace(tmp, self.best_dir)
        record = {"epoch": epoch, "metric": self.metric_name, "value": float(value), "path": self.save_path.name}
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(tmp, self.state_path)
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
        _save_model(self.model, self.final_path)
        if self.best_path is not None and not self.best_path.exists():
            shutil.copyfile(self.final_path, self.best_path)
            engine.logger.info(f"no validated best model: {self.best_path} holds the final weights")


# ================================================================================================ curves
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
            from .plots import plot_learning_curve

            plot_learning_curve(self.metrics_file, self.path, keys=self.keys, title=self.title)
        except ImportError as err:
            engine.logger.warning(f"learning curve not drawn ({err})")


# ================================================================================================ helpers
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


def param_groups(network: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only; biases, norms, embeddings' 1-D parameters and the
    temperature are not decayed (decaying the temperature pulls the logit scale towards 1). Frozen parameters
    are left out.

    Args:
        network: the trained module.
        weight_decay: decay of the matrix group.
    """
    decay, no_decay = [], []
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("temperature") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def make_dataset(data: Sequence[Mapping[str, Any]], transform: Callable, cache: str = "none",
                 cache_dir: Optional[str | os.PathLike] = None, num_workers: int = 0, cache_rate: float = 1.0,
                 item_bytes: Optional[int] = None, max_memory_gb: float = 4.0):
    """A MONAI dataset with the chosen cache.

    Args:
        data: datalist items.
        transform: the preprocessing ``Compose``.
        cache: ``"none"`` (read every epoch), ``"memory"`` (``CacheDataset``), ``"disk"``
            (``PersistentDataset`` in ``cache_dir``: survives restarts; delete it when the transforms change) or
            ``"auto"``: memory when ``len(data) * item_bytes`` fits in ``max_memory_gb``, else none.
        cache_dir: folder of the persistent cache.
        num_workers: workers that fill a memory cache.
        cache_rate: fraction cached in memory.
        item_bytes: memory of one cached item (the model-input volume), for ``"auto"``.
        max_memory_gb: memory budget of ``"auto"``.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset

    if hasattr(transform, "flatten"):
        transform = transform.flatten()  # a nested Compose counts as random: flatten so the cache covers the loading
    if cache == "auto":
        if item_bytes is None:
            raise ValueError("cache='auto' needs item_bytes")
        cache = "memory" if len(data) * item_bytes <= max_memory_gb * 2**30 else "none"
    if cache == "none":
        return Dataset(data, transform)
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers or None, progress=False)
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache='disk' needs cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    raise ValueError(f"cache must be 'none', 'memory', 'disk' or 'auto', got {cache!r}")


def view_transforms(enabled: bool = True, source: str = "image", key: str = "image_view", prob: float = 1.0,
                    rotate_deg: float = 5.0, translate_vox: float = 3.0, scale: float = 0.05,
                    intensity_shift: float = 0.03, intensity_scale: float = 0.05, noise_std: float = 0.01):
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
    """
    import math

    from monai.transforms import Compose, CopyItemsd, RandAffined, RandGaussianNoised, RandScaleIntensityd, RandShiftIntensityd

    if not enabled:
        return Compose([])
    r = math.radians(rotate_deg)
    ts = [] if key == source else [CopyItemsd(keys=source, names=key)]
    ts += [
        RandAffined(keys=key, prob=prob, rotate_range=(r, r, r), translate_range=(translate_vox,) * 3,
                    scale_range=(scale,) * 3, padding_mode="border", mode="bilinear"),
        RandShiftIntensityd(keys=key, offsets=intensity_shift, prob=1.0),
        RandScaleIntensityd(keys=key, factors=intensity_scale, prob=1.0),
        RandGaussianNoised(keys=key, std=noise_std, prob=1.0),
    ]
    return Compose(ts)
