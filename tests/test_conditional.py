"""Prefix-response scoring against exact conditionals."""

import warnings

import numpy as np
import pytest
import torch

from colaprob.estimators import conditional, iwae
from colaprob.testing import make_batch

from test_elbo_iwae import FIXED, _batch, _linear_gaussian_model, _quadrature_model


def test_conditional_equals_joint_minus_prefix_on_and_off_block_boundaries():
    model, batch = _quadrature_model(), _batch()  # patch 2, block 1
    prefix = torch.tensor([2, 1, 3])  # a block boundary; inside a latent position (twice)
    ds = conditional(model, batch, prefix, 2000, chunk_size=1000, response=batch, rtol=1e-6, atol=1e-6)
    assert np.allclose(ds.log_prefix + ds.log_likelihood, ds.log_joint, atol=1e-12)  # same draws
    exact = (model.exact_log_prob(batch) - model.exact_log_prob(batch, prefix)).numpy()
    assert (np.abs(ds.log_likelihood.values - exact) < 4 * ds.log_likelihood_se.values + 0.005).all()
    assert np.allclose(ds.variance_reduction, (ds.independent_se / ds.log_likelihood_se) ** 2)
    assert list(ds.direct_applies.values) == [True, False, False]
    assert np.isfinite(ds.direct_log_likelihood[0]) and np.isnan(ds.direct_log_likelihood[1:]).all()
    assert "nats_per_token" in ds and list(ds.prefix_tokens.values) == [2, 1, 3]
    assert ds.attrs["estimator"].startswith("IWAE-2000 log p(x) - IWAE-2000 log p(x_pre)")
    assert "clean at t = 0" in ds.attrs["direct_estimator"]


def test_common_random_numbers_reduce_the_variance():
    model = _quadrature_model()
    batch = make_batch([torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 1, 1])])
    ds = conditional(model, batch, 2, 512, **FIXED)
    assert (ds.variance_reduction > 1).all(), ds.variance_reduction.values


def _linear_batch():
    g = torch.Generator().manual_seed(5)
    return make_batch([torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)])


@pytest.mark.parametrize("prefix", [6, 3])  # a block boundary; a latent position inside a block
def test_direct_conditional_is_exact_for_an_independent_prior(prefix):
    """Latent positions are independent a priori and each token reads its own position, so
    p(x_res | z_pre) = p(x_res | x_pre); with the exact posterior every weight is exact."""
    model, batch = _linear_gaussian_model(), _linear_batch()  # patch 3, block 2
    ds = conditional(model, batch, prefix, 8, rtol=1e-8, atol=1e-8)
    exact = (model.exact_log_prob(batch) - model.exact_log_prob(batch, torch.tensor(prefix))).numpy()
    assert ds.direct_applies.all()
    assert np.allclose(ds.log_weight_direct, exact[:, None], atol=1e-5)
    if prefix == 6:  # the covering blocks hold only prefix tokens: q is the prefix posterior
        assert np.allclose(ds.log_likelihood, exact, atol=1e-5) and ds.log_weight_prefix.std("sample").max() < 1e-5


def test_prefix_weights_equal_a_run_on_the_prefix_alone():
    """With a causal encoder and a prefix on a block boundary, the prefix draws are the
    prefix-only posterior's: the prefix estimate is the IWAE of the prefix as its own text."""
    model, batch = _linear_gaussian_model(), _linear_batch()
    ds = conditional(model, batch, 6, 16, direct=False, **FIXED)
    alone = iwae(model, make_batch([batch.ids[0, :6], batch.ids[1, :6]]), 16, **FIXED)
    assert np.allclose(ds.log_weight_prefix, alone.log_weight, atol=1e-12)
    assert "direct_log_likelihood" not in ds


