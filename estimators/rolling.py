"""Rolling log-likelihood of documents longer than the model's context: a chain of windows.

A document is cut into windows ``w_1 .. w_J`` that partition it (``colaprob.windows``, mode
``"chain"``: each window fits in one row together with the one before it) and scored as

    log p(document) ~= log p(w_1) + sum_{j > 1} log p(w_j | w_{j-1}),

each term a continuation score (``colaprob.estimators.continuations``): window ``j`` is the
continuation of the context ``w_{j-1}``, window 1 the continuation of an empty context (after
the beginning-of-text token, if the framing has one). Like a continuation, the chain counts
the text's tokens only: no end-of-text, no padding; this is lm-evaluation-harness's rolling
log-likelihood (each token predicted once, conditioned on the beginning of text), so a
perplexity from it is comparable with an autoregressive model's.

What it is. Each term is consistent (IWAE-K differences on common draws, not a bound). The
chain is ``log p(document)`` exactly when the model's dependence on the past reaches back no
further than one window (always, for a document of one or two windows); for longer
documents it drops what lies before the previous window, as a finite-context autoregressive
model's rolling perplexity does. It is NOT the sum of independently scored windows
(``colaprob score --split``), which drops every window's context.

Standard error: windows are separate items with their own random streams (item key
``document_key * 2**32 + window``), so the variance of the sum is the sum of the windows'
variances.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from colaprob import windows as windowing
from colaprob.estimators import statistics
from colaprob.estimators.solver import Solver
from colaprob.estimators.continuations import ContinuationBatch, continuation_log_prob, score_continuations

ESTIMATOR = "rolling chain log p(w_1) + sum_j log p(w_j | w_(j-1)) of continuation scores (IWAE-{K} differences on common draws; consistent, not a bound)"
WINDOW_KEYS = 2**32  # windows per document a random-stream key can tell apart


def rolling_log_prob(
    model,
    documents: Sequence[str],
    n_samples: int = 16,
    *,
    seed: int = 0,
    document_ids: Sequence[int] | None = None,
    chunk_size: int = 32,
    solver: Solver | None = None,
    **solver_keywords,
) -> xr.Dataset:
    """The rolling chain (module docstring) of every document, for a model with a tokenizer
    and a framing; ``documents``: non-empty strings. ``document_ids``: non-negative ints
    keying each document's random streams (default: the position). Other arguments as
    ``colaprob.estimators.continuations.continuation_log_prob``.

    Returns a Dataset over ``sequence`` (one per document) and ``window``: per document
    ``log_likelihood``, ``log_likelihood_se`` (nats), ``n_tokens``, ``n_bytes``, ``n_words``,
    ``n_windows``, ``khat_max`` and the units of ``colaprob.estimators.units``; per window
    ``window_log_likelihood``, ``window_log_likelihood_se``, ``window_n_tokens``,
    ``window_khat``, ``window_text`` and ``window_valid``; with ``solver_error`` (a field of the
    solver) also ``window_log_likelihood_solver_error`` and its sum over the windows,
    ``log_likelihood_solver_error``; the estimator and the settings as attributes."""
    if isinstance(documents, str) or not all(isinstance(d, str) for d in documents):
        raise TypeError("documents must be a sequence of strings")
    for i, text in enumerate(documents):
        if not text:
            raise ValueError(f"documents[{i}] is empty; a chain needs at least one character")
    keys = _document_keys(len(documents), document_ids)
    cut = [windowing.cut_for(model, text, "chain") for text in documents]
    contexts = [w[j - 1] if j else "" for w in cut for j in range(len(w))]
    continuations = [[piece] for w in cut for piece in w]
    ds = continuation_log_prob(
        model, contexts, continuations, n_samples, seed=seed, item_ids=_item_keys(keys, cut), chunk_size=chunk_size, solver=solver, **solver_keywords
    )
    out = _chain_dataset(ds, [len(w) for w in cut], keys, n_samples)
    width = out.sizes["window"]
    text = np.array([w + [""] * (width - len(w)) for w in cut], dtype=object)
    out["window_text"] = (("sequence", "window"), text)
    out["n_bytes"] = ("sequence", np.array([len(d.encode("utf-8")) for d in documents]))
    out["n_words"] = ("sequence", np.array([len(d.split()) for d in documents]))
    return _finish(out)


def chain_log_prob(
    model,
    windows: Sequence[Sequence[Sequence]],
    n_samples: int = 16,
    *,
    prefix: Sequence = (),
    pad_id=0,
    seed: int = 0,
    document_ids: Sequence[int] | None = None,
    chunk_size: int = 32,
    solver: Solver | None = None,
    **solver_keywords,
) -> xr.Dataset:
    """The chain of documents already cut into windows of token ids, for any model of
    ``colaprob.protocol`` (no tokenizer needed; for example the tractable models of
    ``colaprob.testing``): ``windows[i][j]`` the ids of window ``j`` of document ``i``,
    ``prefix`` the framing's ids before a context (the beginning-of-text token), ``pad_id``
    the padding. Returns what ``rolling_log_prob`` returns, with token counts as byte and
    word counts and no ``window_text``."""
    keys = _document_keys(len(windows), document_ids)
    contexts = [list(prefix) + (list(w[j - 1]) if j else []) for w in windows for j in range(len(w))]
    continuations = [[list(piece)] for w in windows for piece in w]
    if not all(len(c[0]) for c in continuations):
        raise ValueError("every window must hold at least one token")
    batch = ContinuationBatch.from_tokens(contexts, continuations, model.patch_size * model.block_size, pad_id)
    ds = score_continuations(model, batch, n_samples, seed=seed, item_ids=_item_keys(keys, windows), chunk_size=chunk_size, solver=solver, **solver_keywords)
    out = _chain_dataset(ds, [len(w) for w in windows], keys, n_samples)
    out["n_bytes"] = out["n_tokens"].copy()
    out["n_words"] = out["n_tokens"].copy()
    return _finish(out)


def _document_keys(n: int, document_ids) -> np.ndarray:
    keys = np.arange(n) if document_ids is None else np.asarray(list(document_ids), dtype=np.int64).reshape(-1)
    if len(keys) != n or (keys < 0).any() or (keys >= 2**31).any():
        raise ValueError("document_ids must be one integer in [0, 2**31) per document")
    return keys


def _item_keys(keys: np.ndarray, cut) -> list[int]:
    """The random-stream key of every window: its document's key and its index."""
    if any(len(w) >= WINDOW_KEYS for w in cut):
        raise ValueError(f"a document has {WINDOW_KEYS} windows or more")
    return [int(key) * WINDOW_KEYS + j for key, w in zip(keys, cut) for j in range(len(w))]


