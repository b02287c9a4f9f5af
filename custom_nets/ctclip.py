"""CTCLIP: the CT-CLIP dual encoder (CTViT image encoder + BERT text encoder + linear latent projections).

State-dict keys are the reference's: ``temperature``, ``text_transformer.*``, ``visual_transformer.*``,
``to_text_latent.weight``, ``to_visual_latent.weight`` and the two never-used ``*_extra`` copies.

Memory: the reference keeps ``to_visual_latent_extra`` (151 M parameters, 604 MB fp32) although its forward
never reads it. Here the ``_extra`` entries are *not* held as modules (unless ``extra_latent_projection`` uses
them): loading accepts and drops them, and :meth:`CTCLIP.state_dict` emits them as aliases of the used
projections (no copy; ``torch.save`` stores shared storage once), so every checkpoint we write has the
reference's key set and loads into the reference classes. :meth:`CTCLIP.reference_state_dict` additionally
adds ``text_transformer.embeddings.position_ids`` for the reference's transformers<4.31 strict load.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from ctclip_contract import IMAGE_POOLINGS, TEXT_POOLINGS

from .ctvit import CTViT, param_versions, pool_depth
from .image_encoders import ImageEncoding
from .losses import clip_loss

__all__ = ["CTCLIP", "EXTRA_KEYS", "POSITION_IDS_KEY", "pool_depth"]

EXTRA_KEYS = ("to_text_latent_extra.weight", "to_visual_latent_extra.weight")
POSITION_IDS_KEY = "text_transformer.embeddings.position_ids"


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``(N, L, C)`` over the tokens where ``mask`` ``(N, L)`` is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class CTCLIP(nn.Module):
    """CT-CLIP dual encoder, key-compatible with ``CT-CLIP_v2.pt`` / ``CT_VocabFine_v2.pt`` with a CTViT.

    Args:
        image_encoder: any registered image encoder (:mod:`custom_nets.image_encoders`: ``encode_volume`` gives a
            global embedding and, optionally, tokens), stored as ``visual_transformer``; the published model's is
            a :class:`~custom_nets.ctvit.CTViT`.
        text_encoder: a ``transformers`` BERT-family model (stored as ``text_transformer``).
        dim_image: width of the image encoder's global embedding (``embedding_dim``); for CTViT
            ``(H/p) * (W/p) * ctvit_dim`` (v2: 294912).
        dim_text: hidden size of the text encoder (v2: 768).
        dim_latent: width of the joint latent space (v2: 512).
        extra_latent_projection: reference option (off in v2): the image-to-text direction of the loss uses the
            separate ``*_extra`` projections; then those are real modules and :meth:`forward` returns
            ``(B, 2 * B_text)`` logits ``[main | extra]`` which :class:`~custom_nets.losses.ClipLoss` understands.
        use_mlm: reference option (off in every published model). The masked-language-model objective is a term of
            the pretraining loss here (:class:`~custom_nets.losses.PretrainingLoss` ``mlm_weight``, the pretraining
            bundle's ``mlm_weight``), so True is refused with that pointer.
        downsample_image_embeds: reference option (off in every published model): a strided convolution over
            CTViT's token grid before the visual projection. Not offered: it is tied to one encoder's grid, and
            ``image_pooling`` or a smaller encoder reduce ``dim_image`` for any encoder; True is refused.
        use_all_token_embeds: the reference's name for token-level (FILIP) similarity: the same as
            ``token_level_similarity=True``.
        text_pooling: ``"cls"`` (reference: ``last_hidden_state[:, 0]``), ``"mean"`` (masked mean) or
            ``"sentence_mean"``: a report comes as ``(S, L)`` token ids, one row per sentence (see
            :class:`transforms.TokenizeReportd`'s ``max_sentences``); each sentence is encoded on its own, mean
            pooled and l2-normalised, and the report is the mean of its sentences. A sentence encoder sees
            sentences like the prompts, and a finding's sentence counts the same in a short or a long report.
            ``(B, L)`` ids are one sentence each (the prompts): the same direction as ``"mean"``.
        keep_reference_extras: hold the ``*_extra`` copies as modules like the reference does (benchmark
            baseline only; costs 605 MB at full size).
        token_level_similarity: FILIP-style late interaction (off by default): image tokens (the encoder's
            tokens, through a new ``to_visual_token_latent``) and text tokens (through ``to_text_latent``)
            are l2-normalised and the pair score is the mean of the two directions' token-wise max similarity.
            :meth:`forward` then returns these scores (scaled), so :class:`~custom_nets.losses.ClipLoss` is unchanged.
        fixed_text_projection: ``to_text_latent`` is the identity and is not trained (needs ``dim_latent ==
            dim_text``): the latent space is the text encoder's own. Small-data option for a frozen sentence
            encoder: a projection learned from a few hundred reports drifts away from what the prompts mean.
        image_pooling: CTViT only: how its tokens ``(B, t, h, w, dim)`` are pooled over depth before flattening
            to ``dim_image = h * w * dim`` (sets the CTViT's ``depth_pooling``): ``"depth_mean"`` (the reference) or
            ``"depth_max"`` (same width and keys). The mean dilutes a finding that sits at one level (apical
            scarring, a hiatal hernia above the diaphragm) by the number of depth tokens; the max keeps it
            (small-data option). Other encoders pool for themselves.
        text_cache_size: sequences whose pooled embedding is kept while the text encoder is frozen and in eval
            mode (a frozen encoder gives a report's sentences the same embedding every epoch, and template
            sentences recur across reports); cleared when its weights change; 0 disables.
        autocast_dtype: e.g. ``"bfloat16"``: run both encoders under ``torch.autocast`` (training option).
        gradient_checkpointing: activation checkpointing in both encoders (training option).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, *, dim_image: int, dim_text: int,
                 dim_latent: int, extra_latent_projection: bool = False, use_mlm: bool = False,
                 downsample_image_embeds: bool = False, use_all_token_embeds: bool = False, text_pooling: str = "cls",
                 keep_reference_extras: bool = False, token_level_similarity: bool = False,
                 fixed_text_projection: bool = False, image_pooling: str = "depth_mean", text_cache_size: int = 65536,
                 autocast_dtype: Optional[str] = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        if use_mlm:
            raise ValueError("CTCLIP(use_mlm=True): the masked-language-model objective is a pretraining loss term "
                             "here; set mlm_weight > 0 in the pretraining loss (ct_clip_pretrain: --mlm_weight)")
        if downsample_image_embeds:
            raise ValueError("CTCLIP(downsample_image_embeds=True) is not offered (off in every published model; "
                             "tied to CTViT's token grid): reduce dim_image with ctclip.image_pooling or the encoder")
        token_level_similarity = token_level_similarity or use_all_token_embeds
        if text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}, got {text_pooling!r}")
        if image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"image_pooling must be one of {IMAGE_POOLINGS}, got {image_pooling!r}")
        if hasattr(image_encoder, "depth_pooling"):
            image_encoder.depth_pooling = image_pooling
        elif image_pooling != "depth_mean":
            raise ValueError(f"image_pooling {image_pooling!r} is CTViT's depth pooling; "
                             f"{type(image_encoder).__name__} pools its own tokens")
        encoder_dim = getattr(image_encoder, "embedding_dim", dim_image)
        if encoder_dim != dim_image:
            raise ValueError(f"dim_image is {dim_image} but the image encoder's embedding_dim is {encoder_dim}")
        self.dim_image, self.dim_text, self.dim_latent = dim_image, dim_text, dim_latent
        self.image_pooling = image_pooling
        self.text_cache_size = int(text_cache_size)
        self._text_cache: dict = {}
        self._text_cache_key = None
        self.extra_latent_projection = extra_latent_projection
        self.text_pooling = text_pooling
        self.autocast_dtype = getattr(torch, autocast_dtype) if isinstance(autocast_dtype, str) else autocast_dtype

        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.text_transformer = text_encoder
        self.visual_transformer = image_encoder
        self.to_text_latent = nn.Linear(dim_text, dim_latent, bias=False)
        self.to_visual_latent = nn.Linear(dim_image, dim_latent, bias=False)
        if fixed_text_projection:
            if dim_latent != dim_text:
                raise ValueError(f"fixed_text_projection needs dim_latent == dim_text, got {dim_latent} and {dim_text}")
            with torch.no_grad():
                self.to_text_latent.weight.copy_(torch.eye(dim_text))
            self.to_text_latent.requires_grad_(False)
        self.token_level_similarity = token_level_similarity
        if token_level_similarity:
            self.to_visual_token_latent = nn.Linear(image_encoder.token_dim, dim_latent, bias=False)
        self.holds_extras = bool(extra_latent_projection or keep_reference_extras)
        if self.holds_extras:
            self.to_text_latent_extra = copy.deepcopy(self.to_text_latent)
            self.to_visual_latent_extra = copy.deepcopy(self.to_visual_latent)
        self._register_state_dict_hook(CTCLIP._add_extra_aliases)
        self.register_load_state_dict_pre_hook(CTCLIP._drop_unused_keys)
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def from_reference_config(cls, ctvit: Mapping[str, Any], bert: Mapping[str, Any], ctclip: Mapping[str, Any],
                              **options) -> "CTCLIP":
        """Build the model the reference builds with ``BertModel(BertConfig(**bert))``, ``CTViT(**ctvit)``,
        ``CTCLIP(image_encoder, text_encoder, **ctclip)``.

        Args:
            ctvit: CTViT constructor kwargs of the reference.
            bert: ``BertConfig`` kwargs.
            ctclip: CTCLIP constructor kwargs of the reference (``dim_image``, ``dim_text``, ``dim_latent``, ...).
            **options: our extra CTCLIP options (e.g. ``keep_reference_extras``).
        """
        text = BertModel(BertConfig(**bert))
        image = CTViT(**ctvit)
        return cls(image, text, **dict(ctclip), **options)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing in the image encoder (if supported) and the text encoder (if supported)."""
        if hasattr(self.visual_transformer, "set_gradient_checkpointing"):
            self.visual_transformer.set_gradient_checkpointing(enabled)
        text = self.text_transformer
        if enabled and hasattr(text, "gradient_checkpointing_enable"):
            text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif not enabled and hasattr(text, "gradient_checkpointing_disable"):
            text.gradient_checkpointing_disable()

    def freeze(self, image_encoder: bool = False, text_encoder: bool = False) -> "CTCLIP":
        """Freeze encoders: no gradients, and they stay in eval mode through ``train()`` (no dropout, no
        codebook update), unlike the reference whose "frozen" modules still ran in train mode."""
        if image_encoder:
            self.visual_transformer.requires_grad_(False)
        if text_encoder:
            self.text_transformer.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "CTCLIP":
        super().train(mode)
        if mode and not _has_trainable(self.text_transformer):
            self.text_transformer.eval()  # frozen stays frozen (image encoders handle themselves the same way)
        return self

    # ----------------------------------------------------------------------------------------- state dict
    @staticmethod
    def _add_extra_aliases(module: "CTCLIP", state_dict, prefix, local_metadata):
        if module.holds_extras:
            return state_dict
        # same tensors as the used projections: the reference's key set at no memory cost
        state_dict[prefix + EXTRA_KEYS[0]] = state_dict[prefix + "to_text_latent.weight"]
        state_dict[prefix + EXTRA_KEYS[1]] = state_dict[prefix + "to_visual_latent.weight"]
        return state_dict

    def _drop_unused_keys(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
        if not self.holds_extras:
            for key, main in zip(EXTRA_KEYS, ("to_text_latent.weight", "to_visual_latent.weight")):
                value = state_dict.pop(prefix + key, None)
                expected = getattr(self, main.split(".")[0]).weight.shape
                if value is not None and tuple(value.shape) != tuple(expected):
                    error_msgs.append(f"size mismatch for {prefix + key}: checkpoint {tuple(value.shape)}, "
                                      f"model {tuple(expected)}")
        emb = getattr(self.text_transformer, "embeddings", None)
        persistent = (emb is not None and "position_ids" in getattr(emb, "_buffers", {})
                      and "position_ids" not in emb._non_persistent_buffers_set)
        if not persistent:
            # written by transformers<4.31 (all published checkpoints); a constant arange, not a weight
            state_dict.pop(prefix + POSITION_IDS_KEY, None)

    def reference_state_dict(self, include_position_ids: bool = True, clone_extras: bool = False) -> dict:
        """State dict loadable with ``strict=True`` by the reference classes (transformers<4.31).

        Args:
            include_position_ids: add ``text_transformer.embeddings.position_ids`` (int64 ``[1, max_positions]``).
            clone_extras: give the ``*_extra`` entries their own storage instead of aliasing the used projections.
        """
        sd = self.state_dict()
        if clone_extras:
            for key in EXTRA_KEYS:
                sd[key] = sd[key].clone()
        if include_position_ids and POSITION_IDS_KEY not in sd:
            n = self.text_transformer.config.max_position_embeddings
            sd[POSITION_IDS_KEY] = torch.arange(n, device=self.temperature.device).unsqueeze(0)
        # the reference's key order: temperature, text, visual, projections, extras
        order = ["temperature"] + [k for k in (POSITION_IDS_KEY,) if k in sd]
        order += [k for k in sd if k.startswith("text_transformer.") and k not in order]
        order += [k for k in sd if k not in order]
        return {k: sd[k] for k in order}

    # ----------------------------------------------------------------------------------------- encoders
    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                           token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last hidden state of the text encoder ``(B, L, dim_text)``."""
        with self._autocast(input_ids.device):
            out = self.text_transformer(input_ids=input_ids, attention_mask=attention_mask,
                                        token_type_ids=token_type_ids)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def text_embedding(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled text embedding before the latent projection ``(B, dim_text)``; ``input_ids`` is ``(B, L)``,
        or ``(B, S, L)`` sentences with ``text_pooling="sentence_mean"``."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if input_ids.ndim == 3:
            if self.text_pooling != "sentence_mean":
                raise ValueError(f"(B, S, L) sentence token ids need text_pooling='sentence_mean', this model pools "
                                 f"{self.text_pooling!r}")
            return self._sentence_mean(input_ids, mask)
        if token_type_ids is not None:
            return self.pool_text(self.encode_text_tokens(input_ids, attention_mask, token_type_ids).float(), mask)
        return self._pooled_sequences(input_ids, mask)

    def pool_text(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One embedding per sequence ``(B, dim_text)`` from the text encoder's ``(B, L, dim_text)`` states, as
        ``text_pooling`` says (a ``"sentence_mean"`` sequence is one sentence: normalised mean)."""
        if self.text_pooling == "cls":
            return hidden[:, 0]
        pooled = masked_mean(hidden, mask)
        return F.normalize(pooled, dim=-1) if self.text_pooling == "sentence_mean" else pooled

    def _encode_pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = int(mask.sum(-1).max().clamp(min=1))  # drop the columns that are padding in every row
        return self.pool_text(self.encode_text_tokens(ids[:, :keep], mask[:, :keep]).float(), mask[:, :keep])

    def _pooled_sequences(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``pool_text`` of each token sequence ``(N, L) -> (N, dim_text)``; with a frozen text encoder in eval
        mode each distinct sequence is encoded once and then served from the cache (``text_cache_size``)."""
        text = self.text_transformer
        if self.text_cache_size <= 0 or text.training or _has_trainable(text) or len(ids) == 0:
            return self._encode_pooled(ids, mask)
        key = (str(ids.device), torch.is_autocast_enabled(ids.device.type), param_versions(text))
        if key != self._text_cache_key:
            self._text_cache, self._text_cache_key = {}, key
        cache = self._text_cache
        ids_cpu, mask_cpu = ids.cpu(), mask.cpu().bool()
        keys = [row[m].numpy().tobytes() for row, m in zip(ids_cpu, mask_cpu)]
        new = {}
        for i, k in enumerate(keys):
            if k not in cache:
                new.setdefault(k, i)
        if new:
            rows = torch.tensor(list(new.values()), device=ids.device)
            with torch.no_grad():
                cache.update(zip(new, self._encode_pooled(ids[rows], mask[rows])))
        out = torch.stack([cache[k] for k in keys])
        for k in list(cache)[:max(0, len(cache) - self.text_cache_size)]:  # oldest first
            del cache[k]
        return out

    def sentence_embeddings(self, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sentence of ``(B, S, L)`` reports pooled on its own (``pool_text``; the frozen-encoder cache
        applies): ``(embeddings (B, S, dim_text), present (B, S) bool)``; padding rows are zeros, not encoded."""
        b, s, length = input_ids.shape
        ids, mask = input_ids.reshape(b * s, length), attention_mask.reshape(b * s, length)
        present = mask.sum(-1) > 0  # padding sentences are all-zero rows: not encoded
        pooled = self._pooled_sequences(ids[present], mask[present])
        sentences = pooled.new_zeros(b * s, pooled.shape[-1])
        sentences[present] = pooled
        return sentences.reshape(b, s, -1), present.reshape(b, s)

    @staticmethod
    def mean_of_sentences(sentences: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """A report's embedding from its sentences ``(B, S, D)``: the mean over the ``present`` ``(B, S)`` ones
        (padding rows are zeros)."""
        return sentences.sum(1) / present.sum(-1, keepdim=True).clamp(min=1)

    def _sentence_mean(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mean_of_sentences(*self.sentence_embeddings(input_ids, mask))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    token_type_ids: Optional[torch.Tensor] = None, extra: bool = False) -> torch.Tensor:
        """L2-normalised text latents ``(B, dim_latent)``.

        Args:
            input_ids: token ids ``(B, L)`` from :func:`custom_nets.build_tokenizer`'s tokenizer.
            attention_mask: ``(B, L)``, 1 for real tokens.
            token_type_ids: optional segment ids.
            extra: use ``to_text_latent_extra`` (only with ``extra_latent_projection``).
        """
        proj = self.to_text_latent_extra if extra else self.to_text_latent
        return F.normalize(proj(self.text_embedding(input_ids, attention_mask, token_type_ids)), dim=-1)

    def image_encoding(self, image: torch.Tensor, seg: Optional[torch.Tensor] = None) -> ImageEncoding:
        """The image encoder's output (:class:`~custom_nets.image_encoders.ImageEncoding`), float32: the global
        embedding ``(B, dim_image)`` and, if the encoder gives them, its tokens with their positions.

        Args:
            image: ``(B, 1, D, H, W)`` model input.
            seg: optional ``(B, 1, D, H, W)`` anatomical region-id map on the image's grid, for an encoder that
                reads one (``uses_segmentation``; it then also gives region embeddings). Refused for any other.
        """
        encoder = self.visual_transformer
        if seg is not None and not getattr(encoder, "uses_segmentation", False):
            raise ValueError(f"the image encoder {type(encoder).__name__} takes no segmentation mask (seg); "
                             "only an encoder with uses_segmentation does (e.g. type 'ct_specialised')")
        with self._autocast(image.device):
            encoding = encoder.encode_volume(image) if seg is None else encoder.encode_volume(image, seg=seg)
        return encoding.float()

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The image encoder's tokens ``(B, N, token_dim)``, float32 (for CTViT all ``t * h * w`` of them)."""
        tokens = self.image_encoding(image).tokens
        if tokens is None:
            raise ValueError(f"the image encoder {type(self.visual_transformer).__name__} gives no tokens")
        return tokens

    def image_embedding(self, image: torch.Tensor, seg: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Global image embedding before the latent projection, ``(B, dim_image)`` (for CTViT its tokens pooled
        over depth as ``image_pooling`` says and flattened in (h, w, dim) order); ``seg`` as in
        :meth:`image_encoding`."""
        return self.image_encoding(image, seg).embedding

    def encode_image(self, image: torch.Tensor, extra: bool = False, seg: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised image latents ``(B, dim_latent)``.

        Args:
            image: ``(B, 1, D, H, W)`` in the layout and value range of the model config's ``input`` section.
            extra: use ``to_visual_latent_extra`` (only with ``extra_latent_projection``).
            seg: optional anatomical region-id map, for an encoder that reads one (:meth:`image_encoding`).
        """
        proj = self.to_visual_latent_extra if extra else self.to_visual_latent
        return F.normalize(proj(self.image_embedding(image, seg)), dim=-1)

    def encode_image_file(self, path, transform=None) -> torch.Tensor:
        """"One scan in, features out": image latents of a NIfTI file or DICOM folder.

        Args:
            path: the scan.
            transform: a callable turning ``{"image": path}`` into a dict whose ``"image"`` is the model input
                ``(1, D, H, W)``; the preprocessing transforms built from this model's config (``transforms``
                package) provide it. Required: the model does not guess spacing, window or axis layout.
        """
        if transform is None:
            raise ValueError("encode_image_file needs the preprocessing transform built from the model config "
                             "(e.g. the inference preprocessing of the transforms package)")
        image = transform({"image": str(path)})["image"]
        image = torch.as_tensor(image, dtype=torch.float32, device=self.temperature.device)
        return self.encode_image(image.unsqueeze(0))[0]

    # ----------------------------------------------------------------------------------------- token level
    def image_token_latents(self, image: torch.Tensor) -> torch.Tensor:
        """Per-token image latents ``(B, N, dim_latent)``, l2-normalised (token-level option)."""
        return F.normalize(self.to_visual_token_latent(self.image_tokens(image)), dim=-1)

    def text_token_latents(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """Per-token text latents ``(B, L, dim_latent)``, l2-normalised (token-level option)."""
        hidden = self.encode_text_tokens(input_ids, attention_mask).float()
        return F.normalize(self.to_text_latent(hidden), dim=-1)

    @staticmethod
    def token_similarity(image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                         text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """FILIP late-interaction scores ``(B_image, B_text)`` from l2-normalised token latents."""
        sim = torch.einsum("ind,tmd->itnm", image_tokens, text_tokens)  # (I, T, n_image, n_text)
        mask = (torch.ones(text_tokens.shape[:2], device=sim.device) if text_mask is None else text_mask).bool()
        m = mask[None, :, None, :]
        text_to_image = sim.masked_fill(~m, float("-inf")).amax(dim=2)  # best image token per text token
        text_to_image = (text_to_image.masked_fill(~mask[None], 0).sum(-1) / mask.sum(-1).clamp(min=1)[None])
        image_to_text = sim.masked_fill(~m, float("-inf")).amax(dim=3).mean(dim=-1)  # best text token per image token
        return (text_to_image + image_to_text) / 2

    # ----------------------------------------------------------------------------------------- forwards
    def forward(self, image: torch.Tensor, text_input_ids: torch.Tensor,
                text_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training forward: image-text similarity logits already multiplied by ``exp(temperature)``.

        Args:
            image: ``(B_image, 1, D, H, W)``.
            text_input_ids: ``(B_text, L)``.
            text_attention_mask: ``(B_text, L)``.

        Returns:
            ``(B_image, B_text)`` logits (row i: image i against every text); with ``extra_latent_projection``,
            ``(B_image, 2 * B_text)`` = ``[main | extra]`` logits; with ``token_level_similarity``, FILIP scores.
        """
        scale = self.temperature.exp()
        if self.token_level_similarity:
            text_tokens = self.text_token_latents(text_input_ids, text_attention_mask)
            return self.token_similarity(self.image_token_latents(image), text_tokens, text_attention_mask) * scale
        image_latents = self.encode_image(image)
        text_latents = self.encode_text(text_input_ids, text_attention_mask)
        logits = image_latents @ text_latents.t() * scale
        if self.extra_latent_projection:
            extra = self.to_visual_latent_extra(self.image_embedding(image))
            extra_text = self.encode_text(text_input_ids, text_attention_mask, extra=True)
            logits = torch.cat([logits, F.normalize(extra, dim=-1) @ extra_text.t() * scale], dim=1)
        return logits

    def reference_forward(self, text_input_ids: torch.Tensor, image: torch.Tensor,
                          text_attention_mask: Optional[torch.Tensor] = None, return_loss: bool = False,
                          return_latents: bool = False):
        """The reference ``CTCLIP.forward(text, image, device, return_loss, return_latents)``.

        Without ``return_loss``: per-row logits ``sum(text_latents * image_latents, -1) * exp(temperature)``,
        broadcasting one image against several prompts. With it: the symmetric InfoNCE loss of the batch.

        Args:
            text_input_ids: ``(B_text, L)``.
            image: ``(B_image, 1, D, H, W)`` with ``B_image`` equal to ``B_text`` or 1.
            text_attention_mask: ``(B_text, L)``.
            return_loss: return the scalar contrastive loss.
            return_latents: return ``(text_latents, image_latents)`` instead.
        """
        text_latents = self.encode_text(text_input_ids, text_attention_mask)
        image_latents = self.encode_image(image)
        if return_latents:
            return text_latents, image_latents
        scale = self.temperature.exp()
        if not return_loss:
            return (text_latents * image_latents).sum(dim=-1) * scale
        return clip_loss(image_latents @ text_latents.t() * scale)
