"""The small interface every estimator and diagnostic works on.

A hierarchical continuous-latent language model, in the terms of the Cola DLM paper:

* text ``x`` of ``N`` tokens is described by ``L = N / P`` latent positions ``z`` of ``d``
  channels each (``P`` = ``patch_size`` tokens per latent position);
* the posterior ``q_phi(z | x)`` is a diagonal Gaussian per latent position;
* the decoder ``p_theta(x | z)`` factorises over tokens;
* the prior ``p_psi(z)`` lives on scaled latents ``u = (z - shift) * scale`` and is a
  block-causal continuous normalising flow: blocks of ``block_size`` latent positions,
  ``log p_psi(u) = sum_b log p_psi(u^(b) | u^(<b))``, each factor defined by a velocity field
  ``v(u_t, t)`` with data at ``t = 0`` and noise ``N(0, I)`` at ``t = 1``.

``colaprob.ColaModel`` implements this protocol for real checkpoints; ``colaprob.testing``
implements it for tractable models whose ``log p(x)`` is known exactly. Estimators never
import the concrete classes.

Shapes: ``B`` sequences, ``N`` tokens (padded to a common length), ``L = N / P`` latent
positions, ``d`` latent channels, ``V`` vocabulary; ``...`` is any number of leading sample
dimensions (for example ``K`` importance samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """A batch of framed, padded token sequences and the counts that define the units.

    ``ids``: [B, N] token ids (or other observations a model accepts), right-padded to a
    common length ``N``. ``lengths``: [B] framed length of each sequence in tokens: the
    positions ``< lengths[i]`` are the observation whose probability is computed (text,
    end-of-text marker and the padding to a whole number of prior blocks); positions at or
    beyond it exist only to batch sequences of different lengths and never count.
    ``n_tokens``, ``n_bytes``, ``n_words``: [B] the denominators of nats/token, bits/byte and
    word perplexity (see the README, "Units and which tokens count").
    """

    ids: Tensor
    lengths: Tensor
    n_tokens: Tensor
    n_bytes: Tensor
    n_words: Tensor
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, index) -> "TokenBatch":
        """The sub-batch of the sequences at ``index`` (a slice, list or index tensor)."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            rows = [int(i) for i in torch.as_tensor(index).reshape(-1)]
        idx = torch.as_tensor(rows, dtype=torch.long)
        n = int(self.lengths[idx].max()) if rows else 0
        return TokenBatch(
            ids=self.ids[idx, :n],
            lengths=self.lengths[idx],
            n_tokens=self.n_tokens[idx],
            n_bytes=self.n_bytes[idx],
            n_words=self.n_words[idx],
            texts=[self.texts[i] for i in rows] if self.texts else [],
        )


@dataclass
class DiagonalGaussian:
    """``N(mean, diag(exp(logvar)))`` per latent position; ``mean``, ``logvar``: [B, L, d]."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, eps: Tensor) -> Tensor:
        """Reparameterised samples ``mean + std * eps``; ``eps``: [..., B, L, d]."""
        return self.mean + self.std * eps

    def log_prob(self, z: Tensor) -> Tensor:
        """Per-position log-density summed over channels, in float64: [..., B, L]."""
        mean, logvar = self.mean.double(), self.logvar.double()
        r = (z.double() - mean) ** 2 * torch.exp(-logvar)
        return -0.5 * (r + logvar + torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))).sum(-1)


@runtime_checkable
class LatentModel(Protocol):
    """What an estimator needs from a model. See the module docstring for the shapes."""

    latent_dim: int
    """d, channels per latent position."""

    patch_size: int
    """P, tokens per latent position."""

    block_size: int
    """Prior block size in latent positions (the DiT block)."""

    latent_shift: float
    latent_scale: float
    """The prior lives on ``u = (z - latent_shift) * latent_scale``; a density on ``z`` adds
    ``n * d * log|latent_scale|`` for ``n`` latent positions."""

    def posterior(self, batch: TokenBatch) -> DiagonalGaussian:
        """``q_phi(z | x)`` for every latent position of the batch: mean, logvar [B, L, d]."""
        ...

    def decoder_log_prob(self, z: Tensor, batch: TokenBatch) -> Tensor:
        """Per-token ``log p_theta(x_i | z)``: z [..., B, L, d] (the posterior's space)
        -> [..., B, N]. Positions beyond ``batch.lengths`` are returned but never counted."""
        ...

    def decoder_logits(self, z: Tensor, batch: TokenBatch) -> Tensor:
        """Per-token logits of ``p_theta(. | z)``: z [..., B, L, d] -> [..., B, N, V]."""
        ...

    def prior_velocity(self, u_t: Tensor, t: Tensor, clean: Tensor) -> Tensor:
        """Velocity ``du/dt`` of the block-causal prior in the 2L layout.

        ``u_t``: [..., L, d] noisy latents (scaled space); ``t``: [..., L] time per position
        in [0, 1] (0 on clean prefix positions inside a block); ``clean``: [..., L, d] the
        clean latents that serve as history. The output for block ``b`` depends only on
        ``u_t`` in block ``b`` and ``clean`` in blocks ``< b`` (and on positions of block
        ``b`` given at ``t = 0``). During one ODE solve the same ``clean`` tensor object is
        passed at every evaluation, so an implementation may cache work that depends on it
        alone (the keys and values of the clean history).
        """
        ...


def latent_log_jacobian(model: LatentModel, n_positions: Tensor | int) -> Tensor:
    """``n * d * log|scale|``: add it to a density on scaled latents ``u`` to get the density
    on ``z`` (``u = (z - shift) * scale``). ``n_positions``: latent positions per sequence."""
    n = torch.as_tensor(n_positions, dtype=torch.float64)
    return n * model.latent_dim * torch.log(torch.tensor(abs(model.latent_scale), dtype=torch.float64))


def to_prior_space(model: LatentModel, z: Tensor) -> Tensor:
    """``u = (z - shift) * scale``: posterior space -> prior space."""
    return (z - model.latent_shift) * model.latent_scale


def from_prior_space(model: LatentModel, u: Tensor) -> Tensor:
    """``z = u / scale + shift``: prior space -> posterior space."""
    return u / model.latent_scale + model.latent_shift
