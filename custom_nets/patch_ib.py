"""Patch-IB for CT: a salience mask over image tokens (information bottleneck) and local text-token-to-patch
alignment, as heads and loss terms for any image encoder that gives tokens (CTViT, slice fusion, ...).

The pieces (the loss terms are wired into :class:`~custom_nets.losses.PretrainingLoss`, the heads into
:class:`~custom_nets.pretraining.PretrainingNetwork`):

* **salience mask**: ``z = sigmoid(w . v + b)`` for every image token ``v`` (for CTViT the ``t x h x w`` tokens
  before depth pooling). The *masked global embedding* is the salience-weighted mean of the tokens, projected into
  the latent space by its own linear map (a token is ``token_dim`` wide, the encoder's global embedding is not: for
  CTViT it is a flattened ``h x w`` grid).
* **token selection** (``selection``): ``"none"`` (the mask alone), ``"soft_topk"`` (a temperature-controlled
  relaxation of top-K: gradients reach every token) or ``"hard_topk"`` (only the K most salient tokens enter the
  pool and the local attention; at inference that is the token drop whose time is measured).
* **local alignment**: cross-attention with the report's text tokens as queries and the image tokens as keys and
  values; each text token's patch summary is compared with the token's own embedding in the latent space, and the
  per-report mean over its content tokens is contrasted against the other reports and volumes of the batch.

The loss terms that read these outputs are :func:`sparsity_loss`, :func:`consistency_loss` and, for the local
scores, the symmetric InfoNCE of :func:`custom_nets.losses.clip_loss` (``LocalAlignmentLoss``).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SELECTIONS", "SPARSE_MODES", "STOP_WORDS", "SalienceSelection", "PatchIBHead", "LocalAlignmentHead",
           "keep_count", "soft_topk_weights", "salience_pool", "local_skip_token_ids", "flatten_sentences",
           "sparsity_loss", "consistency_loss"]

SELECTIONS = ("none", "soft_topk", "hard_topk")
SPARSE_MODES = ("keep_ratio", "l1")

#: English function words that carry no finding: excluded from local alignment (with padding, special tokens and
#: punctuation). Short on purpose: "no", "not" and "without" stay, they decide what a finding sentence means.
STOP_WORDS = frozenset("""
a an the and or of in on at to for from with by as is are was were be been being this that these those there
it its which who whom whose than then also both either each other such into onto over under within upon
has have had do does did can could may might will would shall should seen noted observed present
""".split())


def keep_count(n_tokens: int, ratio: float) -> int:
    """K of top-K: ``round(ratio * n_tokens)``, at least 1 and at most ``n_tokens``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"topk_ratio must be in (0, 1], got {ratio}")
    return max(1, min(n_tokens, int(round(ratio * n_tokens))))


