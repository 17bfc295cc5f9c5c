"""The reference models of colaprob.testing are what they claim to be."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from colaprob.protocol import LatentModel
from colaprob.testing import BlockMixturePrior, GaussianDecoder, LinearGaussianModel, make_batch
from colaprob.testing.strategies import (
    block_mixture_priors,
    linear_gaussian_models,
    quadrature_models,
    seeds,
    token_batches,
)


@settings(max_examples=10)
@given(block_mixture_priors(max_dim=1, max_block_size=1), st.floats(-2, 2), st.floats(-2, 2))
def test_block_conditionals_are_normalised_densities(prior, first, second):
    grid = torch.linspace(-15, 15, 6001, dtype=torch.float64)
    u = torch.tensor([first, second, 0.0], dtype=torch.float64).repeat(len(grid), 1)[..., None]
    u[:, 2, 0] = grid  # the third block, given the first two
    density = prior.block_log_prob(u)[:, 2].exp()
    assert abs(float(density.sum() * (grid[1] - grid[0])) - 1) < 1e-6


@settings(max_examples=10)
@given(block_mixture_priors(), st.integers(0, 6), seeds)
def test_prefix_conditional_is_joint_minus_marginal(prior, prefix, seed):
    u = torch.randn(6, prior.latent_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bs = prior.block_size
    b = min(prefix // bs, -(-6 // bs) - 1)  # the block holding the prefix end
    conditional = prior.block_log_prob(u, prefix)[b]
    joint = prior.block_log_prob(u)[b]
    marginal = prior.block_log_prob(u[: prefix if prefix > b * bs else b * bs])[b] if prefix > b * bs else 0.0
    assert math.isclose(float(conditional), float(joint - marginal), abs_tol=1e-10)


@settings(max_examples=10)
@given(block_mixture_priors(), seeds, st.sampled_from([2.0, -0.5]), st.sampled_from([0.0, 1.5]))
def test_prior_in_z_space_differs_by_the_log_jacobian(prior, seed, scale, shift):
    z = torch.randn(3, 5, prior.latent_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    moved = prior.in_z_space(scale, shift)
    expected = prior.block_log_prob((z - shift) * scale) + math.log(abs(scale)) * prior.latent_dim * prior.block_size
    expected[..., -1] -= math.log(abs(scale)) * prior.latent_dim * (-5 % prior.block_size)  # short last block
    assert torch.allclose(moved.block_log_prob(z), expected, atol=1e-10)


@settings(max_examples=8)
@given(block_mixture_priors(), st.integers(2, 6), seeds)
def test_prior_velocity_keeps_the_block_causal_contract(prior, L, seed):
    g = torch.Generator().manual_seed(seed)
    u_t, clean = (torch.randn(L, prior.latent_dim, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(L, generator=g, dtype=torch.float64)
    J_noisy, J_clean = torch.autograd.functional.jacobian(lambda a, c: prior.velocity(a, t, c), (u_t, clean))
    block = torch.arange(L) // prior.block_size
    out_block, in_block = block[:, None, None, None], block[None, None, :, None]
    assert (J_noisy[(out_block != in_block).expand_as(J_noisy)] == 0).all()  # own noisy block only
    assert (J_clean[(in_block >= out_block).expand_as(J_clean)] == 0).all()  # strictly earlier clean blocks


@settings(max_examples=8)
@given(quadrature_models(), st.data())
def test_quadrature_log_prob_agrees_with_importance_sampling(model, data):
    assert isinstance(model, LatentModel)
    batch = data.draw(token_batches(model))
    q = model.posterior(batch)
    eps = torch.randn(20000, *q.mean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = q.sample(eps)
    counted = torch.arange(q.mean.shape[1]) < model.latent_lengths(batch)[:, None]
    log_w = model.log_joint(z, batch, batch.lengths) - (q.log_prob(z) * counted).sum(-1)
    estimate = torch.logsumexp(log_w, 0) - math.log(len(eps))
    # Monte Carlo error of log mean w (delta method): sd(w) / (sqrt(n) mean(w)); a drawn
    # model with a poor proposal has heavy weights, so a fixed tolerance fails at random.
    w = torch.exp(log_w - log_w.max(0).values)
    se = w.std(0) / (math.sqrt(len(eps)) * w.mean(0))
    assert (torch.abs(estimate - model.exact_log_prob(batch)) < 5 * se + 0.005).all(), (estimate, model.exact_log_prob(batch), se)
    assert torch.allclose(model.unscaled().exact_log_prob(batch), model.exact_log_prob(batch), atol=1e-9)
    logits = model.decoder_logits(z[:2], batch)
    assert torch.allclose(torch.log_softmax(logits, -1).gather(-1, batch.ids.expand(2, -1, -1)[..., None])[..., 0], model.decoder_log_prob(z[:2], batch))


@settings(max_examples=10)
@given(linear_gaussian_models(), st.data())
def test_linear_gaussian_posterior_is_exact(model, data):
    batch = data.draw(token_batches(model))
    q = model.posterior(batch)
    z = q.sample(torch.randn(5, *q.mean.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    counted = torch.arange(q.mean.shape[1]) < model.latent_lengths(batch)[:, None]
    log_w = model.log_joint(z, batch, batch.lengths) - (q.log_prob(z) * counted).sum(-1)
    assert torch.allclose(log_w, model.exact_log_prob(batch).expand(5, -1), atol=1e-9)
    assert torch.allclose(model.unscaled().exact_log_prob(batch), model.exact_log_prob(batch), atol=1e-9)


def test_linear_gaussian_log_prob_is_the_gaussian_marginal_of_x():
    """Against the closed form x ~ N(A m + b, A S A^T + sigma^2 I) for one latent position."""
    prior = BlockMixturePrior(torch.zeros(1), torch.zeros(1, 1, 2), torch.tensor([[[0.5, -1.0]]]), torch.zeros(1, 1, 2), torch.tensor([[[0.2, -0.4]]]))
    decoder = GaussianDecoder(torch.tensor([1.5, -0.7, 0.9]), torch.tensor([0.1, 0.2, -0.3]), 0.6, 2)
    model = LinearGaussianModel(prior, decoder, 3, latent_scale=2.0, latent_shift=0.5)
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    m_z = prior.means[0, 0] / 2 + 0.5
    s_z = prior.log_std[0, 0].exp() / 2
    A = torch.tensor([[1.5, 0.0], [0.0, -0.7], [0.9, 0.0]], dtype=torch.float64)
    cov = A @ torch.diag(s_z**2) @ A.T + 0.36 * torch.eye(3, dtype=torch.float64)
    expected = torch.distributions.MultivariateNormal(A @ m_z + decoder.bias, cov).log_prob(x)
    assert torch.allclose(model.exact_log_prob(make_batch([x])), expected[None], atol=1e-10)

