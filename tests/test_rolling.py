"""Rolling log-likelihood (colaprob.estimators.rolling): the chain against the exact log p of a
tractable model, the difference from independent windows, and the text path on the embedded
model against its continuation scores."""

import numpy as np
import pytest
import torch

import colaprob
from colaprob import windows
from colaprob.estimators.continuations import continuation_log_prob
from colaprob.estimators.rolling import chain_log_prob, rolling_log_prob
from colaprob.testing import make_batch

from test_elbo_iwae import FIXED, _quadrature_model

FAST = dict(method="euler", steps=2)


def test_the_chain_is_the_exact_log_p_of_the_document_and_independent_windows_are_not():
    """A document of two windows (one latent block each) of a quadrature model whose prior
    block depends on the block before: the chain equals log p(document); the sum of the
    windows scored alone, computed exactly here, misses their dependence."""
    model = _quadrature_model()
    documents = [[0, 1, 2, 1], [2, 2, 0, 1]]
    cut = [[doc[:2], doc[2:]] for doc in documents]
    ds = chain_log_prob(model, cut, 3000, chunk_size=1500, **FIXED)
    exact = model.exact_log_prob(make_batch([torch.tensor(doc) for doc in documents])).numpy()
    got, se = ds.log_likelihood.values, ds.log_likelihood_se.values
    assert (np.abs(got - exact) < 4 * se + 0.005).all(), (got, exact, se)
    windows_alone = sum(model.exact_log_prob(make_batch([torch.tensor(w[j]) for w in cut])).numpy() for j in range(2))
    assert (np.abs(windows_alone - exact) > 6 * se).all(), (windows_alone, exact, se)  # 0.25 and 0.043 nats
    assert ds.n_windows.values.tolist() == [2, 2] and ds.n_tokens.values.tolist() == [4, 4]
    assert ds.attrs["estimator"].startswith("rolling chain") and ds.attrs["windows"] == windows.CHAIN_NOTE


def test_the_chain_and_each_window_carry_their_solver_error():
    """A coarse grid against the same draws solved finely: the reported error of each
    continuation score and of the chain bounds the true one, within 20 times of it."""
    model = _quadrature_model()
    cut = [[[0, 1], [2, 1]], [[2, 2], [0, 1]]]
    coarse = chain_log_prob(model, cut, 32, method="rk4", steps=3, solver_error=True)
    fine = chain_log_prob(model, cut, 32, method="rk4", steps=96)  # the same draws and probes
    for name in ("window_log_likelihood", "log_likelihood"):
        true = np.abs(coarse[name].values - fine[name].values)
        reported = coarse[f"{name}_solver_error"].values
        present = ~np.isnan(true)
        # A window's score is log p(joint) - log p(context): the two solves' errors partly
        # cancel while their estimates add, so "within 10x" is of the two terms, not of the
        # difference (checked term by term in test_solver_error.py); on the difference the
        # safety factor 3 puts it 12-13x above here.
        assert (reported[present] >= true[present]).all() and (reported[present] <= 20 * true[present] + 1e-5).all(), (name, reported, true)
    np.testing.assert_allclose(coarse.log_likelihood_solver_error, coarse.window_log_likelihood_solver_error.sum("window"))
    assert "log_likelihood_solver_error" not in fine and coarse.attrs["solver_error_nfe"] > 0


def test_one_window_is_the_unconditional_log_p():
    model = _quadrature_model()
    ds = chain_log_prob(model, [[[1, 0]]], 3000, chunk_size=1500, **FIXED)
    exact = model.exact_log_prob(make_batch([torch.tensor([1, 0])])).numpy()
    assert abs(ds.log_likelihood.values[0] - exact[0]) < 4 * ds.log_likelihood_se.values[0] + 0.005


@pytest.fixture(scope="module")
def tiny():
    return colaprob.load("tiny")


def test_a_long_text_is_a_chain_of_continuation_scores(tiny):
    """On the embedded model (64 tokens a row): the windows partition the text, every
    token is counted once, and each term is the continuation score of its window given the
    window before, on the same random stream."""
    text = "The object is the basic unit of data in the language; every value is one of them."
    ds = rolling_log_prob(tiny, [text, "short one"], 2, seed=5, document_ids=[3, 8], **FAST)
    cut = [w for w in ds.window_text.values[0] if w]
    assert "".join(cut) == text and len(cut) == int(ds.n_windows[0]) >= 3
    assert int(ds.n_tokens[0]) == len(text.encode("utf-8")) and int(ds.n_tokens[1]) == 9  # no end-of-text
    direct = continuation_log_prob(tiny, ["", *cut[:-1]], [[w] for w in cut], 2, seed=5, item_ids=[3 * 2**32 + j for j in range(len(cut))], **FAST)
    assert np.allclose(ds.window_log_likelihood.values[0, : len(cut)], direct.log_likelihood.values[:, 0], rtol=0, atol=1e-9)
    assert np.isclose(float(ds.log_likelihood[0]), direct.log_likelihood.values.sum(), rtol=0, atol=1e-9)
    assert np.isclose(float(ds.log_likelihood_se[0]), np.sqrt((direct.log_likelihood_se.values**2).sum()))
    assert np.isfinite(ds.corpus_bits_per_byte.values) and ds.corpus_bits_per_byte_se > 0


def test_bad_documents_are_refused_naming_the_argument(tiny):
    with pytest.raises(ValueError, match=r"documents\[1\] is empty"):
        rolling_log_prob(tiny, ["a", ""], 2)
    with pytest.raises(TypeError, match="documents must be a sequence of strings"):
        rolling_log_prob(tiny, "a text", 2)
    with pytest.raises(ValueError, match="document_ids"):
        rolling_log_prob(tiny, ["a"], 2, document_ids=[-1])


def test_score_refuses_rolling_with_split_or_another_estimator_or_pairs(tmp_path):
    from cli_support import run_cli

    text = tmp_path / "a.txt"
    text.write_text("some text")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"prompt": "a", "ground_truth": " b"}\n')
    for argv, message in (
        ((text, "--rolling", "--split"), "--rolling and --split window a text in two different ways"),
        ((text, "--rolling", "--estimator", "iwae"), "--rolling is its own estimator"),
        ((pairs, "--rolling"), "--estimator rolling scores plain texts"),
    ):
        outcome = run_cli("score", *argv, "-o", tmp_path / "s.nc")
        assert outcome.code == 2 and message in outcome.err and "Traceback" not in outcome.err, outcome.err
