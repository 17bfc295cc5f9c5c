"""The importance-weighted bound, ``IWAE_K = log (1/K) sum_k w_k`` with ``w_k = p(x, z_k) /
q(z_k | x)``: ``E[IWAE_K] <= log p(x)``, non-decreasing in K and tight as K grows (Burda et
al. 2016)."""

from __future__ import annotations

import torch
import xarray as xr

from colaprob.estimators import _checks, cnf, statistics, streams
from colaprob.estimators.draws import check_arguments, draw, summarise
from colaprob.protocol import LatentModel, TokenBatch


def iwae(
    model: LatentModel,
    batch: TokenBatch,
    n_samples: int = 64,
    *,
    seed: int = 0,
    sequence_ids=None,
    chunk_size: int = 32,
    max_samples: int | None = None,
    solver: cnf.Solver | None = None,
    **solver_keywords,
) -> xr.Dataset:
    """IWAE-K of every sequence, with its delta-method SE, ESS and Pareto k-hat.

    ``max_samples``: while a sequence's k-hat is at or above ``khat_threshold(K)`` or not
    computable (``K < statistics.KHAT_MIN_SAMPLES``), double its K (the new draws continue its
    random stream) up to this cap. Other arguments as ``colaprob.estimators.elbo.elbo``.

    Returns the dataset of ``elbo`` with ``log_likelihood`` the IWAE-K estimate,
    ``log_likelihood_se`` = ``sd(w) / (sqrt(K) mean(w))``, ``reliable`` (k-hat computed and
    below the threshold; read it together with ``khat_computable``: a row whose k-hat is not
    computable is neither reliable nor unreliable) and ``n_samples`` per sequence (NaN
    log-weights beyond it).
    """
    solver = cnf.Solver.build(solver, **solver_keywords)
    check_arguments(model, batch, n_samples, seed=seed, chunk_size=chunk_size)
    if max_samples is not None and _checks.integer("max_samples", max_samples, minimum=1) < n_samples:
        raise ValueError(f"max_samples ({max_samples}) must be at least n_samples ({n_samples})")
    keys = streams.sequence_keys(batch, sequence_ids)
    options = dict(seed=seed, chunk_size=chunk_size, solver=solver, importance_weighted=True)
    draws = draw(model, batch, n_samples, keys=keys, **options)
    while max_samples is not None:
        log_weight = xr.DataArray(draws.log_weight.numpy(), dims=("sequence", "sample"))
        khat = statistics.pareto_khat(log_weight).values
        threshold = statistics.khat_threshold(draws.n_samples.numpy())
        grow = torch.as_tensor(~(khat < threshold)) & (2 * draws.n_samples <= max_samples)
        if not grow.any():
            break
        for K in draws.n_samples[grow].unique().tolist():  # rows with equal K continue together
            rows = torch.nonzero(grow & (draws.n_samples == K))[:, 0]
            more = draw(model, batch.select(rows), K, keys=keys[rows], start=K, **options)
            draws = draws.extend(rows, more)
    estimator = f"IWAE-{int(draws.n_samples.max())} (lower bound in expectation)"
    ds = summarise(model, batch, keys, draws, statistics.log_mean_exp, statistics.log_mean_exp_se, estimator, seed, chunk_size, weighted=True)
    ds["reliable"] = ds["khat"] < ds["khat_threshold"]
    return ds

