"""CTViT: the 3D image encoder of CT-CLIP (factorised spatial/temporal transformer + cosine VQ).

Written from the specification in ``docs/ctclip_reference.md#ctvit``. Module names, parameter and buffer
names mirror the published state dict, so the published checkpoints load without renaming. Two quirks
of the reference change the numbers and are reproduced on purpose:

* keys and values of every attention layer are computed from the layer input *before* its LayerNorm
  (only the queries see the normed input);
* the position-encoding generator (PEG) turns the token sequence back into a ``(b, t, h, w, d)`` grid
  with a raw memory-order reshape, which scrambles positions in the temporal stack.

Beyond the reference: fused attention, a position bias evaluated once per relative offset and cached in
eval, memory-bounded (chunked) patch embedding, feed-forward and codebook lookup without autograd,
activation checkpointing, and frozen-stays-frozen
semantics (a CTViT without trainable parameters never enters train mode, so its codebook never drifts).
``reference_semantics=True`` switches back to the plain computation (used as the benchmark baseline).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctclip_contract import IMAGE_POOLINGS

from .image_encoders import ImageEncoding, grid_positions

__all__ = ["CTViT", "HUBandPatchEmbedding", "LayerNorm", "PEG", "Attention", "FeedForward", "Transformer",
           "ContinuousPositionBias", "CosineSimCodebook", "VectorQuantize", "param_versions", "pool_depth"]


def param_versions(module: nn.Module) -> tuple:
    """Identity and in-place version of every parameter: changes when weights are loaded or stepped."""
    return tuple((p.data_ptr(), p._version, p.device) for p in module.parameters())


def pool_depth(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """CTViT tokens ``(B, T, h, w, dim)`` pooled over depth ``T`` to ``(B, h * w, dim)``, as the model config's
    ``ctclip.image_pooling`` says: the mean (the reference) or the max. Flattened, it is CTViT's global embedding."""
    if tokens.ndim != 5:
        raise ValueError(f"depth pooling needs (B, T, h, w, dim) image tokens, the encoder gave {tuple(tokens.shape)}")
    if pooling not in IMAGE_POOLINGS:
        raise ValueError(f"image_pooling must be one of {IMAGE_POOLINGS}, got {pooling!r}")
    pooled = tokens.amax(dim=1) if pooling == "depth_max" else tokens.mean(dim=1)
    return pooled.reshape(pooled.shape[0], -1, pooled.shape[-1])


