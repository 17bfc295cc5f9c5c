"""Hypothesis strategies that draw the tractable models of ``colaprob.testing``.

Structure (dimensions, component counts, scales) is drawn by hypothesis and shrinks; the
parameter values come from a drawn seed, which keeps examples small and reproducible.
Parameters stay in ranges where the flows are well conditioned (component std >= 0.3).
Requires ``hypothesis`` (a test dependency of colaprob).
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from colaprob.protocol import TokenBatch
from colaprob.testing.flows import GaussianMixture, LinearFlow
from colaprob.testing.models import (
    CategoricalDecoder,
    GaussianDecoder,
    LinearGaussianModel,
    QuadratureModel,
    TractableModel,
    make_batch,
)
from colaprob.testing.priors import BlockMixturePrior

seeds = st.integers(0, 2**31 - 1)
latent_scales = st.sampled_from([1.0, 2.0, 0.5, -1.5])
latent_shifts = st.sampled_from([0.0, 0.5, -1.0])


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uniform(g: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)


@st.composite
def gaussian_mixtures(draw, max_dim: int = 3, max_components: int = 3) -> GaussianMixture:
    """Mixtures of full-covariance Gaussians (eigenvalues >= 0.1), means spread up to 2.5."""
    D = draw(st.integers(1, max_dim))
    K = draw(st.integers(1, max_components))
    spread = draw(st.floats(0.0, 2.5))
    g = _generator(draw(seeds))
    factor = 0.6 * torch.randn(K, D, D, generator=g, dtype=torch.float64)
    covariances = factor @ factor.transpose(-1, -2) + 0.1 * torch.eye(D, dtype=torch.float64)
    means = spread * torch.randn(K, D, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.randn(K, generator=g, dtype=torch.float64), means, covariances)


@st.composite
def linear_flows(draw, max_dim: int = 3) -> LinearFlow:
    """Constant linear fields ``A z + b`` with ``||A|| = O(1)``."""
    D = draw(st.integers(1, max_dim))
    g = _generator(draw(seeds))
    return LinearFlow(0.5 * torch.randn(D, D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64))


@st.composite
def block_mixture_priors(
    draw,
    max_block_size: int = 3,
    max_dim: int = 2,
    max_components: int = 3,
    block_size: int | None = None,
    latent_dim: int | None = None,
) -> BlockMixturePrior:
    """Block-causal mixture priors with history-dependent weights and means."""
    bs = block_size or draw(st.integers(1, max_block_size))
    d = latent_dim or draw(st.integers(1, max_dim))
    K = draw(st.integers(1, max_components))
    g = _generator(draw(seeds))
    return BlockMixturePrior(
        logits=torch.randn(K, generator=g, dtype=torch.float64),
        logit_weight=_uniform(g, -1, 1, K, bs, d),
        means=_uniform(g, -2, 2, K, bs, d),
        mean_weight=_uniform(g, -1, 1, K, bs, d),
        log_std=_uniform(g, math.log(0.3), math.log(1.5), K, bs, d),
    )


@st.composite
def quadrature_models(draw, scaled: bool = True) -> QuadratureModel:
    """Categorical-decoder models small enough for quadrature: ``d = 1`` with blocks of 1 or
    2 positions, or ``d = 2`` with blocks of 1 (sequences of at most two coordinates)."""
    d = draw(st.sampled_from([1, 2]))
    bs = 1 if d == 2 else draw(st.sampled_from([1, 2]))
    prior = draw(block_mixture_priors(block_size=bs, latent_dim=d))
    P = draw(st.integers(1, 3))
    V = draw(st.integers(2, 4))
    g = _generator(draw(seeds))
    decoder = CategoricalDecoder(1.5 * torch.randn(P, V, d, generator=g, dtype=torch.float64), torch.randn(P, V, generator=g, dtype=torch.float64))
    scale, shift = (draw(latent_scales), draw(latent_shifts)) if scaled else (1.0, 0.0)
    return QuadratureModel(prior, decoder, P, scale, shift, posterior_widening=draw(st.sampled_from([1.0, 1.3])))


@st.composite
def linear_gaussian_models(draw, max_block_size: int = 2, max_dim: int = 2, max_patch: int = 3) -> LinearGaussianModel:
    """Gaussian prior, linear-Gaussian decoder: the exact posterior is the model's posterior."""
    bs = draw(st.integers(1, max_block_size))
    d = draw(st.integers(1, max_dim))
    P = draw(st.integers(1, max_patch))
    g = _generator(draw(seeds))
    zeros = torch.zeros(1, bs, d, dtype=torch.float64)
    prior = BlockMixturePrior(torch.zeros(1), zeros, _uniform(g, -2, 2, 1, bs, d), zeros, _uniform(g, math.log(0.3), math.log(1.5), 1, bs, d))
    sign = torch.where(torch.rand(P, generator=g) < 0.5, -1.0, 1.0).double()
    decoder = GaussianDecoder(sign * _uniform(g, 0.5, 2, P), torch.randn(P, generator=g, dtype=torch.float64), float(_uniform(g, 0.3, 1.5)), d)
    return LinearGaussianModel(prior, decoder, P, draw(latent_scales), draw(latent_shifts))


@st.composite
def token_batches(draw, model: TractableModel, max_sequences: int = 3, max_blocks: int = 3) -> TokenBatch:
    """Batches of whole-block sequences for ``model`` (lengths vary), within what its exact
    ``log p(x)`` supports: ``QuadratureModel`` at most two latent coordinates."""
    P, bs, d = model.patch_size, model.block_size, model.latent_dim
    if isinstance(model, QuadratureModel):
        max_blocks = max(1, 2 // (d * bs))
    n = draw(st.integers(1, max_sequences))
    blocks = draw(st.lists(st.integers(1, max_blocks), min_size=n, max_size=n))
    g = _generator(draw(seeds))
    if isinstance(model, QuadratureModel):
        V = model.decoder.bias.shape[1]
        sequences = [torch.randint(0, V, (b * bs * P,), generator=g) for b in blocks]
    else:
        sequences = [2 * torch.randn(b * bs * P, generator=g, dtype=torch.float64) for b in blocks]
    return make_batch(sequences)
