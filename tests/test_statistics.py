"""Importance-weight statistics on cases with known answers."""

import math

import numpy as np
import pytest
import xarray as xr

from colaprob.estimators import statistics


def _rows(values: np.ndarray) -> xr.DataArray:
    return xr.DataArray(values, dims=("sequence", "sample"))


@pytest.mark.parametrize("shape", [0.2, 0.5, 0.8])
def test_khat_recovers_the_shape_of_pareto_tails(shape):
    rng = np.random.default_rng(int(shape * 10))
    u = rng.uniform(size=(8, 10000))
    weights = (u ** (-shape) - 1) / shape  # generalized Pareto(shape, scale 1)
    khat = statistics.pareto_khat(_rows(np.log(weights)))
    assert khat.dims == ("sequence",)
    assert abs(float(khat.mean()) - shape) < 0.08  # a tail of 300 weights: sd(k-hat) ~ 0.1
    assert (np.abs(khat - shape) < 0.4).all()


def test_gpd_fit_recovers_shape_and_scale():
    rng = np.random.default_rng(0)
    x = 2.0 * (rng.uniform(size=20000) ** (-0.4) - 1) / 0.4
    k, sigma = statistics.gpd_fit(x)
    assert abs(k - 0.4) < 0.03 and abs(sigma / 2.0 - 1) < 0.05


def test_khat_edge_cases():
    assert np.isnan(statistics.pareto_khat(_rows(np.zeros((1, 8))))).all()  # tail of 2
    assert (statistics.pareto_khat(_rows(np.zeros((1, 100)))) == -np.inf).all()  # no tail at all
    light = np.random.default_rng(1).uniform(size=(1, 4000))  # bounded weights: k < 0
    assert (statistics.pareto_khat(_rows(np.log(light))) < 0).all()


def test_khat_threshold():
    assert statistics.khat_threshold(100) == pytest.approx(0.5)
    assert statistics.khat_threshold(10**6) == pytest.approx(0.7)
    # Below 21 draws the PSIS tail holds fewer than 5 weights: no k-hat, so no threshold either
    # (the formula would give 0 at K = 10 and -inf at K = 1, verdicts with nothing behind them).
    assert math.isnan(statistics.khat_threshold(10)) and math.isnan(statistics.khat_threshold(1))
    assert statistics.khat_threshold(21) == pytest.approx(1 - 1 / math.log10(21))
    assert not statistics.khat_computable(20) and statistics.khat_computable(21)
    heavy = np.random.default_rng(2).pareto(1.0, size=(1, 21))
    assert np.isnan(statistics.pareto_khat(_rows(np.log(heavy[:, :20])))).all()
    assert np.isfinite(statistics.pareto_khat(_rows(np.log(heavy)))).all()
    n = xr.DataArray([100, 1000], dims="sequence")
    assert np.allclose(statistics.khat_threshold(n), [0.5, 2 / 3])


def test_ess_on_known_cases():
    K = 20000
    assert np.allclose(statistics.ess(_rows(np.full((2, K), 3.0))), K)
    spike = np.zeros((1, K))
    spike[0, 0] = 50
    assert np.allclose(statistics.ess(_rows(spike)), 1, atol=1e-6)
    sigma = 0.5  # log-normal weights: ESS / K -> exp(-sigma^2)
    lw = sigma * np.random.default_rng(2).standard_normal((3, K))
    assert np.allclose(statistics.ess(_rows(lw)) / K, math.exp(-(sigma**2)), rtol=0.02)


def test_standard_errors_match_the_spread_over_replicates():
    rng = np.random.default_rng(3)
    lw = _rows(0.8 * rng.standard_normal((2000, 200)))
    spread = float(statistics.log_mean_exp(lw).std())
    assert float(statistics.log_mean_exp_se(lw).mean()) == pytest.approx(spread, rel=0.08)
    assert float(statistics.mean_se(lw).mean()) == pytest.approx(float(lw.mean("sample").std()), rel=0.08)


def test_paired_se_of_a_difference():
    rng = np.random.default_rng(4)
    a = _rows(rng.standard_normal((3, 500)))
    assert np.allclose(statistics.paired_log_mean_exp_se(a, a), 0)
    b = _rows(rng.standard_normal((3, 500)))  # independent: the errors add in quadrature
    independent = np.sqrt(statistics.log_mean_exp_se(a) ** 2 + statistics.log_mean_exp_se(b) ** 2)
    assert np.allclose(statistics.paired_log_mean_exp_se(a, b), independent, rtol=0.15)
    shifted = a + 0.1 * _rows(rng.standard_normal((3, 500)))  # strongly correlated
    assert (statistics.paired_log_mean_exp_se(a, shifted) < 0.3 * statistics.log_mean_exp_se(a)).all()


def test_missing_samples_are_ignored():
    rng = np.random.default_rng(5)
    lw = rng.standard_normal((2, 300))
    ragged = lw.copy()
    ragged[1, 100:] = np.nan
    for fn in (statistics.log_mean_exp, statistics.log_mean_exp_se, statistics.ess, statistics.pareto_khat, statistics.mean_se):
        assert math.isclose(float(fn(_rows(ragged))[1]), float(fn(_rows(lw[1:, :100]))[0]))
        assert math.isclose(float(fn(_rows(ragged))[0]), float(fn(_rows(lw[:1]))[0]))
    assert list(statistics.count(_rows(ragged)).values) == [300, 100]
    assert np.isnan(statistics.log_mean_exp(_rows(np.full((1, 4), np.nan)))).all()


def test_a_weighted_solver_error_counts_unestimated_samples_as_the_worst_estimated_one():
    log_weights = xr.DataArray(np.log([[4.0, 3.0, 2.0, 1.0, np.nan]]), dims=("sequence", "sample"))
    errors = xr.DataArray([[0.1, 0.3, np.nan, np.nan, np.nan]], dims=("sequence", "sample"))
    # (4 * 0.1 + 3 * 0.3 + (2 + 1) * 0.3) / 10; the fifth sample is absent
    assert float(statistics.solver_error(log_weights, errors, weighted=True)[0]) == pytest.approx(0.22, rel=1e-12)
    assert np.isnan(statistics.solver_error(log_weights, errors * np.nan, weighted=True)[0])
