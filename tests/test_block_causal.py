"""cnf.block_causal_log_prob and cnf.sample on the block-causal mixture prior."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from colaprob.estimators import cnf
from colaprob.testing import BlockMixturePrior
from colaprob.testing.strategies import block_mixture_priors, seeds


def _draw(prior: BlockMixturePrior, shape: tuple[int, ...], L: int, seed: int) -> torch.Tensor:
    """Latents from the prior itself, block by block (each block given the drawn history)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(*shape, L, prior.latent_dim, dtype=torch.float64)
    for b in range(0, L, prior.block_size):
        u[..., b : b + prior.block_size, :] = prior.sample(u, g)[..., b : b + prior.block_size, :]
    return u


def _prior(seed: int = 0, bs: int = 2, d: int = 2, K: int = 3) -> BlockMixturePrior:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return BlockMixturePrior(r(K), r(K, bs, d), 1.5 * r(K, bs, d), r(K, bs, d), 0.3 * r(K, bs, d) - 0.3)


@settings(max_examples=10)
@given(block_mixture_priors(), st.integers(1, 7), st.data())
def test_every_block_matches_its_exact_conditional(prior, L, data):
    u = _draw(prior, (2,), L, data.draw(seeds))
    prefix = torch.tensor([data.draw(st.integers(0, L)), 0])
    r = cnf.block_causal_log_prob(prior.velocity, u, prior.block_size, prefix_len=prefix, rtol=1e-6, atol=1e-6)
    exact = prior.block_log_prob(u, prefix)
    assert r.block_logp.shape == (2, -(-L // prior.block_size))
    assert torch.allclose(r.block_logp, exact, atol=1e-4, rtol=0)
    assert torch.allclose(r.logp, exact.sum(-1), atol=1e-4, rtol=0)
    position_of_block_end = torch.arange(1, r.block_logp.shape[1] + 1) * prior.block_size
    assert torch.equal(r.integrated[0], position_of_block_end.clamp(max=L) > prefix[0])


def _separate_block_solve(prior, u, b, prefix, **options):
    """Block b alone: a CNF over its integrated positions, the rest held at their data."""
    bs = prior.block_size
    start = max(b * bs, prefix)
    stop = min((b + 1) * bs, u.shape[-2])

    def velocity(z, t):
        full = u.clone()
        full[..., start:stop, :] = z
        tt = torch.zeros(u.shape[:-1], dtype=u.dtype)
        tt[..., start:stop] = t
        return prior.velocity(full, tt, u)[..., start:stop, :]

    return cnf.log_prob(velocity, u[..., start:stop, :], event_dims=2, **options).logp


@pytest.mark.parametrize("prefix", [0, 3])
def test_one_solve_equals_separate_per_block_solves(prefix):
    prior = _prior()
    u = _draw(prior, (3,), 7, 1)
    fixed = dict(method="rk4", steps=30)
    joint = cnf.block_causal_log_prob(prior.velocity, u, 2, prefix_len=prefix, **fixed)
    adaptive = cnf.block_causal_log_prob(prior.velocity, u, 2, prefix_len=prefix, rtol=1e-8, atol=1e-8)
    for b in range(prefix // 2, 4):
        separate = _separate_block_solve(prior, u, b, prefix, **fixed)
        assert torch.allclose(joint.block_logp[:, b], separate, atol=1e-10, rtol=0)
        separate = _separate_block_solve(prior, u, b, prefix, rtol=1e-8, atol=1e-8)
        assert torch.allclose(adaptive.block_logp[:, b], separate, atol=1e-6, rtol=0)
    assert (joint.block_logp[:, : prefix // 2] == 0).all() and not joint.integrated[:, : prefix // 2].any()


def test_a_later_block_never_changes_an_earlier_block():
    prior = _prior()
    u = _draw(prior, (2,), 6, 2)
    changed = u.clone()
    changed[..., 4:, :] += torch.randn(2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = cnf.block_causal_log_prob(prior.velocity, u, 2, method="rk4", steps=20).block_logp
    after = cnf.block_causal_log_prob(prior.velocity, changed, 2, method="rk4", steps=20).block_logp
    assert torch.equal(before[:, :2], after[:, :2])
    assert (before[:, 2] != after[:, 2]).all()
    before = cnf.block_causal_log_prob(prior.velocity, u, 2, rtol=1e-7, atol=1e-7).block_logp
    after = cnf.block_causal_log_prob(prior.velocity, changed, 2, rtol=1e-7, atol=1e-7).block_logp
    assert torch.allclose(before[:, :2], after[:, :2], atol=1e-5, rtol=0)  # shared adaptive steps


def test_lengths_drop_later_blocks_without_touching_the_rest():
    prior = _prior()
    u = _draw(prior, (3,), 6, 3)
    lengths = torch.tensor([6, 2, 4])
    r = cnf.block_causal_log_prob(prior.velocity, u, 2, lengths=lengths, method="rk4", steps=20)
    full = cnf.block_causal_log_prob(prior.velocity, u, 2, method="rk4", steps=20)
    counted = torch.arange(3) * 2 < lengths[:, None]
    assert torch.equal(r.integrated, counted)
    assert torch.equal(r.block_logp, torch.where(counted, full.block_logp, 0.0))
    with pytest.raises(ValueError, match="block boundary"):
        cnf.block_causal_log_prob(prior.velocity, u, 2, lengths=3)


def test_exact_trace_costs_block_size_times_d_vjps_per_evaluation(monkeypatch):
    prior = _prior(bs=2, d=3)
    calls = []
    grad = torch.autograd.grad

    def counting_grad(outputs, inputs, grad_outputs, **kw):
        calls.append(grad_outputs.shape[0])
        return grad(outputs, inputs, grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    for L in (2, 12):
        calls.clear()
        u = _draw(prior, (2,), L, 4)
        r = cnf.block_causal_log_prob(prior.velocity, u, 2, method="euler", steps=3, vjp_chunk=4)
        assert len(calls) == 3 * 2 and sum(calls) == r.nfe * 2 * 3  # chunks of 4 + 2 probes


def test_clean_history_is_the_same_object_at_every_evaluation():
    prior = _prior()
    u = _draw(prior, (2,), 4, 5)
    seen = []

    def velocity(u_t, t, clean):
        seen.append(clean)
        assert t.shape == u_t.shape[:-1]
        return prior.velocity(u_t, t, clean)

    cnf.block_causal_log_prob(velocity, u, 2, prefix_len=1)
    assert len(seen) > 5 and all(c is u for c in seen)


def test_hutchinson_block_densities_are_unbiased():
    prior = _prior()
    u = _draw(prior, (2,), 6, 6)
    exact = cnf.block_causal_log_prob(prior.velocity, u, 2, prefix_len=1, method="rk4", steps=20)
    r = cnf.block_causal_log_prob(prior.velocity, u, 2, "hutchinson", prefix_len=1, seed=3, n_probes=300, method="rk4", steps=20)
    se = r.probe_block_logp.std(0) / 300**0.5
    assert r.probe_block_logp.shape == (300, 2, 3)
    assert ((r.block_logp - exact.block_logp).abs() / se).max() < 4
    assert torch.allclose(r.logp, r.block_logp.sum(-1))


def test_sample_inverts_the_density_flow_on_one_block():
    prior = _prior(bs=3)
    noise = torch.randn(4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    history = torch.zeros(4, 3, 2, dtype=torch.float64)
    z0 = cnf.sample(prior.velocity, history, 3, noise=noise, method="dopri5", rtol=1e-9, atol=1e-9)
    r = cnf.block_causal_log_prob(prior.velocity, z0, 3, rtol=1e-9, atol=1e-9)
    assert torch.allclose(r.z1, noise, atol=1e-6)


def test_teacher_forced_samples_follow_each_block_conditional():
    prior = _prior(bs=1, d=1)
    history = _draw(prior, (), 3, 7).expand(4000, 3, 1)
    draws = cnf.sample(prior.velocity, history, 1, prefix_len=1, seed=1, method="dopri5", rtol=1e-6, atol=1e-6)
    assert torch.equal(draws[:, 0], history[:, 0])  # the prefix is held
    reference = prior.sample(history, torch.Generator().manual_seed(2))
    for b in (1, 2):  # each block given the GOLD history: same law as the exact sampler
        x, y = draws[:, b, 0], reference[:, b, 0]
        z_mean = (x.mean() - y.mean()) / (x.var() / 4000 + y.var() / 4000).sqrt()
        assert abs(z_mean) < 4
        assert abs(x.std() / y.std() - 1) < 0.1
    euler = cnf.sample(prior.velocity, history[:8], 1, seed=1)
    assert euler.shape == (8, 3, 1) and euler.dtype == history.dtype