def soft_topk_weights(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """A differentiable relaxation of the top-K indicator over the last axis, in (0, 1].

    ``sigmoid((logit - threshold) / temperature)`` with the threshold half-way between the K-th and the (K+1)-th
    largest logit (held fixed in the backward pass): the K largest get weights above 0.5, the rest below, and
    ``temperature -> 0`` gives the hard top-K. With ``K = N`` every weight is exactly 1.

    Args:
        logits: ``(..., N)`` salience logits.
        k: tokens to keep.
        temperature: softness (> 0).
    """
    n = logits.shape[-1]
    if k >= n:
        return torch.ones_like(logits)
    if temperature <= 0:
        raise ValueError(f"topk_temperature must be > 0, got {temperature}")
    top = logits.detach().topk(k + 1, dim=-1).values
    threshold = (top[..., k - 1] + top[..., k]).unsqueeze(-1) / 2
    return torch.sigmoid((logits - threshold) / temperature)


def salience_pool(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Salience-weighted mean ``(B, C)`` of tokens ``(B, N, C)`` with weights ``(B, N)``."""
    w = weights.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(1) / w.sum(1).clamp(min=1e-6)


@dataclass
class SalienceSelection:
    """What the salience head and the token selection give for a batch.

    Attributes:
        salience: ``(B, N)`` mask ``z`` in (0, 1), one value per token of the encoder.
        logits: ``(B, N)`` the mask's logits (``z = sigmoid(logits)``).
        weights: ``(B, M)`` pooling weights of the tokens that enter the pool and the local attention
            (``M = N``, or ``M = K`` with ``hard_topk``).
        tokens: ``(B, M, C)`` those tokens.
        index: ``(B, K)`` the kept tokens' indices with ``hard_topk``, else None.
        kept_ratio: the mean share of the tokens kept: the mean pooling gate over all N tokens (``z``, or ``z``
            times the soft top-K weight), ``K / N`` with ``hard_topk``.
    """

    salience: torch.Tensor
    logits: torch.Tensor
    weights: torch.Tensor
    tokens: torch.Tensor
    index: Optional[torch.Tensor]
    kept_ratio: torch.Tensor


class PatchIBHead(nn.Module):
    """The salience mask, the token selection and the masked global embedding.

    Args:
        token_dim: width of the encoder's tokens.
        dim_latent: width of the CLIP latent space.
        selection: ``"none"``, ``"soft_topk"`` or ``"hard_topk"``.
        topk_ratio: K as a share of the encoder's tokens (:func:`keep_count`).
        topk_temperature: softness of ``soft_topk``.
        init_keep: the mask's value at initialisation (its bias is ``logit(init_keep)``, the weights 0).
    """

    def __init__(self, token_dim: int, dim_latent: int, selection: str = "none", topk_ratio: float = 0.5,
                 topk_temperature: float = 0.1, init_keep: float = 0.5):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"token selection must be one of {SELECTIONS}, got {selection!r}")
        keep_count(1, topk_ratio)  # validates the ratio
        self.selection, self.topk_ratio, self.topk_temperature = selection, float(topk_ratio), float(topk_temperature)
        self.salience = nn.Linear(token_dim, 1)
        with torch.no_grad():
            self.salience.weight.zero_()
            self.salience.bias.fill_(math.log(init_keep / (1 - init_keep)))
        self.to_masked_latent = nn.Linear(token_dim, dim_latent, bias=False)

    def select(self, tokens: torch.Tensor, selection: Optional[str] = None) -> SalienceSelection:
        """Mask and select the tokens ``(B, N, C)``; ``selection`` overrides the configured one (e.g. the hard
        drop at inference of a model trained with the soft one)."""
        selection = self.selection if selection is None else selection
        if selection not in SELECTIONS:
            raise ValueError(f"token selection must be one of {SELECTIONS}, got {selection!r}")
        logits = self.salience(tokens).squeeze(-1)
        z = torch.sigmoid(logits)
        n = tokens.shape[1]
        k = keep_count(n, self.topk_ratio)
        if selection == "hard_topk":
            index = logits.detach().topk(k, dim=-1).indices.sort(dim=-1).values  # sorted: the spatial order stays
            kept = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            kept_ratio = torch.tensor(k / n, device=tokens.device)
            return SalienceSelection(z, logits, z.gather(1, index), kept, index, kept_ratio)
        weights = z if selection == "none" else z * soft_topk_weights(logits, k, self.topk_temperature)
        return SalienceSelection(z, logits, weights, tokens, None, weights.detach().mean())

    def masked_latent(self, selected: SalienceSelection) -> torch.Tensor:
        """The masked global embedding in the latent space, ``(B, dim_latent)``, l2-normalised."""
        return F.normalize(self.to_masked_latent(salience_pool(selected.tokens, selected.weights)), dim=-1)

    def forward(self, tokens: torch.Tensor, selection: Optional[str] = None) -> tuple[torch.Tensor, SalienceSelection]:
        """``(masked latent (B, dim_latent), selection)`` of the tokens ``(B, N, C)``."""
        selected = self.select(tokens, selection)
        return self.masked_latent(selected), selected


class LocalAlignmentHead(nn.Module):
    """Cross-attention from report tokens (queries) to image tokens (keys and values).

    For every volume ``a`` and report ``b`` of the batch, each of ``b``'s tokens gathers a *patch summary* from
    ``a``'s tokens; the pair's local score is the mean cosine between the summaries and the tokens' own embeddings,
    over ``b``'s content tokens (padding, special tokens and stop words excluded).

    Args:
        token_dim: width of the image tokens.
        dim_latent: width of the latent space (of the text-token embeddings).
    """

    def __init__(self, token_dim: int, dim_latent: int):
        super().__init__()
        self.to_query = nn.Linear(dim_latent, dim_latent, bias=False)
        self.to_key = nn.Linear(token_dim, dim_latent, bias=False)
        self.to_value = nn.Linear(token_dim, dim_latent, bias=False)
        self.scale = dim_latent ** -0.5

    def forward(self, image_tokens: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                token_weights: Optional[torch.Tensor] = None, chunk: int = 4) -> torch.Tensor:
        """Local scores ``(B_image, B_text)``.

        Args:
            image_tokens: ``(B_image, M, token_dim)``.
            words: ``(B_text, L, dim_latent)`` l2-normalised text-token embeddings (the targets and the queries).
            word_mask: ``(B_text, L)``, 1 for the tokens that take part.
            token_weights: ``(B_image, M)`` salience of the image tokens: ``log`` of it biases the attention, so a
                masked token is hard to attend to; None: all equal.
            chunk: volumes per step (bounds the ``chunk x B_text x L x M`` attention in memory).
        """
        keys, values = self.to_key(image_tokens), self.to_value(image_tokens)
        queries = self.to_query(words)
        bias = None if token_weights is None else token_weights.clamp(min=1e-6).log()
        mask = word_mask.to(words.dtype)
        count = mask.sum(-1).clamp(min=1)  # (B_text,)
        rows = []
        for start in range(0, keys.shape[0], chunk):
            k, v = keys[start:start + chunk], values[start:start + chunk]
            attn = torch.einsum("tld,ind->itln", queries, k) * self.scale  # (i, B_text, L, M)
            if bias is not None:
                attn = attn + bias[start:start + chunk, None, None, :]
            summary = torch.einsum("itln,ind->itld", attn.softmax(-1), v)
            cos = (F.normalize(summary, dim=-1) * words.unsqueeze(0)).sum(-1)  # (i, B_text, L)
            rows.append((cos * mask).sum(-1) / count)
        return torch.cat(rows, dim=0)


def local_skip_token_ids(tokenizer, stop_words: Iterable[str] = STOP_WORDS) -> list[int]:
    """Token ids that local alignment leaves out: the tokenizer's special tokens, stop words and punctuation that
    are one token each (a word the vocabulary splits is kept: its pieces carry meaning together).

    Args:
        tokenizer: a ``transformers`` tokenizer (the model's, :func:`custom_nets.build_tokenizer`).
        stop_words: the words to leave out (default :data:`STOP_WORDS`).
    """
    ids = set(int(i) for i in tokenizer.all_special_ids)
    unk = tokenizer.unk_token_id
    for word in list(stop_words) + list(string.punctuation):
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1 and pieces[0] != unk:
            ids.add(int(pieces[0]))
    return sorted(ids)


def flatten_sentences(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A report given sentence by sentence ``(B, S, L, ...)`` as one token sequence ``(B, S * L, ...)``, with the
    ids and the mask flattened the same way (padding rows and columns stay masked)."""
    b, s, length = ids.shape
    return hidden.reshape(b, s * length, *hidden.shape[3:]), ids.reshape(b, s * length), mask.reshape(b, s * length)


# ------------------------------------------------------------------------------------------------ loss terms
def sparsity_loss(salience: torch.Tensor, mode: str = "keep_ratio", keep_ratio: float = 0.25) -> torch.Tensor:
    """``L_sparse`` of a mask ``(B, N)``: ``"keep_ratio"``: the squared gap between each volume's mean mask and the
    target keep ratio, averaged over volumes; ``"l1"``: the mean mask (an L1 penalty, every token towards 0)."""
    if mode == "l1":
        return salience.mean()
    if mode != "keep_ratio":
        raise ValueError(f"sparse_mode must be one of {SPARSE_MODES}, got {mode!r}")
    return ((salience.mean(-1) - keep_ratio) ** 2).mean()


def consistency_loss(image_latents: torch.Tensor, masked_latents: torch.Tensor, text_latents: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """``L_cons``: KL divergence from the unmasked image's distribution over the batch's reports to the masked
    image's, ``KL(p_full || p_masked)`` averaged over volumes. The unmasked side and the reports are the fixed
    target (detached): the term trains the mask and the masked embedding to keep what the global one retrieves.

    Args:
        image_latents: ``(B, D)`` normalised global (unmasked) image latents.
        masked_latents: ``(B, D)`` normalised masked image latents.
        text_latents: ``(B_t, D)`` normalised report latents.
        logit_scale: ``exp(temperature)`` of the CLIP model.
    """
    text = text_latents.detach()
    scale = logit_scale.detach()
    target = F.log_softmax(image_latents.detach() @ text.t() * scale, dim=-1)
    pred = F.log_softmax(masked_latents @ text.t() * scale, dim=-1)
    return F.kl_div(pred, target, reduction="batchmean", log_target=True)
