"""The estimators end to end on the real Cola model (the official-format fixture checkpoint).

The fixture's DiT has random weights, so its velocity oscillates in t (the timestep features
go up to frequency 1000) and an adaptive solve takes ~1000 evaluations; these tests use a few
fixed steps, which is all that properties such as "one solve equals per-block solves" need.
"""

import numpy as np
import pytest
import torch

import colaprob
from colaprob.estimators import cnf, conditional, elbo, iwae
from colaprob.protocol import LatentModel, to_prior_space

STEPS = dict(method="rk4", steps=2)
TEXTS = ["The quick brown", "A small river runs"]


@pytest.fixture(scope="module")
def model(fixture_dirs):
    return colaprob.load(fixture_dirs[0])


@pytest.fixture(scope="module")
def batch(model):
    return model.frame(TEXTS)


def _gold(model, batch):
    with torch.no_grad():
        return to_prior_space(model, model.posterior(batch).mean)


def _finite(ds, *names):
    for name in names:
        assert np.isfinite(ds[name].values).all(), name


def test_elbo_and_iwae_carry_units_errors_and_diagnostics(model, batch):
    assert isinstance(model, LatentModel)
    lower = elbo(model, batch, 8, **STEPS)
    bound = iwae(model, batch, 24, chunk_size=12, **STEPS)
    for ds in (lower, bound):
        assert ds.log_weight.dtype == np.float64 and dict(ds.sizes)["sequence"] == 2
        _finite(ds, "log_likelihood", "log_likelihood_se", "nats_per_token", "nats_per_token_se", "bits_per_byte", "bits_per_byte_se")
        _finite(ds, "token_perplexity_se", "word_perplexity_se", "corpus_nats_per_token", "corpus_bits_per_byte_se", "ess")
        assert list(ds.n_tokens.values) == batch.n_tokens.tolist() and list(ds.n_bytes.values) == batch.n_bytes.tolist()
        assert ds.attrs["latent_scale"] == model.latent_scale and ds.attrs["block_size"] == model.block_size
    _finite(bound, "khat", "khat_threshold")
    assert bound.attrs["estimator"] == "IWAE-24 (lower bound in expectation)" and bound.reliable.dtype == bool
    assert (bound.log_likelihood >= lower.log_weight.isel(sample=slice(0, 8)).mean("sample") - 1e-9).all()  # Jensen on shared draws


def test_hutchinson_on_the_dit(model, batch):
    ds = iwae(model, batch, 4, trace="hutchinson", n_probes=2, **STEPS)
    exact = iwae(model, batch, 4, **STEPS)
    _finite(ds, "log_likelihood", "prior_probe_se")
    assert ds.attrs["trace"].startswith("hutchinson") and ds.attrs["n_probes"] == 2
    assert np.allclose(ds.posterior_log_prob, exact.posterior_log_prob)  # same draws, other trace
    u = _gold(model, batch)
    exact = cnf.block_causal_log_prob(model.prior_velocity, u, model.block_size, **STEPS)
    r = cnf.block_causal_log_prob(model.prior_velocity, u, model.block_size, "hutchinson", n_probes=64, seed=1, **STEPS)
    assert ((r.logp - exact.logp).abs() / r.logp_se).max() < 4


def test_conditional_on_the_dit(model):
    batch = model.frame(["A small river runs"])
    prefix = 1 + len(model.tokenizer.encode_batch(["A small"])[0])  # bos + prompt tokens
    ds = conditional(model, batch, prefix, 6, **STEPS)
    _finite(ds, "log_likelihood", "log_likelihood_se", "log_prefix", "variance_reduction", "direct_log_likelihood")
    assert np.allclose(ds.log_prefix + ds.log_likelihood, ds.log_joint)
    assert bool(ds.direct_applies[0])  # patch size 1: every prefix ends on a latent position


def test_one_solve_equals_per_block_solves_on_the_dit(model, batch):
    u = _gold(model, batch)
    bs = model.block_size
    joint = cnf.block_causal_log_prob(model.prior_velocity, u, bs, method="rk4", steps=3)
    for b in range(u.shape[1] // bs):
        block = slice(b * bs, (b + 1) * bs)

        def velocity(z, t):
            full = u.clone()
            full[:, block] = z
            times = torch.zeros(u.shape[:-1])
            times[:, block] = t
            return model.prior_velocity(full, times, u)[:, block]

        separate = cnf.log_prob(velocity, u[:, block].contiguous(), event_dims=2, method="rk4", steps=3)
        assert torch.allclose(joint.block_logp[:, b], separate.logp, atol=1e-5, rtol=0), b  # measured 8e-8
    changed = u.clone()
    changed[:, -bs:] += 1.0
    later = cnf.block_causal_log_prob(model.prior_velocity, changed, bs, method="rk4", steps=3)
    assert torch.allclose(later.block_logp[:, :-1], joint.block_logp[:, :-1], atol=1e-5, rtol=0)
    assert not torch.allclose(later.block_logp[:, -1], joint.block_logp[:, -1], atol=1e-2)
