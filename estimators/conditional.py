"""Prefix-response scoring: ``log p(x_res | x_pre)``.

Two estimates, both from posterior draws of the whole text:

* ``log_likelihood``: ``log p(x) - log p(x_pre)``, each an IWAE-K on the SAME draws ``z_k ~
  q(z | x)`` (common random numbers). For ``p(x_pre)`` a draw contributes the latents of the
  prior blocks covering the prefix and the decoder terms of the prefix tokens only:

      w_k^pre = p(x_pre | z_k) p(z_k^(covering blocks)) / q(z_k^(covering blocks) | x),

  a valid importance weight for any proposal, because the decoder is causal (prefix tokens
  read only latents of the covering blocks) and the prior is block-causal. With a causal
  encoder and a prefix ending on a block boundary, the proposal is the prefix-only
  posterior. Each term is consistent; their difference is no bound. Its standard error uses
  the pairing (``statistics.paired_log_mean_exp_se``); ``variance_reduction`` is the ratio
  of the variance independent draws would give to this one.

  A prefix that ends inside a prior block: the whole-text posterior of the covering block has
  seen response tokens, so it is narrower than the prefix marginal's posterior there and the
  prefix weights are heavy-tailed. Such rows draw the prefix term from a proposal that has
  seen the prefix only (``prefix_proposal``; ``draws.prefix_only_proposal``: for Cola the
  encoder on the prefix framed as a whole text, end-of-text token and padding after it; for
  a model without an end-of-text token the encoder on the prefix alone and the prior's noise
  after it). Its draws use the same random streams, so they stay paired with the joint's.
  Where the prefix estimate's k-hat is computable and above its threshold,
  ``prefix_heavy_tailed`` is True and a warning names the sequences.

* ``direct_log_likelihood``: how Cola generates a response: the prefix latents are fixed to
  the posterior mean and given to the prior as clean positions (``t = 0``, also inside a
  block), and ``log p(x_res | z_pre)`` is an IWAE-K over the response latents with the
  response tokens' decoder terms: a lower bound in expectation on that plug-in conditional,
  which is not ``log p(x_res | x_pre)`` of the joint model. Defined where the prefix ends on
  a latent-position boundary (a multiple of ``patch_size`` tokens); NaN elsewhere.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import xarray as xr

from colaprob.estimators import _checks, cnf, statistics, streams, units
from colaprob.estimators.draws import check_arguments, covering_rows, describe, draw, prefix_only_proposal, weights_dataset
from colaprob.protocol import LatentModel, TokenBatch

ESTIMATOR = "IWAE-{K} log p(x) - IWAE-{K} log p(x_pre) on common random numbers (consistent, not a bound)"
DIRECT_ESTIMATOR = "IWAE-{K} log p(x_res | z_pre = posterior mean), prefix latents clean at t = 0 (lower bound in expectation on the plug-in conditional)"


def conditional(
    model: LatentModel,
    batch: TokenBatch,
    prefix_tokens,
    n_samples: int = 64,
    *,
    seed: int = 0,
    sequence_ids=None,
    chunk_size: int = 32,
    response=None,
    direct: bool = True,
    solver: cnf.Solver | None = None,
    **solver_keywords,
) -> xr.Dataset:
    """``log p(x_res | x_pre)`` of every sequence, whose first ``prefix_tokens`` ([B] or int)
    framed tokens are the prefix (with the model's beginning-of-text token, if its framing
    has one) and the rest, up to ``batch.lengths``, the response.

    ``response``: an object with ``n_tokens``, ``n_bytes``, ``n_words`` [B] of the response
    alone (for example the response framed by itself); when given, the units of
    ``log_likelihood`` are added. Other arguments as ``colaprob.estimators.elbo.elbo``.

    Returns the IWAE dataset of the joint (``log_weight`` etc., see ``elbo``) with
    ``log_joint``, ``log_prefix`` and their ``_se``, ``log_weight_prefix``, ``khat_prefix``,
    ``ess_prefix``, ``prefix_proposal`` (True where the prefix ends inside a prior block and
    its term drew from the prefix-only proposal), ``prefix_heavy_tailed`` (k-hat of the
    prefix term computable and above its threshold; a warning names these sequences), ``log_likelihood`` / ``log_likelihood_se`` (the conditional),
    ``independent_se``, ``variance_reduction``, ``prefix_tokens``, and with ``direct``:
    ``direct_log_likelihood`` / ``_se``, ``log_weight_direct``, ``khat_direct``,
    ``direct_applies``.
    """
    solver = cnf.Solver.build(solver, **solver_keywords)
    check_arguments(model, batch, n_samples, seed=seed, chunk_size=chunk_size)
    keys = streams.sequence_keys(batch, sequence_ids)
    prefix = _checks.integer_tensor("prefix_tokens", prefix_tokens, (len(batch),), minimum=0, maximum=batch.ids.shape[1]).long()
    if ((prefix < 0) | (prefix > batch.lengths)).any():
        raise ValueError("prefix_tokens must lie between 0 and each sequence's length")
    options = dict(seed=seed, chunk_size=chunk_size, solver=solver, importance_weighted=True)
    draws = draw(model, batch, n_samples, keys=keys, prefix_tokens=prefix, **options)
    ds = weights_dataset(draws, keys, draws.log_weight)
    s = dict(draws.per_sample)
    own = prefix % (model.patch_size * model.block_size) != 0
    if own.any():
        s = _prefix_proposal_terms(model, batch, keys, prefix, own, n_samples, options, s)
        draws.nfe += s.pop("nfe")
    ds["log_weight_prefix"] = (("sequence", "sample"), (s["decoder_prefix"] + s["prior_prefix"] - s["posterior_prefix"]).numpy())
    ds["prefix_tokens"] = ("sequence", prefix.numpy())
    ds["prefix_proposal"] = ("sequence", own.numpy())
    for name, weights in (("joint", "log_weight"), ("prefix", "log_weight_prefix")):
        ds[f"log_{name}"] = statistics.log_mean_exp(ds[weights])
        ds[f"log_{name}_se"] = statistics.log_mean_exp_se(ds[weights])
    ds["khat_prefix"] = statistics.pareto_khat(ds["log_weight_prefix"])
    ds["ess_prefix"] = statistics.ess(ds["log_weight_prefix"])
    ds["prefix_heavy_tailed"] = ds["khat_computable"] & (ds["khat_prefix"] > ds["khat_threshold"])
    if ds["prefix_heavy_tailed"].any():
        heavy = [str(key) for key in ds.sequence.values[ds["prefix_heavy_tailed"].values]]
        warnings.warn(
            f"the prefix term log p(x_pre) of sequence(s) {', '.join(heavy)} has heavy-tailed importance weights (k-hat above "
            "its threshold), so its value and standard error may be far off; use more samples (K) and see prefix_heavy_tailed.",
            stacklevel=2,
        )
    ds["log_likelihood"] = ds["log_joint"] - ds["log_prefix"]
    ds["log_likelihood_se"] = statistics.paired_log_mean_exp_se(ds["log_weight"], ds["log_weight_prefix"])
    ds["independent_se"] = np.sqrt(ds["log_joint_se"] ** 2 + ds["log_prefix_se"] ** 2)
    if "prior_solver_error" in ds:
        ds["prior_prefix_solver_error"] = (("sequence", "sample"), s["prior_prefix_solver_error"].numpy())
        ds["log_joint_solver_error"] = statistics.solver_error(ds["log_weight"], ds["prior_solver_error"], weighted=True)
        ds["log_prefix_solver_error"] = statistics.solver_error(ds["log_weight_prefix"], ds["prior_prefix_solver_error"], weighted=True)
        # The two solver errors need not cancel: the difference's is at most their sum.
        ds["log_likelihood_solver_error"] = ds["log_joint_solver_error"] + ds["log_prefix_solver_error"]
    ds["variance_reduction"] = (ds["independent_se"] / ds["log_likelihood_se"]) ** 2
    if direct:
        ds = ds.merge(_direct(model, batch, keys, prefix, n_samples, options, ds.sizes["sample"]))
    if response is not None:
        ds = units.with_units(ds, *(np.asarray(getattr(response, name)) for name in units.COUNTS))
    ds = describe(ds, model, draws, ESTIMATOR.format(K=n_samples), seed, chunk_size)
    if direct:
        ds.attrs["direct_estimator"] = DIRECT_ESTIMATOR.format(K=n_samples)
    return ds


def _prefix_proposal_terms(model, batch, keys, prefix, rows_mask, n_samples, options, terms) -> dict:
    """``terms`` with the prefix terms (``decoder_prefix``, ``prior_prefix``,
    ``posterior_prefix`` [B, K], and ``prior_prefix_solver_error``) of the rows in
    ``rows_mask`` redrawn from the prefix-only proposal (``draws.prefix_only_proposal``), and
    ``nfe``, the velocity evaluations this took. Only the covering blocks are drawn and
    integrated."""
    rows = torch.nonzero(rows_mask)[:, 0]
    covering = covering_rows(model, batch.select(rows), prefix[rows])
    proposal = prefix_only_proposal(model, covering, prefix[rows])
    draws = draw(model, covering, n_samples, keys=keys[rows], prefix_tokens=prefix[rows], proposal=proposal, **options)
    terms = dict(terms)
    for name in ("decoder_prefix", "prior_prefix", "posterior_prefix", "prior_prefix_solver_error"):
        if name in terms:
            terms[name] = terms[name].clone()
            terms[name][rows] = draws.per_sample[name]
    terms["nfe"] = draws.nfe
    return terms


def _direct(model, batch, keys, prefix, n_samples, options, width) -> xr.Dataset:
    """The direct conditional on the rows whose prefix ends on a latent position (NaN
    elsewhere); its draws reuse each sequence's stream, so the response latents are the same
    draws as the joint's."""
    applies = prefix % model.patch_size == 0
    rows = torch.nonzero(applies)[:, 0]
    log_weight = torch.full((len(batch), width), math.nan, dtype=torch.float64)
    error = torch.full((len(batch), width), math.nan, dtype=torch.float64)
    if len(rows):
        draws = draw(model, batch.select(rows), n_samples, keys=keys[rows], pinned=prefix[rows] // model.patch_size, **options)
        log_weight[rows, :n_samples] = draws.log_weight
        if "prior_solver_error" in draws.per_sample:
            error[rows, :n_samples] = draws.per_sample["prior_solver_error"]
    weights = xr.DataArray(log_weight.numpy(), dims=("sequence", "sample"), coords={"sequence": keys.numpy()})
    ds = xr.Dataset(
        {
            "log_weight_direct": weights,
            "direct_log_likelihood": statistics.log_mean_exp(weights),
            "direct_log_likelihood_se": statistics.log_mean_exp_se(weights),
            "khat_direct": statistics.pareto_khat(weights),
            "direct_applies": ("sequence", applies.numpy()),
        }
    )
    if options["solver"].solver_error:
        errors = xr.DataArray(error.numpy(), dims=("sequence", "sample"), coords={"sequence": keys.numpy()})
        ds["direct_log_likelihood_solver_error"] = statistics.solver_error(weights, errors, weighted=True)
    return ds
