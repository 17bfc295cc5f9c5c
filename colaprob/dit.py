"""The Cola DLM block-causal DiT: the velocity field of the latent prior ``p_psi(z)``.

Weight-compatible with the official ``ColaDiTModel`` (reference sections 3.2, 8, 10). The
network maps latents ``x`` [B, Lq, C] at timesteps ``tau`` (0..1000 scale, one per row) to
velocities; which rows see which is given by a boolean mask, so the same ``forward`` serves

* the training "2L" layout ``[clean | noisy]`` (``velocity_2l``), optionally reusing the clean
  half's keys and values (``clean_history``) when only the noisy half changes, as in an ODE
  solve;
* block-wise generation with a KV cache (``prefill``, ``block_velocity``, ``commit``) and the
  unconditional CFG pass (``block_velocity`` without a cache).

Latents are in DiT space ``u = (z - shift) * scale`` (see ``colaprob.model``). Shapes: ``W =
txt_dim``, ``Hd`` heads of ``hd = head_dim`` channels, ``R = rope_dim``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colaprob.config import DiTConfig
from colaprob.attention import KVCache, attention, block_causal, key_rows, new_rows
from colaprob.linear import Linear

TIMESTEP_FEATURES = 256


def timestep_features(tau: Tensor) -> Tensor:
    """[...] timesteps (0..1000) -> [..., 256] features ``[sin(tau f) | cos(tau f)]`` with
    ``f_j = exp(-ln(10000) j / 128)``, always in float32 like the official code (8.2)."""
    half = TIMESTEP_FEATURES // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=tau.device) / half)
    args = tau.float()[..., None] * freqs
    return torch.cat([args.sin(), args.cos()], -1)


class TimestepEmbedding(nn.Module):
    """``emb_in``: sinusoid features -> three linears with SiLU between (no final activation).

    ``tau`` [...] -> [..., W]; each distinct timestep is embedded once and gathered to its
    rows (the rows of an ODE solve share one or two timesteps)."""

    def __init__(self, c: DiTConfig):
        super().__init__()
        self.proj_in = Linear(TIMESTEP_FEATURES, c.txt_dim)
        self.proj_hid = Linear(c.txt_dim, c.txt_dim)
        self.proj_out = Linear(c.txt_dim, c.emb_dim)

    def forward(self, tau: Tensor) -> Tensor:
        timesteps, level = torch.unique(tau, return_inverse=True)
        x = timestep_features(timesteps).to(self.proj_in.weight.dtype)
        return self.proj_out(F.silu(self.proj_hid(F.silu(self.proj_in(x)))))[level]


class Rotary(nn.Module):
    """Interleaved RoPE on the first ``R`` channels of each head (8.5), from the inverse
    frequencies stored in the checkpoint (a persistent buffer, used as stored)."""

    def __init__(self, rope_dim: int):
        super().__init__()
        self.register_buffer("freqs", 1.0 / 10000 ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """``x``: [B, heads, L, hd]; ``positions``: [B, L]. Pairs ``(2j, 2j+1)`` turn by
        ``position * freqs[j]`` (float32 angles; the rotation in at least float32)."""
        R = 2 * self.freqs.shape[0]
        angles = positions[:, None, :, None].float() * self.freqs.float()  # [B, 1, L, R/2]
        dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = angles.to(dtype).cos(), angles.to(dtype).sin()
        even, odd = x[..., :R].to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2)
        return torch.cat([rotated.to(x.dtype), x[..., R:]], -1)


class Attention(nn.Module):
    """``msa``: fused QKV, per-head affine q/k LayerNorm, partial interleaved RoPE (8.4)."""

    def __init__(self, c: DiTConfig):
        super().__init__()
        self.c = c
        inner = c.heads * c.head_dim
        self.proj_qkv = Linear(c.txt_dim, 3 * inner, bias=c.qk_bias)
        self.proj_out = Linear(inner, c.txt_dim, bias=c.qk_bias)
        self.norm_q = nn.LayerNorm(c.head_dim, c.norm_eps)
        self.norm_k = nn.LayerNorm(c.head_dim, c.norm_eps)
        # Nested as `rope.rope` so the buffer key matches the official `msa.rope.rope.freqs`.
        self.rope = nn.ModuleDict({"rope": Rotary(c.rope_dim)})

    def forward(
        self, a: Tensor, q_pos: Tensor, k_pos: Tensor, allowed: Tensor, past: tuple[Tensor, Tensor] | None, interleave: int | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``a``: [B, Lq, W]; ``past``: cached (k, v) [B, n, Hd, hd]; ``k_pos``: [B, n + Lq];
        ``allowed``: [B or 1, Lq, n + Lq]; ``interleave``: see ``join_keys``. Returns [B, Lq, W]
        and this call's (k, v) rows (k after norm_k, before RoPE: what the cache keeps)."""
        q, k, v = self.proj_qkv(a).unflatten(-1, (3, self.c.heads, self.c.head_dim)).unbind(-3)
        q, k = self.norm_q(q), self.norm_k(k)
        new_kv = (k, v)
        if past is not None:
            k, v = join_keys(past[0], k, interleave), join_keys(past[1], v, interleave)
        q = self.rope.rope(q.transpose(1, 2), q_pos)
        k = self.rope.rope(k.transpose(1, 2), k_pos)
        return self.proj_out(attention(q, k, v.transpose(1, 2), allowed)), new_kv


