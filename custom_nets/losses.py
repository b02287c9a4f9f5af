"""Contrastive losses for CT-CLIP training, called by MONAI engines as ``loss(pred, target)``.

``pred`` is what :meth:`custom_nets.CTCLIP.forward` returns: the ``(B_image, B_text)`` similarity logits
already scaled by ``exp(temperature)``, with matching pairs on the diagonal. ``target`` is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather
from torch import nn

from .multilevel_alignment import PatchSegmentationLoss, RegionSentenceLoss, sentence_contrast
from .patch_ib import SELECTIONS, SPARSE_MODES, consistency_loss, keep_count, sparsity_loss

__all__ = ["clip_loss", "ClipLoss", "gather_with_grad", "ContrastiveTerm", "CloobLoss", "FilipLoss", "filip_similarity",
           "MultiviewLoss", "MaskedLanguageModelLoss", "SimSiamLoss", "SimCLRLoss", "MLMHead", "VisualSSLHead",
           "LocalAlignmentLoss", "SparsityLoss", "ConsistencyLoss", "PretrainingLoss"]


def _decoupled_ce(logits: torch.Tensor) -> torch.Tensor:
    # decoupled contrastive learning (Yeh et al. 2022): the positive is left out of the denominator
    pos = logits.diagonal()
    eye = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    neg = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
    return (neg - pos).mean()


def clip_loss(logits: torch.Tensor, decoupled: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE over a square logits matrix (pairs on the diagonal).

    Args:
        logits: ``(B, B)`` scaled similarities (rows: images, columns: texts), or ``(B, 2B)`` ``[main | extra]``
            from a model with ``extra_latent_projection`` (text-to-image from main, image-to-text from extra).
        decoupled: use the decoupled contrastive loss (positive removed from the denominator).
    """
    b = logits.shape[0]
    if logits.ndim != 2 or logits.shape[1] not in (b, 2 * b):
        raise ValueError(f"clip_loss expects (B, B) or (B, 2B) logits with pairs on the diagonal, got "
                         f"{tuple(logits.shape)}")
    main = logits[:, :b]
    image_to_text = logits[:, b:] if logits.shape[1] == 2 * b else main
    if decoupled:
        return (_decoupled_ce(image_to_text) + _decoupled_ce(main.t())) / 2
    labels = torch.arange(b, device=logits.device)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(main.t(), labels)) / 2


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) loss on the model's logits; ignores ``target``.

    Args:
        decoupled: decoupled contrastive loss (DCL): the positive pair is removed from each denominator,
            which removes the negative-positive coupling that hurts small batches (off by default).

    ``pred`` may also be the dict of :class:`custom_nets.pretraining.PretrainingNetwork` (``image_latents``,
    ``text_latents``, ``logit_scale``): the latents are then gathered over DDP ranks with gradient before the
    similarity is formed, so every rank contrasts against the global batch.
    """

    def __init__(self, decoupled: bool = False):
        super().__init__()
        self.decoupled = decoupled

    def forward(self, pred: Any, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(pred, Mapping):
            return ContrastiveTerm(decoupled=self.decoupled)(pred)
        return clip_loss(pred, decoupled=self.decoupled)


# ------------------------------------------------------------------------------------------------ distributed
def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over all DDP ranks (rank order) keeping the autograd graph.

    ``torch.distributed.nn.functional.all_gather`` sums the incoming gradients over ranks in backward; with every
    rank computing the same global loss and DDP averaging parameter gradients, the result is exactly the gradient
    of the global-batch loss. Single process: returns ``x`` unchanged.
    """
    if _world_size() == 1:
        return x
    return torch.cat(all_gather(x.contiguous()), dim=0)


def _scale(pred: Mapping[str, Any]) -> torch.Tensor:
    if "logit_scale" not in pred:
        raise KeyError("pretraining output has no 'logit_scale' (exp(temperature) of the CLIP model)")
    return pred["logit_scale"]


def _symmetric_ce(logits: torch.Tensor, decoupled: bool = False) -> torch.Tensor:
    return clip_loss(logits, decoupled=decoupled)


