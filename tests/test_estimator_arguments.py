"""Bad arguments to the public estimator functions: one ``ValueError`` / ``TypeError`` naming
the argument, raised before any torch computation; and the solver registry: every torchdiffeq
method either runs as documented or is refused."""

import math

import pytest
import torch

from colaprob.estimators import cnf, conditional, elbo, iwae
from colaprob.protocol import TokenBatch
from colaprob.testing import BlockMixturePrior, CategoricalDecoder, LinearFlow, QuadratureModel, make_batch

FIXED = dict(method="rk4", steps=4)


def _model() -> QuadratureModel:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    prior = BlockMixturePrior(r(3), r(3, 1, 1), r(3, 1, 1), 0.5 * r(3, 1, 1), 0.2 * r(3, 1, 1))
    return QuadratureModel(prior, CategoricalDecoder(r(2, 3, 1), r(2, 3)), 2, 2.0, 0.5)


def _batch() -> TokenBatch:
    return make_batch([torch.tensor([0, 1, 2, 1]), torch.tensor([2, 2])])


def _with(batch: TokenBatch, **changes) -> TokenBatch:
    fields = {name: getattr(batch, name) for name in ("ids", "lengths", "n_tokens", "n_bytes", "n_words")}
    return TokenBatch(**{**fields, **changes})


ESTIMATOR_CASES = [
    # (keyword arguments, exception, fragment of the sentence)
    (dict(n_samples=0), ValueError, "n_samples (K) must be at least 1"),
    (dict(n_samples=2.5), TypeError, "n_samples (K) must be an integer"),
    (dict(chunk_size=-3), ValueError, "chunk_size must be at least 1"),
    (dict(seed=-1), ValueError, "seed must be at least 0"),
    (dict(trace="diagonal"), ValueError, "trace must be 'exact' or 'hutchinson'"),
    (dict(method="rk4", steps=0), ValueError, "steps must be at least 1"),
    (dict(method="rk4"), ValueError, "needs steps"),
    (dict(method="dopri5", steps=8), ValueError, "steps is for fixed-grid methods"),
    (dict(rtol=-1e-5), ValueError, "rtol must be a positive finite number"),
    (dict(atol=math.nan), ValueError, "atol must be a positive finite number"),
    (dict(atol=1e-300), ValueError, "atol = 1e-300 is below 1e-12"),
    (dict(method="scipy_solver"), ValueError, "'scipy_solver' is not supported"),
    (dict(method="rk45"), ValueError, "'rk45' is not a torchdiffeq method"),
    (dict(n_probes=0, trace="hutchinson"), ValueError, "n_probes must be at least 1"),
    (dict(vjp_chunk=0), ValueError, "vjp_chunk must be at least 1"),
    (dict(tolerance=1e-5), TypeError, "unknown solver option 'tolerance'"),
]


@pytest.mark.parametrize("estimate", [elbo, iwae, lambda m, b, K=4, **kw: conditional(m, b, 2, K, **kw)], ids=["elbo", "iwae", "conditional"])
@pytest.mark.parametrize("kwargs, error, fragment", ESTIMATOR_CASES, ids=[c[2] for c in ESTIMATOR_CASES])
def test_estimators_refuse_bad_arguments_in_one_sentence(estimate, kwargs, error, fragment, monkeypatch):
    model = _model()
    # Nothing may reach the model: the check comes first.
    monkeypatch.setattr(model, "posterior", lambda batch: pytest.fail("the model ran before the arguments were checked"))
    options = dict(kwargs)
    n = options.pop("n_samples", 4)
    if "method" not in options:
        options = {**FIXED, **options}
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        estimate(model, _batch(), n, **options)


BATCH_CASES = [
    (lambda b: _with(b, lengths=torch.tensor([4, 0])), ValueError, r"batch.lengths is 0 for sequence\(s\) \[1\]"),
    (lambda b: _with(b, lengths=torch.tensor([4, 2, 2])), ValueError, "batch.lengths of shape"),
    (lambda b: _with(b, lengths=torch.tensor([4, 9])), ValueError, "batch.lengths must lie between 0 and 4"),
    (lambda b: _with(b, lengths=torch.tensor([4.0, 2.0])), TypeError, "batch.lengths must hold integers"),
    (lambda b: _with(b, ids=b.ids[0]), ValueError, r"batch.ids must be \[sequences, tokens\]"),
    (lambda b: _with(b, n_tokens=torch.tensor([3])), ValueError, "batch.n_tokens must hold one count per sequence"),
    (lambda b: "some text", TypeError, "batch must be a colaprob.protocol.TokenBatch"),
]


