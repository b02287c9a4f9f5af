"""Classifiers on top of CT-CLIP: ClassFine (linear probe, ``CT_LiPro_v2.pt`` keys) and zero-shot."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctclip_contract import CTRATE_PATHOLOGIES, DEFAULT_TEMPLATES, PROMPT_SCORINGS, load_model_config

from .ctclip import CTCLIP
from .ctvit import param_versions
from .text_encoder import build_tokenizer

__all__ = ["HEAD_INPUTS", "ClassFineClassifier", "classfine_head_input", "ZeroShotClassifier", "ImageReportLatents"]


#: What the ClassFine head reads: the l2-normalised image latent (the reference) or the encoder's global embedding.
HEAD_INPUTS = ("latent", "embedding")
#: The state-dict key only a head on the embedding has (its batch norm's statistics).
_EMBEDDING_HEAD_KEY = "embedding_norm.running_mean"


class ClassFineClassifier(nn.Module):
    """CT-CLIP ClassFine: ``Linear(dim_latent, num_classes)`` on ``Dropout(ReLU(image_latents))``.

    Keys: ``trained_model.*`` (the whole CTCLIP, as in ``CT_LiPro_v2.pt``) and ``classifier.{weight,bias}``.

    ``head_input="embedding"`` puts the head on the image encoder's global embedding instead (``dim_image``, before
    the contrastive projection ``to_visual_latent``), standardised per feature by a ``BatchNorm1d`` without affine
    parameters (keys ``embedding_norm.*``) in place of the ReLU: ``Linear(dim_image, num_classes)`` on
    ``Dropout(BatchNorm(embedding))``. The projection was trained to match reports, not findings; on the demo the
    head on the embedding scores what a tuned linear probe scores (docs/experiments.md). Not the published layout.

    Args:
        clip_model: the :class:`~custom_nets.CTCLIP` backbone.
        num_classes: number of labels (18 CT-RATE pathologies).
        dropout: dropout before the linear head (reference: 0.3).
        freeze_backbone: no gradients into the backbone, and the backbone stays in eval mode through ``train()``
            (no dropout, no VQ codebook update; the reference's "frozen" backbone drifted in train mode).
        head_input: ``"latent"`` (the reference) or ``"embedding"``.
    """

    def __init__(self, clip_model: CTCLIP, num_classes: int = 18, dropout: float = 0.3, freeze_backbone: bool = False,
                 head_input: str = "latent"):
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {HEAD_INPUTS}, got {head_input!r}")
        self.trained_model = clip_model
        self.head_input = head_input
        self.dropout = nn.Dropout(dropout)
        if head_input == "embedding":
            self.embedding_norm = nn.BatchNorm1d(clip_model.dim_image, affine=False)
        self.classifier = nn.Linear(clip_model.dim_latent if head_input == "latent" else clip_model.dim_image,
                                    num_classes)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.trained_model.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ClassFineClassifier":
        super().train(mode)
        if self.freeze_backbone:
            self.trained_model.eval()
        return self

    def describe(self) -> str:
        """The head in one line (an exported bundle's README says which head its weights have)."""
        reads, what = (("ReLU(image latent)", "the reference head (head_input 'latent')") if self.head_input == "latent"
                       else ("BatchNorm(image embedding)", "the embedding before the latent projection standardised per "
                             "feature (head_input 'embedding'; not the CT_LiPro_v2.pt layout)"))
        return (f"ClassFine head: Linear({self.classifier.in_features}, {self.classifier.out_features}) on "
                f"Dropout({self.dropout.p})({reads}), {what}")

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """What the head reads, ``(B, dim)``: the l2-normalised image latent or the global embedding."""
        clip = self.trained_model
        return clip.encode_image(image) if self.head_input == "latent" else clip.image_embedding(image)

    def head_activation(self, features: torch.Tensor) -> torch.Tensor:
        """The head's input from :meth:`encode`'s output: ReLU (reference) or the per-feature standardisation."""
        if self.head_input == "latent":
            return F.relu(features)
        norm = self.embedding_norm
        if norm.training and features.shape[0] < 2:  # one volume has no batch statistics: use the running ones
            return F.batch_norm(features, norm.running_mean, norm.running_var, training=False, eps=norm.eps)
        return norm(features)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits from :meth:`encode`'s output."""
        return self.classifier(self.dropout(self.head_activation(features)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = "embedding" if f"{prefix}{_EMBEDDING_HEAD_KEY}" in state_dict else "latent"
        if f"{prefix}classifier.weight" in state_dict and stored != self.head_input:
            raise ValueError(f"the checkpoint's ClassFine head reads the {stored} (head_input {stored!r}), this "
                             f"network's the {self.head_input}: build it with head_input {stored!r}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` (apply a sigmoid for probabilities; train with BCE-with-logits)."""
        if self.freeze_backbone:
            with torch.no_grad():
                features = self.encode(image)
        else:
            features = self.encode(image)
        return self.head(features)


def classfine_head_input(checkpoint: str | Any) -> str:
    """The ``head_input`` of a saved ClassFine state dict (``"latent"`` when the file is absent: loading it then
    fails on its own, naming the file). Read memory-mapped, ``weights_only``: the weights are not loaded."""
    if not os.path.isfile(str(checkpoint)):
        return "latent"
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True, mmap=True)
    return "embedding" if _EMBEDDING_HEAD_KEY in state else "latent"


class ZeroShotClassifier(nn.Module):
    """Zero-shot pathology probabilities from a CLIP model: ``(B, n_classes)``, each in [0, 1].

    For every class and template pair ``(present, absent)`` the probability is the reference's pairwise
    softmax ``softmax([s_present, s_absent])[0]`` of the scaled similarities, i.e. ``sigmoid(T * e)`` with the
    evidence ``e = s_present - s_absent``, averaged over template pairs. ``scoring="decomposed"`` changes only
    the evidence: the image latent is written as a ridge-regularised least-squares combination of all classes'
    prompt directions ``d_c = t_present - t_absent``, and class ``c``'s evidence is its own part,
    ``coef_c * |d_c|^2``. With orthogonal directions (and no ridge) that is the pairwise evidence. Prompts that
    differ only in the class name share most of their direction, so the pairwise evidence of one class also
    rises with every other finding in the image; the decomposition removes that cross-talk. Each class's score
    then depends on the whole class list.
    Prompts are encoded once and cached (re-encoded automatically when the text weights change, or by
    :meth:`refresh_prompts`); each volume is encoded once instead of once per class as in the reference script.
    The result equals the reference procedure (one CTCLIP forward per pathology) in eval mode.
    ``state_dict()`` / ``load_state_dict()`` are the wrapped model's (CT-CLIP keys).

    Args:
        model: a :class:`~custom_nets.CTCLIP`.
        tokenizer: the tokenizer of the model's text encoder (:func:`custom_nets.build_tokenizer`).
        class_names: class names in output order; default: ``ctclip_contract.CTRATE_PATHOLOGIES``.
        templates: sequence of ``(present, absent)`` format strings with one ``{}``;
            default ``[("{} is present.", "{} is not present.")]`` (v2).
        max_length: tokenizer truncation length.
        pad_to_max_length: pad prompts to ``max_length`` like the reference (same result, much slower);
            default pads to the longest prompt.
        scoring: ``"pairwise"`` (the reference) or ``"decomposed"`` (see above).
        ridge: regularisation of the decomposition, relative to the mean of ``|d_c|^2`` (keeps it stable when
            two classes' prompts are nearly the same).
    """

    def __init__(self, model: CTCLIP, tokenizer, class_names: Optional[Sequence[str]] = None,
                 templates: Optional[Sequence[Sequence[str]]] = None, max_length: int = 512,
                 pad_to_max_length: bool = False, scoring: str = "pairwise", ridge: float = 0.1):
        super().__init__()
        if scoring not in PROMPT_SCORINGS:
            raise ValueError(f"zero-shot scoring must be one of {PROMPT_SCORINGS}, got {scoring!r}")
        if not ridge >= 0:
            raise ValueError(f"zero-shot ridge must be >= 0, got {ridge!r}")
        if class_names is None:
            class_names = CTRATE_PATHOLOGIES
        templates = [tuple(t) for t in (templates or DEFAULT_TEMPLATES)]
        for t in templates:
            if len(t) != 2 or any("{}" not in s for s in t):
                raise ValueError(f"zero-shot templates must be (present, absent) pairs with a '{{}}', got {t!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.class_names = list(class_names)
        self.templates = templates
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        self.scoring = scoring
        self.ridge = float(ridge)
        self._cache: Optional[tuple] = None

    # The wrapper's state dict *is* the CLIP model's (CT-CLIP keys, no "model." prefix): a bundle can load
    # models/model.pt or a published checkpoint straight into it, and MONAI Label's strict=False load into
    # network_def cannot silently miss every key.
    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_config(cls, model: CTCLIP, config: Mapping[str, Any] | str, tokenizer=None,
                    class_names: Optional[Sequence[str]] = None, templates: Optional[Sequence[Sequence[str]]] = None,
                    pad_to_max_length: bool = False) -> "ZeroShotClassifier":
        """Build with the prompts (templates, scoring, ridge) and text length of a model config (tokenizer built
        from it if not given); ``templates`` given here replace the config's."""
        cfg = load_model_config(config)
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
        return cls(model, tokenizer, class_names, templates or cfg.prompts.templates, cfg.text.max_length,
                   pad_to_max_length, scoring=cfg.prompts.scoring, ridge=cfg.prompts.ridge)

    def prompts(self) -> list[str]:
        """All prompts, ordered (template pair, present/absent, class)."""
        return [t.format(name) for pair in self.templates for t in pair for name in self.class_names]

    def refresh_prompts(self) -> None:
        """Forget the cached prompt latents (they are also refreshed automatically when text weights change)."""
        self._cache = None

    def _text_modules(self):
        return (self.model.text_transformer, self.model.to_text_latent)

    def prompt_latents(self) -> torch.Tensor:
        """Prompt latents ``(n_templates, 2, n_classes, dim_latent)``."""
        device = self.model.temperature.device
        key = (str(device),) + tuple(param_versions(m) for m in self._text_modules())
        trainable = torch.is_grad_enabled() and any(p.requires_grad for m in self._text_modules()
                                                    for p in m.parameters())
        if self._cache is not None and self._cache[0] == key and not trainable:
            return self._cache[1]
        tokens = self.tokenizer(self.prompts(), padding="max_length" if self.pad_to_max_length else "longest",
                                truncation=True, max_length=self.max_length, return_tensors="pt")
        latents = self.model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        latents = latents.reshape(len(self.templates), 2, len(self.class_names), -1)
        if not trainable:
            self._cache = (key, latents.detach())
        return latents

    def forward(self, image: torch.Tensor, seg: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Probabilities ``(B, n_classes)`` for images ``(B, 1, D, H, W)`` (with their anatomical masks ``seg`` for
        an encoder that reads them)."""
        return self.probabilities(self.model.encode_image(image, seg=seg))

    def evidence(self, image_latents: torch.Tensor) -> torch.Tensor:
        """Evidence per template pair ``(n_templates, B, n_classes)`` from image latents ``(B, dim_latent)``:
        ``s_present - s_absent`` (pairwise), or the class's own part of the latent (decomposed)."""
        directions = self.prompt_latents()
        directions = directions[:, 0] - directions[:, 1]  # (templates, classes, dim)
        if self.scoring == "decomposed":
            d = directions.double()  # a classes x classes solve: float64 costs nothing
            gram = d @ d.transpose(1, 2)
            sq_norms = gram.diagonal(dim1=1, dim2=2)
            eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            # rows of `readout` map a latent to its coefficients; scaled by |d_c|^2 to the pairwise evidence's units
            readout = torch.linalg.solve(gram + self.ridge * sq_norms.mean(-1)[:, None, None] * eye, d)
            directions = readout * sq_norms[..., None]
        return torch.einsum("bd,tcd->tbc", image_latents, directions.to(image_latents.dtype))

    def probabilities(self, image_latents: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(B, n_classes)`` from precomputed image latents ``(B, dim_latent)``."""
        return torch.sigmoid(self.evidence(image_latents) * self.model.temperature.exp()).mean(dim=0)


class ImageReportLatents(nn.Module):
    """Image and report latents of a CT-CLIP in one forward, for retrieval evaluators.

    ``forward(image, input_ids, attention_mask) -> {"image_latents": (B, D), "text_latents": (B, D)}``;
    state-dict keys ``model.*`` like :class:`~custom_nets.ZeroShotClassifier`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return {"image_latents": self.model.encode_image(image),
                "text_latents": self.model.encode_text(input_ids, attention_mask)}
