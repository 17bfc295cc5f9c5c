"""Latent-space geometry: one fitted map for every point, free generation block by block,
and the density slice against the exact prior density and decoder."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from colaprob.diagnostics import geometry
from colaprob.estimators import cnf
from colaprob.diagnostics._latent import generated_latents, prior_samples
from colaprob.protocol import DiagonalGaussian, from_prior_space, to_prior_space
from colaprob.testing import BlockMixturePrior, CategoricalDecoder, QuadratureModel, make_batch

EXACT_SAMPLER = cnf.Solver(method="dopri5")


class TablePosterior(QuadratureModel):
    """A ``QuadratureModel`` whose posterior is a fixed Gaussian per token (mean
    ``table[token]``, std 0.3): cheap for sequences longer than quadrature allows. The
    geometry diagnostics need a posterior, not the exact one."""

    table = None

    def posterior(self, batch):
        mean = self.table[batch.ids]  # patch_size 1: one position per token
        return DiagonalGaussian(mean, torch.full_like(mean, 2 * math.log(0.3)))


def model(latent_dim=2, block_size=1, vocab=3) -> TablePosterior:
    g = torch.Generator().manual_seed(7)
    shape = (2, block_size, latent_dim)
    prior = BlockMixturePrior(
        logits=torch.tensor([0.2, -0.1], dtype=torch.float64),
        logit_weight=0.5 * torch.randn(shape, generator=g, dtype=torch.float64),
        means=torch.randn(shape, generator=g, dtype=torch.float64),
        mean_weight=0.7 * torch.randn(shape, generator=g, dtype=torch.float64),
        log_std=torch.full(shape, math.log(0.7), dtype=torch.float64),
    )
    decoder = CategoricalDecoder(2 * torch.randn(1, vocab, latent_dim, generator=g, dtype=torch.float64), torch.zeros(1, vocab, dtype=torch.float64))
    m = TablePosterior(prior, decoder, patch_size=1, latent_scale=1.4, latent_shift=0.3)
    m.table = torch.randn(vocab, latent_dim, generator=g, dtype=torch.float64)
    return m


BATCH = make_batch([torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2]), torch.tensor([1, 0, 0])])


def test_pca_is_one_map_for_every_kind_of_point():
    """With d = 2, PCA is a rotation about the posterior means' centre: every point --
    posterior mean, prior sample or generated latent -- keeps its distance to that centre."""
    m = model()
    ds = geometry.embedding(m, BATCH, n_prior=2, n_generated=3, methods=("pca",), sampler=EXACT_SAMPLER)
    kind = ds.kind.values
    assert (kind == "posterior_mean").sum() == 9
    assert (kind == "prior_sample").sum() == 2 * 9
    assert (kind == "generated").sum() == 3 * 4
    assert float(ds.pca_explained_variance_ratio.sum()) == pytest.approx(1.0)

    mean = m.posterior(BATCH).mean
    valid = torch.arange(4) < BATCH.lengths[:, None]
    center = mean[valid].mean(0)
    z = torch.cat(
        [
            mean[valid],
            prior_samples(m, mean, 2, sampler=EXACT_SAMPLER)[:, valid].reshape(-1, 2),
            generated_latents(m, 3, 4, dtype=torch.float64, sampler=EXACT_SAMPLER).reshape(-1, 2),
        ]
    )
    np.testing.assert_allclose(np.linalg.norm(ds.pca.values, axis=-1), (z - center).norm(dim=-1), atol=1e-5)
    np.testing.assert_array_equal(ds.token_id.values[:9], BATCH.ids[valid])


def test_generated_blocks_follow_the_prior_given_generated_history():
    """One position per block, one component: block b given the blocks before it is
    N(M + C tanh(sum of earlier blocks), s^2) in the scaled space; the standardised
    residuals of freely generated sequences must be N(0, 1)."""
    m = model(latent_dim=1)
    p = m.prior
    p.logits = torch.tensor([0.0, -40.0], dtype=torch.float64)  # effectively one component
    u = to_prior_space(m, generated_latents(m, 2000, 3, dtype=torch.float64, seed=1, sampler=EXACT_SAMPLER)).double()[..., 0]
    history = torch.tanh(torch.cumsum(u, -1) - u)  # sum over earlier positions
    residual = (u - (p.means[0, 0, 0] + p.mean_weight[0, 0, 0] * history)) / p.log_std[0, 0, 0].exp()
    assert residual.mean(0).abs().max() < 0.1  # 2000 draws: standard error 0.022
    assert (residual.std(0) - 1).abs().max() < 0.08


@pytest.mark.parametrize("directions", ["decoder", "random"])
def test_density_slice_matches_exact_prior_and_decoder(directions):
    m = model(latent_dim=1, block_size=2)
    batch = make_batch([torch.tensor([0, 2, 1, 1])])
    ds = geometry.density_slice(m, batch, block=1, directions=directions, extent=2.0, resolution=7, n_prior=5)

    e = torch.as_tensor(ds.direction.values)  # [2, block_size, d]
    np.testing.assert_allclose(torch.einsum("apd,bpd->ab", e, e), np.eye(2), atol=1e-9)
    mean = m.posterior(batch).mean
    u = to_prior_space(m, mean).expand(7, 7, -1, -1).clone()
    a = torch.tensor(ds.alpha.values, dtype=torch.float64)
    u[:, :, 2:4] += a[:, None, None, None] * e[0] + a[None, :, None, None] * e[1]
    exact = m.prior.block_log_prob(u)[..., 1] + 2 * math.log(m.latent_scale)
    np.testing.assert_allclose(ds.log_prob.values, exact, atol=1e-3)
    argmax = m.decoder.logits(from_prior_space(m, u), 4).argmax(-1)[..., 2:4]
    np.testing.assert_array_equal(ds.argmax_token.values, argmax)
    np.testing.assert_array_equal(ds.n_correct.values, (argmax == torch.tensor([1, 1])).sum(-1))
    assert float(ds.gold_point_log_prob) == pytest.approx(float(ds.log_prob[3, 3]), abs=1e-3)
    if directions == "decoder":
        u0 = to_prior_space(m, mean).requires_grad_(True)
        m.decoder.log_prob(from_prior_space(m, u0), batch.ids)[0, 2:4].sum().backward()
        grad = u0.grad[0, 2:4]
        assert torch.sum(grad * e[0]) == pytest.approx(float(grad.norm()), rel=1e-6)


def test_density_slice_rejects_a_missing_block():
    with pytest.raises(ValueError, match="block must be in"):
        geometry.density_slice(model(), make_batch([torch.tensor([0])]), block=1)


def test_pca_is_the_default_and_umap_without_the_extra_is_one_sentence(monkeypatch):
    ds = geometry.embedding(model(), BATCH, n_prior=1, n_generated=1, sampler=EXACT_SAMPLER)
    assert "pca" in ds and "umap" not in ds
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "umap" else real_find_spec(name, *a))
    with pytest.raises(ImportError) as err:
        geometry.embedding(model(), BATCH, methods=("pca", "umap"))
    message = str(err.value)
    assert "colaprob[umap]" in message and message.count(".") <= 1 and "\n" not in message
    with pytest.raises(ValueError, match="methods must be"):
        geometry.embedding(model(), BATCH, methods=("tsne",))