def join_keys(cached: Tensor, new: Tensor, interleave: int | None) -> Tensor:
    """The keys a call sees, on dim 1: ``[cached | new]``, or with ``interleave = bs`` (both of
    the same length, a multiple of ``bs``) their blocks of ``bs`` rows alternated, ``[cached
    block 0 | new block 0 | cached block 1 | ...]``.

    Attention is the same for any order of its keys (each key carries its own position and
    mask column), but its float sums are not: in the 2L layout ``[clean | noisy]`` a noisy
    block's own keys sit after all L clean ones, so where they land in the softmax's vector
    lanes depends on how far the batch pads L. Interleaved, a block's keys are at the same
    places whatever follows them, and padding only appends masked keys.
    """
    if interleave is None:
        return torch.cat([cached, new], 1)
    blocks = lambda x: x.unflatten(1, (-1, interleave))  # noqa: E731
    return torch.stack([blocks(cached), blocks(new)], 2).flatten(1, 3)


def per_row(values: Tensor, level: Tensor | None) -> Tensor:
    """``values`` [U, n] of the distinct timesteps at each row: [B, Lq, n] by ``level`` [B, Lq];
    ``level`` None (one timestep for all rows): [1, n], which broadcasts."""
    return values if level is None else values[level]


def ada_linear(width: int, out: int) -> nn.Sequential:
    """An AdaLN projection ``Linear(silu(e))`` (its keys are ``....1.weight``/``bias``)."""
    return nn.Sequential(nn.SiLU(), Linear(width, out))


class Block(nn.Module):
    """One DiT block: AdaLN shift-scale-gate around attention and a GELU-tanh MLP (8.3).

    The AdaLN modulations depend on the row's timestep alone, so they are computed once per
    distinct timestep and gathered to the rows: an ODE solve's rows share one or two
    timesteps (t, and 0 on clean rows), and computed per row these projections took a quarter
    to two fifths of an official-width forward pass (bench/scale.py).
    """

    def __init__(self, c: DiTConfig):
        super().__init__()
        W = c.txt_dim
        self.msa_norm = nn.LayerNorm(W, c.norm_eps, elementwise_affine=False)
        self.msa = Attention(c)
        self.mlp_norm = nn.LayerNorm(W, c.norm_eps, elementwise_affine=False)
        self.mlp = nn.ModuleDict({"proj_in": Linear(W, W * c.expand_ratio), "proj_out": Linear(W * c.expand_ratio, W)})
        self.ada = nn.ModuleDict(
            {"msa_in": ada_linear(W, 2 * W), "msa_out": ada_linear(W, W), "mlp_in": ada_linear(W, 2 * W), "mlp_out": ada_linear(W, W)}
        )

    def forward(self, x, e, level, q_pos, k_pos, allowed, past, interleave):
        """``x``: [B, Lq, W]; ``e``: [U, W] embeddings of the U distinct timesteps; ``level``:
        [B, Lq] which of them each row has (None when U = 1); the rest as in
        ``Attention.forward``. Returns the new x and this call's (k, v) rows."""
        shift, scale = per_row(self.ada.msa_in(e), level).chunk(2, -1)
        o, kv = self.msa(self.msa_norm(x) * (1 + scale) + shift, q_pos, k_pos, allowed, past, interleave)
        x = x + per_row(self.ada.msa_out(e), level) * o
        shift, scale = per_row(self.ada.mlp_in(e), level).chunk(2, -1)
        m = self.mlp_norm(x) * (1 + scale) + shift
        x = x + per_row(self.ada.mlp_out(e), level) * self.mlp.proj_out(F.gelu(self.mlp.proj_in(m), approximate="tanh"))
        return x, kv


