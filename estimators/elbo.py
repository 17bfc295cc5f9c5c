"""The evidence lower bound, ``E_q[log p(x|z) + log p(z) - log q(z|x)] <= log p(x)``."""

from __future__ import annotations

import xarray as xr

from colaprob.estimators import cnf, statistics, streams
from colaprob.estimators.draws import check_arguments, draw, summarise
from colaprob.protocol import LatentModel, TokenBatch

ESTIMATOR = "ELBO (lower bound)"


def elbo(
    model: LatentModel,
    batch: TokenBatch,
    n_samples: int = 16,
    *,
    seed: int = 0,
    sequence_ids=None,
    chunk_size: int = 32,
    solver: cnf.Solver | None = None,
    **solver_keywords,
) -> xr.Dataset:
    """The ELBO of every sequence, averaged over ``n_samples`` posterior draws.

    ``solver``: how the prior's CNF is solved (``cnf.Solver``; or its fields as keywords:
    ``trace``, ``method``, ``rtol``, ``atol``, ``steps``, ``n_probes``, ``probe``,
    ``vjp_chunk``, ``solver_error``: True to estimate the prior's solver error by a finer
    companion solve of samples 0, 8, 16, ... (``draws.ERROR_SUBSAMPLE_STRIDE``), which on the
    embedded model costs 0.23-0.43 times the solve itself, see BENCHMARKS.md section 10;
    ``colaprob score`` does unless ``--no-solver-error``). ``sequence_ids`` ([B] non-negative integers, default
    the row index) key each sequence's random stream.

    Returns an ``xarray.Dataset`` over ``sequence`` (coordinate: the keys), ``sample``,
    ``token`` and ``block``: ``log_likelihood`` (the ELBO, nats) and ``log_likelihood_se``
    (``sd / sqrt(K)``), the units of ``colaprob.estimators.units``, the per-sample
    ``log_weight`` = ``decoder_log_prob`` + ``prior_log_prob`` - ``posterior_log_prob``, the
    sample means ``token_decoder_log_prob`` and ``block_prior_log_prob`` (NaN where not
    counted), and the proposal's importance diagnostics ``ess``, ``khat``,
    ``khat_threshold``, ``khat_computable``; with the solver error ``log_likelihood_solver_error``
    (nats, apart from the Monte Carlo ``log_likelihood_se``; the mean over the estimated
    samples), per sample ``prior_solver_error`` (NaN for the samples not estimated) and per
    block ``block_prior_solver_error``; ``attrs``: estimator,
    trace, solver, tolerances, K, seed, nfe (of the solves; ``solver_error_nfe`` of the
    estimate).
    """
    solver = cnf.Solver.build(solver, **solver_keywords)
    check_arguments(model, batch, n_samples, seed=seed, chunk_size=chunk_size)
    keys = streams.sequence_keys(batch, sequence_ids)
    draws = draw(model, batch, n_samples, seed=seed, keys=keys, chunk_size=chunk_size, solver=solver)
    mean = lambda log_weight: log_weight.mean("sample")
    return summarise(model, batch, keys, draws, mean, statistics.mean_se, ESTIMATOR, seed, chunk_size)

