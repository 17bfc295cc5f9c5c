"""Per-token probes against hit rates and densities computed exactly by quadrature on a
categorical-decoder model with a block-causal mixture prior."""

import math

import numpy as np
import pytest
import torch
import xarray as xr

from colaprob.estimators import cnf
from colaprob.diagnostics import probes, summarize_probes
from colaprob.estimators.elbo import elbo
from colaprob.protocol import from_prior_space, to_prior_space
from colaprob.testing import BlockMixturePrior, CategoricalDecoder, QuadratureModel, make_batch

N_DRAWS = 1500
EXACT_SAMPLER = cnf.Solver(method="dopri5")


def history_model() -> QuadratureModel:
    """d = 1, one position per block, one token per position, three tokens; a two-component
    prior whose weights and means depend on the previous block, on scaled latents."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64).reshape(-1, 1, 1)  # noqa: E731
    prior = BlockMixturePrior(
        logits=torch.tensor([0.3, -0.2], dtype=torch.float64),
        logit_weight=t(1.0, -0.5),
        means=t(-1.0, 1.2),
        mean_weight=t(0.8, -0.6),
        log_std=t(math.log(0.6), math.log(0.9)),
    )
    decoder = CategoricalDecoder(torch.tensor([[[-2.0], [0.0], [2.5]]], dtype=torch.float64), torch.tensor([[0.0, 0.8, -0.3]], dtype=torch.float64))
    return QuadratureModel(prior, decoder, patch_size=1, latent_scale=1.5, latent_shift=-0.3)


def batch():
    """Texts whose posterior means decode to the gold token at 4 of 6 places."""
    return make_batch([torch.tensor([0, 2]), torch.tensor([1, 2]), torch.tensor([2, 2])])


def exact_probes(model, batch):
    """Every probe by quadrature on a grid of the one coordinate each token reads."""
    q = model.posterior(batch)
    gold_u = to_prior_space(model, q.mean)
    out = {name: np.zeros(batch.ids.shape) for name in ("prior_hit", "generation_prob", "gen_sd", "percentile", "posterior_hit", "gold")}
    for i in range(len(batch)):
        for b in range(batch.ids.shape[1]):
            gold = int(batch.ids[i, b])
            # Block b given the gold history: its exact conditional density on a grid.
            u = gold_u[i].expand(6001, -1, -1).clone()
            u[:, b, 0] = torch.linspace(-10, 10, 6001, dtype=torch.float64)
            log_p = model.prior.block_log_prob(u)[:, b]
            w = torch.softmax(log_p, 0)
            probs = torch.softmax(model.decoder.logits(from_prior_space(model, u), 2)[:, b], -1)
            gen = (w * probs[:, gold]).sum()
            gold_log_p = model.prior.block_log_prob(gold_u[i])[b]
            out["prior_hit"][i, b] = (w * (probs.argmax(-1) == gold)).sum()
            out["generation_prob"][i, b] = gen
            out["gen_sd"][i, b] = (w * (probs[:, gold] - gen) ** 2).sum().sqrt()
            out["percentile"][i, b] = (w * (log_p <= gold_log_p)).sum()
            out["gold"][i, b] = gold_log_p + math.log(model.latent_scale)
            # The posterior of the position: a Gaussian, on its own grid.
            z = q.mean[i].expand(6001, -1, -1).clone()
            std = q.std[i, b, 0]
            z[:, b, 0] = q.mean[i, b, 0] + std * torch.linspace(-10, 10, 6001, dtype=torch.float64)
            wq = torch.softmax(-0.5 * ((z[:, b, 0] - q.mean[i, b, 0]) / std) ** 2, 0)
            out["posterior_hit"][i, b] = (wq * (model.decoder.logits(z, 2)[:, b].argmax(-1) == gold)).sum()
    out["decoder_probe"] = (model.decoder.logits(q.mean, 2).argmax(-1) == batch.ids).double().numpy()
    return out


@pytest.fixture(scope="module")
def result():
    model, b = history_model(), batch()
    ds = probes(model, b, n_posterior=N_DRAWS, n_prior=N_DRAWS, seed=2, sampler=EXACT_SAMPLER)
    return model, b, ds, exact_probes(model, b)


def binomial_tolerance(p, n=N_DRAWS):
    """Five standard errors of a Monte Carlo proportion, plus 0.01 for the ODE solves."""
    return 5 * np.sqrt(p * (1 - p) / n) + 0.01


def test_hit_rates_match_quadrature(result):
    _, _, ds, exact = result
    for name in ("prior_hit", "posterior_hit"):
        assert np.all(np.abs(ds[name].values - exact[name]) <= binomial_tolerance(exact[name])), name
    np.testing.assert_array_equal(ds.decoder_probe.values, exact["decoder_probe"])
    np.testing.assert_array_equal(exact["decoder_probe"], [[1, 1], [0, 1], [1, 0]])
    # The test means something only if the exact rates are mostly neither 0 nor 1.
    for name in ("prior_hit", "posterior_hit"):
        assert np.mean((exact[name] > 0.05) & (exact[name] < 0.95)) >= 0.5, name


def test_generation_probability_matches_quadrature(result):
    _, _, ds, exact = result
    tol = 5 * exact["gen_sd"] / math.sqrt(N_DRAWS) + 0.01
    assert np.all(np.abs(ds.generation_prob.values - exact["generation_prob"]) <= tol)


def test_density_alignment_matches_quadrature(result):
    _, _, ds, exact = result
    np.testing.assert_allclose(ds.gold_log_prob.values, exact["gold"], atol=1e-3)
    assert np.all(np.abs(ds.density_percentile.values - exact["percentile"]) <= binomial_tolerance(exact["percentile"]))


def test_token_elbo_sums_to_the_sequence_elbo():
    """Probes draw the estimators' posterior samples, so the per-token shares add up to the
    ELBO of ``colaprob.estimators.elbo`` with the same seed, sequence by sequence."""
    model = history_model()
    b = make_batch([torch.tensor([0, 2]), torch.tensor([1])])
    ds = probes(model, b, n_posterior=8, n_prior=2, seed=5)
    reference = elbo(model, b, n_samples=8, seed=5).log_likelihood.values
    np.testing.assert_allclose(ds.token_elbo.where(ds.valid).sum("token").values, reference, rtol=1e-6)
    assert np.isnan(ds.prior_hit.values[1, 1]) and np.isnan(ds.block_kl.values[1, 1])
    np.testing.assert_array_equal(ds.valid.values, [[True, True], [True, False]])


def test_summary_counts_tokens():
    """NLL 1..8 (median 4.5) against prior hits; an invalid token with extreme values is
    ignored."""
    nll = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 100.0]])
    hit = np.array([[1, 1, 0, 0.6, 1, 0.2, 0, 0.9, 1.0]])
    valid = np.array([[True] * 8 + [False]])
    token = ("sequence", "token")
    ds = xr.Dataset(
        {
            "valid": (token, valid),
            "token_elbo": (token, -nll),
            "prior_hit": (token, hit),
            "posterior_hit": (token, np.ones_like(hit)),
            "decoder_probe": (token, np.ones_like(hit)),
            "generation_prob": (token, hit / 2),
            "density_percentile": (("sequence", "block"), [[0.5, 0.01, 0.3]]),
            "block_valid": (("sequence", "block"), [[True, True, False]]),
        }
    )
    s = summarize_probes(ds, n_bins=2)
    assert float(s.nll_threshold) == 4.5
    np.testing.assert_array_equal(s["count"].values, [[3, 1], [2, 2]])
    assert float(s.high_nll_generated_fraction) == 0.5
    assert float(s.low_nll_missed_fraction) == 0.25
    np.testing.assert_allclose(s.prior_hit_by_nll, [0.65, 0.525])
    np.testing.assert_array_equal(s.n_tokens, [4, 4])
    assert float(s.density_percentile_mean) == pytest.approx(0.255)
    assert float(s.density_percentile_below_5pct) == 0.5
