"""The ELBO decomposition: the identity on the same samples, the MI estimate against exact
values, and active units on constructed cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from colaprob.diagnostics import active_units, decompose
from colaprob.estimators.elbo import elbo
from colaprob.testing import BlockMixturePrior, GaussianDecoder, LinearGaussianModel, make_batch
from colaprob.testing.strategies import block_mixture_priors, latent_scales, latent_shifts, token_batches


def gaussian_model(prior_mean=0.0, prior_std=1.0, sigma=1.0, latent_dim=1, scale=1.0, shift=0.0) -> LinearGaussianModel:
    """One-position blocks, one token per position observing channel 0:
    ``u ~ N(prior_mean, prior_std^2)``, ``x = z_0 + noise(sigma)``; exact Gaussian posterior."""
    zeros = torch.zeros(1, 1, latent_dim, dtype=torch.float64)
    prior = BlockMixturePrior(
        torch.zeros(1), zeros, torch.full_like(zeros, prior_mean), zeros, torch.full_like(zeros, math.log(prior_std))
    )
    decoder = GaussianDecoder(torch.ones(1), torch.zeros(1), sigma, latent_dim)
    return LinearGaussianModel(prior, decoder, patch_size=1, latent_scale=scale, latent_shift=shift)


def real_batch(*sequences):
    return make_batch([torch.tensor(s, dtype=torch.float64) for s in sequences])


@st.composite
def mixture_prior_models(draw) -> LinearGaussianModel:
    """A Gaussian decoder under a block-causal mixture prior with history terms. Its
    ``posterior`` is then only a Gaussian proposal, which is all the identity needs."""
    prior = draw(block_mixture_priors(max_block_size=2, max_dim=2))
    patch = draw(st.integers(1, 2))
    decoder = GaussianDecoder(torch.ones(patch), torch.zeros(patch), 0.5, prior.latent_dim)
    return LinearGaussianModel(prior, decoder, patch, draw(latent_scales), draw(latent_shifts))


@settings(max_examples=8)
@given(data=st.data())
def test_identity_holds_on_the_same_samples(data):
    model = data.draw(mixture_prior_models())
    batch = data.draw(token_batches(model, max_sequences=4).filter(lambda b: len(b) >= 2))
    ds = decompose(model, batch, n_samples=2, seed=1)

    scale = max(1.0, abs(float(ds.window_rate_mean)))
    assert abs(float(ds.identity_residual)) <= 1e-10 * scale
    np.testing.assert_allclose(ds.window_rate, ds.mi_term + ds.marginal_kl_term, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(ds.elbo, -(ds.distortion + ds.rate), rtol=1e-12)
    # The estimate of I_q(X;Z) never exceeds log n, on the corpus and on every nested subset.
    assert float(ds.mutual_information) <= math.log(len(batch)) + 1e-12
    assert np.all(ds.mutual_information_nested.values <= ds.log_n_nested.values + 1e-12)


def test_separated_posteriors_give_log_n():
    """Posteriors 3000 standard deviations apart: ``q_bar(z_ik) = q_i(z_ik) / N`` and the MI is
    exactly log N, on the corpus and on every nested subset. Sequences differ in length; the
    aggregate posterior lives on the first block, where they differ too."""
    model = gaussian_model(sigma=1e-3)
    batch = real_batch([0.0], [3.0, -1.0], [6.0], [9.0, 9.0, 0.0], [-3.0])
    ds = decompose(model, batch, n_samples=4)
    assert ds.attrs["window_blocks"] == 1
    assert float(ds.mutual_information) == pytest.approx(math.log(5), abs=1e-9)
    np.testing.assert_allclose(ds.mutual_information_nested, np.log(ds.subset.values), atol=1e-9)
    np.testing.assert_array_equal(ds.subset, [2, 4, 5])


def test_decomposition_matches_quadrature():
    """Three overlapping Gaussian posteriors, a Gaussian prior on scaled latents: distortion,
    rate, MI and marginal KL against their exact values (closed form and quadrature)."""
    scale, shift, mu, s = 1.5, -0.4, 0.3, 0.8
    model = gaussian_model(prior_mean=mu, prior_std=s, sigma=1.0, scale=scale, shift=shift)
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    batch = real_batch(*[[v] for v in x.tolist()])
    ds = decompose(model, batch, n_samples=4000, seed=0)

    q = model.posterior(batch)
    m, v = q.mean[:, 0, 0], q.logvar[:, 0, 0].exp()
    pm, pv = mu / scale + shift, (s / scale) ** 2  # the prior on z
    rate = 0.5 * (torch.log(pv / v) + (v + (m - pm) ** 2) / pv - 1)
    distortion = 0.5 * math.log(2 * math.pi) + 0.5 * ((x - m) ** 2 + v)
    grid = torch.linspace(-8, 8, 40001, dtype=torch.float64)
    dz = float(grid[1] - grid[0])
    log_qi = -0.5 * ((grid[:, None] - m) ** 2 / v + torch.log(2 * math.pi * v))  # [G, N]
    log_qbar = torch.logsumexp(log_qi, -1) - math.log(3)
    log_p = -0.5 * ((grid - pm) ** 2 / pv + math.log(2 * math.pi * pv))
    mi = (log_qi.exp() * (log_qi - log_qbar[:, None])).sum(0).mean() * dz
    mkl = (log_qbar.exp() * (log_qbar - log_p)).sum() * dz

    # Monte Carlo with 4000 samples per sequence; over seeds 0-4 the largest errors were
    # 0.017 (rate, distortion), 0.007 (MI) and 0.004 (marginal KL).
    np.testing.assert_allclose(ds.rate, rate, atol=0.04)
    np.testing.assert_allclose(ds.distortion, distortion, atol=0.04)
    assert float(ds.mutual_information) == pytest.approx(float(mi), abs=0.02)
    assert float(ds.marginal_kl) == pytest.approx(float(mkl), abs=0.012)
    assert 0 < float(mi) < math.log(3)


def test_active_units_on_constructed_channels():
    """Variances 1, 0.0121, 0.0081 and 0: the first two channels are active."""
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)[:, None]
    means = signs * torch.tensor([1.0, 0.11, 0.09, 0.0], dtype=torch.float64) + torch.tensor([5.0, -2.0, 0.0, 3.0])
    ds = active_units(means)
    np.testing.assert_allclose(ds.posterior_mean_variance, [1.0, 0.0121, 0.0081, 0.0], atol=1e-12)
    np.testing.assert_array_equal(ds.active, [True, True, False, False])
    assert int(ds.n_active) == 2
    assert int(active_units(means, threshold=0.005).n_active) == 3


def test_active_units_count_only_valid_positions():
    """Channel 0 sees the data (posterior means +-0.11, variance 0.0121: active); channel 1 is
    never observed (posterior = prior: inactive). The padding of the short sequence sits at
    the prior mean 0 and would pull channel 0 below the threshold if it were counted."""
    model = gaussian_model(sigma=1e-3, latent_dim=2)
    batch = real_batch([0.11], [-0.11, 0.11, -0.11])
    ds = decompose(model, batch, n_samples=2)
    assert float(ds.posterior_mean_variance[0]) == pytest.approx(0.0121, rel=1e-4)
    assert float(ds.posterior_mean_variance[1]) == pytest.approx(0.0, abs=1e-20)
    np.testing.assert_array_equal(ds.active, [True, False])


def test_distortion_and_rate_split_the_estimators_elbo():
    """The decomposition draws the estimators' posterior samples: distortion + rate is
    ``colaprob.estimators.elbo`` with the same seed, sequence by sequence."""
    model = gaussian_model(prior_mean=0.2, sigma=0.5, scale=2.0, shift=0.3)
    batch = real_batch([0.1], [1.0, -0.5], [0.3, 0.3, 2.0])
    ds = decompose(model, batch, n_samples=5, seed=11)
    reference = elbo(model, batch, n_samples=5, seed=11).log_likelihood.values
    np.testing.assert_allclose(-(ds.distortion + ds.rate), reference, rtol=1e-6)


def test_result_does_not_depend_on_batch_size():
    model = gaussian_model(prior_mean=0.2, sigma=0.5, scale=2.0)
    batch = real_batch([0.1], [1.0, -0.5], [0.3, 0.3, 2.0])
    one, all_ = decompose(model, batch, n_samples=3, batch_size=1), decompose(model, batch, n_samples=3)
    for name in ("distortion", "rate", "mi_term", "marginal_kl_term"):
        np.testing.assert_allclose(one[name], all_[name], atol=1e-4)


def test_rejects_what_it_cannot_define():
    model = gaussian_model()
    with pytest.raises(ValueError, match="at least 2"):
        decompose(model, real_batch([0.0]))
    with pytest.raises(ValueError, match="window_blocks"):
        decompose(model, real_batch([0.0], [1.0, 2.0]), window_blocks=2)