@pytest.mark.parametrize("change, error, fragment", BATCH_CASES, ids=[c[2] for c in BATCH_CASES])
def test_bad_batches_are_refused_not_scored_as_zero(change, error, fragment):
    with pytest.raises(error, match=fragment):
        elbo(_model(), change(_batch()), 4, **FIXED)


def test_iwae_max_samples_below_k_and_bad_prefix_tokens_are_refused():
    with pytest.raises(ValueError, match=r"max_samples \(8\) must be at least n_samples \(16\)"):
        iwae(_model(), _batch(), 16, max_samples=8, **FIXED)
    with pytest.raises(TypeError, match="prefix_tokens must hold integers"):
        conditional(_model(), _batch(), 1.5, 4, **FIXED)
    with pytest.raises(ValueError, match="prefix_tokens must lie between 0 and"):
        conditional(_model(), _batch(), torch.tensor([1, 3]), 4, **FIXED)


def test_cnf_refuses_bad_latents_and_shapes():
    flow = LinearFlow(torch.zeros(2, 2), torch.zeros(2))
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="z0 must be a floating-point tensor"):
        cnf.log_prob(flow.velocity, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="z0 holds NaN"):
        cnf.log_prob(flow.velocity, torch.full((3, 2), math.nan, dtype=torch.float64))
    with pytest.raises(ValueError, match="z0 must have at least 3 dimensions"):
        cnf.log_prob(flow.velocity, z0, event_dims=3)
    with pytest.raises(ValueError, match=r"probes must have shape \[n_probes, \*z0.shape\]"):
        cnf.log_prob(flow.velocity, z0, trace="hutchinson", probes=torch.ones(2, 4, 2, dtype=torch.float64))
    velocity = lambda u, t, clean: torch.zeros_like(u)
    block = torch.zeros(2, 4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="block_size must be at least 1"):
        cnf.block_causal_log_prob(velocity, block, 0)
    with pytest.raises(ValueError, match="lengths of shape"):
        cnf.block_causal_log_prob(velocity, block, 2, lengths=torch.tensor([2, 4, 4]))
    with pytest.raises(ValueError, match="prefix_len must lie between 0 and 4"):
        cnf.block_causal_log_prob(velocity, block, 2, prefix_len=5)
    with pytest.raises(TypeError, match="lengths must hold integers"):
        cnf.block_causal_log_prob(velocity, block, 2, lengths=2.0)


@pytest.mark.parametrize("method", [*cnf.ADAPTIVE_METHODS, *sorted(cnf.FIXED_GRID_METHODS)])
def test_every_registered_method_integrates_to_the_closed_form(method):
    """A linear flow, whose density is Gaussian in closed form: every method of the registry
    reaches it, so no method silently takes one step (``fixed_adams`` used to)."""
    g = torch.Generator().manual_seed(0)
    flow = LinearFlow(0.6 * torch.randn(2, 2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64))
    z0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    exact = flow.log_prob(z0)
    error = lambda **options: float((cnf.log_prob(flow.velocity, z0, method=method, **options).logp - exact).abs().max())
    if method in cnf.FIXED_GRID_METHODS:
        # Doubling the grid shrinks the error at least as a first-order method's would.
        coarse, fine = error(steps=64), error(steps=128)
        assert fine < 0.1 and fine < coarse / 1.9, (coarse, fine)
        assert cnf.log_prob(flow.velocity, z0, method=method, steps=64).settings["steps"] == 64
    else:
        # The tolerance controls the answer: tightening it 100-fold brings it closer.
        loose, tight = error(rtol=1e-4, atol=1e-4), error(rtol=1e-6, atol=1e-6)
        assert tight < 1e-3 and tight < max(loose, 1e-6), (loose, tight)
        assert "steps" not in cnf.log_prob(flow.velocity, z0, method=method).settings


@pytest.mark.parametrize("method", ["bosh3", "adaptive_heun"])
def test_an_underflowing_step_is_one_sentence(method):
    """``dz/dt = z^2`` from ``z = 2`` leaves every float at ``t = 1/2``."""
    with pytest.raises(cnf.SolverFailure, match=f"the {method} solver's step size underflowed .* loosen them"):
        cnf.log_prob(lambda z, t: z**2, torch.full((1, 1), 2.0, dtype=torch.float64), method=method, rtol=1e-6, atol=1e-6)
