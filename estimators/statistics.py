"""Summaries of importance weights: estimates, standard errors, ESS and the Pareto k-hat.

Every function takes log-weights as an ``xarray.DataArray`` with a sample dimension (``dim``,
default ``"sample"``; NaN entries are missing samples, for rows with fewer draws; a row without samples gives NaN)
and returns a labelled ``DataArray`` over the other dimensions, in float64.

For weights ``w_k = exp(lw_k)``, ``k = 1..K`` (all computed relative to ``max lw``):

* ``log_mean_exp``: ``log((1/K) sum w_k)``, the IWAE-K estimate;
* ``log_mean_exp_se``: delta method, ``se = sd(w) / (sqrt(K) mean(w))``;
* ``paired_log_mean_exp_se``: the same for a difference of two such estimates on shared draws;
* ``mean_se``: ``sd(lw) / sqrt(K)``, the standard error of the ELBO average;
* ``ess``: ``(sum w)^2 / sum w^2`` (Kong 1992);
* ``pareto_khat``: the shape of a generalized Pareto fit to the largest weights (Vehtari et
  al., *Pareto smoothed importance sampling*, 2024): the ``M = ceil(min(0.2 K, 3 sqrt(K)))``
  largest weights in excess of the next largest, fitted by the Zhang & Stephens (2009)
  empirical-Bayes estimator with the weakly informative prior of PSIS (shrinking k towards
  0.5 with the weight of 10 observations). ``k`` is reliable when below
  ``khat_threshold(K) = min(1 - 1 / log10(K), 0.7)``. The fit needs a tail of at least 5
  weights, so k-hat is not computable below ``KHAT_MIN_SAMPLES = 21`` samples
  (``khat_computable``): there k-hat and its threshold are NaN, which is no verdict either
  way (at K = 8 the formula's threshold would even be negative).
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr


# The smallest K whose PSIS tail, ceil(min(0.2 K, 3 sqrt K)) weights, holds the 5 a fit needs.
KHAT_MIN_SAMPLES = 21


def khat_computable(n_samples):
    """Whether a k-hat exists at ``n_samples`` draws (``K >= KHAT_MIN_SAMPLES``). Same type
    as ``n_samples`` (DataArray, array, number)."""
    if isinstance(n_samples, xr.DataArray):
        return xr.apply_ufunc(khat_computable, n_samples)
    computable = np.asarray(n_samples) >= KHAT_MIN_SAMPLES
    return bool(computable) if computable.ndim == 0 else computable


def khat_threshold(n_samples):
    """``min(1 - 1 / log10(K), 0.7)``: k-hat below it means the estimate can be trusted;
    NaN where k-hat is not computable (``K < KHAT_MIN_SAMPLES``). Same type as ``n_samples``
    (DataArray, array, number)."""
    if isinstance(n_samples, xr.DataArray):
        return xr.apply_ufunc(khat_threshold, n_samples)
    K = np.asarray(n_samples, dtype=np.float64)
    computable = K >= KHAT_MIN_SAMPLES
    threshold = np.where(computable, np.minimum(1 - 1 / np.log10(np.where(computable, K, 10.0)), 0.7), np.nan)
    return float(threshold) if threshold.ndim == 0 else threshold


def log_mean_exp(log_weights: xr.DataArray, dim: str = "sample") -> xr.DataArray:
    return _reduce(_log_mean_exp, log_weights, dim)


def log_mean_exp_se(log_weights: xr.DataArray, dim: str = "sample") -> xr.DataArray:
    return _reduce(_log_mean_exp_se, log_weights, dim)


def mean_se(values: xr.DataArray, dim: str = "sample") -> xr.DataArray:
    return _reduce(_mean_se, values, dim)


def ess(log_weights: xr.DataArray, dim: str = "sample") -> xr.DataArray:
    return _reduce(_ess, log_weights, dim)


def pareto_khat(log_weights: xr.DataArray, dim: str = "sample") -> xr.DataArray:
    return _reduce(_pareto_khat, log_weights, dim)


def paired_log_mean_exp_se(log_weights_a: xr.DataArray, log_weights_b: xr.DataArray, dim: str = "sample") -> xr.DataArray:
    """SE of ``log_mean_exp(a) - log_mean_exp(b)`` when sample ``k`` of both comes from the
    same draw (common random numbers): to first order the difference is
    ``mean(w_a / mean w_a - w_b / mean w_b)``, so ``se = sd(w_a / mean w_a - w_b / mean w_b)
    / sqrt(K)``. With independent draws it would be ``sqrt(se_a^2 + se_b^2)``."""
    return xr.apply_ufunc(
        _paired_log_mean_exp_se, log_weights_a.astype(np.float64), log_weights_b.astype(np.float64), input_core_dims=[[dim], [dim]], vectorize=True
    )


def solver_error(log_weights: xr.DataArray, errors: xr.DataArray, *, weighted: bool, dim: str = "sample") -> xr.DataArray:
    """The solver error of an average of log-weights whose samples carry solver errors
    ``e_k`` (nats, ``cnf`` estimates): ``mean_k e_k`` for the plain average (the ELBO), over
    the samples whose error was estimated (NaN: not; ``draws.error_subsample``);
    ``sum_k w_k e_k / sum_k w_k`` for ``log_mean_exp`` (``weighted``): to first order an error
    ``d_k`` in ``lw_k`` moves ``log mean exp(lw)`` by the weight-averaged ``d_k``. Kept apart
    from the Monte Carlo standard error: the two are different things and both are reported.

    Weighted, ``e_k`` may be NaN for samples whose error was not estimated (an importance-
    weighted estimator skips the companion solve of samples with almost no weight,
    ``colaprob.estimators.draws``): they are taken to be no worse than the worst estimated
    sample, whose error is added in proportion to their share of the weight."""
    fn = _weighted_error if weighted else (lambda lw, e: _mean(e[~np.isnan(lw) & ~np.isnan(e)]))
    return xr.apply_ufunc(fn, log_weights.astype(np.float64), errors.astype(np.float64), input_core_dims=[[dim], [dim]], vectorize=True)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan


def _weighted_error(log_weights: np.ndarray, errors: np.ndarray) -> float:
    present = ~np.isnan(log_weights)
    w, e = _relative_weights(log_weights), errors[present]
    estimated = ~np.isnan(e)
    if not estimated.any():
        return math.nan
    unestimated_share = w[~estimated].sum()
    return float((np.sum(w[estimated] * e[estimated]) + unestimated_share * e[estimated].max()) / w.sum())


def count(values: xr.DataArray, dim: str = "sample") -> xr.DataArray:
    """Samples present (not NaN) along ``dim``."""
    return values.notnull().sum(dim)


def gpd_fit(exceedances: np.ndarray) -> tuple[float, float]:
    """``(k, sigma)`` of a generalized Pareto distribution ``1 - (1 + k x / sigma)^(-1/k)``
    fitted to positive ``exceedances`` (Zhang & Stephens 2009, with the PSIS prior on k).

    With ``theta = -k / sigma``, the profile likelihood in ``theta`` has ``k(theta) =
    mean log(1 - theta x)`` and value ``n (log(-theta / k) - k - 1)``. ``theta`` is averaged
    over a grid of ``30 + sqrt(n)`` quantile-based candidates, weighted by that likelihood.
    """
    x = np.sort(np.asarray(exceedances, dtype=np.float64))
    n = len(x)
    m = 30 + int(math.sqrt(n))
    quartile = x[int(n / 4 + 0.5) - 1]
    theta = 1 / x[-1] + (1 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))) / (3 * quartile)
    k = np.log1p(-theta[:, None] * x).mean(axis=1)
    profile = n * (np.log(-theta / k) - k - 1)
    weights = np.exp(profile - profile.max())
    theta_hat = np.sum(theta * weights) / weights.sum()
    k_hat = np.log1p(-theta_hat * x).mean()
    sigma = -k_hat / theta_hat
    prior_n, prior_k = 10, 0.5
    return float((n * k_hat + prior_n * prior_k) / (n + prior_n)), float(sigma)


def _reduce(fn, values: xr.DataArray, dim: str) -> xr.DataArray:
    return xr.apply_ufunc(fn, values.astype(np.float64), input_core_dims=[[dim]], vectorize=True)


def _present(values: np.ndarray) -> np.ndarray:
    return values[~np.isnan(values)]


def _relative_weights(log_weights: np.ndarray) -> np.ndarray:
    """``exp(lw - max lw)`` of the present samples (empty if none)."""
    lw = _present(log_weights)
    return np.exp(lw - lw.max()) if len(lw) else lw


def _log_mean_exp(log_weights: np.ndarray) -> float:
    lw = _present(log_weights)
    return float(lw.max() + np.log(np.mean(np.exp(lw - lw.max())))) if len(lw) else math.nan


def _log_mean_exp_se(log_weights: np.ndarray) -> float:
    w = _relative_weights(log_weights)
    if len(w) < 2:
        return math.nan
    return float(w.std(ddof=1) / (math.sqrt(len(w)) * w.mean()))


def _paired_log_mean_exp_se(a: np.ndarray, b: np.ndarray) -> float:
    both = ~np.isnan(a) & ~np.isnan(b)
    if both.sum() < 2:
        return math.nan
    wa, wb = _relative_weights(a[both]), _relative_weights(b[both])
    return float((wa / wa.mean() - wb / wb.mean()).std(ddof=1) / math.sqrt(both.sum()))


def _mean_se(values: np.ndarray) -> float:
    v = _present(values)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def _ess(log_weights: np.ndarray) -> float:
    w = _relative_weights(log_weights)
    return float(w.sum() ** 2 / np.sum(w**2)) if len(w) else math.nan


def _pareto_khat(log_weights: np.ndarray) -> float:
    """k-hat of the weights' upper tail: NaN when the tail is shorter than 5 samples,
    ``-inf`` when the largest weights are all equal (no tail at all)."""
    lw = np.sort(_present(log_weights))
    K = len(lw)
    tail_length = math.ceil(min(0.2 * K, 3 * math.sqrt(K)))
    if tail_length < 5:
        return math.nan
    cutoff = lw[-tail_length - 1]
    # Exceedances of the weights over the cutoff weight, relative to the largest weight: the
    # fit is scale invariant, so this changes nothing but avoids overflow.
    exceedances = np.exp(lw[-tail_length:] - lw[-1]) - np.exp(cutoff - lw[-1])
    if exceedances[-1] <= 0:
        return -math.inf
    return gpd_fit(exceedances[exceedances > 0])[0] if (exceedances > 0).sum() >= 5 else math.nan
