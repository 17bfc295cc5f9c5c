"""Why likelihood and generation disagree: per-token and per-block probes of one text.

Generation needs prior mass to *reach* the region around the gold latent that the decoder
turns into the gold token; likelihood needs the prior *density* to be calibrated right at the
gold posterior. The probes measure both, token by token, next to the token's share of the
ELBO. For text ``x`` with posterior ``q(z|x)``, posterior mean ``m`` and prior block ``b``:

* ``decoder_probe``: ``argmax_v p_theta(v | m) == x_i`` -- the decoder can read the token
  from the posterior mean at all.
* ``posterior_hit``: ``P_{z ~ q(z|x)}[argmax p_theta(. | z) == x_i]`` -- the whole latent
  sampled from the posterior, estimated from ``n_posterior`` samples.
* ``prior_hit``: ``P_{z^(b) ~ p_psi(. | m^(<b))}[argmax p_theta(. | m with block b := z^(b))
  == x_i]`` -- block ``b`` drawn from the prior given the gold history (teacher forcing, the
  ODE sampler), the other blocks kept at the posterior mean; ``n_prior`` samples. This is the
  probability that greedy decoding of a teacher-forced generated block gives the gold token.
* ``generation_prob``: ``E_{z^(b) ~ p_psi(. | m^(<b))}[p_theta(x_i | ...)]`` on the same prior
  samples -- the probability that generation with *sampled* decoding gives the gold token:
  where the prior puts its mass, times what the decoder makes of it there.
* ``gold_log_prob``: ``log p_psi(m^(b) | m^(<b))`` (posterior space) and
  ``density_percentile``: the fraction of the block's prior samples whose own ``log p_psi(.
  | m^(<b))`` is at most that -- 0.5: the gold latent is as dense as a typical sample; near 0:
  the prior puts little density on it (whatever mass it puts nearby); near 1: denser than
  the prior's own samples (a mode).
* the likelihood side: ``token_log_prob = E_q[log p_theta(x_i | z)]``, the block's prior
  term ``block_prior_log_prob = E_q[log p_psi(z^(b) | z^(<b))]`` and its rate ``block_kl =
  E_q[log q(z^(b)|x) - log p_psi(z^(b) | z^(<b))]`` (on the posterior's own samples, each
  block given the sampled history, as in the ELBO), the rate's per-token share
  ``block_kl_share = block_kl / (patch_size * block_size)``, and ``token_elbo =
  token_log_prob - block_kl_share``, which sums over a sequence's tokens to its ELBO.

``summarize`` turns the per-token table into the corpus view: how often tokens with a high
likelihood-perplexity are still generated correctly.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from colaprob.diagnostics._latent import (
    chunks,
    decode_gold,
    prior_block_log_prob,
    prior_samples,
    standard_normal,
)
from colaprob.estimators import cnf, streams
from colaprob.estimators.draws import draw
from colaprob.estimators.layout import LatentLayout
from colaprob.protocol import LatentModel, TokenBatch

PROBES = ("prior_hit", "posterior_hit", "decoder_probe", "generation_prob")
"""The per-token probes ``summarize`` bins against the likelihood."""


def probes(
    model: LatentModel,
    batch: TokenBatch,
    *,
    n_posterior: int = 16,
    n_prior: int = 16,
    batch_size: int = 4,
    chunk_size: int | None = None,
    seed: int = 0,
    solver: cnf.Solver | None = None,
    sampler: cnf.Solver = cnf.SAMPLER,
    progress: bool = True,
    **solver_keywords,
) -> xr.Dataset:
    """Per-token and per-block probes of every sequence in ``batch`` (module docstring);
    ``solver``: how the prior's CNF is solved (``cnf.Solver``, or its fields as keywords);
    ``sampler``: the solver of the prior draws; ``batch_size`` sequences per model call and
    ``chunk_size`` posterior samples solved together (default: all); ``progress``: a
    progress bar over the batches.

    Returns an ``xarray.Dataset`` with, over ``(sequence, token)``: ``token_id``, ``valid``,
    ``decoder_probe``, ``posterior_hit``, ``prior_hit``, ``generation_prob``,
    ``token_log_prob``, ``block_kl_share``, ``token_elbo``; over ``(sequence, block)``:
    ``block_valid``, ``block_kl``, ``block_prior_log_prob``, ``gold_log_prob``,
    ``density_percentile``; over
    ``(prior_sample, sequence, block)``: ``prior_sample_log_prob``. Log-densities in nats on the
    posterior's space; hit rates in [0, 1]. Invalid (padding) entries are NaN. The coordinate
    ``token_block`` gives each token's prior block.
    """
    solver = cnf.Solver.build(solver, **solver_keywords)
    n_seq, n_tok = batch.ids.shape
    grid = LatentLayout.of(model, batch)
    n_blk = grid.n_blocks
    # Per-sequence random streams: the numbers do not depend on ``batch_size``, and the
    # posterior draws are those of ``colaprob.estimators.elbo`` with this seed.
    keys = streams.sequence_keys(batch)
    prior_noise = standard_normal(model, batch, n_prior, seed, stream=streams.PRIOR_SAMPLE)
    layout = _layout(n_seq, n_tok, n_blk, n_prior)
    out = {name: np.full(shape, np.nan) for name, (_, shape) in layout.items()}
    for rows in chunks(n_seq, batch_size, "probes", progress):
        sub = batch.select(rows)
        drawn = draw(model, sub, n_posterior, seed=seed, keys=keys[rows], chunk_size=chunk_size or n_posterior, solver=solver, per_block=True, keep_latents=True)
        for name, value in _probe_chunk(model, sub, drawn, prior_noise[:, rows], seed, solver, sampler).items():
            out[name][..., rows, : value.shape[-1]] = value
    valid, bvalid = grid.token_mask(), grid.block_mask()
    ds = xr.Dataset(
        {name: (dims, np.where(bvalid if dims[-1] == "block" else valid, out[name], np.nan)) for name, (dims, _) in layout.items()}
        | {
            "token_id": (("sequence", "token"), batch.ids.numpy()),
            "valid": (("sequence", "token"), valid.numpy()),
            "block_valid": (("sequence", "block"), bvalid.numpy()),
        },
        coords={
            "sequence": np.arange(n_seq),
            "token": np.arange(n_tok),
            "block": np.arange(n_blk),
            "token_block": ("token", grid.block_of_token().numpy()),
        },
    )
    ds["token_elbo"] = ds["token_log_prob"] - ds["block_kl_share"]
    ds.attrs.update(
        units="nats (log-densities on the posterior's space); probabilities in [0, 1]",
        n_posterior=n_posterior,
        n_prior=n_prior,
        **solver.to_attrs(),
        sampler=sampler.label,
        seed=seed,
        prior_samples="teacher-forced: block b drawn from p_psi(. | posterior means of blocks < b) by the ODE sampler",
        prior_hit_decoding="block b replaced by the prior sample, other blocks at the posterior mean; argmax decoding",
        posterior_hit_decoding="the whole latent sampled from q(z|x); argmax decoding",
        tokens_per_block=grid.tokens_per_block,
    )
    return ds


def _layout(n_seq: int, n_tok: int, n_blk: int, n_prior: int) -> dict:
    """Name -> (dims, shape) of the probe arrays that are estimated (NaN where padding)."""
    tok, blk = (("sequence", "token"), (n_seq, n_tok)), (("sequence", "block"), (n_seq, n_blk))
    return {
        "decoder_probe": tok,
        "posterior_hit": tok,
        "prior_hit": tok,
        "generation_prob": tok,
        "token_log_prob": tok,
        "block_kl_share": tok,
        "block_kl": blk,
        "block_prior_log_prob": blk,
        "gold_log_prob": blk,
        "density_percentile": blk,
        "prior_sample_log_prob": (("prior_sample", "sequence", "block"), (n_prior, n_seq, n_blk)),
    }


def _probe_chunk(model, batch, drawn, prior_noise, seed, solver, sampler) -> dict:
    """The probes of one sub-batch as float64 arrays (token and block axes as long as its
    longest sequence). ``drawn``: its posterior draws and their weight terms per block
    (``colaprob.estimators.draws``); ``prior_noise``: standard-normal draws for the prior
    sampler, [n_prior, B, >= L, d]."""
    ids, layout = batch.ids, LatentLayout.of(model, batch)
    with torch.no_grad():
        mean = drawn.proposal.mean
        n_pos = mean.shape[-2]
        n_blk = n_pos // model.block_size
        decoder_probe = model.decoder_logits(mean, batch).argmax(-1) == ids

        # Posterior side: the whole latent from q(z|x).
        post_argmax = model.decoder_logits(drawn.latents, batch).argmax(-1)

        # Prior side: block b from p_psi(. | gold history), decoded with the rest at the mean.
        z_prior = prior_samples(model, mean, prior_noise[:, :, :n_pos], sampler=sampler)
        position_block = torch.arange(mean.shape[-2]) // model.block_size
        token_block = layout.block_of_token()
        prior_hit = torch.zeros(ids.shape, dtype=torch.float64)
        generation_prob = torch.zeros(ids.shape, dtype=torch.float64)
        for b in range(n_blk):
            in_block = (position_block == b)[:, None]
            logp, argmax = decode_gold(model, torch.where(in_block, z_prior, mean), batch)
            tokens = token_block == b
            prior_hit[:, tokens] = (argmax == ids).double().mean(0)[:, tokens]
            generation_prob[:, tokens] = logp.exp().mean(0)[:, tokens]

    # Prior densities need autograd (the CNF divergence), so they sit outside no_grad.
    density = dict(lengths=layout.blocks() * model.block_size, seed=seed, solver=solver)
    block_prior = drawn.blocks["prior"].transpose(0, 1)  # [K, B, n_blocks], the ELBO's own terms
    block_kl = (drawn.blocks["posterior"].transpose(0, 1) - block_prior).mean(0)
    gold_log_prob = prior_block_log_prob(model, mean, **density)
    sample_log_prob = prior_block_log_prob(model, z_prior, history=mean, **density)
    values = {
        "decoder_probe": decoder_probe,
        "posterior_hit": (post_argmax == ids).double().mean(0),
        "prior_hit": prior_hit,
        "generation_prob": generation_prob,
        "token_log_prob": drawn.sums["token_decoder"] / drawn.n_samples[:, None].double(),
        "block_kl_share": block_kl[:, token_block] / layout.tokens_per_block,
        "block_kl": block_kl,
        "block_prior_log_prob": block_prior.mean(0),
        "gold_log_prob": gold_log_prob,
        "density_percentile": (sample_log_prob <= gold_log_prob).double().mean(0),
        "prior_sample_log_prob": sample_log_prob,
    }
    return {name: value.double().numpy() for name, value in values.items()}


def summarize(
    ds: xr.Dataset, *, nll_threshold: float | None = None, hit_threshold: float = 0.5, n_bins: int = 8
) -> xr.Dataset:
    """Corpus view of ``probes`` output: likelihood against generation, token by token.

    A token's likelihood cost is ``nll = -token_elbo`` (nats; its share of the negative ELBO).
    Tokens are "high-NLL" when ``nll > nll_threshold`` (default: the median over valid
    tokens) and "generated" when ``prior_hit >= hit_threshold``. Returns ``count`` over
    ``(likelihood, generation)`` = ``{low_nll, high_nll} x {generated, missed}``;
    ``high_nll_generated_fraction`` (how often a token the likelihood finds hard is still
    generated) and ``low_nll_missed_fraction``; over ``nll_bin`` (equal-count bins of
    ``nll``): ``nll_center`` (median), ``n_tokens`` and the mean ``prior_hit``,
    ``posterior_hit``, ``decoder_probe``, ``generation_prob``; ``spearman_nll_prior_hit``;
    and per-block ``density_percentile`` summaries (mean, fraction below 0.05).
    """
    from scipy.stats import spearmanr

    valid = ds["valid"].values
    take = lambda name: ds[name].values[valid]  # noqa: E731 -- flat over valid tokens
    nll, hit = -take("token_elbo"), take("prior_hit")
    threshold = float(np.median(nll)) if nll_threshold is None else float(nll_threshold)
    high, generated = nll > threshold, hit >= hit_threshold
    count = np.array([[np.sum(~high & generated), np.sum(~high & ~generated)], [np.sum(high & generated), np.sum(high & ~generated)]])
    edges = np.unique(np.quantile(nll, np.linspace(0, 1, n_bins + 1)))
    which = np.clip(np.searchsorted(edges, nll, side="right") - 1, 0, len(edges) - 2)
    bins = range(len(edges) - 1)
    per_bin = lambda x, f=np.mean: np.array([f(x[which == k]) if np.any(which == k) else np.nan for k in bins])  # noqa: E731
    percentile = ds["density_percentile"].values[ds["block_valid"].values]
    out = xr.Dataset(
        {
            "count": (("likelihood", "generation"), count),
            "high_nll_generated_fraction": count[1, 0] / max(1, count[1].sum()),
            "low_nll_missed_fraction": count[0, 1] / max(1, count[0].sum()),
            "nll_center": ("nll_bin", per_bin(nll, np.median)),
            "nll_edge_low": ("nll_bin", edges[:-1]),
            "nll_edge_high": ("nll_bin", edges[1:]),
            "n_tokens": ("nll_bin", per_bin(nll, np.size)),
            **{f"{name}_by_nll": ("nll_bin", per_bin(take(name))) for name in PROBES},
            "spearman_nll_prior_hit": float(spearmanr(nll, hit).statistic) if np.ptp(hit) > 0 else np.nan,
            "density_percentile_mean": float(np.mean(percentile)),
            "density_percentile_below_5pct": float(np.mean(percentile < 0.05)),
            "nll_threshold": threshold,
            "hit_threshold": hit_threshold,
        },
        coords={"likelihood": ["low_nll", "high_nll"], "generation": ["generated", "missed"], "nll_bin": np.arange(len(edges) - 1)},
    )
    out.attrs.update(
        units="nll in nats per token (-token_elbo); rates in [0, 1]",
        definition=(
            f"high_nll: nll > {threshold:.4g} nats ({'median' if nll_threshold is None else 'given'}); "
            f"generated: prior_hit >= {hit_threshold}"
        ),
    )
    return out
