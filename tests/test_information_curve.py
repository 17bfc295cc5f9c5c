"""The information curve against its closed form on a Gaussian prior with a two-token
decoder, and the training density of t."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from colaprob.diagnostics import information_curve
from colaprob.diagnostics.flow_information import logit_normal_pdf, midpoint_logsnr
from colaprob.protocol import to_prior_space
from colaprob.testing import BlockMixturePrior, CategoricalDecoder, QuadratureModel, make_batch

MU, S, SCALE, SHIFT = 0.4, 0.9, 1.3, 0.2  # prior N(MU, S^2) on u = (z - SHIFT) * SCALE
W, C = 3.0, -0.5  # token 1 iff W z + C > 0


def gaussian_model() -> QuadratureModel:
    one = lambda v: torch.full((1, 1, 1), v, dtype=torch.float64)  # noqa: E731
    prior = BlockMixturePrior(torch.zeros(1), one(0.0), one(MU), one(0.0), one(math.log(S)))
    decoder = CategoricalDecoder(torch.tensor([[[0.0], [W]]], dtype=torch.float64), torch.tensor([[0.0, C]], dtype=torch.float64))
    return QuadratureModel(prior, decoder, patch_size=1, latent_scale=SCALE, latent_shift=SHIFT)


def exact_curve(model, batch, t):
    """Accuracy and cross-entropy of ``z_hat0`` in closed form: with the exact velocity,
    ``u_hat0 = E[u0 | u_t] = MU + (1-t) S^2 / var * (u_t - (1-t) MU)``, linear in the noise."""
    valid = torch.arange(batch.ids.shape[1]) < batch.lengths[:, None]
    u0 = to_prior_space(model, model.posterior(batch).mean)[..., 0][valid]
    gold = batch.ids[valid]
    var = (1 - t) ** 2 * S**2 + t**2
    a = MU + (1 - t) ** 2 * S**2 * (u0 - MU) / var
    b = (1 - t) * S**2 * t / var
    eps = torch.linspace(-9, 9, 4001, dtype=torch.float64)[:, None]
    w = torch.softmax(-0.5 * eps**2, 0)
    logit = W * ((a + b * eps) / SCALE + SHIFT) + C  # log p(1|z) - log p(0|z)
    nll = torch.nn.functional.softplus(torch.where(gold == 1, -logit, logit))  # [G, tokens]
    p_one = torch.tensor(norm.sf(((-C / W - SHIFT) * SCALE - a.numpy()) / b))
    p_gold = torch.where(gold == 1, p_one, 1 - p_one)
    ce = (w * nll).sum(0)
    ce_sd = (w * (nll - ce) ** 2).sum(0).sqrt()
    return p_gold, ce, ce_sd


def test_accuracy_and_cross_entropy_match_closed_form():
    model = gaussian_model()
    batch = make_batch([torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0, 0]), torch.tensor([1, 1])])
    logsnr = np.array([6.0, 2.0, 0.0, -1.0, -4.0])
    n = 2000
    ds = information_curve(model, batch, logsnr=logsnr, n_noise=n, seed=4)
    for i, t in enumerate(ds.t.values):
        p_gold, ce, ce_sd = exact_curve(model, batch, float(t))
        k = len(p_gold)
        acc_se = float(torch.sqrt((p_gold * (1 - p_gold)).sum() / n)) / k
        assert float(ds.accuracy[i]) == pytest.approx(float(p_gold.mean()), abs=5 * acc_se + 1e-3)
        ce_se = float(torch.sqrt((ce_sd**2).sum() / n)) / k
        assert float(ds.cross_entropy[i]) == pytest.approx(float(ce.mean()), abs=5 * ce_se + 1e-3)
    # The grid must cover the whole transition for the comparison to mean anything.
    assert float(ds.accuracy[0]) > 0.9 and float(ds.accuracy[-1]) < 0.75
    np.testing.assert_allclose(ds.logsnr, logsnr)
    np.testing.assert_allclose(2 * np.log((1 - ds.t) / ds.t), logsnr)


def test_clean_end_is_the_posterior_mean():
    model = gaussian_model()
    batch = make_batch([torch.tensor([0, 1]), torch.tensor([1, 0])])
    ds = information_curve(model, batch, logsnr=np.array([40.0]), n_noise=3)
    assert float(ds.accuracy[0]) == float(ds.accuracy_at_mean)
    assert float(ds.cross_entropy[0]) == pytest.approx(float(ds.cross_entropy_at_mean), abs=1e-6)
    assert ds.attrs["n_tokens"] == 4


def test_training_density_of_t():
    t = np.linspace(1e-6, 1 - 1e-6, 200001)
    for loc, scale in ((0.0, 1.0), (0.5, 0.7)):
        assert np.trapezoid(logit_normal_pdf(t, loc, scale), t) == pytest.approx(1.0, abs=1e-4)
    model = gaussian_model()
    ds = information_curve(model, make_batch([torch.tensor([0])]), loc=0.5, scale=0.7, n_noise=1)
    # Per unit logSNR = per unit t times |dt / dlogSNR| = t (1 - t) / 2.
    t = ds.t.values
    np.testing.assert_allclose(ds.train_density_logsnr, ds.train_density * t * (1 - t) / 2, rtol=1e-9)


def test_midpoint_logsnr():
    logsnr = np.array([-2.0, 4.0, 0.0, 2.0])  # any order
    accuracy = np.array([0.1, 1.0, 0.3, 0.9])
    assert midpoint_logsnr(logsnr, accuracy) == pytest.approx(2 - 2 * 0.35 / 0.6)
    assert np.isnan(midpoint_logsnr(logsnr, np.full(4, 0.5)))