class LayerNorm(nn.Module):
    """LayerNorm with a learned ``gamma`` and a fixed (persistent) ``beta`` buffer, as in the reference."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, self.eps)


class Patchify(nn.Module):
    """``b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)`` (parameter-free, keeps index 0 of the
    reference's ``to_patch_emb`` Sequential)."""

    def __init__(self, patch_size: int, temporal_patch_size: int):
        super().__init__()
        self.p = patch_size
        self.pt = temporal_patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        p, pt = self.p, self.pt
        x = x.reshape(b, c, d // pt, pt, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, d // pt, h // p, w // p, c * pt * p * p)


class HUBandPatchEmbedding(nn.Module):
    """Patch tokens from how much of each patch lies in fixed intensity (HU) bands.

    ``(B, 1, D, H, W) -> (B, D/pt, H/p, W/p, dim)``: for each patch the fraction of its voxels in each band
    ``(-inf, e0), [e0, e1), ..., [e_last, inf)``, on a log scale (``log1p(100 * fraction)``, so that a few
    calcified or metal voxels in a patch still count), through ``Linear(bands, dim)`` and ``LayerNorm(dim)``.

    The published patch embedding (LayerNorm over the patch's voxels, then ``Linear``) removes each patch's mean
    and spread, which is where effusion, consolidation, emphysema, ground glass and calcification differ from
    normal tissue, and its ``Linear(c * pt * p * p, dim)`` has to learn that from data. With a few hundred
    training volumes it memorises instead; band fractions give the same regional evidence with
    ``bands * dim`` weights. Not key-compatible with published CT-CLIP weights (small-data option).

    Args:
        band_edges: increasing band edges in model-input units (the factory converts the model config's
            ``hu_band_edges`` with the config's ``hu_offset`` / ``hu_scale``).
        patch_size: in-plane patch size.
        temporal_patch_size: patch size along D.
        dim: token width.
    """

    def __init__(self, band_edges: Sequence[float], patch_size: int, temporal_patch_size: int, dim: int):
        super().__init__()
        edges = torch.as_tensor(list(band_edges), dtype=torch.float32)
        if edges.ndim != 1 or len(edges) < 1 or bool((edges[1:] <= edges[:-1]).any()):
            raise ValueError(f"band_edges must be a non-empty increasing list, got {list(band_edges)}")
        self.register_buffer("band_edges", edges, persistent=False)
        self.kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Linear(len(edges) + 1, dim)
        self.norm = nn.LayerNorm(dim)

    def band_fractions(self, video: torch.Tensor) -> torch.Tensor:
        """Fraction of each patch's voxels per band ``(B, t, h, w, bands)`` (sums to 1 over bands)."""
        x = video[:, :1].float()
        # fraction of voxels at or above each edge, one edge at a time (no (bands x volume) one-hot in memory)
        above = [F.avg_pool3d((x >= e).to(x.dtype), self.kernel) for e in self.band_edges.tolist()]
        ones = torch.ones_like(above[0])
        cum = torch.cat([ones] + above + [torch.zeros_like(ones)], dim=1)
        return (cum[:, :-1] - cum[:, 1:]).clamp(min=0).permute(0, 2, 3, 4, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(torch.log1p(100.0 * self.band_fractions(video))))


class Unpatchify(nn.Module):
    """Inverse of :class:`Patchify` (only used by the decoder heads, which CT-CLIP never runs)."""

    def __init__(self, patch_size: int, temporal_patch_size: int, channels: int):
        super().__init__()
        self.p, self.pt, self.c = patch_size, temporal_patch_size, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, _ = x.shape
        p, pt, c = self.p, self.pt, self.c
        x = x.reshape(b, t, h, w, c, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, t * pt, h * p, w * p)


class PEG(nn.Module):
    """Position-encoding generator: depthwise 3x3x3 conv over the token grid, causal in time.

    The raw ``reshape(*video_shape, d)`` is the reference's behaviour: in the temporal stack the tokens
    are laid out ``(b h w) t d``, so the grid the convolution sees is a scrambled one. Kept on purpose.
    """

    def __init__(self, dim: int, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, video_shape: Sequence[int]) -> torch.Tensor:
        orig_shape = x.shape
        x = x.reshape(*video_shape, x.shape[-1])  # raw memory-order reshape (quirk)
        x = x.permute(0, 4, 1, 2, 3)
        t_pad = (2, 0) if self.causal else (1, 1)
        x = F.pad(x, (1, 1, 1, 1, *t_pad))
        x = self.dsconv(x)
        return x.permute(0, 2, 3, 4, 1).reshape(orig_shape)


class Attention(nn.Module):
    """Multi-head self-attention with l2-normalised queries/keys, learned per-dim scales and scale 8.

    Quirk of the reference: ``k, v = to_kv(x)`` from the *un-normed* input; ``q = to_q(norm(x))``.
    ``null_kv`` (zero elements) and ``context_norm`` (unused) exist only for state-dict compatibility.
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, dropout: float = 0.0, scale: float = 8.0):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = scale
        self.dropout = dropout
        inner = dim_head * heads
        self.norm = LayerNorm(dim)
        self.context_norm = LayerNorm(dim)
        self.null_kv = nn.Parameter(torch.zeros(heads, 0, dim_head))
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.fused = True  # set by CTViT; False = explicit softmax(q k^T) (reference semantics)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        p = self.dropout if self.training else 0.0
        if self.fused:
            if attn_bias is not None:
                # (1, heads, n, n): the CPU flash kernel takes 2-D/4-D masks only; a 3-D one silently falls back to
                # the math kernel, which materialises the (b, heads, n, n) weights (+640 MB at full size)
                attn_bias = attn_bias.to(q.dtype).reshape(-1, *attn_bias.shape[-3:])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p, scale=self.scale)
        else:
            sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
            if attn_bias is not None:
                sim = sim + attn_bias
            attn = F.dropout(sim.softmax(dim=-1), p)
            out = torch.einsum("bhij,bhjd->bhid", attn, v)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def FeedForward(dim: int, mult: float = 4.0, dropout: float = 0.0) -> nn.Sequential:
    """``LayerNorm -> Linear(dim, 2*inner) -> GEGLU -> Dropout -> Linear(inner, dim)``, inner = int(mult*2/3*dim)."""
    inner = int(mult * (2 / 3) * dim)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner * 2, bias=False), GEGLU(), nn.Dropout(dropout),
                         nn.Linear(inner, dim, bias=False))


class Transformer(nn.Module):
    """Stack of ``[PEG, Attention, None (no cross-attention), FeedForward]`` layers and ``norm_out``."""

    def __init__(self, dim: int, depth: int, dim_head: int = 64, heads: int = 8, attn_dropout: float = 0.0,
                 ff_dropout: float = 0.0, ff_mult: float = 4.0, peg_causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PEG(dim, causal=peg_causal), Attention(dim, dim_head, heads, attn_dropout), None,
                           FeedForward(dim, ff_mult, ff_dropout)])
            for _ in range(depth)
        )
        self.norm_out = LayerNorm(dim)
        self.gradient_checkpointing = False
        self.chunk_feedforward = True  # off with reference_semantics
        self.ff_chunk_tokens = 4096

    def _layer(self, layer: nn.ModuleList, x: torch.Tensor, video_shape, attn_bias) -> torch.Tensor:
        peg, attn, _, ff = layer
        x = peg(x, video_shape) + x
        x = attn(x, attn_bias) + x
        if torch.is_grad_enabled() or not self.chunk_feedforward:
            return ff(x) + x
        # without autograd: token blocks bound the (tokens, 2 * inner) hidden activations (row-wise: same numbers)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.cat([ff(block) for block in flat.split(self.ff_chunk_tokens)])
        return out.reshape(x.shape) + x

    def forward(self, x: torch.Tensor, video_shape: Sequence[int], attn_bias: Optional[torch.Tensor] = None):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self._layer, layer, x, tuple(video_shape), attn_bias, use_reentrant=False)
            else:
                x = self._layer(layer, x, video_shape, attn_bias)
        return self.norm_out(x)


class ContinuousPositionBias(nn.Module):
    """Attention bias from an MLP over log-signed relative 2D offsets (spatial stack only).

    The MLP is evaluated once per distinct offset ``(2h-1)(2w-1)`` and gathered to ``(heads, hw, hw)``
    instead of once per token pair (the same numbers, ~150x less work at 24x24); in eval the result is
    cached until a parameter changes. ``reference_semantics`` evaluates every pair on every call.
    """

    def __init__(self, dim: int, heads: int, layers: int = 2):
        super().__init__()
        self.net = nn.ModuleList([nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1))])
        for _ in range(layers - 1):
            self.net.append(nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)))
        self.net.append(nn.Linear(dim, heads))
        self.reference_semantics = False
        self._cache: Optional[tuple] = None

    def _mlp(self, rel: torch.Tensor) -> torch.Tensor:
        rel = torch.sign(rel) * torch.log(rel.abs() + 1)
        for layer in self.net:
            rel = layer(rel)
        return rel

    def compute(self, h: int, w: int, device) -> torch.Tensor:
        if self.reference_semantics:
            grid = torch.stack(torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                              indexing="ij")).reshape(2, -1).t()
            rel = (grid[:, None, :] - grid[None, :, :]).float()
            return self._mlp(rel).permute(2, 0, 1)
        di = torch.arange(-(h - 1), h, device=device)
        dj = torch.arange(-(w - 1), w, device=device)
        offsets = torch.stack(torch.meshgrid(di, dj, indexing="ij"), dim=-1).float()  # (2h-1, 2w-1, 2)
        table = self._mlp(offsets)  # (2h-1, 2w-1, heads)
        ii = torch.arange(h, device=device).repeat_interleave(w)
        jj = torch.arange(w, device=device).repeat(h)
        rows = (ii[:, None] - ii[None, :]) + (h - 1)
        cols = (jj[:, None] - jj[None, :]) + (w - 1)
        return table[rows, cols].permute(2, 0, 1).contiguous()

    def forward(self, h: int, w: int, device=None) -> torch.Tensor:
        device = device if device is not None else self.net[-1].weight.device
        if self.training or self.reference_semantics or torch.is_grad_enabled() and any(
                p.requires_grad for p in self.parameters()):
            self._cache = None
            return self.compute(h, w, device)
        key = (h, w, str(device), param_versions(self))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.compute(h, w, device))
        return self._cache[1]


class CosineSimCodebook(nn.Module):
    """EMA codebook matched by cosine similarity (buffers ``embed``, ``cluster_size``, ``initted``).

    Lookup: ``argmax(l2norm(x) . l2norm(embed)^T)``, returning the raw codebook row. In train mode the
    codebook is EMA-updated (decay 0.8), synchronised across DDP ranks when a process group is active.
    """

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.8, eps: float = 1e-5,
                 chunk_size: int = 2048):
        super().__init__()
        self.decay = decay
        self.eps = eps
        self.codebook_size = codebook_size
        self.chunk_size = chunk_size
        self.reference_semantics = False
        self.register_buffer("initted", torch.tensor([1.0]))
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))
        self.register_buffer("embed", F.normalize(torch.randn(1, codebook_size, dim), dim=-1))

    @torch.no_grad()
    def lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices of the most similar codes for ``flat`` of shape ``(n, dim)``."""
        codes = F.normalize(self.embed[0].to(flat.dtype), dim=-1)
        flat = F.normalize(flat, dim=-1)
        if self.reference_semantics:
            return (flat @ codes.t()).argmax(dim=-1)
        # chunked: bounds the (n, codebook_size) similarity matrix (13824 x 8192 x 4 B = 453 MB at full size)
        # to chunk_size rows
        return torch.cat([(c @ codes.t()).argmax(dim=-1) for c in flat.split(self.chunk_size)])

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        flat = F.normalize(flat.float(), dim=-1)
        bins = torch.bincount(indices, minlength=self.codebook_size).to(flat.dtype)
        embed_sum = torch.zeros(self.codebook_size, flat.shape[-1], dtype=flat.dtype, device=flat.device)
        embed_sum.index_add_(0, indices, flat)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bins)
            dist.all_reduce(embed_sum)
        self.cluster_size.data[0].lerp_(bins, 1 - self.decay)
        empty = bins == 0
        means = F.normalize(embed_sum / bins.clamp(min=1)[:, None], dim=-1)
        current = F.normalize(self.embed[0], dim=-1)
        target = torch.where(empty[:, None], current, means)
        self.embed.data[0].lerp_(target, 1 - self.decay)

    def forward(self, x: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])
        indices = self.lookup(flat)
        quantized = self.embed[0][indices].to(x.dtype)
        if self.training:
            self.ema_update(flat.detach(), indices)
        return quantized.reshape(x.shape), indices.reshape(x.shape[:-1])


