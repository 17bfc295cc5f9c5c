"""cnf.log_prob against closed-form densities."""

import math

import pytest
import torch
from hypothesis import given, settings

from colaprob.estimators import cnf
from colaprob.testing import GaussianMixture, LinearFlow
from colaprob.testing.strategies import gaussian_mixtures, linear_flows, seeds


def _points(mixture: GaussianMixture, seed: int, n: int = 4) -> torch.Tensor:
    """Typical draws plus one point far in the tail."""
    z = mixture.sample(n, torch.Generator().manual_seed(seed))
    z[-1] = z[-1] + 3.0
    return z


@settings(max_examples=12)
@given(gaussian_mixtures(), seeds)
def test_exact_trace_matches_mixture_density(mixture, seed):
    z0 = _points(mixture, seed)
    r = cnf.log_prob(mixture.velocity, z0, rtol=1e-6, atol=1e-6)
    assert r.logp.dtype == torch.float64 and r.logp.shape == (4,)
    assert torch.allclose(r.logp, mixture.log_prob(z0), atol=1e-4, rtol=0)


@settings(max_examples=8)
@given(linear_flows(max_dim=4), seeds)
def test_fixed_step_rk4_matches_gaussian_push_forward_on_2d_events(flow, seed):
    D = flow.offset.shape[0]
    flow = LinearFlow(flow.matrix, flow.offset, event_shape=(1, D))
    z0 = torch.randn(3, 2, 1, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = cnf.log_prob(flow.velocity, z0, event_dims=2, method="rk4", steps=50)
    assert r.logp.shape == (3, 2)
    assert r.nfe == 4 * 50
    assert torch.allclose(r.logp, flow.log_prob(z0), atol=1e-7, rtol=0)


def _mixture(seed: int = 3, D: int = 3) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    factor = 0.6 * torch.randn(3, D, D, generator=g, dtype=torch.float64)
    cov = factor @ factor.transpose(-1, -2) + 0.1 * torch.eye(D, dtype=torch.float64)
    return GaussianMixture(torch.randn(3, generator=g, dtype=torch.float64), 2 * torch.randn(3, D, generator=g, dtype=torch.float64), cov)


def test_fixed_step_errors_shrink_at_the_method_order():
    mixture = _mixture()
    z0 = _points(mixture, 0)
    exact = mixture.log_prob(z0)

    def error(method, steps):
        return (cnf.log_prob(mixture.velocity, z0, method=method, steps=steps).logp - exact).abs().max()

    for method, order in [("euler", 1), ("midpoint", 2), ("rk4", 4)]:
        coarse, fine = error(method, 40), error(method, 80)
        assert fine < coarse * 2 ** (-order) * 1.6, method
    assert error("rk4", 80) < 1e-3


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_the_exact_log_det(probe):
    mixture = _mixture()
    z0 = _points(mixture, 1)
    exact = cnf.log_prob(mixture.velocity, z0, method="rk4", steps=20)
    r = cnf.log_prob(mixture.velocity, z0, trace="hutchinson", probe=probe, n_probes=400, seed=7, method="rk4", steps=20)
    assert r.probe_logp.shape == (400, 4)
    assert torch.equal(r.prior_logp, exact.prior_logp)  # the probes do not move z
    z_score = (r.logp - exact.logp) / r.logp_se
    assert z_score.abs().max() < 4
    assert (r.logp_se > 0).all() and r.settings["trace"].startswith("hutchinson (unbiased log-det")


def test_hutchinson_is_reproducible_from_its_seed():
    mixture = _mixture()
    z0 = _points(mixture, 2)
    run = lambda seed: cnf.log_prob(mixture.velocity, z0, trace="hutchinson", n_probes=3, seed=seed, method="rk4", steps=5).probe_logp
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    probes = cnf._draw_probes("rademacher", (3, *z0.shape), 1)
    given_probes = cnf.log_prob(mixture.velocity, z0, trace="hutchinson", probes=probes, method="rk4", steps=5).probe_logp
    assert torch.equal(given_probes, run(1))


def test_exact_trace_does_not_depend_on_the_vjp_chunk():
    mixture = _mixture(D=5)
    z0 = _points(mixture, 3)
    runs = [cnf.log_prob(mixture.velocity, z0, method="rk4", steps=10, vjp_chunk=c).logp for c in (1, 2, 5, 32)]
    for r in runs[1:]:
        assert torch.allclose(r, runs[0], atol=1e-12, rtol=0)


def test_float32_velocity_gives_float64_density():
    mixture = _mixture()
    z0 = _points(mixture, 4)[:3]
    r = cnf.log_prob(mixture.velocity, z0.float())
    assert r.logp.dtype == torch.float64
    assert torch.allclose(r.logp, mixture.log_prob(z0), atol=2e-3, rtol=0)


def test_settings_and_argument_errors():
    flow = LinearFlow(torch.zeros(2, 2), torch.zeros(2))
    z0 = torch.zeros(1, 2, dtype=torch.float64)
    r = cnf.log_prob(flow.velocity, z0)
    assert r.settings == {"trace": "exact", "solver": "dopri5", "event_dims": 1, "rtol": 1e-5, "atol": 1e-5, "seed": 0}
    assert r.logp_se is None and r.probe_logp is None
    assert torch.allclose(r.logp, torch.tensor([-math.log(2 * math.pi)], dtype=torch.float64))
    with pytest.raises(ValueError, match="steps"):
        cnf.log_prob(flow.velocity, z0, method="euler")
    with pytest.raises(ValueError, match="trace"):
        cnf.log_prob(flow.velocity, z0, trace="diagonal")
    with pytest.raises(ValueError, match="probe"):
        cnf.log_prob(flow.velocity, z0, trace="hutchinson", probe="uniform")
