"""The Cola DLM Text VAE: encoder ``q_phi(z | x)`` and decoder ``p_theta(x | z)``.

Weight-compatible with the official ``ColaTextVAEModel`` (state-dict keys and forward math of
``shared/reference/official-cola-format.md``, sections 3.1, 4, 5, 6). Where the official code
packs samples into one flat row list, this file works on right-padded batches ``[B, ...]``
with a key-padding mask, so the padding of a batch never changes a valid row.

The attention helpers and ``KVCache`` it shares with the DiT live in ``colaprob.attention``.

Shapes: ``B`` sequences, ``N`` tokens, ``L = N / P`` latent positions (``P = patch_size``),
``D = dim``, ``d = latent_dim``, ``V = vocab_size``, ``H`` heads of size ``h = D / H``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colaprob.attention import KVCache, attention, block_causal, key_rows, new_rows
from colaprob.config import VAEConfig
from colaprob.linear import Linear, linear

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# ----------------------------------------------------------------------------------------------
# VAE transformer block
# ----------------------------------------------------------------------------------------------


def rope_half_split(x: Tensor, positions: Tensor, theta: float, full_precision: bool) -> Tensor:
    """Rotate channel pairs ``(j, j + h/2)`` of every head by ``position * theta^(-2j/h)``
    (reference 5.3). ``x``: [B, heads, L, h]; ``positions``: [B, L].

    Angles are float32 products as in the official code; the rotation runs in at least float32
    when ``full_precision`` (float64 stays float64), else in the dtype of ``x``.
    """
    h = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, h, 2, device=x.device, dtype=torch.float32) / h)
    angles = positions[:, None, :, None].float() * inv_freq  # [B, 1, L, h/2]
    dtype = torch.promote_types(x.dtype, torch.float32) if full_precision else x.dtype
    angles = torch.cat([angles, angles], -1).to(dtype)
    xr = x.to(dtype)
    x1, x2 = xr.chunk(2, -1)
    rotated = torch.cat([-x2, x1], -1)
    return (xr * angles.cos() + rotated * angles.sin()).to(x.dtype)


class VAEBlock(nn.Module):
    """One VAE transformer block (reference 5.2), pre-norm or the official post-norm variant."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        self.c = c
        D, Dk = c.dim, c.dim // c.shared_heads_kv
        eps = c.layer_norm_eps
        self.norm_attn = nn.LayerNorm(D, eps, elementwise_affine=c.layer_norm_affine)
        self.qkv_proj = Linear(D, D + 2 * Dk, bias=c.qk_bias)
        # q/k norms run over the whole projection width, not per head.
        self.q_norm = nn.LayerNorm(D, eps, elementwise_affine=c.qk_norm_affine) if c.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(Dk, eps, elementwise_affine=c.qk_norm_affine) if c.qk_norm else nn.Identity()
        self.attn_out_proj = Linear(D, D, bias=c.bias)
        self.norm_ffn = nn.LayerNorm(D, eps)  # always affine
        self.ffn_proj = Linear(D, c.ffn_dim, bias=c.bias)
        self.ffn_out = Linear(c.ffn_dim // 2 if c.act == "swiglu" else c.ffn_dim, D, bias=c.bias)

    def ffn(self, x: Tensor) -> Tensor:
        u = self.ffn_proj(x)
        if self.c.act == "swiglu":
            value, gate = u.chunk(2, -1)  # the gate is the SECOND half
            u = F.silu(gate) * value
        else:
            u = F.silu(u) if self.c.act == "silu" else F.gelu(u)
        return self.ffn_out(u)

    def forward(
        self, x: Tensor, q_pos: Tensor, k_pos: Tensor, allowed: Tensor, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x``: [B, Lq, D] rows at ``q_pos`` [B, Lq]; ``past``: raw (k, v) [B, n, D/S] of earlier
        rows; ``k_pos``: [B, n + Lq] positions of [past | x]; ``allowed``: [B, Lq, n + Lq].
        Returns the new x and this call's raw (k, v) rows (the projection, before k_norm and
        RoPE, which is what the decoder cache keeps, reference 6)."""
        c = self.c
        D, Dk, h = c.dim, c.dim // c.shared_heads_kv, c.head_size
        qkv = self.qkv_proj(x if c.post_norm else self.norm_attn(x))
        if c.clip_qkv is not None:
            qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
        q, k, v = qkv.split([D, Dk, Dk], -1)
        new_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        q, k = self.q_norm(q), self.k_norm(k)
        heads = lambda t: t.unflatten(-1, (-1, h)).transpose(1, 2)  # [B, L, n*h] -> [B, n, L, h]
        q = rope_half_split(heads(q), q_pos, c.rope_theta, c.rope_full_precision)
        k = rope_half_split(heads(k), k_pos, c.rope_theta, c.rope_full_precision)
        o = self.attn_out_proj(attention(q, k, heads(v), allowed))
        if c.post_norm:
            # Official asymmetry: normalise the residual stream around attention, the FFN output
            # around the FFN.
            x = self.norm_attn(x) + o
            return x + self.norm_ffn(self.ffn(x)), new_kv
        x = x + o
        return x + self.ffn(self.norm_ffn(x)), new_kv


def run_blocks(
    blocks: nn.ModuleList, x: Tensor, valid: Tensor | None, block_size: int | None, cache: KVCache | None
) -> tuple[Tensor, KVCache]:
    """Run VAE blocks over new rows ``x`` [B, Lq, D] placed after ``cache``.

    ``valid``: [B, Lq] False on batch padding (None: all valid); ``block_size``: the
    block-causal block, or None for full attention within each sample (``block_causal =
    false``: the official code then uses no mask at all, which also lets the samples of one
    batch see each other; here a sample only sees itself). Returns x and the cache extended
    with these rows.
    """
    B, Lq = x.shape[:2]
    q_pos = new_rows(cache, B, Lq, x.device)
    valid = torch.ones_like(q_pos, dtype=torch.bool) if valid is None else valid
    k_pos, k_valid = key_rows(cache, q_pos, valid)
    allowed = k_valid[:, None, :]
    if block_size is not None:
        allowed = allowed & block_causal(q_pos, k_pos, block_size)
    layers = []
    for i, block in enumerate(blocks):
        x, kv = block(x, q_pos, k_pos, allowed, None if cache is None else cache.layers[i])
        layers.append(kv)
    return x, KVCache(layers, q_pos, valid) if cache is None else cache.extend(layers, q_pos, valid)


# ----------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------


class PatchEmbedding(nn.Conv1d):
    """The official ``Conv1d(D, D, P, stride=P)`` over token embeddings (its weight [D, D, P]
    is the checkpoint's), computed as the same sums: each patch of P embeddings, flattened
    channel-major, times the flattened kernel, through ``linear``. On several threads a
    convolution's rounding depends on the batch's shape; this product's does not."""

    def forward(self, x: Tensor) -> Tensor:
        """``x``: [B, N, D] token embeddings (N a multiple of P). Returns [B, N / P, D]."""
        P = self.kernel_size[0]
        patches = x.unflatten(1, (-1, P)).transpose(2, 3).flatten(2)  # [B, L, D * P], index c * P + k
        return linear(patches, self.weight.flatten(1), self.bias)


class Encoder(nn.Module):
    """Tokens -> ``encoder.final_layer`` output (reference 5.1, steps 1-4)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        self.c = c
        D, d = c.dim, c.latent_dim
        self.wte = nn.Embedding(c.vocab_size + 1, D)  # row V: the mask token of the masking loss
        self.patch_embedder = PatchEmbedding(D, D, c.patch_size, stride=c.patch_size)
        self.blocks = nn.ModuleList(VAEBlock(c) for _ in range(c.encoder_num_blocks))
        self.final_layer = Linear(D, 2 * d if c.use_variation else d, bias=c.bias)
        # Non-affine LayerNorm of the posterior mean (of the whole output when deterministic).
        use_norm = c.encoder_last_ln or not c.use_variation
        self.final_norm = nn.LayerNorm(d, c.layer_norm_eps, elementwise_affine=False) if use_norm else nn.Identity()

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``ids``: [B, N] (N a multiple of P); ``lengths``: [B] valid latent positions.
        Returns [B, L, 2d] (mean before its LayerNorm, raw logvar) or [B, L, d]."""
        x = self.patch_embedder(self.wte(ids))
        valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
        x, _ = run_blocks(self.blocks, x, valid, self.c.block_size if self.c.block_causal else None, None)
        return self.final_layer(x)


class Decoder(nn.Module):
    """Latents -> token logits (reference 5.4), optionally block by block with a KV cache."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        self.c = c
        D = c.dim
        self.in_layer = Linear(c.latent_dim, D, bias=c.bias)
        self.blocks = nn.ModuleList(VAEBlock(c) for _ in range(c.decoder_num_blocks))
        self.unpatch_layer = Linear(D, c.patch_size * D)  # bias regardless of `bias`
        self.final_norm = nn.LayerNorm(D, c.layer_norm_eps)  # always affine
        self.final_layer = Linear(D, c.vocab_size, bias=c.bias)

    def forward(self, z: Tensor, lengths: Tensor | None = None, cache: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """``z``: [B, Lq, d] latents placed after ``cache`` (a previous call's returned cache, or
        None); ``lengths``: [B] valid positions of ``z`` (None: all). Returns logits
        [B, Lq * P, V] and the cache extended with these rows. Decoding block by block through
        the cache gives the same logits as decoding the whole sequence at once."""
        valid = None if lengths is None else torch.arange(z.shape[1], device=z.device) < lengths[:, None]
        block_size = self.c.block_size if self.c.block_causal else None
        x, cache = run_blocks(self.blocks, self.in_layer(z), valid, block_size, cache)
        u = self.unpatch_layer(x)  # [B, Lq, P*D], channel-major: view as [D, P]
        x = u.unflatten(-1, (self.c.dim, self.c.patch_size)).transpose(-1, -2).flatten(1, 2)  # [B, Lq*P, D]
        return self.final_layer(self.final_norm(x)), cache


class TextVAE(nn.Module):
    """The official ``ColaTextVAEModel`` (``encoder.*`` and ``decoder.*`` keys)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def mask_token_id(self) -> int:
        """The extra embedding row ``V``: the [MASK] input of the masking loss."""
        return self.config.vocab_size

    def encode(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor | None]:
        """Posterior ``q_phi(z | x)``: ``ids`` [B, N], ``lengths`` [B] valid latent positions ->
        mean [B, L, d] and log-variance clamped to [-30, 20] (None for a deterministic encoder).
        Rows beyond a sample's length are computed but meaningless."""
        y = self.encoder(ids, lengths)
        if not self.config.use_variation:
            return self.encoder.final_norm(y), None
        mean, logvar = y.chunk(2, -1)
        return self.encoder.final_norm(mean), logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``z``: [B, L, d] -> logits [B, L * P, V] (whole sequences, no cache)."""
        return self.decoder(z, lengths)[0]
