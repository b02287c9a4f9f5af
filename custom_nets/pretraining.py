"""The CT-CLIP as the networks of the pretraining engines.

- :class:`PretrainingNetwork`: the trainer's network; returns the dict of features the
  :class:`~custom_nets.losses.PretrainingLoss` terms need (global latents, tokens, second view, MLM, SSL heads).
- :class:`ZeroShotValidationNetwork`: the evaluator's network; zero-shot probabilities and report/volume latents in
  one forward (the evaluation handlers compute macro AUROC and recall@k from them).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .losses import MLMHead, VisualSSLHead, _world_size
from .patch_ib import LocalAlignmentHead, PatchIBHead, flatten_sentences

__all__ = ["PretrainingNetwork", "ZeroShotValidationNetwork"]


class PretrainingNetwork(nn.Module):
    """A CT-CLIP as the trainer's network: ``forward(image, text_input_ids, text_attention_mask, image_view=None)``
    returns a dict of features for :class:`~custom_nets.losses.PretrainingLoss`.

    Always: ``image_latents``, ``text_latents`` (L2-normalised, ``(B, dim_latent)``), ``logit_scale``
    (``exp(temperature)``). Depending on the loss's :meth:`~custom_nets.losses.PretrainingLoss.needs`:
    ``image_tokens``/``text_tokens``/``text_token_mask`` (FILIP), ``image_latents_view`` (second view),
    ``mlm_logits``/``mlm_labels`` (masked LM), ``ssl_z1``/``ssl_z2``/``ssl_p1``/``ssl_p2`` (visual SSL),
    ``salience``/``masked_image_latents``/``kept_ratio`` (Patch-IB mask), ``local_scores`` (Patch-IB local
    alignment, ``(B, B)``).

    The CT-CLIP is kept as ``self.model`` (its state dict is what ``models/model.pt`` holds); the auxiliary heads
    (FILIP image-token projection, MLM head, visual-SSL projector/predictor, Patch-IB ``salience`` and ``local``)
    live in ``self.heads`` so that DDP synchronises their gradients; they are saved with the training state (and
    the Patch-IB ones beside ``models/model.pt`` as ``models/heads.pt`` by the pretraining bundle).

    Local alignment takes reports as one token sequence each or, with ``text_pooling: "sentence_mean"``, as
    ``(B, S, L)`` sentences: each sentence is encoded alone (as the global text embedding does) and a report's
    sentence tokens are then one flattened sequence with their mask.

    Args:
        model: the :class:`~custom_nets.CTCLIP` with any registered image encoder (FILIP needs one that gives
            tokens).
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
        local_skip_token_ids: token ids that local alignment leaves out besides padding (special tokens, stop
            words, punctuation: :func:`custom_nets.patch_ib.local_skip_token_ids`).
    """

    def __init__(self, model: nn.Module, loss: Optional[nn.Module] = None, temperature_init: Optional[float] = None,
                 temperature_range: Optional[Sequence[float]] = None, mask_token_id: Optional[int] = None,
                 special_token_ids: Sequence[int] = (), trim_padding: bool = True,
                 gradient_checkpointing: bool = False, autocast_dtype: Optional[str] = None,
                 local_skip_token_ids: Sequence[int] = ()):
        super().__init__()
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
        token_dim = getattr(model.visual_transformer, "token_dim", None)
        token_needs = sorted(self.needs & {"tokens", "salience", "local"})
        if token_needs and token_dim is None:
            names = {"tokens": "FILIP", "salience": "the Patch-IB salience mask", "local": "local alignment"}
            raise ValueError(f"{' and '.join(names[n] for n in token_needs)} need(s) an image encoder that gives "
                             f"tokens; {type(model.visual_transformer).__name__} gives none")
        if "tokens" in self.needs:
            heads["image_tokens"] = nn.Linear(token_dim, model.dim_latent, bias=False)
        if "salience" in self.needs:
            heads["salience"] = PatchIBHead(token_dim, model.dim_latent, **loss.patch_ib_settings())
        if "local" in self.needs:
            heads["local"] = LocalAlignmentHead(token_dim, model.dim_latent)
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
        self.register_buffer("local_skip_ids", torch.as_tensor(sorted(set(int(i) for i in local_skip_token_ids)),
                                                               dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------------------------------- features
    def _image(self, image: torch.Tensor, with_tokens: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        encoding = self.model.image_encoding(image)  # one encoder pass for the embedding and the tokens
        return encoding.embedding, (encoding.tokens if with_tokens else None)

    def _text_token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled report embedding (B, dim_text), token states)``: one encoder pass for both. Token states are
        ``(B, L, dim_text)``, or ``(B, S, L, dim_text)`` for sentences (padding sentences are zeros, not encoded)."""
        m = self.model
        if ids.ndim == 2:
            hidden = m.encode_text_tokens(ids, mask).float()
            return m.pool_text(hidden, mask), hidden
        b, s, length = ids.shape
        flat_ids, flat_mask = ids.reshape(b * s, length), mask.reshape(b * s, length)
        present = flat_mask.sum(-1) > 0
        encoded = m.encode_text_tokens(flat_ids[present], flat_mask[present]).float()
        hidden = encoded.new_zeros(b * s, length, encoded.shape[-1])
        hidden[present] = encoded
        pooled = m.pool_text(hidden, flat_mask).masked_fill(~present[:, None], 0.0)
        counts = present.reshape(b, s).sum(-1, keepdim=True).clamp(min=1)  # as CTCLIP's sentence mean
        return pooled.reshape(b, s, -1).sum(1) / counts, hidden.reshape(b, s, length, -1)

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
            text_input_ids: ``(B, L)`` report token ids, or ``(B, S, L)`` sentences.
            text_attention_mask: ``(B, L)`` or ``(B, S, L)``.
            image_view: ``(B, 1, D, H, W)`` second augmented view (multiview / visual SSL).
        """
        m = self.model
        if text_attention_mask is None:
            text_attention_mask = torch.ones_like(text_input_ids)
        sentences = text_input_ids.ndim == 3  # (B, S, L): text_pooling "sentence_mean"
        if sentences and self.needs & {"tokens", "mlm"}:
            raise ValueError("FILIP and MLM need one token sequence per report; with text_pooling 'sentence_mean' "
                             "reports come as sentences: turn those losses off or pool 'mean' (local alignment, "
                             "local_weight, takes sentences)")
        if self.trim_padding and _world_size() == 1:
            length = max(int(text_attention_mask.sum(dim=-1).max()), 1)
            text_input_ids, text_attention_mask = text_input_ids[..., :length], text_attention_mask[..., :length]
        if self.training and self.temperature_range is not None:
            with torch.no_grad():
                m.temperature.clamp_(*self.temperature_range)

        emb, tokens = self._image(image, bool(self.needs & {"tokens", "salience", "local"}))
        image_raw = m.to_visual_latent(emb)
        if not self.needs & {"tokens", "local"}:
            text = m.text_embedding(text_input_ids, text_attention_mask)
        else:  # FILIP and local alignment also need the token states: encode once
            text, hidden = self._text_token_states(text_input_ids, text_attention_mask)
        out = {
            "image_latents": F.normalize(image_raw, dim=-1),
            "text_latents": F.normalize(m.to_text_latent(text), dim=-1),
            "logit_scale": m.temperature.exp(),
        }
        if "tokens" in self.needs:
            out["image_tokens"] = F.normalize(self.heads["image_tokens"](tokens), dim=-1)
            out["text_tokens"] = F.normalize(m.to_text_latent(hidden), dim=-1)
            out["text_token_mask"] = text_attention_mask
        selected = None
        if "salience" in self.needs:
            out["masked_image_latents"], selected = self.heads["salience"](tokens)
            out["salience"], out["kept_ratio"] = selected.salience, selected.kept_ratio
        if "local" in self.needs:
            ids, mask = text_input_ids, text_attention_mask
            if sentences:
                hidden, ids, mask = flatten_sentences(hidden, ids, mask)
            words = F.normalize(m.to_text_latent(hidden), dim=-1)
            content = mask.bool() & ~torch.isin(ids, self.local_skip_ids.to(ids.device))
            if selected is None:
                out["local_scores"] = self.heads["local"](tokens, words, content)
            else:  # the tokens the mask keeps, its values biasing the attention
                out["local_scores"] = self.heads["local"](selected.tokens, words, content, selected.weights)
        if "view" in self.needs:
            if image_view is None:
                raise ValueError("the multiview / visual-SSL losses need a second view: add 'image_view' to the "
                                 "batch (transforms.view_transforms) and to prepare_batch")
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
