"""Units and their standard errors, per sequence and for the corpus."""

import math

import numpy as np
import pytest
import xarray as xr

from colaprob.estimators import units


def _estimates(ll, se):
    return xr.Dataset({"log_likelihood": ("sequence", np.array(ll, float)), "log_likelihood_se": ("sequence", np.array(se, float))})


def test_per_sequence_and_corpus_units():
    ds = units.with_units(_estimates([-10.0, -20.0], [1.0, 2.0]), n_tokens=[5, 10], n_bytes=[10, 25], n_words=[2, 4])
    assert np.allclose(ds.nats_per_token, [2, 2]) and np.allclose(ds.nats_per_token_se, [0.2, 0.2])
    assert np.allclose(ds.bits_per_byte, [1 / math.log(2), 0.8 / math.log(2)])
    assert np.allclose(ds.bits_per_byte_se, [0.1 / math.log(2), 0.08 / math.log(2)])
    assert np.allclose(ds.token_perplexity, math.exp(2)) and np.allclose(ds.token_perplexity_se, math.exp(2) * 0.2)
    assert np.allclose(ds.word_perplexity, [math.exp(5), math.exp(5)])
    assert np.allclose(ds.word_perplexity_se, [math.exp(5) * 0.5, math.exp(5) * 0.5])
    assert float(ds.corpus_nats_per_token) == pytest.approx(30 / 15)  # total nats / total tokens
    assert float(ds.corpus_nats_per_token_se) == pytest.approx(math.sqrt(5) / 15)
    assert float(ds.corpus_bits_per_byte) == pytest.approx(30 / (35 * math.log(2)))
    assert float(ds.corpus_word_perplexity) == pytest.approx(math.exp(30 / 6))
    assert float(ds.corpus_token_perplexity_se) == pytest.approx(math.exp(2) * math.sqrt(5) / 15)
    assert list(ds.n_tokens.values) == [5, 10] and ds.n_tokens.dtype == np.int64


def test_corpus_units_of_merged_shards_use_the_stored_counts():
    a = units.with_units(_estimates([-10.0], [1.0]), n_tokens=[5], n_bytes=[10], n_words=[2])
    b = units.with_units(_estimates([-20.0], [2.0]), n_tokens=[10], n_bytes=[25], n_words=[4])
    # Corpus scalars of the shards differ; they are recomputed from the stored per-sequence data.
    merged = units.with_units(xr.concat([a, b], "sequence", data_vars="minimal", coords="minimal", compat="override"))
    whole = units.with_units(_estimates([-10.0, -20.0], [1.0, 2.0]), n_tokens=[5, 10], n_bytes=[10, 25], n_words=[2, 4])
    for name in ("corpus_nats_per_token", "corpus_bits_per_byte_se", "corpus_word_perplexity"):
        assert float(merged[name]) == pytest.approx(float(whole[name]))


def test_zero_counts_give_nan_not_infinity():
    ds = units.with_units(_estimates([-3.0], [0.1]), n_tokens=[3], n_bytes=[4], n_words=[0])
    assert np.isnan(ds.word_perplexity).all() and np.isfinite(ds.nats_per_token).all()