class VectorQuantize(nn.Module):
    """Wrapper holding ``_codebook`` (key compatibility); straight-through estimator in train mode."""

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.8):
        super().__init__()
        self._codebook = CosineSimCodebook(dim, codebook_size, decay)

    def forward(self, x: torch.Tensor):
        quantized, indices = self._codebook(x)
        if self.training:
            quantized = x + (quantized - x).detach()
        return quantized, indices


class CTViT(nn.Module):
    """CT-CLIP's 3D vision transformer encoder (CTViT), key-compatible with the published weights.

    Input ``(B, channels, D, H, W)`` with ``H == W == image_size`` and ``D`` divisible by
    ``temporal_patch_size``; depth is the "time" axis. Output of ``forward(..., return_encoded_tokens=True)``:
    the VQ-quantised tokens ``(B, D/pt, H/p, W/p, dim)``.

    Args:
        dim: token width.
        codebook_size: number of VQ codes.
        image_size: in-plane size H = W of the input.
        patch_size: in-plane patch size.
        temporal_patch_size: patch size along D.
        spatial_depth: layers of the spatial transformer.
        temporal_depth: layers of the temporal transformer.
        dim_head: width per attention head.
        heads: attention heads.
        channels: input channels (1 for CT).
        attn_dropout: dropout on attention weights.
        ff_dropout: dropout inside the feed-forward blocks.
        vq_decay: EMA decay of the codebook (reference: 0.8).
        use_fused_attention: use ``scaled_dot_product_attention`` (same numbers, faster, less memory).
        gradient_checkpointing: recompute each transformer layer in backward (training memory).
        reference_semantics: plain attention, position bias recomputed for every token pair on every call,
            whole-volume patch embedding, unchunked feed-forward and codebook lookup: the reference's
            computation, used as a benchmark baseline.
        band_edges: use :class:`HUBandPatchEmbedding` with these edges (model-input units) as ``to_patch_emb``
            instead of the published voxel embedding (small-data option; None: the published embedding).
        quantize: return the VQ-quantised tokens (the published model). False returns the encoded tokens
            themselves (small-data option: 512 codes for every token are a bottleneck a few hundred volumes
            cannot train through); the codebook is then neither used nor updated, its keys stay.
        depth_pooling: how :meth:`encode_volume` pools the tokens over depth for the global embedding
            (:func:`pool_depth`; the model config's ``ctclip.image_pooling``, set by :class:`~custom_nets.CTCLIP`).
    """

    def __init__(self, *, dim: int, codebook_size: int, image_size: int, patch_size: int, temporal_patch_size: int,
                 spatial_depth: int, temporal_depth: int, dim_head: int = 64, heads: int = 8, channels: int = 1,
                 attn_dropout: float = 0.0, ff_dropout: float = 0.0, vq_decay: float = 0.8,
                 use_fused_attention: bool = True, gradient_checkpointing: bool = False,
                 reference_semantics: bool = False, band_edges: Optional[Sequence[float]] = None,
                 quantize: bool = True, depth_pooling: str = "depth_mean"):
        super().__init__()
        if depth_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"CTViT: depth_pooling must be one of {IMAGE_POOLINGS}, got {depth_pooling!r}")
        self.depth_pooling = depth_pooling
        if image_size % patch_size:
            raise ValueError(f"CTViT: image_size {image_size} is not divisible by patch_size {patch_size}")
        self.dim = dim
        self.quantize = quantize
        self.image_size = image_size
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.channels = channels
        self.patch_height_width = (image_size // patch_size, image_size // patch_size)
        p, pt, c = patch_size, temporal_patch_size, channels

        self.spatial_rel_pos_bias = ContinuousPositionBias(dim=dim, heads=heads)
        # first-frame embedding and the two decoder heads are unused by CT-CLIP; kept for key compatibility
        self.to_patch_emb_first_frame = nn.Sequential(Patchify(p, 1), nn.LayerNorm(c * p * p), nn.Linear(c * p * p, dim),
                                                      nn.LayerNorm(dim))
        if band_edges is None:
            self.to_patch_emb = nn.Sequential(Patchify(p, pt), nn.LayerNorm(c * pt * p * p),
                                              nn.Linear(c * pt * p * p, dim), nn.LayerNorm(dim))
        else:
            if channels != 1:
                raise ValueError(f"CTViT: band_edges needs a single-channel input, got channels={channels}")
            self.to_patch_emb = HUBandPatchEmbedding(band_edges, p, pt, dim)
        kwargs = dict(dim=dim, dim_head=dim_head, heads=heads, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
                      peg_causal=True)
        self.enc_spatial_transformer = Transformer(depth=spatial_depth, **kwargs)
        self.enc_temporal_transformer = Transformer(depth=temporal_depth, **kwargs)
        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, decay=vq_decay)
        self.to_pixels_first_frame = nn.Sequential(nn.Linear(dim, c * p * p), Unpatchify(p, 1, c))
        self.to_pixels = nn.Sequential(nn.Linear(dim, c * pt * p * p), Unpatchify(p, pt, c))
        self.set_options(use_fused_attention=use_fused_attention, gradient_checkpointing=gradient_checkpointing,
                         reference_semantics=reference_semantics)

    def set_options(self, use_fused_attention: Optional[bool] = None, gradient_checkpointing: Optional[bool] = None,
                    reference_semantics: Optional[bool] = None) -> "CTViT":
        """Switch execution options after construction (weights are untouched)."""
        if reference_semantics is not None:
            self.reference_semantics = reference_semantics
            self.spatial_rel_pos_bias.reference_semantics = reference_semantics
            self.vq._codebook.reference_semantics = reference_semantics
        if use_fused_attention is not None:
            self.use_fused_attention = use_fused_attention
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused = self.use_fused_attention and not self.reference_semantics
        self.enc_spatial_transformer.chunk_feedforward = not self.reference_semantics
        self.enc_temporal_transformer.chunk_feedforward = not self.reference_semantics
        if gradient_checkpointing is not None:
            self.enc_spatial_transformer.gradient_checkpointing = gradient_checkpointing
            self.enc_temporal_transformer.gradient_checkpointing = gradient_checkpointing
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer layer in backward (the image-encoder contract's switch)."""
        self.set_options(gradient_checkpointing=enabled)

    @property
    def token_dim(self) -> int:
        """Width of the tokens :meth:`encode_volume` returns."""
        return self.dim

    @property
    def embedding_dim(self) -> int:
        """Width of the global embedding: the depth-pooled tokens flattened, ``(H/p) * (W/p) * dim``."""
        return self.patch_height_width[0] * self.patch_height_width[1] * self.dim

    def train(self, mode: bool = True) -> "CTViT":
        # frozen stays frozen: without trainable parameters the encoder (and its EMA codebook) stays in eval
        if mode and not any(p.requires_grad for p in self.parameters()):
            mode = False
        return super().train(mode)

    def check_input(self, video: torch.Tensor) -> None:
        if video.ndim != 5:
            raise ValueError(f"CTViT expects (B, C, D, H, W), got a tensor of shape {tuple(video.shape)}")
        b, c, d, h, w = video.shape
        if c != self.channels or h != self.image_size or w != self.image_size or d % self.temporal_patch_size:
            raise ValueError(
                f"CTViT expects (B, {self.channels}, D, {self.image_size}, {self.image_size}) with D divisible by "
                f"{self.temporal_patch_size}; got {tuple(video.shape)}. Check the model config's input contract "
                "(spatial_size and axis_codes).")

    def patch_embed(self, video: torch.Tensor) -> torch.Tensor:
        """``to_patch_emb`` (patchify, LayerNorm, Linear, LayerNorm; or the HU-band embedding) -> ``(b, t, h, w, dim)``.

        Without autograd it runs one temporal slab at a time: the same numbers, without materialising the
        patchified copy and its normed copy of the whole volume (2 x 221 MB at 240x480x480).
        """
        if torch.is_grad_enabled() or self.reference_semantics:
            return self.to_patch_emb(video)
        slabs = video.split(self.temporal_patch_size * max(1, 4 // video.shape[0]), dim=2)
        return torch.cat([self.to_patch_emb(s) for s in slabs], dim=1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Spatial then temporal transformer on patch tokens ``(b, t, h, w, d)`` (before quantisation)."""
        b, t, h, w, d = tokens.shape
        video_shape = (b, t, h, w)
        attn_bias = self.spatial_rel_pos_bias(h, w, device=tokens.device)
        x = tokens.reshape(b * t, h * w, d)
        x = self.enc_spatial_transformer(x, video_shape=video_shape, attn_bias=attn_bias)
        x = x.reshape(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
        x = self.enc_temporal_transformer(x, video_shape=video_shape)
        return x.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4).contiguous()

    def forward(self, video: torch.Tensor, return_encoded_tokens: bool = True, return_only_codebook_ids: bool = False):
        """Encode a volume.

        Args:
            video: ``(B, C, D, H, W)`` tensor.
            return_encoded_tokens: return the quantised tokens ``(B, t, h, w, dim)`` (the only mode CT-CLIP uses;
                with ``quantize=False`` the tokens before quantisation).
            return_only_codebook_ids: return the codebook indices ``(B, t, h, w)`` instead.
        """
        if not (return_encoded_tokens or return_only_codebook_ids):
            raise ValueError("CTViT here is an encoder only (CT-CLIP never decodes): ask for return_encoded_tokens or "
                             "return_only_codebook_ids")
        self.check_input(video)
        tokens = self.patch_embed(video)
        tokens = self.encode(tokens)
        if not self.quantize and not return_only_codebook_ids:
            return tokens
        quantized, indices = self.vq(tokens)
        if return_only_codebook_ids:
            return indices
        return quantized

    def encode_volume(self, video: torch.Tensor) -> ImageEncoding:
        """The image-encoder contract (:mod:`custom_nets.image_encoders`): the tokens of :meth:`forward`, pooled over
        depth (``depth_pooling``) and flattened in (h, w, dim) order as the global embedding, and all
        ``t * h * w`` tokens with their centres in model-input voxels."""
        tokens = self(video, return_encoded_tokens=True).float()
        b, t, h, w, d = tokens.shape
        positions = grid_positions((t, h, w), (self.temporal_patch_size, self.patch_size, self.patch_size),
                                   device=tokens.device)
        return ImageEncoding(pool_depth(tokens, self.depth_pooling).flatten(1), tokens.reshape(b, t * h * w, d),
                             positions)
