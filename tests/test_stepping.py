"""The per-element adaptive solver against closed-form solutions."""

import math

import pytest
import torch

from colaprob.estimators import cnf, stepping
from colaprob.testing import BlockMixturePrior


def _decay(rates: torch.Tensor):
    """``dy/dt = -rate y``, ``dl/dt = rate y``: ``y(1) = y0 exp(-rate)``, ``l(1) = y0 - y(1)``;
    one element per rate, each a [3]-vector ``y`` and a scalar ``l``."""

    def f(t, state):
        y, _ = state
        return -rates[:, None] * y, rates * y[:, 0]

    def norm(ratio):
        y, l = ratio
        return torch.maximum(y.pow(2).mean(-1).sqrt(), l.abs())

    return f, norm, (lambda h: (h[:, None], h))


METHODS = sorted(stepping.TABLEAUS)
# (tolerance, the largest error it left on the test's problem), per method: the 2nd-order
# pairs need many steps for a tight tolerance, and fehlberg2's error is 100-600x its
# tolerance (torchdiffeq's fehlberg2 leaves the same on these problems).
DECAY = {"dopri5": (1e-9, 1e-9), "dopri8": (1e-9, 1e-9), "bosh3": (1e-8, 1e-7), "fehlberg2": (1e-9, 1e-6), "adaptive_heun": (1e-7, 1e-7)}
MIXTURE = {"dopri5": (1e-7, 1e-5), "dopri8": (1e-7, 1e-5), "bosh3": (1e-7, 1e-5), "fehlberg2": (1e-7, 1e-4), "adaptive_heun": (1e-5, 1e-4)}


@pytest.mark.parametrize("method", METHODS)
def test_each_pair_has_its_order_and_its_error_estimate_the_next_lower(method):
    """One step of ``dy/dt = cos(t) y`` (``y(h) = exp(sin h)``) from ``t = 0.3``: halving ``h``
    divides the local error by ``2^(p+1)`` and the error estimate ``h sum e_i k_i`` by
    ``2^p`` (the embedded solution has order ``p - 1``), which the coefficients give only if
    each is right."""
    tableau = stepping.TABLEAUS[method]
    f = lambda t, state: (torch.cos(t) * state[0],)
    t0 = torch.tensor([0.3], dtype=torch.float64)
    y0 = (torch.exp(torch.sin(t0)),)
    h0 = {"dopri8": 0.4, "dopri5": 0.4}.get(method, 0.1)
    errors, estimates = [], []
    for h in (h0, h0 / 2):
        h = torch.tensor([h], dtype=torch.float64)
        (y,), (estimate,), _ = tableau.step(f, t0, y0, h, f(t0, y0), lambda x: (x,))
        errors.append(float((y - torch.exp(torch.sin(t0 + h))).abs()))
        estimates.append(float(estimate.abs()))
    assert abs(math.log2(errors[0] / errors[1]) - (tableau.order + 1)) < 0.5, errors
    assert abs(math.log2(estimates[0] / estimates[1]) - tableau.order) < 0.5, estimates
    assert sum(tableau.weights) == pytest.approx(1, abs=1e-14) and sum(tableau.error_weights) == pytest.approx(0, abs=1e-14)
    assert all(sum(row) == pytest.approx(c, abs=1e-14) for row, c in zip(tableau.stages, tableau.nodes))


@pytest.mark.parametrize("method", METHODS)
def test_each_element_meets_its_closed_form_and_ignores_its_batch_mates(method):
    rates = torch.tensor([0.1, 3.0, 20.0, 60.0], dtype=torch.float64)
    y0 = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64).expand(4, 3)
    f, norm, spread = _decay(rates)
    tolerance, accuracy = DECAY[method]
    tol = dict(rtol=tolerance, atol=tolerance, method=method)
    (y, l), steps = stepping.solve(f, (y0, torch.zeros(4, dtype=torch.float64)), spread=spread, norm=norm, **tol)
    exact = y0 * torch.exp(-rates)[:, None]
    assert torch.allclose(y, exact, rtol=0, atol=accuracy) and torch.allclose(l, y0[:, 0] - exact[:, 0], rtol=0, atol=accuracy)
    assert steps[0] < steps[-1]  # a stiffer element takes more steps, alone
    for e in range(4):
        f_e, norm_e, spread_e = _decay(rates[e : e + 1])
        (y_e, l_e), steps_e = stepping.solve(f_e, (y0[e : e + 1], torch.zeros(1, dtype=torch.float64)), spread=spread_e, norm=norm_e, **tol)
        assert torch.equal(y_e[0], y[e]) and torch.equal(l_e[0], l[e]) and steps_e[0] == steps[e]


