"""Posterior draws and every term of their importance weights, per sequence: the one engine
under ELBO, IWAE, the conditional and task scores, the decomposition and the probes.

Sample ``k`` of a sequence is ``z_k = mean + std * eps_k`` from the proposal (``q_phi(z | x)``
unless another is given), and per sample, in float64,

* ``decoder``: ``log p_theta(x | z_k)`` over the counted tokens (``< batch.lengths``);
* ``block_prior`` [n_blocks]: ``log p_psi(z_k^(b) | z_k^(<b))`` on ``z``: the block-causal
  CNF on ``u = to_prior_space(z)`` plus ``d log|scale|`` per integrated latent position;
* ``block_posterior`` [n_blocks]: ``log q(z_k^(b) | x)`` over the block's sampled positions,

so that ``log w_k = decoder + sum_b block_prior - sum_b block_posterior``. The estimators are
sums of these arrays: ELBO and IWAE average ``log w``; the marginal of the first ``n``
tokens (the conditional's prefix) takes their decoder terms and the blocks covering them
(``colaprob.estimators.layout``); the decomposition's distortion is ``-decoder`` and its rate
``sum_b (block_posterior - block_prior)``, so ``distortion + rate = -ELBO`` holds by
construction, not by a test.

Randomness: ``eps_k`` of a sequence and its Hutchinson probes come from its own streams
(``colaprob.estimators.streams``), so a sequence gets the same numbers whatever batch, shard,
chunk size or resumed run it is in: fixed-step solvers reproduce exactly, and the default
``dopri5`` steps every block of every draw on its own (``colaprob.estimators.stepping``), so
only the float32 rounding of the velocity, which can depend on the batch's padded length,
moves it (README, "Choosing estimator settings"). K is processed ``chunk_size`` samples at a time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from colaprob.estimators import _checks, cnf, statistics, streams, units
from colaprob.estimators.layout import LatentLayout
from colaprob.protocol import DiagonalGaussian, TokenBatch, to_prior_space

def check_arguments(model, batch: TokenBatch, n_samples: int, *, seed: int, chunk_size: int) -> None:
    """Refuse, with one sentence naming the argument, what the estimators cannot compute:
    ``n_samples`` (K) or ``chunk_size`` below 1, a negative ``seed``, and a batch whose shapes
    disagree or that holds an empty sequence (it has no likelihood, and would read as 0).
    (The solver settings are checked where a ``cnf.Solver`` is made.)"""
    _checks.integer("n_samples (K)", n_samples, minimum=1)
    _checks.integer("chunk_size", chunk_size, minimum=1)
    _checks.integer("seed", seed, minimum=0)
    check_batch(batch)


def check_batch(batch: TokenBatch) -> None:
    """``ids`` [B, N], ``lengths`` [B] integers in ``1..N``, the unit counts [B]."""
    if not isinstance(batch, TokenBatch):
        raise TypeError(f"batch must be a colaprob.protocol.TokenBatch (model.frame(texts) makes one), not {type(batch).__name__}")
    if batch.ids.dim() != 2:
        raise ValueError(f"batch.ids must be [sequences, tokens], got shape {tuple(batch.ids.shape)}")
    B, N = batch.ids.shape
    if B == 0:
        raise ValueError("batch holds no sequences")
    lengths = _checks.integer_tensor("batch.lengths", batch.lengths, (B,), minimum=0, maximum=N)
    if tuple(torch.as_tensor(batch.lengths).shape) != (B,):
        raise ValueError(f"batch.lengths must hold one length per sequence ({B}), got shape {tuple(torch.as_tensor(batch.lengths).shape)}")
    empty = torch.nonzero(lengths == 0)[:, 0].tolist()
    if empty:
        raise ValueError(f"batch.lengths is 0 for sequence(s) {empty}: an empty sequence has no likelihood; leave it out of the batch")
    for name in units.COUNTS:
        count = torch.as_tensor(getattr(batch, name))
        if tuple(count.shape) != (B,):
            raise ValueError(f"batch.{name} must hold one count per sequence ({B}), got shape {tuple(count.shape)}")


@dataclass
class Draws:
    """The weight terms of the draws of a batch of ``B`` sequences.

    ``per_sample``: name -> [B, K] float64, NaN beyond a row's ``n_samples``: ``decoder``,
    ``prior`` and ``posterior`` (``log p(x|z)``, ``log p(z)``, ``log q(z|x)`` over the counted
    tokens and latents), with ``prefix_tokens`` also ``decoder_prefix``, ``prior_prefix``,
    ``posterior_prefix`` (prefix tokens; prior blocks covering them), and for Hutchinson
    ``prior_probe_se``, and with the solver error ``prior_solver_error`` (and
    ``prior_prefix_solver_error``). ``sums``: name -> [B, ...] sums over a row's samples:
    ``token_decoder`` [B, N], ``block_prior`` [B, n_blocks] (and ``block_prior_solver_error``
    over the samples whose error was estimated, ``block_prior_solver_error_samples`` of them).
    ``blocks`` (with ``per_block``): ``prior`` and ``posterior`` [B, K, n_blocks] per sample
    and block, of which ``per_sample``'s are the sums. ``latents`` (with ``keep_latents``):
    the draws ``z`` [K, B, L, d]; ``proposal``: the distribution they came from.
    ``integrated``: [B, n_blocks] the prior blocks and ``counted_tokens``: [B, N] the tokens
    that count.
    """

    per_sample: dict[str, Tensor]
    sums: dict[str, Tensor]
    integrated: Tensor
    counted_tokens: Tensor
    n_samples: Tensor
    nfe: int
    settings: dict
    blocks: dict[str, Tensor] = field(default_factory=dict)
    latents: Tensor | None = None
    proposal: DiagonalGaussian | None = None

    @property
    def log_weight(self) -> Tensor:
        """[B, K] ``log p(x|z) + log p(z) - log q(z|x)``."""
        return self.per_sample["decoder"] + self.per_sample["prior"] - self.per_sample["posterior"]

    def extend(self, rows: Tensor, more: "Draws") -> "Draws":
        """Append ``more``, drawn for the sequences ``rows`` with the sample indices that
        follow theirs (the per-sample terms and sums; not ``blocks`` or ``latents``)."""
        n = self.n_samples.clone()
        n[rows] += more.n_samples
        per_sample = {}
        for name, values in self.per_sample.items():
            grown = torch.full((values.shape[0], int(n.max())), math.nan, dtype=torch.float64)
            grown[:, : values.shape[1]] = values
            for j, row in enumerate(rows.tolist()):
                start = int(self.n_samples[row])
                grown[row, start : start + int(more.n_samples[j])] = more.per_sample[name][j, : int(more.n_samples[j])]
            per_sample[name] = grown
        # A sub-batch may be narrower (fewer tokens and blocks): pad its sums.
        widen = lambda x, like: torch.nn.functional.pad(x, (0, like.shape[-1] - x.shape[-1]))
        sums = {name: values.index_add(0, rows, widen(more.sums[name], values)) for name, values in self.sums.items()}
        settings = dict(self.settings)
        if "solver_error_nfe" in settings:
            settings["solver_error_nfe"] += more.settings.get("solver_error_nfe", 0)
        return Draws(per_sample, sums, self.integrated, self.counted_tokens, n, self.nfe + more.nfe, settings)


def marginal_terms(layout: LatentLayout, decoder: Tensor, block_prior: Tensor, block_posterior: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The decoder, prior and posterior terms of the marginal of the first ``tokens`` [B]
    tokens: their decoder terms and the prior and posterior of the blocks covering them.
    ``decoder`` [..., B, N] (0 where a token does not count), ``block_prior`` and
    ``block_posterior`` [..., B, n_blocks]; each term [..., B]."""
    covering = layout.block_mask(tokens)
    return (decoder * layout.token_mask(tokens)).sum(-1), (block_prior * covering).sum(-1), (block_posterior * covering).sum(-1)


