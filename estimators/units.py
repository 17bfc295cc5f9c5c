"""Per-sequence and corpus-level units of a log-likelihood estimate, each with an SE.

From ``log_likelihood`` (nats) and its standard error ``log_likelihood_se`` per sequence:

* ``nats_per_token = -log_likelihood / n_tokens``;
* ``bits_per_byte = -log_likelihood / (n_bytes ln 2)``;
* ``token_perplexity = exp(nats_per_token)``, ``word_perplexity = exp(-log_likelihood / n_words)``.

Corpus level (lm-evaluation-harness style): the total nats over the total count, for example
``corpus_nats_per_token = -sum log_likelihood / sum n_tokens``. Standard errors by the delta
method: a ratio divides the SE by the count, ``exp(x)`` multiplies it by ``exp(x)``; the
corpus total has ``se = sqrt(sum se_i^2)`` (sequences are estimated independently). Which
tokens, bytes and words count is the README's "Units and which tokens count".
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

COUNTS = ("n_tokens", "n_bytes", "n_words")


def with_units(ds: xr.Dataset, n_tokens=None, n_bytes=None, n_words=None, dim: str = "sequence") -> xr.Dataset:
    """``ds`` with the units of its ``log_likelihood`` / ``log_likelihood_se`` [``dim``] added.

    The counts (each [``dim``]) default to the dataset's own ``n_tokens``, ``n_bytes`` and
    ``n_words`` variables, so a dataset merged from shards can be given corpus units again.
    """
    counts = {}
    for name, given in zip(COUNTS, (n_tokens, n_bytes, n_words)):
        values = ds[name] if given is None else xr.DataArray(np.asarray(given, dtype=np.float64), dims=dim)
        counts[name] = values.astype(np.float64).where(values > 0)
    nll, se = -ds["log_likelihood"], ds["log_likelihood_se"]
    total_nll = nll.sum(dim, skipna=False)
    total_se = np.sqrt((se**2).sum(dim, skipna=False))
    out = ds.assign({name: values.fillna(0).astype(np.int64) for name, values in counts.items()})
    for scope, numerator, error, denominator in (
        ("", nll, se, counts),
        ("corpus_", total_nll, total_se, {k: v.sum(dim) for k, v in counts.items()}),
    ):
        per_token = numerator / denominator["n_tokens"]
        per_token_se = error / denominator["n_tokens"]
        per_word = numerator / denominator["n_words"]
        out[f"{scope}nats_per_token"] = per_token
        out[f"{scope}nats_per_token_se"] = per_token_se
        out[f"{scope}bits_per_byte"] = numerator / (denominator["n_bytes"] * math.log(2))
        out[f"{scope}bits_per_byte_se"] = error / (denominator["n_bytes"] * math.log(2))
        out[f"{scope}token_perplexity"] = np.exp(per_token)
        out[f"{scope}token_perplexity_se"] = np.exp(per_token) * per_token_se
        out[f"{scope}word_perplexity"] = np.exp(per_word)
        out[f"{scope}word_perplexity_se"] = np.exp(per_word) * error / denominator["n_words"]
    out.attrs["units"] = "log_likelihood in nats; nats_per_token, bits_per_byte and perplexities from -log_likelihood"
    return out