def _chain_dataset(ds: xr.Dataset, n_windows: list[int], keys: np.ndarray, n_samples: int) -> xr.Dataset:
    """Continuation scores [item] (one choice each) regrouped as [sequence, window] and summed."""
    D, W = len(n_windows), max(n_windows, default=0)
    starts = np.cumsum([0, *n_windows[:-1]]).astype(int)
    grid = lambda name, fill, dtype: np.array(
        [list(ds[name].values[s : s + n, 0]) + [fill] * (W - n) for s, n in zip(starts, n_windows)], dtype=dtype
    ).reshape(D, W)
    dims = ("sequence", "window")
    out = xr.Dataset(
        {
            "window_log_likelihood": (dims, grid("log_likelihood", np.nan, np.float64)),
            "window_log_likelihood_se": (dims, grid("log_likelihood_se", np.nan, np.float64)),
            "window_n_tokens": (dims, grid("n_tokens", 0, np.int64)),
            "window_khat": (dims, grid("khat", np.nan, np.float64)),
            "window_valid": (dims, np.arange(W)[None, :] < np.array(n_windows)[:, None]),
        },
        coords={"sequence": keys, "window": np.arange(W)},  # a sequence is labelled by its key, as in the other estimators
    )
    out["n_windows"] = ("sequence", np.array(n_windows))
    out["log_likelihood"] = out["window_log_likelihood"].sum("window", skipna=True)
    out["log_likelihood_se"] = np.sqrt((out["window_log_likelihood_se"] ** 2).sum("window", skipna=True))
    if "log_likelihood_solver_error" in ds:
        # Solver errors are systematic, not independent: the chain's is the sum of its windows'.
        out["window_log_likelihood_solver_error"] = (dims, grid("log_likelihood_solver_error", np.nan, np.float64))
        out["log_likelihood_solver_error"] = out["window_log_likelihood_solver_error"].sum("window", skipna=True)
    out["n_tokens"] = out["window_n_tokens"].sum("window")
    out["khat_max"] = out["window_khat"].max("window", skipna=True)
    out["khat_threshold"] = ds["khat_threshold"]
    out["n_samples"] = ("sequence", np.full(D, n_samples))
    out["khat_computable"] = ("sequence", np.full(D, statistics.khat_computable(n_samples)))
    out["reliable"] = out["khat_max"] < out["khat_threshold"]
    settings = {k: v for k, v in ds.attrs.items() if k not in ("estimator",)}
    out.attrs.update({**settings, "estimator": ESTIMATOR.format(K=n_samples), "windows": windowing.CHAIN_NOTE})
    return out


def _finish(out: xr.Dataset) -> xr.Dataset:
    from colaprob.estimators import units

    return units.with_units(out)
