"""Where the tokens, latent positions and prior blocks of a batch lie: the one place of the
positions-to-blocks arithmetic every estimator and diagnostic needs.

A latent position describes ``P = patch_size`` tokens and a prior block holds ``bs =
block_size`` positions, so a block describes ``P * bs`` tokens. The first ``n`` tokens of a
sequence have ``ceil(n / P)`` latent positions, and ``ceil(ceil(n / P) / bs)`` prior blocks
cover them: the blocks a prefix's marginal likelihood integrates. Widths: ``N`` token
positions, ``L = ceil(N / P)`` latent positions, ``n_blocks = ceil(L / bs)`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def ceil_div(a, b):
    """``ceil(a / b)`` of non-negative integers (tensors or ints)."""
    return -(-a // b)


def sum_per_block(x: Tensor, block_size: int) -> Tensor:
    """Sum ``x`` [..., L] over consecutive blocks of ``block_size`` positions (the last one
    padded with zeros): [..., ceil(L / block_size)]."""
    pad = -x.shape[-1] % block_size
    return torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, block_size)).sum(-1)


@dataclass(frozen=True)
class LatentLayout:
    """The layout of a batch of ``B`` sequences, ``lengths`` [B] counted tokens each, in a
    grid of ``n_tokens`` (N) token positions, for a model with ``patch_size`` tokens per
    latent position and ``block_size`` positions per prior block."""

    patch_size: int
    block_size: int
    lengths: Tensor
    n_tokens: int

    @classmethod
    def of(cls, model, batch) -> "LatentLayout":
        """The layout of a ``TokenBatch`` for a model of ``colaprob.protocol``."""
        return cls(model.patch_size, model.block_size, torch.as_tensor(batch.lengths).long(), batch.ids.shape[-1])

    @property
    def tokens_per_block(self) -> int:
        return self.patch_size * self.block_size

    @property
    def n_positions(self) -> int:
        """L, latent positions of the grid."""
        return ceil_div(self.n_tokens, self.patch_size)

    @property
    def n_blocks(self) -> int:
        return ceil_div(self.n_positions, self.block_size)

    def positions(self, tokens: Tensor | None = None) -> Tensor:
        """[B] latent positions describing the first ``tokens`` [B] tokens (default: all
        counted tokens)."""
        return ceil_div(self.lengths if tokens is None else torch.as_tensor(tokens).long(), self.patch_size)

    def blocks(self, tokens: Tensor | None = None) -> Tensor:
        """[B] prior blocks covering the first ``tokens`` [B] tokens (default: all)."""
        return ceil_div(self.positions(tokens), self.block_size)

    def token_mask(self, tokens: Tensor | None = None) -> Tensor:
        """[B, N] the first ``tokens`` [B] token positions (default: the counted ones)."""
        limit = self.lengths if tokens is None else torch.as_tensor(tokens).long()
        return torch.arange(self.n_tokens) < limit[:, None]

    def position_mask(self, positions: Tensor) -> Tensor:
        """[B, L] the first ``positions`` [B] latent positions."""
        return torch.arange(self.n_positions) < torch.as_tensor(positions).long()[:, None]

    def block_mask(self, tokens: Tensor | None = None) -> Tensor:
        """[B, n_blocks] the blocks covering the first ``tokens`` [B] tokens (default: all)."""
        return torch.arange(self.n_blocks) < self.blocks(tokens)[:, None]

    def block_of_token(self) -> Tensor:
        """[N] the prior block each token position belongs to."""
        return torch.arange(self.n_tokens) // self.tokens_per_block

    def per_block(self, x: Tensor) -> Tensor:
        """Sum ``x`` [..., L] over each block's positions: [..., n_blocks]."""
        return sum_per_block(x, self.block_size)