# ------------------------------------------------------------------------------------------------ loss terms
class ContrastiveTerm(nn.Module):
    """Symmetric InfoNCE on (global) image and report latents: ``pred`` keys ``image_latents``, ``text_latents``,
    ``logit_scale``. Latents are gathered over DDP ranks with gradient (global negatives).

    Args:
        decoupled: decoupled contrastive loss (positive removed from the denominators).
        image_key: which image latents to contrast with the reports (``image_latents_view`` for multiview).
    """

    def __init__(self, decoupled: bool = False, image_key: str = "image_latents"):
        super().__init__()
        self.decoupled, self.image_key = decoupled, image_key

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        img = gather_with_grad(pred[self.image_key])
        txt = gather_with_grad(pred["text_latents"])
        return _symmetric_ce(img @ txt.t() * _scale(pred), self.decoupled)


def _hopfield(state: torch.Tensor, stored: torch.Tensor, beta: float) -> torch.Tensor:
    # one update of a modern Hopfield network: the state retrieves a softmax-weighted mix of stored patterns
    return F.normalize(torch.softmax(beta * state @ stored.t(), dim=-1) @ stored, dim=-1)


def _info_loob(x: torch.Tensor, y: torch.Tensor, inv_tau: float) -> torch.Tensor:
    # InfoLOOB: the positive pair is left out of the denominator (leave-one-out bound)
    logits = x @ y.t() * inv_tau
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    pos = logits.diagonal()
    neg = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
    return (neg - pos).mean() / inv_tau


class CloobLoss(nn.Module):
    """CLOOB (Fürst et al. 2022): InfoLOOB on Hopfield-retrieved embeddings, which decouples the positive from
    the negatives and counters the saturation of InfoNCE with small batches. ``pred`` keys: ``image_latents``,
    ``text_latents`` (normalised), gathered over ranks.

    Args:
        inv_tau: fixed inverse temperature of InfoLOOB (paper: 30).
        hopfield_scale: inverse temperature beta of the Hopfield retrieval (paper: 14.3).
    """

    def __init__(self, inv_tau: float = 30.0, hopfield_scale: float = 14.3):
        super().__init__()
        self.inv_tau, self.beta = float(inv_tau), float(hopfield_scale)

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        x = gather_with_grad(pred["image_latents"])
        y = gather_with_grad(pred["text_latents"])
        u_xx, u_yx = _hopfield(x, x, self.beta), _hopfield(x, y, self.beta)  # image states: from images, texts
        u_yy, u_xy = _hopfield(y, y, self.beta), _hopfield(y, x, self.beta)  # text states: from texts, images
        return (_info_loob(u_xx, u_xy, self.inv_tau) + _info_loob(u_yy, u_yx, self.inv_tau)) / 2