def _sharp_decoder_model(widening: float = 1.0):
    """Patch 2, block 1: a response token shares the prefix's latent position, and the decoder
    is sharp enough that it moves that position's posterior a long way."""
    from colaprob.testing import BlockMixturePrior, CategoricalDecoder, QuadratureModel

    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    prior = BlockMixturePrior(r(3), r(3, 1, 1), r(3, 1, 1), 0.5 * r(3, 1, 1), 0.2 * r(3, 1, 1))
    return QuadratureModel(prior, CategoricalDecoder(4 * r(2, 3, 1), r(2, 3)), 2, 2.0, 0.5, posterior_widening=widening)


def test_a_prefix_ending_inside_a_block_draws_from_a_prefix_only_proposal():
    """With the whole-text posterior as proposal the first row's prefix term was 1.45 nats
    (12 SE) off at K = 4096; the prefix-only proposal puts every row within 3 SE."""
    model = _sharp_decoder_model()
    batch = make_batch([torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 1, 2]), torch.tensor([1, 2, 0, 2])])
    prefix = torch.tensor([1, 3, 2])  # inside the first block, inside the second, on a boundary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-hat is the subject of the next test
        ds = conditional(model, batch, prefix, 4096, chunk_size=4096, direct=False, **FIXED)
    exact_prefix = model.exact_log_prob(batch, prefix).numpy()
    assert (np.abs(ds.log_prefix.values - exact_prefix) < 3 * ds.log_prefix_se.values).all(), (ds.log_prefix.values - exact_prefix, ds.log_prefix_se.values)
    assert list(ds.prefix_proposal.values) == [True, True, False]
    exact = (model.exact_log_prob(batch) - model.exact_log_prob(batch, prefix)).numpy()
    assert (np.abs(ds.log_likelihood.values - exact) < 3 * ds.log_likelihood_se.values + 0.01).all()


def test_heavy_tailed_prefix_weights_are_flagged_and_named():
    """A proposal half as wide as the posterior: the first row's prefix weights are
    heavy-tailed, flagged and named; below 21 samples k-hat is not computable and nothing is
    claimed."""
    model = _sharp_decoder_model(widening=0.5)
    batch = make_batch([torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 1, 2])])
    with pytest.warns(UserWarning, match=r"sequence\(s\) 0 has heavy-tailed"):
        ds = conditional(model, batch, 2, 256, direct=False, **FIXED)
    assert ds.prefix_heavy_tailed.values.tolist() == [True, False]
    assert ds.prefix_heavy_tailed.values.tolist() == (ds.khat_prefix > ds.khat_threshold).values.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few = conditional(model, batch, 2, 8, direct=False, **FIXED)
    assert not few.prefix_heavy_tailed.any() and np.isnan(few.khat_prefix).all()


def test_the_prefix_only_proposal_of_cola_is_the_prefix_framed_as_a_whole_text():
    """On the official-format fixture (block-causal VAE, an end-of-text token): the proposal
    for the covering blocks is the posterior of the prefix framed as ``model.frame`` frames a
    text, and no token after the prefix moves it."""
    from pathlib import Path

    import dataclasses

    import colaprob
    from colaprob.estimators.draws import prefix_only_proposal

    cola = colaprob.load(str(Path(__file__).parent / "fixtures" / "official-tiny-a"))
    prompt = "The cat sat on"
    batch = cola.frame([prompt + " the mat and slept", prompt + " a hat"])
    tokens = cola.tokenizer.encode(prompt)
    prefix = torch.full((2,), 1 + len(tokens))  # bos + the prompt's tokens
    assert batch.ids[:, 1 : 1 + len(tokens)].tolist() == [tokens, tokens]
    block_tokens = cola.patch_size * cola.block_size
    covering = int(-(-prefix[0] // block_tokens) * block_tokens)
    assert prefix[0] % block_tokens != 0  # the prompt ends inside a block
    cut = dataclasses.replace(batch, ids=batch.ids[:, :covering], lengths=torch.full((2,), covering))
    q = prefix_only_proposal(cola, cut, prefix)
    alone = cola.posterior(cola.frame([prompt]))
    L = covering // cola.patch_size
    torch.testing.assert_close(q.mean, alone.mean[:, :L].expand(2, -1, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(q.logvar, alone.logvar[:, :L].expand(2, -1, -1), rtol=0, atol=1e-6)