def mask_2l(length: int, block_size: int | Tensor, device=None) -> Tensor:
    """The 2L training mask (10.2) for rows ``[clean (L) | noisy (L)]``: bool [B or 1, 2L, 2L].

    With ``b`` the block of a row's position (``block_size``: int or one per sample [B]):
    clean -> clean iff ``b(k) <= b(q)``; noisy -> clean iff ``b(k) < b(q)``; noisy -> noisy
    iff ``b(k) == b(q)``; clean -> noisy never.
    """
    positions = torch.arange(length, device=device)
    b = positions // torch.as_tensor(block_size, device=device).reshape(-1, 1)  # [B or 1, L]
    bq, bk = b[:, :, None], b[:, None, :]
    clean_rows = torch.cat([bk <= bq, torch.zeros_like(bq == bk)], -1)
    noisy_rows = torch.cat([bk < bq, bk == bq], -1)
    return torch.cat([clean_rows, noisy_rows], 1)


class DiT(nn.Module):
    """The official ``ColaDiTModel``: ``txt_in``, ``emb_in``, ``blocks``, ``txt_out_*``."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        W = config.txt_dim
        self.txt_in = nn.ModuleDict({"proj": Linear(config.txt_in_channels, W)})
        self.emb_in = TimestepEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.txt_out_norm = nn.LayerNorm(W, config.norm_eps)  # affine, unlike the block norms
        self.txt_out_ada = nn.ModuleDict({"out_in": ada_linear(W, 2 * W)})
        self.txt_out = nn.ModuleDict({"proj": Linear(W, config.txt_out_channels)})

    def forward(
        self, x: Tensor, tau: Tensor, positions: Tensor, allowed: Tensor, cache: KVCache | None = None, interleave: int | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """``x``: [B, Lq, Cin] rows at ``positions`` [B, Lq] (RoPE), timesteps ``tau``
        broadcastable to [B, Lq]; ``cache``: rows seen before (keys ``[cached | x]``, or their
        blocks alternated with ``interleave``, see ``join_keys``); ``allowed``: bool [B or 1,
        Lq, n_cached + Lq] over the keys in that order. Returns velocities [B, Lq, Cout] and
        this call's (k, v) rows per block, for a cache."""
        e, level = self._timestep_embeddings(tau.expand(x.shape[:2]))
        k_pos = positions if cache is None else join_keys(cache.positions, positions, interleave)
        h = self.txt_in.proj(x)
        layers = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, e, level, positions, k_pos, allowed, None if cache is None else cache.layers[i], interleave)
            layers.append(kv)
        shift, scale = per_row(self.txt_out_ada.out_in(e), level).chunk(2, -1)
        return self.txt_out.proj(self.txt_out_norm(h) * (1 + scale) + shift), layers

    def _timestep_embeddings(self, tau: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(e, level)``: [U, W] embeddings of the U distinct timesteps of ``tau`` [B, Lq] and
        [B, Lq] which of them each row has (None when all rows share one, as the noisy rows
        of an ODE solve do). ``emb_in`` still runs on the rows (its output per row, as the
        official model has it), picking one row per timestep from it."""
        timesteps, level = torch.unique(tau, return_inverse=True)
        rows = self.emb_in(tau).flatten(0, 1)
        if len(timesteps) == 1:
            return rows[:1], None
        first = torch.empty_like(timesteps, dtype=torch.long).scatter_(0, level.flatten(), torch.arange(len(rows), device=tau.device))
        return rows[first], level  # any row of each timestep

    # -- training layout ------------------------------------------------------------------------

    def velocity_2l(
        self, clean: Tensor, noisy: Tensor, tau: Tensor, block_size: int | Tensor, history: KVCache | None = None
    ) -> Tensor:
        """Velocities of the noisy rows in the 2L layout ``[clean | noisy]`` (10.2).

        ``clean``, ``noisy``: [B, L, C]; ``tau``: timesteps broadcastable to [B, L] (0 on noisy
        rows that hold clean values: a prefix inside a block, the prompt-block trick);
        ``block_size``: int or [B]. Both halves sit at positions 0..L-1; the clean half at
        timestep 0. ``history = clean_history(clean, block_size)`` gives the same result
        without recomputing the clean half (with an int ``block_size`` dividing L, over the
        keys in block-interleaved order, so that a row's result does not depend on how far
        the batch pads L: ``join_keys``). Returns [B, L, Cout].
        """
        B, L = noisy.shape[:2]
        positions = torch.arange(L, device=noisy.device).expand(B, L)
        allowed = mask_2l(L, block_size, noisy.device)
        tau = tau.expand(B, L)
        if history is not None:
            interleave = block_size if isinstance(block_size, int) and L % block_size == 0 else None
            keys = allowed[:, L:]
            if interleave is not None:
                keys = join_keys(keys[..., :L].transpose(1, 2), keys[..., L:].transpose(1, 2), interleave).transpose(1, 2)
            return self(noisy, tau, positions, keys, history, interleave)[0]
        both = torch.cat([positions, positions], 1)
        v, _ = self(torch.cat([clean, noisy], 1), torch.cat([torch.zeros_like(tau), tau], 1), both, allowed)
        return v[:, L:]

    def velocity_window(self, noisy: Tensor, tau: Tensor, start: int, block_size: int, history: KVCache) -> Tensor:
        """``velocity_2l`` restricted to the noisy rows at positions ``start .. start + W - 1``
        (``start`` a multiple of ``block_size``): ``noisy`` [B, W, C], ``tau`` broadcastable to
        [B, W], ``history = clean_history(clean[:, :start + W], block_size)``. The same
        velocities as the full layout at those positions (their noisy rows see only their own
        block's noisy rows), for ``W`` rows instead of ``start + W``. Returns [B, W, Cout]."""
        B, W = noisy.shape[:2]
        end = start + W
        positions = torch.arange(start, end, device=noisy.device).expand(B, W)
        rows = mask_2l(end, block_size, noisy.device)[:, end + start :]
        allowed = torch.cat([rows[..., :end], rows[..., end + start :]], -1)
        return self(noisy, tau.expand(B, W), positions, allowed, history)[0]

    def clean_history(self, clean: Tensor, block_size: int | Tensor) -> KVCache:
        """Keys and values of the clean half of the 2L layout: clean rows see only clean rows,
        at timestep 0, so they depend on ``clean`` [B, L, C] alone and can be reused for every
        noisy input (``velocity_2l(..., history=...)``)."""
        B, L = clean.shape[:2]
        positions = torch.arange(L, device=clean.device).expand(B, L)
        allowed = mask_2l(L, block_size, clean.device)[:, :L, :L]
        _, layers = self(clean, clean.new_zeros(B, L), positions, allowed)
        return KVCache(layers, positions, torch.ones_like(positions, dtype=torch.bool))

    # -- block-wise generation (10.3) -----------------------------------------------------------

    def prefill(self, clean: Tensor, lengths: Tensor | None = None) -> KVCache:
        """Cache a clean prefix ``clean`` [B, n, C] at timestep 0, block-causally with the
        config block size; ``lengths``: [B] valid rows per sample (None: all n)."""
        B, n = clean.shape[:2]
        positions = torch.arange(n, device=clean.device).expand(B, n)
        valid = torch.ones_like(positions, dtype=torch.bool) if lengths is None else positions < lengths[:, None]
        allowed = block_causal(positions, positions, self.config.block_size) & valid[:, None, :]
        _, layers = self(clean, clean.new_zeros(B, n), positions, allowed)
        return KVCache(layers, positions, valid)

    def _over_cache(self, block: Tensor, tau: Tensor, cache: KVCache | None):
        """Run ``block`` [B, n, C] right after each sample's cached rows (all of which it sees)."""
        B, n = block.shape[:2]
        positions = new_rows(cache, B, n, block.device)
        _, k_valid = key_rows(cache, positions, torch.ones_like(positions, dtype=torch.bool))
        v, layers = self(block, tau, positions, k_valid[:, None, :], cache)
        return v, layers, positions

    def block_velocity(self, block: Tensor, tau: Tensor, cache: KVCache | None = None) -> Tensor:
        """Velocity of the current block ``block`` [B, bs, C] at timesteps ``tau``
        (broadcastable to [B, bs]; 0 on rows pinned to known values). With ``cache``: the
        conditional velocity given the cached prefix, read-only. Without: the unconditional CFG
        pass, the block alone at positions 0..bs-1."""
        return self._over_cache(block, tau, cache)[0]

    def commit(self, block: Tensor, cache: KVCache | None) -> KVCache:
        """Append a finished block [B, bs, C] to the cache (its clean K/V at timestep 0);
        ``cache`` None starts one."""
        _, layers, positions = self._over_cache(block, block.new_zeros(block.shape[:2]), cache)
        valid = torch.ones_like(positions, dtype=torch.bool)
        return KVCache(layers, positions, valid) if cache is None else cache.extend(layers, positions, valid)