def filip_similarity(image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                     text_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP late-interaction similarities between every image and every report.

    Args:
        image_tokens: ``(B_i, N, D)`` normalised image-token embeddings.
        text_tokens: ``(B_t, L, D)`` normalised text-token embeddings.
        text_mask: ``(B_t, L)``, 1 for real tokens (padding never matches).

    Returns:
        ``(image_to_text, text_to_image)``, both ``(B_i, B_t)``: the mean over one side's tokens of the max
        similarity to the other side's tokens.
    """
    sim = torch.einsum("ind,tld->itnl", image_tokens, text_tokens)  # (B_i, B_t, N, L)
    if text_mask is None:
        text_mask = torch.ones(text_tokens.shape[:2], device=text_tokens.device)
    valid = text_mask.to(torch.bool)[None, :, None, :]  # (1, B_t, 1, L)
    i2t = sim.masked_fill(~valid, float("-inf")).amax(dim=3).mean(dim=2)
    t2i_tok = sim.amax(dim=2)  # (B_i, B_t, L): best image token for each text token
    m = valid[:, :, 0, :].to(sim.dtype)
    t2i = (t2i_tok * m).sum(dim=2) / m.sum(dim=2).clamp(min=1)
    return i2t, t2i


class FilipLoss(nn.Module):
    """FILIP-style token-level contrastive loss (Yao et al. 2022): image-token and report-token embeddings are
    matched by max similarity, averaged, and used as logits of a symmetric InfoNCE. ``pred`` keys:
    ``image_tokens`` ``(B, N, D)``, ``text_tokens`` ``(B, L, D)``, ``text_token_mask``, ``logit_scale``."""

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        img = gather_with_grad(pred["image_tokens"])
        txt = gather_with_grad(pred["text_tokens"])
        mask = pred.get("text_token_mask")
        mask = gather_with_grad(mask) if mask is not None else None
        i2t, t2i = filip_similarity(img, txt, mask)
        scale = _scale(pred)
        labels = torch.arange(img.shape[0], device=img.device)
        return (F.cross_entropy(i2t * scale, labels) + F.cross_entropy(t2i.t() * scale, labels)) / 2


class MultiviewLoss(nn.Module):
    """Multiview supervision (DeCLIP-style): a second, anatomy-preserving augmented view of each volume must
    also retrieve its report, and the two views must retrieve each other. ``pred`` keys:
    ``image_latents_view``, ``image_latents``, ``text_latents``, ``logit_scale``.

    Args:
        view_to_view: weight of the view-to-view contrastive part (0: report supervision only).
    """

    def __init__(self, view_to_view: float = 0.5):
        super().__init__()
        self.view_to_view = float(view_to_view)
        self.report = ContrastiveTerm(image_key="image_latents_view")

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        loss = self.report(pred)
        if self.view_to_view:
            a = gather_with_grad(pred["image_latents"])
            b = gather_with_grad(pred["image_latents_view"])
            loss = loss + self.view_to_view * _symmetric_ce(a @ b.t() * _scale(pred))
        return loss


class MaskedLanguageModelLoss(nn.Module):
    """Masked-language-model text self-supervision: cross-entropy of the masked report tokens. ``pred`` keys:
    ``mlm_logits`` ``(B, L, V)``, ``mlm_labels`` ``(B, L)`` with ``-100`` where no token was masked."""

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        logits, labels = pred["mlm_logits"], pred["mlm_labels"]
        if not bool((labels != -100).any()):
            return logits.sum() * 0.0  # nothing masked in this batch: zero, but keep the graph
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


class SimSiamLoss(nn.Module):
    """SimSiam (Chen & He 2021) on two views of each volume: negative cosine of each view's prediction against
    the other view's stop-gradient projection. ``pred`` keys: ``ssl_z1``, ``ssl_z2`` (projections),
    ``ssl_p1``, ``ssl_p2`` (predictions)."""

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        def d(p, z):
            return -F.cosine_similarity(p, z.detach(), dim=-1).mean()

        return (d(pred["ssl_p1"], pred["ssl_z2"]) + d(pred["ssl_p2"], pred["ssl_z1"])) / 2


class SimCLRLoss(nn.Module):
    """SimCLR NT-Xent (Chen et al. 2020) between the projections of two views (gathered over ranks): each view's
    positive is the other view of the same volume, every other view in the global batch is a negative.
    ``pred`` keys: ``ssl_z1``, ``ssl_z2``.

    Args:
        temperature: softmax temperature (paper: 0.1 to 0.5).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        z = F.normalize(torch.cat([gather_with_grad(pred["ssl_z1"]), gather_with_grad(pred["ssl_z2"])]), dim=-1)
        n = z.shape[0] // 2
        logits = (z @ z.t() / self.temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device),
                                                             float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, target)


class LocalAlignmentLoss(nn.Module):
    """Patch-IB ``L_local``: symmetric InfoNCE over the ``(B, B)`` local scores of
    :class:`~custom_nets.patch_ib.LocalAlignmentHead` (each report's token-wise patch summaries against its own
    volume, contrasted with the batch's other volumes and reports). ``pred`` keys: ``local_scores``,
    ``logit_scale``. Scores are formed per rank (the cross-attention of every volume with every report is
    the memory cost); under DDP the negatives are the rank's own batch."""

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        return _symmetric_ce(pred["local_scores"] * _scale(pred))