def covering_rows(model, batch: TokenBatch, prefix: Tensor) -> TokenBatch:
    """``batch`` cut to the prior blocks covering each row's first ``prefix`` [B] tokens: the
    tokens a prefix marginal integrates (``lengths`` the covering blocks' end, or the row's
    own length where that comes first)."""
    block_tokens = model.patch_size * model.block_size
    covering = -(-torch.as_tensor(prefix).long() // block_tokens) * block_tokens
    width = min(int(covering.max()), batch.ids.shape[1])
    return dataclasses.replace(batch, ids=batch.ids[:, :width], lengths=torch.minimum(covering, torch.as_tensor(batch.lengths)))


def prefix_only_proposal(model, covering: TokenBatch, prefix: Tensor) -> DiagonalGaussian:
    """A proposal for the blocks covering each row's first ``prefix`` [B] tokens that has seen
    those tokens only: [B, L, d] over the latent positions of ``covering`` (``covering_rows``).
    The whole-text posterior of a block the prefix ends inside has seen later tokens and is
    narrower than the prefix marginal's posterior there, so its weights for the prefix term
    are heavy-tailed and depend on what follows.

    * A model whose framing ends a text with an end-of-text token (Cola): ``model.posterior``
      of the prefix framed as a whole text, ``prefix + [eos] + [pad ...]`` to the end of the
      covering blocks, on every covering position: the posterior the model learned for a
      text that ends there. Its decoder is block-causal, so a prefix token reads every
      latent of its block, and the positions after the prefix need latents it knows: the
      prior's noise there put the embedded model's context terms 4.5 to 55 nats lower
      (IWAE-256; BENCHMARKS.md, section 6).
    * Otherwise: ``model.posterior`` of the prefix alone (``lengths = prefix``) on the
      positions holding prefix tokens, and the prior's noise ``N(0, I)`` in the prior space,
      ``N(shift, scale^-2)`` on ``z``, on the covering positions after them."""
    prefix = torch.as_tensor(prefix).long()
    framing = getattr(model, "framing", None)
    if framing is not None and framing.eos_id is not None:
        position = torch.arange(covering.ids.shape[1])
        ids = torch.where(position < prefix[:, None], covering.ids, framing.pad_id)
        ids = torch.where(position == prefix[:, None], framing.eos_id, ids).to(covering.ids.dtype)
        with torch.no_grad():
            return model.posterior(dataclasses.replace(covering, ids=ids))
    with torch.no_grad():
        alone = model.posterior(dataclasses.replace(covering, lengths=prefix))
    L = -(-covering.ids.shape[1] // model.patch_size)
    like = alone.mean
    mean = torch.full((len(prefix), L, model.latent_dim), model.latent_shift, dtype=like.dtype, device=like.device)
    logvar = torch.full_like(mean, -2 * math.log(abs(model.latent_scale)))
    n = min(L, like.shape[-2])
    read = (torch.arange(n) < -(-prefix // model.patch_size)[:, None])[..., None].to(like.device)  # positions holding prefix tokens
    mean[:, :n] = torch.where(read, like[:, :n], mean[:, :n])
    logvar[:, :n] = torch.where(read, alone.logvar[:, :n].to(logvar.dtype), logvar[:, :n])
    return DiagonalGaussian(mean, logvar)


# An importance-weighted estimate skips the companion solve of every sample whose
# self-normalised weight is below this share of 1/K: together they hold less than this share
# of the weight, so their errors (taken as the worst estimated one's) move its solver error
# by at most that share. On the embedded model 1 to 5 of 16 or 64 samples carry the rest.
UNESTIMATED_WEIGHT = 0.01


# A plain average (the ELBO) weighs every sample alike, so its solver error, the mean of its
# samples' errors, is estimated from every ``ERROR_SUBSAMPLE_STRIDE``-th sample (indices 0, 8,
# 16, ...: i.i.d. draws, so an unbiased estimate of that mean) at 1/8 of the companion's cost.
# bench/elbo_error.py measures what this does to the estimate's coverage of the true error.
ERROR_SUBSAMPLE_STRIDE = 8


def error_subsample(indices: range, batch_size: int) -> Tensor:
    """[k, B] bool: the samples of ``indices`` whose error a plain average estimates (sample
    index a multiple of ``ERROR_SUBSAMPLE_STRIDE``), the same in every row and chunk."""
    chosen = torch.tensor(indices) % ERROR_SUBSAMPLE_STRIDE == 0
    return chosen[:, None].expand(len(indices), batch_size)


def weight_carrying(log_weight: Tensor) -> Tensor:
    """[B, K] bool: the samples whose self-normalised weight ``w_k / sum_j w_j`` (over a
    row's present samples; NaN ones are absent) is at least ``UNESTIMATED_WEIGHT / K``."""
    present = ~log_weight.isnan()
    K = present.sum(-1, keepdim=True).clamp_min(1)
    normalised = torch.softmax(log_weight.masked_fill(~present, -math.inf), -1)
    return present & (normalised >= UNESTIMATED_WEIGHT / K)


def draw(
    model,
    batch: TokenBatch,
    n_samples: int,
    *,
    seed: int,
    keys: Tensor,
    start: int = 0,
    chunk_size: int = 32,
    solver: cnf.Solver,
    prefix_tokens: Tensor | None = None,
    pinned: Tensor | None = None,
    per_block: bool = False,
    keep_latents: bool = False,
    proposal: DiagonalGaussian | None = None,
    importance_weighted: bool = False,
) -> Draws:
    """Samples ``start .. start + n_samples - 1`` of every sequence and their weight terms,
    the prior's density solved by ``solver``.

    ``prefix_tokens`` [B]: also the terms of the prefix marginal. ``pinned`` [B] latent
    positions: hold the latents before it at the posterior mean, give them to the prior as
    clean positions (``t = 0``) and count only the tokens from ``pinned * patch_size`` on
    and the latents from ``pinned`` on (the direct conditional). ``per_block``: also keep
    every sample's per-block prior and posterior terms; ``keep_latents``: also the draws.
    ``proposal``: draw from this [B, L, d] instead of ``model.posterior(batch)`` (the prefix
    proposal of ``colaprob.estimators.conditional``).

    With the solver error, only some samples get the companion solve; the others' errors are
    NaN. ``importance_weighted``: the estimator self-normalises these draws' weights (IWAE,
    the conditional), so the samples that carry weight get it (``weight_carrying``, of the
    joint and of the prefix marginal); otherwise (a plain average: the ELBO, the
    decomposition) every ``ERROR_SUBSAMPLE_STRIDE``-th sample (``error_subsample``).
    """
    check_arguments(model, batch, n_samples, seed=seed, chunk_size=chunk_size)
    _checks.integer("start", start, minimum=0)
    P, bs, d = model.patch_size, model.block_size, model.latent_dim
    B, N = batch.ids.shape
    layout = LatentLayout.of(model, batch)
    with torch.no_grad():
        q = model.posterior(batch) if proposal is None else proposal
    device, dtype = q.mean.device, q.mean.dtype
    L = q.mean.shape[-2]
    lengths, n_blocks = layout.positions(), layout.n_blocks  # latent positions per sequence; blocks
    pinned = torch.zeros(B, dtype=torch.long) if pinned is None else torch.as_tensor(pinned).long()
    sampled = ~layout.position_mask(pinned) & layout.position_mask(lengths)  # [B, L]
    counted_tokens = ~layout.token_mask(pinned * P) & layout.token_mask()  # [B, N]
    sampled_per_block = layout.per_block(sampled.double())  # [B, n_blocks]
    jacobian = sampled_per_block * d * math.log(abs(model.latent_scale))
    if prefix_tokens is not None:
        prefix_tokens = torch.as_tensor(prefix_tokens).long().expand(B)
        prefix_blocks = layout.block_mask(prefix_tokens)  # the blocks covering the prefix
    hutchinson, with_error = solver.hutchinson, solver.solver_error
    # Weighted, the companion waits until every sample's weight is known.
    deferred = with_error and importance_weighted
    main_solver = solver.replace(solver_error=False)

    per_sample: dict[str, list[Tensor]] = {}
    sums = {"token_decoder": torch.zeros(B, N, dtype=torch.float64), "block_prior": torch.zeros(B, n_blocks, dtype=torch.float64)}
    if with_error:
        sums["block_prior_solver_error"] = torch.zeros(B, n_blocks, dtype=torch.float64)
        sums["block_prior_solver_error_samples"] = torch.zeros(B, n_blocks, dtype=torch.float64)
    nfe, error_nfe, per_block_terms, latents, solves = 0, 0, {}, [], []

    def companion_terms(u: Tensor, r: cnf.BlockLogProb, flow: dict, select: Tensor) -> dict[str, Tensor]:
        """A chunk's per-sample error terms, from the companion solve of its samples
        ``select`` [k, B] (NaN elsewhere); adds the blocks' to ``sums``."""
        nonlocal error_nfe
        block_error, error, companion_nfe = cnf.block_causal_solver_error(model.prior_velocity, u, bs, r, select.to(device), **{**flow, "solver": solver})
        error_nfe += companion_nfe
        block_error, error = block_error.cpu(), error.cpu()
        estimated = ~block_error.isnan()
        sums["block_prior_solver_error"] += block_error.nan_to_num().sum(0)
        sums["block_prior_solver_error_samples"] += estimated.double().sum(0)
        terms = {"prior_solver_error": error}
        if prefix_tokens is not None:
            terms["prior_prefix_solver_error"] = (block_error * prefix_blocks).sum(-1)
        return terms
    for k0 in range(start, start + n_samples, chunk_size):
        indices = range(k0, min(k0 + chunk_size, start + n_samples))
        eps = streams.draws(seed, streams.POSTERIOR, keys, indices, lengths, d).to(device, dtype)
        eps = torch.nn.functional.pad(eps, (0, 0, 0, L - eps.shape[-2]))
        with torch.no_grad():
            z = torch.where(sampled.to(device)[..., None], q.sample(eps), q.mean)  # [k, B, L, d]
            decoder = model.decoder_log_prob(z, batch).double().cpu()  # [k, B, N]
            posterior = q.log_prob(z).cpu()  # [k, B, L]
        probes = None
        if hutchinson:
            probes = streams.draws(seed, streams.PROBE, keys, indices, lengths, d, solver.probe, leading=(solver.n_probes,))
            probes = torch.nn.functional.pad(probes, (0, 0, 0, L - probes.shape[-2])).to(device, dtype)
        shape = (len(indices), B)
        flow = dict(prefix_len=pinned.to(device).expand(shape), lengths=lengths.to(device).expand(shape), probes=probes, seed=seed, solver=main_solver)
        u = to_prior_space(model, z)
        r = cnf.block_causal_log_prob(model.prior_velocity, u, bs, **flow)
        nfe += r.nfe
        if deferred:
            solves.append((u, r, flow))
        block_prior = r.block_logp.cpu() + jacobian  # [k, B, n_blocks], on z
        block_posterior = layout.per_block(posterior * sampled)
        terms = {
            "decoder": (decoder * counted_tokens).sum(-1),
            "prior": block_prior.sum(-1),
            "posterior": block_posterior.sum(-1),
        }
        if prefix_tokens is not None:
            prefix = marginal_terms(layout, decoder * counted_tokens, block_prior, block_posterior, prefix_tokens)
            terms |= dict(zip(("decoder_prefix", "prior_prefix", "posterior_prefix"), prefix))
        if hutchinson:
            terms["prior_probe_se"] = r.logp_se.cpu()
        if with_error and not deferred:
            terms |= companion_terms(u, r, flow, error_subsample(indices, B))
        for name, value in terms.items():
            per_sample.setdefault(name, []).append(value.T)
        sums["token_decoder"] += (decoder * counted_tokens).sum(0)
        sums["block_prior"] += block_prior.sum(0)
        if per_block:
            for name, value in (("prior", block_prior), ("posterior", block_posterior)):
                per_block_terms.setdefault(name, []).append(value.transpose(0, 1))
        if keep_latents:
            latents.append(z)
    per_sample = {name: torch.cat(parts, 1) for name, parts in per_sample.items()}
    if deferred:
        carrying = weight_carrying(per_sample["decoder"] + per_sample["prior"] - per_sample["posterior"])
        if prefix_tokens is not None:
            carrying |= weight_carrying(per_sample["decoder_prefix"] + per_sample["prior_prefix"] - per_sample["posterior_prefix"])
        parts, column = {}, 0
        for u, r, flow in solves:
            for name, value in companion_terms(u, r, flow, carrying[:, column : column + u.shape[0]].T).items():
                parts.setdefault(name, []).append(value.T)
            column += u.shape[0]
        per_sample |= {name: torch.cat(values, 1) for name, values in parts.items()}
    settings = solver.to_attrs()
    if with_error:
        settings["solver_error_nfe"] = error_nfe
    return Draws(
        per_sample=per_sample,
        sums=sums,
        integrated=sampled_per_block > 0,
        counted_tokens=counted_tokens,
        n_samples=torch.full((B,), n_samples, dtype=torch.long),
        nfe=nfe,
        settings=settings,
        blocks={name: torch.cat(parts, 1) for name, parts in per_block_terms.items()},
        latents=torch.cat(latents) if keep_latents else None,
        proposal=q,
    )


def summarise(
    model, batch: TokenBatch, keys: Tensor, draws: Draws, average, se, estimator: str, seed: int, chunk_size: int, *, weighted: bool = False
) -> xr.Dataset:
    """The dataset of ELBO or IWAE: ``log_likelihood = average(log_weight)`` and
    ``log_likelihood_se = se(log_weight)`` (over ``sample``), with units and attributes, and
    ``log_likelihood_solver_error`` (``statistics.solver_error``; ``weighted`` for an
    importance-weighted average)."""
    ds = weights_dataset(draws, keys, draws.log_weight)
    ds["log_likelihood"] = average(ds["log_weight"])
    ds["log_likelihood_se"] = se(ds["log_weight"])
    if "prior_solver_error" in ds:
        ds["log_likelihood_solver_error"] = statistics.solver_error(ds["log_weight"], ds["prior_solver_error"], weighted=weighted)
    ds = units.with_units(ds, batch.n_tokens.numpy(), batch.n_bytes.numpy(), batch.n_words.numpy())
    return describe(ds, model, draws, estimator, seed, chunk_size)


def weights_dataset(draws: Draws, keys: Tensor, log_weight: Tensor) -> xr.Dataset:
    """The per-sample terms, sample means per token and block, and the weight diagnostics.
    ``log_weight``: [B, K]."""
    n = draws.n_samples.double()
    token_mean = torch.where(draws.counted_tokens, draws.sums["token_decoder"] / n[:, None], math.nan)
    block_mean = torch.where(draws.integrated, draws.sums["block_prior"] / n[:, None], math.nan)
    samples = ("sequence", "sample")
    ds = xr.Dataset(
        {
            "log_weight": (samples, log_weight.numpy()),
            "decoder_log_prob": (samples, draws.per_sample["decoder"].numpy()),
            "prior_log_prob": (samples, draws.per_sample["prior"].numpy()),
            "posterior_log_prob": (samples, draws.per_sample["posterior"].numpy()),
            "token_decoder_log_prob": (("sequence", "token"), token_mean.numpy()),
            "block_prior_log_prob": (("sequence", "block"), block_mean.numpy()),
            "n_samples": ("sequence", draws.n_samples.numpy()),
        },
        coords={"sequence": keys.numpy(), "sample": np.arange(log_weight.shape[1])},
    )
    for name in ("prior_probe_se", "prior_solver_error"):
        if name in draws.per_sample:
            ds[name] = (samples, draws.per_sample[name].numpy())
    if "block_prior_solver_error" in draws.sums:
        estimated = draws.sums["block_prior_solver_error_samples"]
        error_mean = torch.where(draws.integrated & (estimated > 0), draws.sums["block_prior_solver_error"] / estimated, math.nan)
        ds["block_prior_solver_error"] = (("sequence", "block"), error_mean.numpy())
    ds["ess"] = statistics.ess(ds["log_weight"])
    ds["khat"] = statistics.pareto_khat(ds["log_weight"])
    ds["khat_threshold"] = statistics.khat_threshold(ds["n_samples"])
    ds["khat_computable"] = statistics.khat_computable(ds["n_samples"])
    return ds


def describe(ds: xr.Dataset, model, draws: Draws, estimator: str, seed: int, chunk_size: int) -> xr.Dataset:
    """Settings as attributes (netCDF-safe: strings and numbers only)."""
    attrs = {
        "estimator": estimator,
        **{k: v for k, v in draws.settings.items() if v is not None},
        "K": int(draws.n_samples.max()),
        "seed": seed,
        "chunk_size": chunk_size,
        "nfe": draws.nfe,
        "block_size": model.block_size,
        "patch_size": model.patch_size,
        "latent_scale": model.latent_scale,
        "latent_shift": model.latent_shift,
    }
    ds.attrs.update(attrs)
    return ds
