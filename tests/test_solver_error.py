"""The reported solver error against the true one: the analytic harness (exact block
densities of ``colaprob.testing.BlockMixturePrior``) and the estimators on the quadrature
model, where a much finer solve is the reference."""

import numpy as np
import pytest
import torch

from colaprob.estimators import cnf, elbo, iwae
from colaprob.estimators.solver import SAFETY
from colaprob.testing import BlockMixturePrior, CategoricalDecoder, QuadratureModel, make_batch

FLOOR = 1e-6  # nats: float32 rounding, where "within 10x" is met by anything below 10x it


def _prior(seed=3, bs=2, d=2, K=3) -> BlockMixturePrior:
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
    return BlockMixturePrior(
        torch.randn(K, generator=g, dtype=torch.float64), u(-1, 1, K, bs, d) / 2, u(-2, 2, K, bs, d), u(-1, 1, K, bs, d), u(-1.2, 0.4, K, bs, d)
    )


def _draws(prior, n_blocks, batch, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(batch, n_blocks * prior.block_size, prior.latent_dim, dtype=torch.float64)
    for start in range(0, u.shape[1], prior.block_size):
        u[:, start : start + prior.block_size] = prior.sample(u, g)[:, start : start + prior.block_size]
    return u.float()


def test_reported_error_bounds_the_true_error_within_ten_times_on_the_analytic_harness():
    prior = _prior()
    u = _draws(prior, n_blocks=4, batch=12)
    exact = prior.block_log_prob(u.double())
    bounds, within = [], []
    for options in (dict(rtol=1e-3, atol=1e-3), dict(rtol=1e-5, atol=1e-5), dict(method="rk4", steps=8), dict(method="rk4", steps=32)):
        r = cnf.block_causal_log_prob(prior.velocity, u, 2, solver_error=True, **options)
        assert r.error_nfe > r.nfe and r.settings["solver_error"].startswith(f"{SAFETY:g} x")
        for reported, true in ((r.logp_error, (r.logp - exact.sum(-1)).abs()), (r.block_logp_error.flatten(), (r.block_logp - exact).abs().flatten())):
            bounds.append((reported >= true).double())
            within.append(((reported <= 10 * true) | ((true < FLOOR) & (reported <= 10 * FLOOR))).double())
        # The error it reports is not the tolerance: it moves with the solver's accuracy.
        assert float(r.logp_error.max()) > 0
    assert float(torch.cat(bounds).mean()) >= 0.95 and float(torch.cat(within).mean()) >= 0.95


def test_a_coarse_solve_reports_more_error_than_a_fine_one():
    prior = _prior()
    u = _draws(prior, n_blocks=3, batch=4)
    coarse = cnf.block_causal_log_prob(prior.velocity, u, 2, method="rk4", steps=4, solver_error=True)
    fine = cnf.block_causal_log_prob(prior.velocity, u, 2, method="rk4", steps=64, solver_error=True)
    assert (coarse.logp_error > 10 * fine.logp_error).all()
    assert cnf.block_causal_log_prob(prior.velocity, u, 2, method="rk4", steps=4).logp_error is None


def _quadrature_model(posterior_widening: float = 1.1) -> QuadratureModel:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    prior = BlockMixturePrior(r(3), r(3, 1, 1), r(3, 1, 1), 0.5 * r(3, 1, 1), 0.2 * r(3, 1, 1))
    return QuadratureModel(prior, CategoricalDecoder(r(2, 3, 1), r(2, 3)), 2, 2.0, 0.5, posterior_widening=posterior_widening)


def test_estimators_propagate_the_solver_error_to_the_log_likelihood():
    model = _quadrature_model()
    batch = make_batch([torch.tensor([0, 1, 2, 1]), torch.tensor([2, 2]), torch.tensor([1, 0, 0, 2])])
    for estimate in (elbo, iwae):
        coarse = estimate(model, batch, 32, method="rk4", steps=3, solver_error=True)
        reference = estimate(model, batch, 32, method="rk4", steps=96)  # the same draws, solved finely
        true = np.abs(coarse.log_likelihood.values - reference.log_likelihood.values)
        reported = coarse.log_likelihood_solver_error.values
        assert (reported >= true).all() and (reported <= 10 * true + 10 * FLOOR).all(), (reported, true)
        assert coarse.block_prior_solver_error.dims == ("sequence", "block") and coarse.attrs["solver_error_nfe"] > 0
        assert "log_likelihood_solver_error" not in reference


def test_task_scores_report_each_terms_solver_error():
    """``log p(y | c) = log p(c + y) - log p(c)``: each term's reported error against the same
    draws solved finely bounds its true error within 10x; their sum bounds the difference's
    (whose two errors may partly cancel, so no "within" there). Contexts ending on and
    inside a latent position, an empty one; the shared and the per-choice paths."""
    from colaprob.estimators.continuations import ContinuationBatch, score_continuations

    model = _quadrature_model()
    batch = ContinuationBatch.from_tokens([[0, 1], [2], []], [[[2], [1, 0]], [[1, 2, 0], [0]], [[1, 1]]], multiple=2)
    at = (batch.item, batch.choice)
    for share_context in (True, False):
        coarse = score_continuations(model, batch, 32, method="rk4", steps=3, solver_error=True, share_context=share_context)
        fine = score_continuations(model, batch, 32, method="rk4", steps=96, share_context=share_context)
        for name in ("log_joint", "log_context"):
            true = np.abs(coarse[name].values[at] - fine[name].values[at])
            reported = coarse[f"{name}_solver_error"].values[at]
            assert (reported >= true).all() and (reported <= 10 * true + 10 * FLOOR).all(), (name, share_context, reported, true)
        assert coarse.log_context_solver_error.values[2, 0] == 0  # no context, no solve
        true = np.abs(coarse.log_likelihood.values[at] - fine.log_likelihood.values[at])
        assert (coarse.log_likelihood_solver_error.values[at] >= true).all()


def test_the_companion_of_selected_elements_equals_the_whole_batchs_there():
    """``block_causal_solver_error`` on some elements of a finished solve reports what the
    companion of the whole batch reports on them (the same probes, drawn for the whole
    batch), and NaN on the others: adaptive and fixed-grid, exact and Hutchinson, with clean
    prefixes and short lengths."""
    prior = _prior()
    u = _draws(prior, n_blocks=3, batch=6).reshape(2, 3, 6, 2)
    flow = dict(prefix_len=torch.tensor([[0, 1, 2], [3, 0, 1]]), lengths=torch.tensor([[6, 4, 6], [6, 2, 6]]))
    select = torch.tensor([[True, False, True], [False, True, False]])
    for options in (dict(rtol=1e-4, atol=1e-4), dict(method="rk4", steps=4), dict(rtol=1e-4, atol=1e-4, trace="hutchinson", n_probes=2)):
        solver = cnf.Solver(**options)
        whole = cnf.block_causal_log_prob(prior.velocity, u, 2, solver=solver.replace(solver_error=True), **flow)
        solved = cnf.block_causal_log_prob(prior.velocity, u, 2, solver=solver, **flow)
        block_error, error, nfe = cnf.block_causal_solver_error(prior.velocity, u, 2, solved, select, solver=solver, **flow)
        torch.testing.assert_close(block_error[select], whole.block_logp_error[select], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(error[select], whole.logp_error[select], rtol=1e-9, atol=1e-12)
        assert error[~select].isnan().all() and block_error[~select].isnan().all() and nfe > 0
        nothing = cnf.block_causal_solver_error(prior.velocity, u, 2, solved, torch.zeros_like(select), solver=solver, **flow)
        assert nothing[1].isnan().all() and nothing[2] == 0
    with pytest.raises(ValueError, match="select must have the batch shape"):
        cnf.block_causal_solver_error(prior.velocity, u, 2, solved, select[0], solver=solver, **flow)
    with pytest.raises(ValueError, match="solved must be the BlockLogProb"):
        cnf.block_causal_solver_error(prior.velocity, u[:1], 2, solved, select[:1], solver=solver)


def test_importance_weighted_estimates_skip_the_companion_of_light_samples(monkeypatch):
    """IWAE and the conditional solve the companion only for the samples that carry at least
    ``UNESTIMATED_WEIGHT / K`` of the weight; the reported error then differs from the one
    with a companion on every sample by at most that share times the largest sample error,
    and still bounds the true error (the same draws solved finely)."""
    from colaprob.estimators import draws, statistics, streams
    from colaprob.estimators.conditional import conditional
    from colaprob.estimators.draws import UNESTIMATED_WEIGHT, draw, summarise

    monkeypatch.setattr(draws, "ERROR_SUBSAMPLE_STRIDE", 1)  # a plain draw: every sample's companion

    model = _quadrature_model(posterior_widening=4.0)  # a wide proposal: uneven weights
    batch = make_batch([torch.tensor([0, 1, 2, 1]), torch.tensor([2, 2]), torch.tensor([1, 0, 0, 2])])
    K, solver = 64, cnf.Solver(method="rk4", steps=3, solver_error=True)
    keys = streams.sequence_keys(batch, None)
    every = summarise(
        model, batch, keys, draw(model, batch, K, keys=keys, seed=0, solver=solver), statistics.log_mean_exp, statistics.log_mean_exp_se, "IWAE", 0, 32, weighted=True
    )
    weighted = iwae(model, batch, K, solver=solver)
    estimated = weighted.prior_solver_error.notnull()
    assert 0 < int(estimated.sum()) < estimated.size, "the weights of this case are uneven: some samples must be skipped, some not"
    normalised = np.exp(weighted.log_weight - weighted.log_likelihood) / K
    assert bool((estimated == (normalised >= UNESTIMATED_WEIGHT / K)).all())
    np.testing.assert_array_equal(weighted.log_likelihood.values, every.log_likelihood.values)  # the same solves
    difference = np.abs(weighted.log_likelihood_solver_error - every.log_likelihood_solver_error)
    assert bool((difference <= UNESTIMATED_WEIGHT * every.prior_solver_error.max("sample") + 1e-12).all())
    reference = iwae(model, batch, K, method="rk4", steps=96)
    assert bool((weighted.log_likelihood_solver_error >= np.abs(weighted.log_likelihood - reference.log_likelihood)).all())
    assert weighted.attrs["solver_error_nfe"] > 0
    cond = conditional(model, batch, torch.tensor([1, 1, 2]), K, solver=solver, direct=False)
    assert 0 < int(cond.prior_solver_error.notnull().sum()) < cond.prior_solver_error.size
    fine = conditional(model, batch, torch.tensor([1, 1, 2]), K, method="rk4", steps=96, direct=False)
    for name in ("log_joint", "log_prefix"):
        assert bool((cond[f"{name}_solver_error"] >= np.abs(cond[name] - fine[name])).all()), name


def test_the_elbo_estimates_its_error_from_every_eighth_sample(monkeypatch):
    """The ELBO's solver error is the mean of the errors of samples 0, 8, 16, ... (the
    companion runs on those alone, whatever the chunking), equal there to what the companion
    of every sample reports; the other samples' errors are NaN, the block errors the mean
    over the estimated samples, and the ELBO itself unchanged."""
    from colaprob.estimators import draws

    model = _quadrature_model()
    batch = make_batch([torch.tensor([0, 1, 2, 1]), torch.tensor([2, 2]), torch.tensor([1, 0, 0, 2])])
    solver = cnf.Solver(method="rk4", steps=3, solver_error=True)
    K, rows = 20, []
    velocity = model.prior_velocity

    def counted(z, *args, **kwargs):  # the latent sequences each evaluation runs
        rows.append(z.shape[:-2].numel())
        return velocity(z, *args, **kwargs)

    monkeypatch.setattr(model, "prior_velocity", counted)
    sub = elbo(model, batch, K, solver=solver, chunk_size=3)
    sub_rows, rows[:] = sum(rows), []
    estimated = sub.prior_solver_error.notnull()
    assert (estimated.values == (np.arange(K) % 8 == 0)[None]).all()
    np.testing.assert_allclose(sub.log_likelihood_solver_error, sub.prior_solver_error.isel(sample=[0, 8, 16]).mean("sample"), rtol=1e-12)
    monkeypatch.setattr(draws, "ERROR_SUBSAMPLE_STRIDE", 1)
    every = elbo(model, batch, K, solver=solver, chunk_size=7)
    assert every.prior_solver_error.notnull().all()
    np.testing.assert_array_equal(sub.log_likelihood.values, every.log_likelihood.values)
    np.testing.assert_allclose(sub.prior_solver_error.values[estimated.values], every.prior_solver_error.values[estimated.values], rtol=1e-9)
    block_mean = every.block_prior_solver_error  # over all samples; the subsample's is over three
    assert block_mean.dims == sub.block_prior_solver_error.dims and not np.allclose(block_mean, sub.block_prior_solver_error, equal_nan=True)
    # The solve evaluates 20 samples; the companion (twice the steps) 3 of them, against 20.
    solve_rows = 20 * 3 * 3 * 4  # samples x sequences x steps x rk4 stages
    assert sub_rows == solve_rows + 2 * solve_rows * 3 // 20 and sum(rows) == 3 * solve_rows


def test_task_scores_solve_the_companion_of_the_weight_carrying_samples_only(monkeypatch):
    """With uneven weights some samples of every solve go without a companion, none with
    all of them skipped (each term's heaviest sample carries weight), and each term's
    reported error still bounds its true one (the same draws solved finely)."""
    from colaprob.estimators.continuations import ContinuationBatch, score_continuations

    shares, real = [], cnf.block_causal_solver_error
    monkeypatch.setattr(cnf, "block_causal_solver_error", lambda *a, **k: (shares.append(float(a[4].double().mean())), real(*a, **k))[1])
    model = _quadrature_model(posterior_widening=4.0)
    batch = ContinuationBatch.from_tokens([[0, 1], [2], []], [[[2], [1, 0]], [[1, 2, 0], [0]], [[1, 1]]], multiple=2)
    at = (batch.item, batch.choice)
    coarse = score_continuations(model, batch, 64, method="rk4", steps=3, solver_error=True)
    fine = score_continuations(model, batch, 64, method="rk4", steps=96)
    assert shares and min(shares) > 0 and min(shares) < 1, shares
    for name in ("log_joint", "log_context"):
        true = np.abs(coarse[name].values[at] - fine[name].values[at])
        assert (coarse[f"{name}_solver_error"].values[at] >= true).all(), name