class SparsityLoss(nn.Module):
    """Patch-IB ``L_sparse`` on the salience mask (``pred["salience"]`` ``(B, N)``), see
    :func:`custom_nets.patch_ib.sparsity_loss`.

    Args:
        mode: ``"keep_ratio"`` (each volume's mean mask towards ``keep_ratio``) or ``"l1"`` (the mean mask).
        keep_ratio: the target share of kept tokens.
    """

    def __init__(self, mode: str = "keep_ratio", keep_ratio: float = 0.25):
        super().__init__()
        if mode not in SPARSE_MODES:
            raise ValueError(f"sparse_mode must be one of {SPARSE_MODES}, got {mode!r}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.mode, self.keep_ratio = mode, float(keep_ratio)

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        return sparsity_loss(pred["salience"], self.mode, self.keep_ratio)


class ConsistencyLoss(nn.Module):
    """Patch-IB ``L_cons``: the masked image latent keeps the unmasked one's distribution over the batch's reports
    (:func:`custom_nets.patch_ib.consistency_loss`). ``pred`` keys: ``image_latents``, ``masked_image_latents``,
    ``text_latents``, ``logit_scale``."""

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        return consistency_loss(pred["image_latents"], pred["masked_image_latents"], pred["text_latents"],
                                _scale(pred))


class RegionAlignmentLoss(nn.Module):
    """#23 region level: each region embedding of a volume against the mean of its report's sentences that mention
    that region (:class:`~custom_nets.multilevel_alignment.RegionSentenceLoss`); a region absent from the mask or
    without a sentence leaves the loss. ``pred`` keys: ``region_latents``, ``region_mask``, ``sentence_latents``,
    ``sentence_mask``, ``sentence_regions``, ``logit_scale``."""

    def __init__(self):
        super().__init__()
        self.loss = RegionSentenceLoss()

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        return self.loss(pred["region_latents"], pred["region_mask"], pred["sentence_latents"], pred["sentence_mask"],
                         pred["sentence_regions"], _scale(pred))


class SentenceAlignmentLoss(nn.Module):
    """#23 sentence level: each report sentence's attention pooling over its volume's patch tokens against the
    batch's sentences (:func:`~custom_nets.multilevel_alignment.sentence_contrast`; the pooling is the network's
    ``sentence`` head). ``pred`` keys: ``sentence_summaries``, ``sentence_latents``, ``sentence_mask``,
    ``logit_scale``."""

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        return sentence_contrast(pred["sentence_summaries"], pred["sentence_latents"], pred["sentence_mask"],
                                 _scale(pred))


class SegmentationLoss(nn.Module):
    """#23 auxiliary loss: each patch's predicted region against its region in the mask
    (:class:`~custom_nets.multilevel_alignment.PatchSegmentationLoss`), over the volumes that have a mask.
    ``pred`` keys: ``segmentation_logits``, ``patch_regions``, ``segmented``.

    Args:
        target: ``"majority"`` or ``"soft"`` (see :class:`~custom_nets.multilevel_alignment.PatchSegmentationLoss`).
    """

    def __init__(self, target: str = "majority"):
        super().__init__()
        self.loss = PatchSegmentationLoss(target)

    def forward(self, pred: Mapping[str, Any]) -> torch.Tensor:
        return self.loss(pred["segmentation_logits"], pred["patch_regions"], pred["segmented"])


# ------------------------------------------------------------------------------------------------ heads
class MLMHead(nn.Module):
    """BERT-style MLM head: dense + GELU + LayerNorm, decoder tied to the text encoder's word embeddings (so a
    frozen embedding table costs no new vocabulary-sized weights).

    Args:
        hidden: text-encoder width.
        word_embeddings: the encoder's input embedding module (``get_input_embeddings()``).
    """

    def __init__(self, hidden: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        self.bias = nn.Parameter(torch.zeros(word_embeddings.weight.shape[0]))
        self._embeddings = [word_embeddings]  # a list: not registered twice (it belongs to the text encoder)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(hidden) @ self._embeddings[0].weight.t() + self.bias


def _mlp(dims: Sequence[int], last_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 2 or last_norm:
            layers.append(nn.BatchNorm1d(b, affine=i < len(dims) - 2))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class VisualSSLHead(nn.Module):
    """Projector (and, for SimSiam, predictor) on the pooled image latent (before normalisation).

    Args:
        dim_in: width of the image latent.
        dim: projection width.
        method: ``"simsiam"`` (projector + bottleneck predictor) or ``"simclr"`` (projector only).
    """

    def __init__(self, dim_in: int, dim: int = 256, method: str = "simsiam"):
        super().__init__()
        if method not in ("simsiam", "simclr"):
            raise ValueError(f"visual SSL method must be 'simsiam' or 'simclr', got {method!r}")
        self.method = method
        self.projector = _mlp([dim_in, dim, dim], last_norm=method == "simsiam")
        self.predictor = _mlp([dim, max(dim // 4, 8), dim]) if method == "simsiam" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        z = self.projector(x)
        return z, (self.predictor(z) if self.predictor is not None else None)


# ------------------------------------------------------------------------------------------------ composite
class PretrainingLoss(nn.Module):
    """Weighted sum of the CT-CLIP contrastive loss and the optional terms of the embedding analysis.

    Called by the trainer as ``loss(pred, target)``; ``pred`` is the dict of
    :class:`custom_nets.pretraining.PretrainingNetwork` (a plain ``(B, B)`` logits tensor is also accepted and
    gives the CLIP term only). Every optional term is off (weight 0) by default. The last values of every term
    are kept in :attr:`last_terms` for logging.

    Args:
        clip_weight: weight of the symmetric InfoNCE on global latents.
        decoupled: decoupled contrastive variant of the CLIP term.
        cloob_weight: CLOOB (Hopfield retrieval + InfoLOOB).
        cloob_inv_tau: CLOOB's fixed inverse temperature.
        cloob_hopfield_scale: CLOOB's Hopfield beta.
        filip_weight: FILIP token-level matching.
        multiview_weight: second augmented view against the reports (and the first view).
        multiview_view_to_view: weight of the view-to-view part inside the multiview term.
        mlm_weight: masked-language-model loss on the reports.
        mlm_probability: fraction of report tokens masked.
        visual_ssl: ``"simsiam"`` or ``"simclr"``.
        visual_ssl_weight: weight of the visual self-supervision on two views.
        visual_ssl_dim: projection width of the visual SSL head.
        simclr_temperature: NT-Xent temperature.
        local_weight: Patch-IB local alignment of report tokens to image patches (``L_local``).
        sparse_weight: Patch-IB ``L_sparse`` on the salience mask.
        cons_weight: Patch-IB ``L_cons``: masked against unmasked image latent over the batch's reports.
        sparse_mode: ``"keep_ratio"`` (the mean mask towards ``keep_ratio``) or ``"l1"``.
        keep_ratio: the target mean of the salience mask.
        token_selection: ``"none"``, ``"soft_topk"`` or ``"hard_topk"`` (needs the salience mask: ``sparse_weight``
            or ``cons_weight`` > 0).
        topk_ratio: K of the top-K selection as a share of the encoder's tokens.
        topk_temperature: softness of ``"soft_topk"``.
        region_weight: #23 region level: region embeddings against the report sentences naming their region.
        sentence_weight: #23 sentence level: patch tokens, attention-pooled by each sentence, against the sentences.
        segmentation_weight: #23 auxiliary per-patch region cross-entropy against the anatomical mask.
        segmentation_target: ``"majority"`` or ``"soft"`` patch targets of the segmentation term.

    The Patch-IB settings (``token_selection``, ``topk_*``) shape the network's heads: the
    :class:`~custom_nets.pretraining.PretrainingNetwork` reads them from this object (:meth:`patch_ib_settings`).
    """

    def __init__(self, clip_weight: float = 1.0, decoupled: bool = False, cloob_weight: float = 0.0,
                 cloob_inv_tau: float = 30.0, cloob_hopfield_scale: float = 14.3, filip_weight: float = 0.0,
                 multiview_weight: float = 0.0, multiview_view_to_view: float = 0.5, mlm_weight: float = 0.0,
                 mlm_probability: float = 0.15, visual_ssl: str = "simsiam", visual_ssl_weight: float = 0.0,
                 visual_ssl_dim: int = 256, simclr_temperature: float = 0.1, local_weight: float = 0.0,
                 sparse_weight: float = 0.0, cons_weight: float = 0.0, sparse_mode: str = "keep_ratio",
                 keep_ratio: float = 0.25, token_selection: str = "none", topk_ratio: float = 0.5,
                 topk_temperature: float = 0.1, region_weight: float = 0.0, sentence_weight: float = 0.0,
                 segmentation_weight: float = 0.0, segmentation_target: str = "majority"):
        super().__init__()
        if visual_ssl not in ("simsiam", "simclr"):
            raise ValueError(f"visual_ssl must be 'simsiam' or 'simclr', got {visual_ssl!r}")
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        self.weights = {"clip": float(clip_weight), "cloob": float(cloob_weight), "filip": float(filip_weight),
                        "multiview": float(multiview_weight), "mlm": float(mlm_weight),
                        "visual_ssl": float(visual_ssl_weight), "local": float(local_weight),
                        "sparse": float(sparse_weight), "cons": float(cons_weight), "region": float(region_weight),
                        "sentence": float(sentence_weight), "segmentation": float(segmentation_weight)}
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"loss weights must be >= 0, got {self.weights}")
        if not any(self.weights.values()):
            raise ValueError("every loss weight is 0: nothing to train")
        if token_selection not in SELECTIONS:
            raise ValueError(f"token_selection must be one of {SELECTIONS}, got {token_selection!r}")
        if token_selection != "none" and not (self.weights["sparse"] or self.weights["cons"]):
            raise ValueError(f"token_selection {token_selection!r} selects by the salience mask, which only exists "
                             f"with Patch-IB on: set sparse_weight or cons_weight > 0")
        keep_count(1, topk_ratio)  # validates the ratio where the loss is configured
        self.token_selection, self.topk_ratio = token_selection, float(topk_ratio)
        self.topk_temperature = float(topk_temperature)
        self.visual_ssl, self.visual_ssl_dim = visual_ssl, int(visual_ssl_dim)
        self.mlm_probability = float(mlm_probability)
        self.terms = nn.ModuleDict({
            "clip": ContrastiveTerm(decoupled=decoupled),
            "cloob": CloobLoss(cloob_inv_tau, cloob_hopfield_scale),
            "filip": FilipLoss(),
            "multiview": MultiviewLoss(multiview_view_to_view),
            "mlm": MaskedLanguageModelLoss(),
            "visual_ssl": SimSiamLoss() if visual_ssl == "simsiam" else SimCLRLoss(simclr_temperature),
            "local": LocalAlignmentLoss(),
            "sparse": SparsityLoss(sparse_mode, keep_ratio),
            "cons": ConsistencyLoss(),
            "region": RegionAlignmentLoss(),
            "sentence": SentenceAlignmentLoss(),
            "segmentation": SegmentationLoss(segmentation_target),
        })
        self.last_terms: dict[str, float] = {}

    def active(self) -> list[str]:
        """Names of the terms with a non-zero weight."""
        return [k for k, w in self.weights.items() if w]

    def needs(self) -> set[str]:
        """Network outputs the active terms need beyond global latents: ``tokens`` (FILIP), ``view`` (multiview,
        visual SSL), ``mlm``, ``visual_ssl``, ``salience`` (Patch-IB mask: ``L_sparse``, ``L_cons``), ``local``
        (Patch-IB local alignment), ``regions``, ``sentences``, ``segmentation`` (the #23 levels)."""
        active = set(self.active())
        out = set()
        if "filip" in active:
            out.add("tokens")
        if active & {"multiview", "visual_ssl"}:
            out.add("view")
        if "mlm" in active:
            out.add("mlm")
        if "visual_ssl" in active:
            out.add("visual_ssl")
        if active & {"sparse", "cons"}:
            out.add("salience")
        if "local" in active:
            out.add("local")
        out |= {{"region": "regions", "sentence": "sentences", "segmentation": "segmentation"}[t]
                for t in active & {"region", "sentence", "segmentation"}}
        return out

    def patch_ib_settings(self) -> dict[str, Any]:
        """The head settings of Patch-IB: ``{"selection", "topk_ratio", "topk_temperature", "init_keep"}``; the mask
        starts at its keep-ratio target, so that L_sparse need not first drag it there from 0.5."""
        sparse = self.terms["sparse"]
        init_keep = min(sparse.keep_ratio, 0.99) if sparse.mode == "keep_ratio" else 0.5  # logit(1) is infinite
        return {"selection": self.token_selection, "topk_ratio": self.topk_ratio,
                "topk_temperature": self.topk_temperature, "init_keep": init_keep}

    def forward(self, pred: Any, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):
            if set(self.active()) - {"clip"}:
                raise ValueError(f"loss terms {self.active()} need the dict output of PretrainingNetwork, got a tensor")
            return self.weights["clip"] * clip_loss(pred, decoupled=self.terms["clip"].decoupled)
        total = None
        terms = {}
        for name in self.active():
            value = self.terms[name](pred)
            terms[name] = float(value.detach())
            total = value * self.weights[name] if total is None else total + value * self.weights[name]
        if "kept_ratio" in pred:  # not a term: the share of tokens the salience mask keeps, logged beside them
            terms["kept_ratio"] = float(pred["kept_ratio"])
        self.last_terms = terms
        return total
