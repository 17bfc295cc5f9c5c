"""Latent models implementing ``colaprob.protocol.LatentModel`` whose ``log p(x)`` is exact.

Both models pair a ``BlockMixturePrior`` on scaled latents ``u = (z - shift) * scale`` with a
decoder in which token ``i`` reads only its own latent position ``i // patch_size`` (so the
decoder is causal, as Cola's, and a prefix's probability involves only the latents of the
prior blocks covering it):

* ``QuadratureModel``: a categorical decoder; ``log p(x)`` by quadrature over at most two
  latent coordinates per sequence; the posterior is the Gaussian matched to the exact
  posterior's per-coordinate moments (a good but inexact proposal), optionally widened.
* ``LinearGaussianModel``: a Gaussian prior and a linear-Gaussian decoder of real-valued
  observations; the exact posterior is a diagonal Gaussian, which it returns, so every
  importance weight equals ``log p(x)`` (the zero-variance IWAE case).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from colaprob.protocol import DiagonalGaussian, TokenBatch, from_prior_space, latent_log_jacobian, to_prior_space
from colaprob.testing.priors import BlockMixturePrior

_LOG_2PI = math.log(2 * math.pi)


def make_batch(sequences: list[Tensor], pad_value: float = 0) -> TokenBatch:
    """A ``TokenBatch`` of the given observation sequences (each already a whole number of
    prior blocks long), right-padded with ``pad_value``. Synthetic unit denominators: every
    position is a token and a byte, and every second token ends a word."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_value, dtype=sequences[0].dtype)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = s
    return TokenBatch(ids=ids, lengths=lengths, n_tokens=lengths.clone(), n_bytes=lengths.clone(), n_words=(lengths + 1) // 2)


class CategoricalDecoder:
    """``p(x_i | z) = softmax(W_{i mod P} z_{i // P} + c_{i mod P})`` over ``V`` tokens.
    ``weight``: [P, V, d]; ``bias``: [P, V]."""

    def __init__(self, weight: Tensor, bias: Tensor):
        self.weight = weight.double()
        self.bias = bias.double()

    def logits(self, z: Tensor, n_tokens: int) -> Tensor:
        """z [..., L, d] -> [..., n_tokens, V]."""
        per_position = torch.einsum("pvd,...ld->...lpv", self.weight.to(z.dtype), z) + self.bias.to(z.dtype)
        return per_position.flatten(-3, -2)[..., :n_tokens, :]

    def log_prob(self, z: Tensor, ids: Tensor) -> Tensor:
        """Per-token ``log p(x_i | z)``: z [..., B, L, d], ids [B, N] -> [..., B, N]."""
        log_probs = torch.log_softmax(self.logits(z, ids.shape[-1]), -1)
        index = ids.long().expand(*log_probs.shape[:-1])[..., None]
        return log_probs.gather(-1, index)[..., 0]


class GaussianDecoder:
    """Real-valued observations ``x_i ~ N(a_{i mod P} z_{i // P, c(i)} + b_{i mod P}, sigma^2)``,
    ``c(i) = (i mod P) mod d``: each token observes one latent coordinate.
    ``weight``, ``bias``: [P]; ``sigma``: scalar."""

    def __init__(self, weight: Tensor, bias: Tensor, sigma: float, latent_dim: int):
        self.weight = weight.double()
        self.bias = bias.double()
        self.sigma = float(sigma)
        self.latent_dim = latent_dim
        self.channel = torch.arange(len(weight)) % latent_dim

    def mean(self, z: Tensor, n_tokens: int) -> Tensor:
        """z [..., L, d] -> [..., n_tokens] the mean of each observation."""
        observed = z[..., self.channel]  # [..., L, P]
        return (observed * self.weight.to(z.dtype) + self.bias.to(z.dtype)).flatten(-2)[..., :n_tokens]

    def log_prob(self, z: Tensor, ids: Tensor) -> Tensor:
        """z [..., B, L, d], ids [B, N] (real values) -> [..., B, N]."""
        residual = (ids.to(z.dtype) - self.mean(z, ids.shape[-1])) / self.sigma
        return -0.5 * (residual**2 + _LOG_2PI) - math.log(self.sigma)


class TractableModel:
    """What both tractable models share: the protocol's attributes, the decoder terms and the
    prior velocity. ``patch_size`` tokens per latent position."""

    def __init__(self, prior: BlockMixturePrior, decoder, patch_size: int, latent_scale: float = 1.0, latent_shift: float = 0.0):
        self.prior = prior
        self.decoder = decoder
        self.patch_size = patch_size
        self.latent_dim = prior.latent_dim
        self.block_size = prior.block_size
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift)

    def unscaled(self) -> "TractableModel":
        """The same model written with ``latent_scale = 1``, ``latent_shift = 0``: its prior is
        this prior moved to the posterior's space. Every density on ``z`` is unchanged."""
        prior = self.prior.in_z_space(self.latent_scale, self.latent_shift)
        return type(self)(prior, self.decoder, self.patch_size, **self._options())

    def _options(self) -> dict:
        return {}

    def prior_velocity(self, u_t: Tensor, t: Tensor, clean: Tensor) -> Tensor:
        return self.prior.velocity(u_t, t, clean)

    def decoder_log_prob(self, z: Tensor, batch: TokenBatch) -> Tensor:
        return self.decoder.log_prob(z, batch.ids)

    def latent_lengths(self, batch: TokenBatch) -> Tensor:
        """Latent positions of each sequence: [B]."""
        return -(-batch.lengths // self.patch_size)

    def _covering(self, n_tokens: Tensor) -> Tensor:
        """Latent positions of the prior blocks that cover the first ``n_tokens`` tokens."""
        positions = -(-n_tokens // self.patch_size)
        return -(-positions // self.block_size) * self.block_size

    def log_joint(self, z: Tensor, batch: TokenBatch, n_tokens: Tensor) -> Tensor:
        """Exact ``log p(x_{<n}, z)`` of the first ``n_tokens`` tokens and the latents of the
        blocks covering them: z [..., B, L, d] -> [..., B] float64."""
        positions = self._covering(n_tokens)
        token_mask = torch.arange(batch.ids.shape[1]) < n_tokens[:, None]
        decoder = (self.decoder_log_prob(z, batch).double() * token_mask).sum(-1)
        n_blocks = -(-z.shape[-2] // self.block_size)
        block_mask = torch.arange(n_blocks) * self.block_size < positions[:, None]
        prior = (self.prior.block_log_prob(to_prior_space(self, z)) * block_mask).sum(-1)
        return decoder + prior + latent_log_jacobian(self, positions)


class QuadratureModel(TractableModel):
    """Categorical decoder; ``log p(x)`` by quadrature on a uniform grid (spectrally accurate
    for these smooth, Gaussian-tailed integrands) over at most two latent coordinates per
    sequence. ``posterior_widening`` multiplies the moment-matched posterior std."""

    grid_points = {1: 2001, 2: 401}

    def __init__(self, prior, decoder, patch_size, latent_scale=1.0, latent_shift=0.0, posterior_widening: float = 1.0):
        super().__init__(prior, decoder, patch_size, latent_scale, latent_shift)
        self.posterior_widening = posterior_widening

    def _options(self) -> dict:
        return {"posterior_widening": self.posterior_widening}

    def decoder_logits(self, z: Tensor, batch: TokenBatch) -> Tensor:
        return self.decoder.logits(z, batch.ids.shape[1])

    def _grid(self, n_positions: int) -> tuple[Tensor, float]:
        """Grid points in the prior space ``u`` [G, n_positions, d] and the cell volume."""
        n = n_positions * self.latent_dim
        if n > 2:
            raise ValueError("quadrature covers at most two latent coordinates per sequence")
        p = self.prior
        half_width = float(p.means.abs().max() + p.mean_weight.abs().max() + 10 * p.log_std.exp().max())
        axis = torch.linspace(-half_width, half_width, self.grid_points[n], dtype=torch.float64)
        mesh = torch.stack(torch.meshgrid(*[axis] * n, indexing="ij"), -1).reshape(-1, n_positions, self.latent_dim)
        return mesh, float(axis[1] - axis[0]) ** n

    def _posterior_grid(self, batch: TokenBatch, row: int, n_tokens: int) -> tuple[Tensor, Tensor, float]:
        """Grid ``z`` [G, n, d], the unnormalised log posterior on it (``log p(x_{<n}, z)``
        with ``d u = |scale|^(n d) d z``) and the cell volume in ``u``."""
        positions = int(self._covering(torch.tensor(n_tokens)))
        u, volume = self._grid(positions)
        z = from_prior_space(self, u)
        one = batch.select([row])
        ids = one.ids[:, :n_tokens]
        decoder = self.decoder.log_prob(z[:, None], ids).sum(-1)[:, 0]
        return z, decoder + self.prior.log_prob(u), volume

    def exact_log_prob(self, batch: TokenBatch, n_tokens: Tensor | None = None) -> Tensor:
        """``log p(x_{<n})`` of each sequence's first ``n_tokens`` tokens (default: all
        counted tokens), by quadrature: [B] float64."""
        counts = batch.lengths if n_tokens is None else torch.as_tensor(n_tokens).expand(len(batch))
        out = []
        for row, n in enumerate(counts.tolist()):
            _, log_joint, volume = self._posterior_grid(batch, row, n)
            out.append(torch.logsumexp(log_joint, 0) + math.log(volume))
        return torch.stack(out)

    def posterior(self, batch: TokenBatch) -> DiagonalGaussian:
        L = int(self.latent_lengths(batch).max())
        mean = torch.zeros(len(batch), L, self.latent_dim, dtype=torch.float64)
        var = torch.ones_like(mean)
        for row, n in enumerate(batch.lengths.tolist()):
            z, log_joint, _ = self._posterior_grid(batch, row, n)
            w = torch.softmax(log_joint, 0)[:, None, None]
            m = (w * z).sum(0)
            mean[row, : z.shape[1]] = m
            var[row, : z.shape[1]] = (w * (z - m) ** 2).sum(0)
        return DiagonalGaussian(mean, var.log() + 2 * math.log(self.posterior_widening))


class LinearGaussianModel(TractableModel):
    """Gaussian prior (a one-component ``BlockMixturePrior`` without history terms) and a
    ``GaussianDecoder``: the posterior of each latent coordinate is exactly Gaussian,

        precision = 1 / s_z^2 + sum_i a_i^2 / sigma^2,
        mean = (m_z / s_z^2 + sum_i a_i (x_i - b_i) / sigma^2) / precision,

    over the tokens ``i`` observing it (``m_z``, ``s_z``: the prior in ``z`` space), and
    ``log p(x) = log p(x, z) - log q(z | x)`` at any ``z``."""

    def decoder_logits(self, z: Tensor, batch: TokenBatch) -> Tensor:
        raise TypeError("LinearGaussianModel observes real values; it has no logits")

    def _posterior(self, batch: TokenBatch, n_tokens: Tensor) -> DiagonalGaussian:
        """Exact posterior given each sequence's first ``n_tokens`` tokens: [B, L, d]."""
        P, d = self.patch_size, self.latent_dim
        L = int(self.latent_lengths(batch).max())
        z_prior = self.prior.in_z_space(self.latent_scale, self.latent_shift)
        position = torch.arange(L) % self.block_size
        prior_mean, prior_var = z_prior.means[0][position], z_prior.log_std[0][position].exp() ** 2  # [L, d]
        ids = torch.nn.functional.pad(batch.ids.double(), (0, L * P - batch.ids.shape[1])).reshape(len(batch), L, P)
        counted = (torch.arange(L * P) < n_tokens[:, None]).reshape(len(batch), L, P).double()
        dec = self.decoder
        reads = torch.nn.functional.one_hot(dec.channel, d).double()  # [P, d]: token slot -> channel
        precision = 1 / prior_var + torch.einsum("blp,pc->blc", counted, (dec.weight**2)[:, None] * reads) / dec.sigma**2
        signal = torch.einsum("blp,pc->blc", counted * (ids - dec.bias) * dec.weight, reads) / dec.sigma**2
        return DiagonalGaussian((prior_mean / prior_var + signal) / precision, -precision.log())

    def posterior(self, batch: TokenBatch) -> DiagonalGaussian:
        return self._posterior(batch, batch.lengths)

    def exact_log_prob(self, batch: TokenBatch, n_tokens: Tensor | None = None) -> Tensor:
        """``log p(x_{<n})`` by Bayes' rule at the posterior mean: [B] float64."""
        counts = batch.lengths if n_tokens is None else torch.as_tensor(n_tokens).expand(len(batch))
        q = self._posterior(batch, counts)
        covering = torch.arange(q.mean.shape[1]) < self._covering(counts)[:, None]
        return self.log_joint(q.mean, batch, counts) - (q.log_prob(q.mean) * covering).sum(-1)
