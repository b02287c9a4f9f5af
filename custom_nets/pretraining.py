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

from .image_encoders import reads_segmentation
from .losses import MLMHead, VisualSSLHead, _world_size
from .multilevel_alignment import SentencePatchLoss
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
    alignment, ``(B, B)``); the multi-level alignment of an encoder that reads anatomical masks (#23):
    ``sentence_latents (B, S, dim_latent)``/``sentence_mask (B, S)`` (each report sentence on its own, through the
    text projection), ``region_latents (B, R, dim_latent)``/``region_mask``/``sentence_regions (B, S, R)`` (region
    level), ``sentence_summaries (B, S, dim_latent)`` (each sentence's attention pooling over its volume's patch
    tokens: sentence level), ``segmentation_logits``/``patch_regions``/``segmented (B,)`` (the auxiliary per-patch
    region loss; ``segmented``: the volumes that have a mask).

    The CT-CLIP is kept as ``self.model`` (its state dict is what ``models/model.pt`` holds); the auxiliary heads
    (FILIP image-token projection, MLM head, visual-SSL projector/predictor, Patch-IB ``salience`` and ``local``)
    live in ``self.heads`` so that DDP synchronises their gradients; they are saved with the training state (and
    the Patch-IB ones beside ``models/model.pt`` as ``models/heads.pt`` by the pretraining bundle).

    Local alignment takes reports as one token sequence each or, with ``text_pooling: "sentence_mean"``, as
    ``(B, S, L)`` sentences: each sentence is encoded alone (as the global text embedding does) and a report's
    sentence tokens are then one flattened sequence with their mask.

    The multi-level terms need reports as ``(B, S, L)`` sentences (``text_pooling: "sentence_mean"``); the region
    level and the segmentation loss need the anatomical mask ``seg`` in the batch and an encoder that reads it
    (:func:`~custom_nets.image_encoders.reads_segmentation`); the region level pairs regions and sentences with
    the batch's ``sentence_regions`` (:class:`transforms.SentenceRegionsd`). Their heads: ``regions`` (region
    embedding to the latent space) and ``sentence`` (the sentence-queried attention pooling of
    :class:`~custom_nets.multilevel_alignment.SentencePatchLoss`).

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
        self._check_multilevel(model, token_dim)
        if "regions" in self.needs:
            heads["regions"] = nn.Linear(token_dim, model.dim_latent, bias=False)
        if "sentences" in self.needs:
            heads["sentence"] = SentencePatchLoss(token_dim, model.dim_latent)
        self.heads = heads
        self.mask_token_id = mask_token_id
        self.register_buffer("special_ids", torch.as_tensor(sorted(set(int(i) for i in special_token_ids)),
                                                            dtype=torch.long), persistent=False)
        self.register_buffer("local_skip_ids", torch.as_tensor(sorted(set(int(i) for i in local_skip_token_ids)),
                                                               dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------------------------------- checks
    def _check_multilevel(self, model: nn.Module, token_dim: Optional[int]) -> None:
        needs = self.needs & {"regions", "sentences", "segmentation"}
        if not needs:
            return
        names = {"regions": "region-level alignment (region_weight)",
                 "sentences": "sentence-level alignment (sentence_weight)",
                 "segmentation": "the patch segmentation loss (segmentation_weight)"}
        wanted = " and ".join(names[n] for n in sorted(needs))
        encoder = type(model.visual_transformer).__name__
        if needs & {"regions", "segmentation"} and not reads_segmentation(model):
            raise ValueError(f"{wanted} need(s) an image encoder that reads anatomical masks (e.g. type "
                             f"'ct_specialised' with num_regions > 0); {encoder} reads none")
        if "sentences" in needs and token_dim is None:
            raise ValueError(f"{wanted} need(s) an image encoder that gives tokens; {encoder} gives none")
        if "segmentation" in needs and getattr(model.visual_transformer, "segmentation_head", None) is None:
            raise ValueError(f"{wanted} need(s) the encoder's per-patch region head: set "
                             "image_encoder.aux_segmentation true in the model config")
        if needs & {"regions", "sentences"} and getattr(model, "text_pooling", None) != "sentence_mean":
            raise ValueError(f"{wanted} pair(s) image parts with report sentences: the model config's text.pooling "
                             f"must be 'sentence_mean' (is {getattr(model, 'text_pooling', None)!r})")

    # ------------------------------------------------------------------------------------------- features
    def _text_token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
        """``(pooled report embedding (B, dim_text), token states, sentence embeddings)``: one encoder pass for all.
        Token states are ``(B, L, dim_text)``, or ``(B, S, L, dim_text)`` for sentences (padding sentences are
        zeros, not encoded); sentence embeddings ``(B, S, dim_text)`` for sentences (padding rows zero), else None."""
        m = self.model
        if ids.ndim == 2:
            hidden = m.encode_text_tokens(ids, mask).float()
            return m.pool_text(hidden, mask), hidden, None
        b, s, length = ids.shape
        flat_ids, flat_mask = ids.reshape(b * s, length), mask.reshape(b * s, length)
        present = flat_mask.sum(-1) > 0
        encoded = m.encode_text_tokens(flat_ids[present], flat_mask[present]).float()
        hidden = encoded.new_zeros(b * s, length, encoded.shape[-1])
        hidden[present] = encoded
        pooled = m.pool_text(hidden, flat_mask).masked_fill(~present[:, None], 0.0).reshape(b, s, -1)
        return m.mean_of_sentences(pooled, present.reshape(b, s)), hidden.reshape(b, s, length, -1), pooled

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
                image_view: Optional[torch.Tensor] = None, seg: Optional[torch.Tensor] = None,
                sentence_regions: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Features of a batch of (volume, report) pairs.

        Args:
            image: ``(B, 1, D, H, W)`` model input.
            text_input_ids: ``(B, L)`` report token ids, or ``(B, S, L)`` sentences.
            text_attention_mask: ``(B, L)`` or ``(B, S, L)``.
            image_view: ``(B, 1, D, H, W)`` second augmented view (multiview / visual SSL).
            seg: ``(B, 1, D, H, W)`` anatomical region ids on the image's grid, for an encoder that reads them (an
                all-background map: that volume has no mask and runs regions-off).
            sentence_regions: ``(B, S, R)`` bool, sentence ``s`` mentions region ``r`` (region level).
        """
        m = self.model
        if text_attention_mask is None:
            text_attention_mask = torch.ones_like(text_input_ids)
        sentences = text_input_ids.ndim == 3  # (B, S, L): text_pooling "sentence_mean"
        if sentences and self.needs & {"tokens", "mlm"}:
            raise ValueError("FILIP and MLM need one token sequence per report; with text_pooling 'sentence_mean' "
                             "reports come as sentences: turn those losses off or pool 'mean' (local alignment, "
                             "local_weight, takes sentences)")
        multilevel = self.needs & {"regions", "sentences", "segmentation"}
        if multilevel & {"regions", "sentences"} and not sentences:
            raise ValueError("region- and sentence-level alignment need reports as (B, S, L) sentences "
                             "(text.pooling 'sentence_mean', TokenizeReportd max_sentences)")
        if multilevel & {"regions", "segmentation"} and seg is None:
            raise ValueError("region-level alignment and the patch segmentation loss need the anatomical mask: add "
                             "'seg' to the batch and to prepare_batch (the pretraining bundle does so for an encoder "
                             "that reads masks)")
        if "regions" in multilevel and sentence_regions is None:
            raise ValueError("region-level alignment needs the batch's 'sentence_regions' (transforms.SentenceRegionsd)")
        if self.trim_padding and _world_size() == 1:
            length = max(int(text_attention_mask.sum(dim=-1).max()), 1)
            text_input_ids, text_attention_mask = text_input_ids[..., :length], text_attention_mask[..., :length]
        if self.training and self.temperature_range is not None:
            with torch.no_grad():
                m.temperature.clamp_(*self.temperature_range)

        encoding = m.image_encoding(image, seg)  # one encoder pass for the embedding, tokens and regions
        tokens = encoding.tokens
        image_raw = m.to_visual_latent(encoding.embedding)
        sentence_states = None
        if self.needs & {"tokens", "local"}:  # FILIP and local alignment also need the token states: encode once
            text, hidden, sentence_states = self._text_token_states(text_input_ids, text_attention_mask)
        elif multilevel & {"regions", "sentences"}:  # each sentence once (the frozen encoder's cache applies)
            sentence_states, present = m.sentence_embeddings(text_input_ids, text_attention_mask)
            text = m.mean_of_sentences(sentence_states, present)
        else:
            text = m.text_embedding(text_input_ids, text_attention_mask)
        out = {
            "image_latents": F.normalize(image_raw, dim=-1),
            "text_latents": F.normalize(m.to_text_latent(text), dim=-1),
            "logit_scale": m.temperature.exp(),
        }
        if multilevel:
            out.update(self._multilevel(encoding, sentence_states, text_attention_mask, sentence_regions))
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
            # the view's spatial jitter moves its anatomy off the mask: it is encoded without one (regions off)
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

    def _multilevel(self, encoding, sentence_states: Optional[torch.Tensor], text_attention_mask: torch.Tensor,
                    sentence_regions: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The outputs of the region, sentence and segmentation terms (#23) from one image encoding."""
        m, out = self.model, {}
        if sentence_states is not None:
            out["sentence_latents"] = F.normalize(m.to_text_latent(sentence_states), dim=-1)  # padding rows stay 0
            out["sentence_mask"] = text_attention_mask.sum(-1) > 0
        b = encoding.embedding.shape[0]
        if "regions" in self.needs:
            if encoding.regions is None:  # only empty maps in this batch: every region leaves the loss
                r = sentence_regions.shape[-1]
                regions = encoding.embedding.new_zeros(b, r, self.heads["regions"].in_features)
                region_mask = torch.zeros(b, r, dtype=torch.bool, device=regions.device)
            else:
                regions, region_mask = encoding.regions, encoding.region_mask
            if sentence_regions.shape[-1] != regions.shape[1]:
                raise ValueError(f"sentence_regions has {sentence_regions.shape[-1]} regions, the encoder "
                                 f"{regions.shape[1]} (image_encoder.num_regions)")
            out["region_latents"] = F.normalize(self.heads["regions"](regions), dim=-1)
            out["region_mask"] = region_mask
            out["sentence_regions"] = sentence_regions.bool()
        if "sentences" in self.needs:
            out["sentence_summaries"], _ = self.heads["sentence"].attend(encoding.tokens, out["sentence_latents"])
        if "segmentation" in self.needs:
            out["segmentation_logits"] = encoding.segmentation_logits
            if encoding.patch_regions is None:  # no volume of the batch has a mask
                out["patch_regions"] = torch.zeros_like(encoding.segmentation_logits)
                out["segmented"] = torch.zeros(b, dtype=torch.bool, device=out["patch_regions"].device)
            else:
                out["patch_regions"] = encoding.patch_regions
                out["segmented"] = encoding.region_mask.any(1)
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
                text_attention_mask: Optional[torch.Tensor] = None,
                seg: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        model = self.zero_shot.model
        image_latents = model.encode_image(image, seg=seg)  # seg: for an encoder that reads anatomical masks
        out = {"probs": self.zero_shot.probabilities(image_latents), "image_latents": image_latents}
        if text_input_ids is not None:
            out["text_latents"] = model.encode_text(text_input_ids, text_attention_mask)
            out["report_probs"] = self.zero_shot.probabilities(out["text_latents"])
        return out
