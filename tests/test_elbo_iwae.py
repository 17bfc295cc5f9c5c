"""ELBO and IWAE against exact log p(x) of the tractable models."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from colaprob.estimators import elbo, iwae, statistics
from colaprob.protocol import latent_log_jacobian
from colaprob.testing import BlockMixturePrior, CategoricalDecoder, GaussianDecoder, LinearGaussianModel, QuadratureModel, make_batch
from colaprob.testing.strategies import linear_gaussian_models, quadrature_models, token_batches

FIXED = dict(method="rk4", steps=12)  # fixed steps: reproducible to rounding, fast


def _quadrature_model(scale=2.0, shift=0.5) -> QuadratureModel:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    prior = BlockMixturePrior(r(3), r(3, 1, 1), r(3, 1, 1), 0.5 * r(3, 1, 1), 0.2 * r(3, 1, 1))
    return QuadratureModel(prior, CategoricalDecoder(r(2, 3, 1), r(2, 3)), 2, scale, shift, posterior_widening=1.1)


def _linear_gaussian_model(scale=1.7, shift=-0.3) -> LinearGaussianModel:
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    zeros = torch.zeros(1, 2, 2, dtype=torch.float64)
    prior = BlockMixturePrior(torch.zeros(1), zeros, r(1, 2, 2), zeros, 0.3 * r(1, 2, 2))
    return LinearGaussianModel(prior, GaussianDecoder(r(3), r(3), 0.7, 2), 3, scale, shift)


def _batch():
    return make_batch([torch.tensor([0, 1, 2, 1]), torch.tensor([2, 2]), torch.tensor([1, 0, 0, 2])])


@settings(max_examples=5)
@given(quadrature_models(), st.data())
def test_elbo_is_below_and_iwae_converges_to_the_exact_log_prob(model, data):
    batch = data.draw(token_batches(model, max_sequences=2))
    exact = model.exact_log_prob(batch).numpy()
    lower = elbo(model, batch, 256, chunk_size=256, **FIXED)
    assert (lower.log_likelihood.values <= exact + 3 * lower.log_likelihood_se.values + 1e-3).all()
    bound = iwae(model, batch, 1024, chunk_size=1024, **FIXED)
    # E[IWAE_K] does not decrease in K: on nested disjoint groups the averages are ordered
    # (Jensen), and K = 1 is the ELBO's average.
    lw = bound.log_weight.values
    means = [statistics.log_mean_exp(_groups(lw, K)).mean("group").values for K in (1, 4, 16, 64, 256, 1024)]
    assert np.allclose(means[0], lw.mean(1))
    assert all((a <= b + 1e-12).all() for a, b in zip(means, means[1:]))
    # Every row is checked: at K = 1024 every k-hat is computable; where it passes, the
    # estimate is within 5 SE of the answer; where it does not (heavy-tailed weights: the SE
    # is itself unreliable), the estimate is still no more than 5 SE above it, a lower bound.
    assert bound.khat_computable.all()
    reliable = bound.reliable.values
    error = bound.log_likelihood.values - exact
    margin = 5 * bound.log_likelihood_se.values + 2e-3
    assert (np.abs(error[reliable]) < margin[reliable]).all()
    assert (error[~reliable] < margin[~reliable]).all()


def _groups(log_weight, K):
    import xarray as xr

    B, total = log_weight.shape
    return xr.DataArray(log_weight.reshape(B, total // K, K), dims=("sequence", "group", "sample"))


def test_iwae_at_large_k_is_within_a_hundredth_of_a_nat():
    model, batch = _quadrature_model(), _batch()
    ds = iwae(model, batch, 5000, chunk_size=2500, rtol=1e-6, atol=1e-6)
    error = ds.log_likelihood.values - model.exact_log_prob(batch).numpy()
    assert (np.abs(error) < 0.01).all(), error
    assert ds.reliable.all() and (ds.log_likelihood_se < 0.01).all()
    assert ds.attrs["estimator"] == "IWAE-5000 (lower bound in expectation)" and ds.attrs["K"] == 5000


def test_iwae_with_the_exact_posterior_has_zero_variance():
    model = _linear_gaussian_model()
    g = torch.Generator().manual_seed(3)
    batch = make_batch([torch.randn(12, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)])
    ds = iwae(model, batch, 64, rtol=1e-8, atol=1e-8)
    exact = model.exact_log_prob(batch).numpy()
    assert ds.log_weight.std("sample").max() < 1e-5
    assert np.allclose(ds.log_likelihood.values, exact, atol=1e-5)
    assert np.allclose(ds.ess.values, 64, rtol=1e-6)
    assert np.allclose(elbo(model, batch, 8, rtol=1e-8, atol=1e-8).log_likelihood.values, exact, atol=1e-5)


@settings(max_examples=4)
@given(linear_gaussian_models(), st.data())
def test_zero_variance_holds_for_drawn_linear_gaussian_models(model, data):
    batch = data.draw(token_batches(model, max_sequences=2, max_blocks=2))
    ds = iwae(model, batch, 4, rtol=1e-8, atol=1e-8)
    assert np.allclose(ds.log_weight.values, model.exact_log_prob(batch).numpy()[:, None], atol=1e-5)


@pytest.mark.parametrize("make", [_quadrature_model, _linear_gaussian_model])
def test_weights_are_the_same_in_raw_and_scaled_latent_space(make):
    scaled = make()
    assert scaled.latent_scale != 1 and scaled.latent_shift != 0
    raw = scaled.unscaled()
    assert raw.latent_scale == 1 and raw.latent_shift == 0
    if isinstance(scaled, QuadratureModel):
        batch = _batch()
    else:
        batch = make_batch([torch.linspace(-1, 2, 12, dtype=torch.float64), torch.linspace(0, 1, 6, dtype=torch.float64)])
    a = iwae(scaled, batch, 16, rtol=1e-8, atol=1e-8)
    b = iwae(raw, batch, 16, rtol=1e-8, atol=1e-8)
    assert np.allclose(a.posterior_log_prob, b.posterior_log_prob, atol=1e-9)  # same draws
    # The scaled model's CNF runs on u = (z - shift) * scale, whose density differs from that
    # on z by n * d * log|scale| nats (n counted latent positions): the two agree on z only if
    # that Jacobian is added, and it is far above the tolerance.
    jacobian = latent_log_jacobian(scaled, scaled.latent_lengths(batch)).numpy()
    assert (np.abs(jacobian) > 0.5).all()
    assert np.allclose(a.prior_log_prob, b.prior_log_prob, atol=1e-5)
    assert np.allclose(a.log_weight, b.log_weight, atol=1e-5)


def test_a_sequence_gets_the_same_numbers_in_any_batch_or_chunking():
    model, batch = _quadrature_model(), _batch()
    whole = iwae(model, batch, 24, chunk_size=24, **FIXED)
    part = iwae(model, batch.select([2, 0]), 24, sequence_ids=[2, 0], chunk_size=5, **FIXED)
    assert list(part.sequence.values) == [2, 0]
    assert np.allclose(whole.log_weight.sel(sequence=[2, 0]), part.log_weight, atol=1e-12, rtol=0)
    adaptive = iwae(model, batch, 24, chunk_size=24)
    resharded = iwae(model, batch.select([1]), 24, sequence_ids=[1], chunk_size=7)
    assert np.allclose(adaptive.log_weight.sel(sequence=[1]), resharded.log_weight, atol=1e-4)
    first = iwae(model, batch, 12, **FIXED)  # a resumed run continues the same streams
    assert np.allclose(whole.log_weight[:, :12], first.log_weight, atol=1e-12, rtol=0)
    assert not np.allclose(iwae(model, batch, 12, seed=1, **FIXED).log_weight, first.log_weight)


def test_iwae_doubles_k_until_khat_is_acceptable():
    model, batch = _quadrature_model(), _batch()
    ds = iwae(model, batch, 16, max_samples=128, **FIXED)
    n = ds.n_samples.values
    assert set(n) <= {16, 32, 64, 128} and (n > 16).any()
    for row, K in enumerate(n):
        assert ds.reliable.values[row] or K == 128
        assert np.isnan(ds.log_weight.values[row, K:]).all()
        alone = iwae(model, batch.select([row]), int(K), sequence_ids=[row], **FIXED)
        assert np.allclose(ds.log_weight.values[row, :K], alone.log_weight.values[0], atol=1e-12)
        assert math.isclose(float(ds.log_likelihood[row]), float(alone.log_likelihood[0]), abs_tol=1e-12)
        assert math.isclose(float(ds.khat_threshold[row]), statistics.khat_threshold(K))
    assert ds.attrs["K"] == n.max()


def test_hutchinson_prior_is_unbiased_for_the_exact_prior():
    model, batch = _quadrature_model(), _batch()
    exact = elbo(model, batch, 64, **FIXED)
    # Gaussian probes: on this one-coordinate block, Rademacher probes would be exact.
    hutchinson = elbo(model, batch, 64, trace="hutchinson", n_probes=2, probe="gaussian", **FIXED)
    assert np.allclose(exact.posterior_log_prob, hutchinson.posterior_log_prob)  # same draws
    difference = (hutchinson.prior_log_prob - exact.prior_log_prob).values
    z = difference.mean() / (difference.std() / math.sqrt(difference.size))
    assert abs(z) < 4 and difference.std() > 0
    assert (hutchinson.prior_probe_se > 0).all()
    assert hutchinson.attrs["trace"] == "hutchinson (unbiased log-det, biased inside log-sum-exp)"
    assert hutchinson.attrs["n_probes"] == 2 and hutchinson.attrs["probe"] == "gaussian"


def test_the_dataset_says_what_it_holds():
    model, batch = _quadrature_model(), _batch()
    ds = elbo(model, batch, 32, seed=5, **FIXED)
    assert dict(ds.sizes) == {"sequence": 3, "sample": 32, "token": 4, "block": 2}
    assert ds.attrs["estimator"] == "ELBO (lower bound)"
    for key, value in {"trace": "exact", "solver": "rk4", "steps": 12, "K": 32, "seed": 5, "block_size": 1, "patch_size": 2}.items():
        assert ds.attrs[key] == value
    assert ds.attrs["nfe"] == 4 * 12  # one chunk
    assert np.isnan(elbo(model, batch, 8, **FIXED).khat).all()  # a tail of < 5 weights: no fit
    assert np.allclose(ds.log_weight, ds.decoder_log_prob + ds.prior_log_prob - ds.posterior_log_prob)
    assert np.allclose(ds.log_likelihood, ds.log_weight.mean("sample"))
    assert np.isnan(ds.token_decoder_log_prob.values[1, 2:]).all() and np.isnan(ds.block_prior_log_prob.values[1, 1])
    assert np.allclose(ds.token_decoder_log_prob.sum("token"), ds.decoder_log_prob.mean("sample"))
    assert np.allclose(ds.block_prior_log_prob.sum("block"), ds.prior_log_prob.mean("sample"))
    assert np.allclose(ds.nats_per_token, -ds.log_likelihood / ds.n_tokens)
    for name in ("log_likelihood_se", "ess", "khat", "khat_threshold", "corpus_bits_per_byte_se"):
        assert np.isfinite(ds[name]).all(), name


def test_khat_below_21_samples_is_not_computable_and_no_verdict():
    model, batch = _quadrature_model(), _batch()
    few = iwae(model, batch, 20, **FIXED)
    assert np.isnan(few.khat).all() and np.isnan(few.khat_threshold).all()
    assert not few.khat_computable.any() and not few.reliable.any()
    enough = iwae(model, batch, 21, **FIXED)
    assert enough.khat_computable.all() and np.isfinite(enough.khat).all() and np.isfinite(enough.khat_threshold).all()
    assert statistics.khat_threshold(8) != statistics.khat_threshold(8)  # NaN, not the negative 1 - 1/log10(8)