@pytest.mark.parametrize("method", METHODS)
def test_every_element_ends_exactly_at_one(method):
    """A method of order ``p`` integrates ``dy/dt = c t^(p-1)`` exactly on any steps, so
    ``y(1) = c / p`` to rounding only if the last step ends at ``t = 1`` (not before, not
    past it)."""
    p = stepping.TABLEAUS[method].order
    c = torch.tensor([1.0, 50.0, 2000.0], dtype=torch.float64)
    seen = []

    def f(t, state):
        seen.append(t.clone())
        return (c * t ** (p - 1),)

    (y,), _ = stepping.solve(f, (torch.zeros(3, dtype=torch.float64),), spread=lambda h: (h,), norm=lambda r: r[0].abs(), rtol=1e-3, atol=1e-3, method=method)
    assert torch.allclose(y, c / p, rtol=1e-13, atol=0)
    assert torch.equal(torch.stack(seen).amax(0), torch.ones(3, dtype=torch.float64))


def test_elements_marked_done_are_held_and_cost_no_steps():
    rates = torch.tensor([2.0, 5.0], dtype=torch.float64)
    f, norm, spread = _decay(rates)
    y0 = torch.ones(2, 3, dtype=torch.float64)
    (y, l), steps = stepping.solve(f, (y0, torch.zeros(2, dtype=torch.float64)), spread=spread, norm=norm, rtol=1e-6, atol=1e-6, done=torch.tensor([False, True]))
    assert torch.equal(y[1], y0[1]) and l[1] == 0 and steps[1] == 0 and steps[0] > 0
    assert math.isclose(float(y[0, 0]), math.exp(-2.0), rel_tol=1e-5)


def test_a_blow_up_is_a_step_underflow_and_a_solver_failure():
    """``dy/dt = y^2`` from ``y0 = 2`` leaves every float at ``t = 1/2``; a velocity that turns
    NaN is refused by name."""
    blow_up = lambda t, state: (state[0] ** 2,)
    with pytest.raises(stepping.StepUnderflow, match="underflow at t = 0.5"):
        stepping.solve(blow_up, (torch.full((1,), 2.0, dtype=torch.float64),), spread=lambda h: (h,), norm=lambda r: r[0].abs(), rtol=1e-6, atol=1e-6)
    blow_up_late = lambda u, t, clean: torch.where(t[..., None] > 0.5, math.nan, -u)
    with pytest.raises(cnf.SolverFailure, match="velocity was not finite"):
        cnf.block_causal_log_prob(blow_up_late, torch.ones((1, 2, 1), dtype=torch.float64), 2)


@pytest.mark.parametrize("method", METHODS)
def test_a_block_density_does_not_depend_on_its_batch_or_its_sequence(method):
    """Per-block step control on the exact 2L velocity of a mixture prior: a sequence's
    blocks equal those of the same sequence solved alone, and of its first block alone, and
    they match the closed form."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    prior = BlockMixturePrior(r(3), r(3, 2, 2), 1.5 * r(3, 2, 2), r(3, 2, 2), 0.3 * r(3, 2, 2) - 0.3)
    u = 1.5 * r(5, 6, 2)  # 5 sequences of 6 positions (3 blocks)
    tolerance, accuracy = MIXTURE[method]
    tol = dict(method=method, rtol=tolerance, atol=tolerance)
    together = cnf.block_causal_log_prob(prior.velocity, u, 2, **tol)
    alone = cnf.block_causal_log_prob(prior.velocity, u[2:3], 2, **tol)
    first = cnf.block_causal_log_prob(prior.velocity, u[2:3, :2], 2, **tol)
    assert torch.allclose(alone.block_logp[0], together.block_logp[2], rtol=0, atol=1e-12)
    assert torch.allclose(first.block_logp[0, 0], together.block_logp[2, 0], rtol=0, atol=1e-12)
    assert torch.allclose(together.block_logp, prior.block_log_prob(u), rtol=0, atol=accuracy)


def test_a_document_does_not_depend_on_its_batch_on_the_embedded_model():
    """The embedded DiT in float32 under the default dopri5: a document scored alone, at its
    own length, and among 5 others of other lengths (padded to the longest) agrees to 1e-5
    nats, although the batch needed other steps. Before the DiT's products and softmax were
    made independent of the batch's shape (``linear.Linear``, ``attention.KEY_TILE``,
    ``dit.join_keys``), last-bit differences were amplified by the step control into 0.01
    nats (BENCHMARKS section 8)."""
    import colaprob
    from colaprob.protocol import to_prior_space

    model = colaprob.load("tiny")
    batch = model.frame(["if x:", "def f(x): return x", "a", "1 2 3", "()", "for i in"])
    with torch.no_grad():
        q = model.posterior(batch)
        u = to_prior_space(model, q.sample(torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(0))))
    lengths = -(-batch.lengths // model.patch_size)
    probes = torch.randint(0, 2, (1, *u.shape), generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    together = cnf.block_causal_log_prob(model.prior_velocity, u, model.block_size, "hutchinson", lengths=lengths, probes=probes)
    for i in (0, 2):
        n = int(lengths[i])
        alone = cnf.block_causal_log_prob(model.prior_velocity, u[i : i + 1, :n], model.block_size, "hutchinson", probes=probes[:, i : i + 1, :n])
        assert together.nfe > alone.nfe  # the batch-mates needed other steps
        n_blocks = alone.block_logp.shape[1]
        assert torch.allclose(alone.block_logp[0], together.block_logp[i, :n_blocks], rtol=0, atol=1e-5), i
