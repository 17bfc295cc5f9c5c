"""Attention pieces shared by the Text VAE (``colaprob.vae``) and the DiT (``colaprob.dit``):
the block-causal mask, masked multi-head attention, and the key/value cache of block-wise
calls (reference sections 4.2 and 4.3 of the official format).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Keys are padded (masked) to a multiple of this: a softmax row whose length is not a multiple
# of the vector width (16 floats with AVX-512, 8 with AVX2) ends in a scalar loop, which
# rounds differently, so a query's result would depend on how many keys its batch's padding
# gave it. (64 measured the same and cost 1.18x on the embedded model's exact trace, 16 1.02x.)
KEY_TILE = 16


def block_causal(q_pos: Tensor, k_pos: Tensor, block_size: int | Tensor) -> Tensor:
    """Where block-causal attention is allowed: ``block(q) >= block(k)`` (reference 4.2).

    ``q_pos``: [B, Lq] or [Lq], ``k_pos``: [B, Lk] or [Lk] positions; ``block_size``: an int or
    a [B] tensor (one block size per sample). Returns bool [B or 1, Lq, Lk].
    """
    bs = torch.as_tensor(block_size, device=q_pos.device)
    bs = bs.reshape(-1, 1)  # [B or 1, 1]: broadcasts over positions
    return (q_pos // bs)[..., :, None] >= (k_pos // bs)[..., None, :]


def attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """``softmax((q / sqrt(h)) k^T + mask) v`` per head (reference 4.3).

    ``q``: [B, H, Lq, h]; ``k``, ``v``: [B, Hk, Lk, h] with ``Hk`` = H, or 1 for one K/V head
    shared by all query heads; ``allowed``: bool [B or 1, Lq, Lk]. Returns [B, Lq, H * h], the
    heads concatenated in order. Masked scores get ``finfo.min`` added, which leaves them at
    ``finfo.min`` in float rounding, as the official code sets them (a row with nothing
    allowed, which only padding can produce, then averages instead of NaN); an addition
    rather than ``masked_fill``, whose backward a batched backward pass would run once per
    probe. Keys are padded to a multiple of ``KEY_TILE`` (masked), so a query's result does not
    depend on how far a batch pads the keys beyond that (bit for bit on CPU).
    """
    pad = -k.shape[-2] % KEY_TILE
    if pad:
        k, v, allowed = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(allowed, (0, pad))
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    bias = torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device).masked_fill(~allowed, torch.finfo(scores.dtype).min)
    scores = scores + bias[:, None]
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


@dataclass
class KVCache:
    """Keys and values of the rows a stack of blocks has already seen, for block-wise calls.

    ``layers``: per block ``(k, v)`` with the rows on dim 1 (what exactly is stored is up to
    the network: the VAE keeps the raw projection, the DiT the normalised key; RoPE is applied
    at attention time from ``positions``). ``positions``: [B, n] position of each cached row;
    ``valid``: [B, n] False on rows that only pad the batch. A sample's valid rows sit at
    positions ``0 .. m-1``, so its next row goes to position ``m = lengths``.
    """

    layers: list[tuple[Tensor, Tensor]]
    positions: Tensor
    valid: Tensor

    @property
    def lengths(self) -> Tensor:
        """[B] number of valid cached rows = position of the next row."""
        return self.valid.sum(-1)

    def extend(self, layers: list[tuple[Tensor, Tensor]], positions: Tensor, valid: Tensor) -> "KVCache":
        """This cache with new rows appended (``positions``, ``valid``: [B, n_new])."""
        return KVCache(
            [(torch.cat([k0, k1], 1), torch.cat([v0, v1], 1)) for (k0, v0), (k1, v1) in zip(self.layers, layers)],
            torch.cat([self.positions, positions], 1),
            torch.cat([self.valid, valid], 1),
        )


def new_rows(cache: KVCache | None, batch: int, n: int, device) -> Tensor:
    """[B, n] positions of ``n`` new rows: right after each sample's valid cached rows."""
    start = torch.zeros(batch, 1, dtype=torch.long, device=device) if cache is None else cache.lengths[:, None]
    return start + torch.arange(n, device=device)


def key_rows(cache: KVCache | None, q_pos: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Positions and validity [B, n + Lq] of the keys a call sees: the cached rows, then its own."""
    if cache is None:
        return q_pos, valid
    return torch.cat([cache.positions, q_pos], 1), torch.cat([cache.valid, valid], 1)
