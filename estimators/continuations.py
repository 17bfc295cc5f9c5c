"""Continuation scoring for task evaluation: ``log p(continuation | context)`` of every choice
of an item, with the context paid for once.

For an item with context ``c`` (``n_c`` framed tokens: the beginning-of-text token, if the
framing has one, and the context's tokens) and a continuation ``y`` (``n_y`` tokens), the joint
row is ``x = [bos] + c + y`` followed by padding to whole prior blocks, and

    log p(y | c) = log p(x_{< n_c + n_y}) - log p(x_{< n_c}),

both marginal over everything after them: no end-of-text, no padding counts. Each term is
an IWAE-K on the SAME draws (common random numbers), with the prefix-marginal weights of
``colaprob.estimators.conditional`` (a causal decoder, a block-causal prior): for the first
``n`` tokens a draw contributes the decoder terms of those tokens and the prior and posterior
of the latents of the prior blocks covering them,

    w_k(n) = p(x_{<n} | z_k) p(z_k^(covering)) / q(z_k^(covering)).

Consistent, not a bound; the SE of the difference uses the pairing.

Shared context. Blocks wholly inside the context (``F = n_c // (patch_size * block_size)`` of
them) are the same for every choice: their latents are drawn from the posterior of the
context alone (the same random stream for every choice, keyed by the item), and their prior
terms come from ONE ODE solve per item. Each choice then integrates only the blocks from
``F`` on, with the context's latents as clean history (the model's
``prior_velocity_window`` when it has one: the DiT sees only those rows, the clean history's
keys and values computed once per solve; otherwise the full 2L layout, which gives the same
numbers at the full cost). With a causal encoder the context posterior equals each joint
row's, so the result is exactly (to float rounding) the independent per-choice computation
(``share_context=False``) on the same draws; with any encoder the weights stay valid
importance weights (the proposal is the context posterior times the row's).

Framing (the one place it happens; see the README, "Task evaluation"): a context's trailing
whitespace moves to the start of every continuation (lm-evaluation-harness's rule); the
context and the continuation are tokenized separately and concatenated, as generation
conditions on a prompt; continuations are taken as given, so the caller adds the
word-boundary space (the task reader of ``colaprob.tasks`` does). The model's end-of-text
token follows the continuation in the row, as in training: it is never scored, but the encoder
sees it, so the proposal is the posterior the model learned.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from colaprob.estimators import cnf, statistics, streams
from colaprob.estimators.draws import marginal_terms
from colaprob.estimators.layout import LatentLayout
from colaprob.protocol import DiagonalGaussian, TokenBatch, to_prior_space

ESTIMATOR = "IWAE-{K} log p(context + continuation) - IWAE-{K} log p(context), marginal over later tokens, on common random numbers (consistent, not a bound)"


@dataclass
class ContinuationBatch:
    """Joint rows ``[bos] + context + continuation``, one per (item, choice), right-padded to
    whole prior blocks. ``ids``: [R, N]; ``lengths``: [R] padded length of each row (a
    multiple of ``patch_size * block_size``); ``context_tokens``, ``total_tokens``: [R] framed
    tokens of the context (with bos) and of context + continuation; ``item``, ``choice``: [R]
    indices; ``n_bytes``: [R] UTF-8 bytes of the continuation; ``n_items``, ``n_choices``: the
    grid the rows fill (items may have fewer choices)."""

    ids: Tensor
    lengths: Tensor
    context_tokens: Tensor
    total_tokens: Tensor
    item: Tensor
    choice: Tensor
    n_bytes: Tensor
    n_items: int
    n_choices: int

    @classmethod
    def from_tokens(cls, contexts, continuations, multiple: int, pad_id=0, n_bytes=None, end=()) -> "ContinuationBatch":
        """Rows from token ids: ``contexts[i]`` the framed context of item ``i`` (with its bos),
        ``continuations[i][j]`` the ids of its choice ``j``, then the ids ``end`` (never
        counted), then ``pad_id`` up to a multiple of ``multiple`` tokens. ``n_bytes[i][j]``
        (default: the token count)."""
        rows, context_tokens, total_tokens, item, choice, sizes = [], [], [], [], [], []
        for i, (context, choices) in enumerate(zip(contexts, continuations)):
            for j, continuation in enumerate(choices):
                ids = list(context) + list(continuation)
                row = ids + list(end)
                rows.append(row + [pad_id] * (-len(row) % multiple))
                context_tokens.append(len(context))
                total_tokens.append(len(ids))
                item.append(i)
                choice.append(j)
                sizes.append(len(continuation) if n_bytes is None else n_bytes[i][j])
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long if isinstance(pad_id, int) else torch.float64)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=ids.dtype)
        as_long = lambda x: torch.tensor(x, dtype=torch.long)
        return cls(
            ids=ids,
            lengths=as_long([len(r) for r in rows]),
            context_tokens=as_long(context_tokens),
            total_tokens=as_long(total_tokens),
            item=as_long(item),
            choice=as_long(choice),
            n_bytes=as_long(sizes),
            n_items=len(contexts),
            n_choices=max((len(c) for c in continuations), default=0),
        )

    def token_batch(self) -> TokenBatch:
        n = self.total_tokens - self.context_tokens
        return TokenBatch(ids=self.ids, lengths=self.lengths, n_tokens=n, n_bytes=self.n_bytes, n_words=n)


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-evaluation-harness's rule: whitespace that ends the context starts the continuation."""
    kept = context.rstrip()
    return kept, context[len(kept) :] + continuation


def frame_continuations(model, contexts: Sequence[str], continuations: Sequence[Sequence[str]]) -> ContinuationBatch:
    """Frame items for ``score_continuations`` with the model's tokenizer and framing (see the
    module docstring). Raises ValueError naming the argument for malformed input and for a
    row longer than the framing's ``max_tokens``."""
    if isinstance(contexts, str) or not all(isinstance(c, str) for c in contexts):
        raise TypeError("contexts must be a sequence of strings, one per item")
    if len(continuations) != len(contexts):
        raise ValueError(f"continuations must hold one list per context: {len(continuations)} lists for {len(contexts)} contexts")
    for i, choices in enumerate(continuations):
        if isinstance(choices, str) or not len(choices) or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"continuations[{i}] must be a non-empty list of non-empty strings")
    tokenizer, framing = model.tokenizer, model.framing
    bos = [framing.bos_id] if framing.bos_id is not None else []
    context_ids, continuation_ids, n_bytes = [], [], []
    for context, choices in zip(contexts, continuations):
        moved = [move_trailing_space(context, c) for c in choices]
        context_ids.append(bos + tokenizer.encode(moved[0][0]))
        continuation_ids.append([tokenizer.encode(cont) for _, cont in moved])
        n_bytes.append([len(cont.encode("utf-8")) for _, cont in moved])
    # The end-of-text token after the continuation is not scored (the score is marginal over
    # it), but the encoder sees it: the posterior is then the one the model was trained to
    # produce, a far better proposal. On the embedded model, a 35-token text without it scored
    # 38 nats below the same text's IWAE-16 (-176.3 against -137.9 nats).
    end = [framing.eos_id] if framing.eos_id is not None else []
    batch = ContinuationBatch.from_tokens(context_ids, continuation_ids, model.patch_size * model.block_size, framing.pad_id, n_bytes, end)
    if framing.max_tokens is not None and len(batch.lengths) and int(batch.lengths.max()) > framing.max_tokens:
        r = int(batch.lengths.argmax())
        raise ValueError(
            f"item {int(batch.item[r])}, continuation {int(batch.choice[r])} is {int(batch.lengths[r])} tokens long once framed, "
            f"more than the model's limit of {framing.max_tokens}; shorten the context"
        )
    return batch


def continuation_log_prob(
    model,
    contexts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    n_samples: int = 16,
    *,
    seed: int = 0,
    item_ids: Sequence[int] | None = None,
    chunk_size: int = 32,
    share_context: bool = True,
    solver: cnf.Solver | None = None,
    **solver_keywords,
) -> xr.Dataset:
    """``log p(continuation | context)`` of every continuation of every item (module
    docstring), for a model with a tokenizer and a framing.

    ``contexts``: one string per item ("" allowed: the continuation is then scored after the
    beginning-of-text token alone, or unconditionally without one); ``continuations``: per
    item, one or more non-empty strings, each carrying its leading word-boundary space where
    the task has one. ``n_samples``: K posterior draws shared by all continuations of an item;
    ``item_ids``: non-negative ints keying each item's random stream (default: the row index).
    ``share_context``: False integrates every row's whole sequence (the independent
    per-choice path; the same numbers with a causal encoder, at a higher cost). Other
    arguments as ``colaprob.estimators.iwae.iwae``.

    Returns a Dataset with dims ``item``, ``choice`` (padded to the largest number of
    continuations; ``choice_valid`` says which exist), ``sample``: ``log_likelihood`` and
    ``log_likelihood_se`` (nats), ``log_joint``, ``log_context`` and their ``_se``,
    ``log_weight``, ``log_weight_context`` [item, choice, sample], ``n_tokens``, ``n_bytes``
    of the continuation alone, ``context_tokens``, ``khat``, ``khat_context``, ``ess``,
    ``context_heavy_tailed`` (k-hat of the context term computable and above its threshold;
    a warning names these rows); with ``solver_error`` (a field of the solver) also
    ``log_joint_solver_error``, ``log_context_solver_error`` and their sum
    ``log_likelihood_solver_error`` (nats, apart from the Monte Carlo ``log_likelihood_se``);
    with the
    estimator, solver settings and cost (``nfe``, ``dit_rows``: positions the prior network
    was evaluated at, summed over evaluations) as attributes.
    """
    batch = frame_continuations(model, contexts, continuations)
    return score_continuations(
        model, batch, n_samples, seed=seed, item_ids=item_ids, chunk_size=chunk_size, share_context=share_context, solver=solver, **solver_keywords
    )


def score_continuations(
    model,
    batch: ContinuationBatch,
    n_samples: int = 16,
    *,
    seed: int = 0,
    item_ids: Sequence[int] | None = None,
    chunk_size: int = 32,
    share_context: bool = True,
    solver: cnf.Solver | None = None,
    **solver_keywords,
) -> xr.Dataset:
    """``continuation_log_prob`` on framed rows: any model of ``colaprob.protocol`` (no
    tokenizer needed), for example the tractable models of ``colaprob.testing``."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, not {n_samples!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, not {chunk_size!r}")
    keys = torch.arange(batch.n_items) if item_ids is None else torch.as_tensor(list(item_ids), dtype=torch.long).reshape(-1)
    if len(keys) != batch.n_items or (keys < 0).any():
        raise ValueError("item_ids must be one non-negative integer per item")
    solver = cnf.Solver.build(solver, **solver_keywords)
    cost = _Cost()
    parts, settings = [], {}
    for k0 in range(0, n_samples, chunk_size):
        indices = range(k0, min(k0 + chunk_size, n_samples))
        weights, settings = _weights(model, batch, keys, indices, seed, solver, share_context, cost)
        parts.append(weights)
    settings.update(solver.to_attrs())  # the probes were drawn here, of the solver's kind
    weights = {name: torch.cat([part[name] for part in parts], 0) for name in parts[0]}
    return _dataset(model, batch, keys, weights, settings, cost, n_samples, seed, chunk_size, share_context)


@dataclass
class _Cost:
    """What the prior network was asked for: ODE right-hand-side evaluations and the latent
    positions (rows) it saw in them, plus the clean-history rows computed once per solve."""

    nfe: int = 0
    dit_rows: int = 0
    history_rows: int = 0
    error_nfe: int = 0


def _weights(model, batch, keys, indices, seed, solver, share_context, cost):
    """Log-weights of samples ``indices`` by name, each [k, R] float64: ``joint`` and
    ``context``, and with ``solver.solver_error`` their solver errors ``joint_error`` and
    ``context_error`` (the covering blocks' estimated errors, summed); and the settings."""
    P, bs, d = model.patch_size, model.block_size, model.latent_dim
    rows = batch.token_batch()
    R, N = rows.ids.shape
    with torch.no_grad():
        q = model.posterior(rows)
    device, dtype = q.mean.device, q.mean.dtype
    L = q.mean.shape[-2]
    layout = LatentLayout.of(model, rows)
    shared_blocks = batch.context_tokens // (P * bs) if share_context else torch.zeros(R, dtype=torch.long)
    shared = layout.position_mask(shared_blocks * bs)  # [R, L]
    first_row = _first_rows(batch)  # [n_items] the row that stands for each item
    if shared.any():
        q = _with_context_posterior(model, batch, q, shared_blocks, first_row)
    row_keys = keys[batch.item]
    latent_lengths = layout.positions()
    eps = streams.draws(seed, streams.POSTERIOR, row_keys, indices, latent_lengths, d)
    eps = torch.nn.functional.pad(eps, (0, 0, 0, L - eps.shape[-2])).to(device, dtype)
    probes = None
    if solver.hutchinson:
        probes = streams.draws(seed, streams.PROBE, row_keys, indices, latent_lengths, d, solver.probe, leading=(solver.n_probes,))
        probes = torch.nn.functional.pad(probes, (0, 0, 0, L - probes.shape[-2])).to(device, dtype)
    with torch.no_grad():
        z = q.sample(eps)  # [k, R, L, d]
        decoder = model.decoder_log_prob(z, rows).double().cpu()  # [k, R, N]
        posterior = q.log_prob(z).cpu()  # [k, R, L]
    u = to_prior_space(model, z)
    options = dict(seed=seed, solver=solver)
    block_prior, block_error, settings = _block_prior(model, u, probes, shared_blocks, layout.blocks(batch.total_tokens), batch, first_row, cost, options)
    block_prior = block_prior + bs * d * math.log(abs(model.latent_scale))  # on z, per whole block

    block_posterior = layout.per_block(posterior)

    def log_weight(n_tokens: Tensor) -> Tensor:
        dec, prior, post = marginal_terms(layout, decoder, block_prior, block_posterior, n_tokens)
        return dec + prior - post

    weights = {"joint": log_weight(batch.total_tokens), "context": log_weight(batch.context_tokens)}
    if block_error is not None:
        for name, tokens in (("joint", batch.total_tokens), ("context", batch.context_tokens)):
            weights[f"{name}_error"] = (block_error * layout.block_mask(tokens)).sum(-1)
    return weights, settings


def _first_rows(batch: ContinuationBatch) -> Tensor:
    """[n_items] the first row of every item."""
    first = torch.full((batch.n_items,), -1, dtype=torch.long)
    for r in reversed(range(len(batch.item))):
        first[batch.item[r]] = r
    return first


def _with_context_posterior(model, batch, q, shared_blocks, first_row) -> DiagonalGaussian:
    """``q`` with the latents of the shared context blocks taken from the posterior of the
    context alone (those blocks' tokens only), identical for every choice of an item."""
    P, bs = model.patch_size, model.block_size
    ctx_tokens = shared_blocks[first_row] * bs * P  # [n_items]
    items = torch.nonzero(ctx_tokens > 0)[:, 0]
    width = int(ctx_tokens.max())
    ids = batch.ids[first_row[items], :width]
    alone = TokenBatch(ids=ids, lengths=ctx_tokens[items], n_tokens=ctx_tokens[items], n_bytes=ctx_tokens[items], n_words=ctx_tokens[items])
    with torch.no_grad():
        qc = model.posterior(alone)  # [I', Lc, d]
    slot = torch.full((batch.n_items,), -1, dtype=torch.long)
    slot[items] = torch.arange(len(items))
    L, Lc = q.mean.shape[-2], qc.mean.shape[-2]
    where = (torch.arange(L) < (shared_blocks * bs)[:, None])[..., None].to(q.mean.device)  # [R, L, 1]
    source = slot[batch.item].clamp_min(0)
    pad = lambda x: torch.nn.functional.pad(x[source], (0, 0, 0, L - Lc))
    return DiagonalGaussian(torch.where(where, pad(qc.mean), q.mean), torch.where(where, pad(qc.logvar), q.logvar))


def _block_prior(model, u, probes, shared_blocks, joint_blocks, batch, first_row, cost, options):
    """``log p(u^(b) | u^(<b))`` per row and absolute block, [k, R, n_blocks] float64 (0 beyond
    a row's covering blocks), each block's estimated solver error in the same layout (None
    without ``solver_error``), and the solver settings. Shared context blocks come from one
    solve per item; the rest from one solve per group of rows that share where it starts."""
    bs = model.block_size
    k, R, L, d = u.shape
    n_blocks = -(-L // bs)
    out = torch.zeros(k, R, n_blocks, dtype=torch.float64)
    error = torch.zeros(k, R, n_blocks, dtype=torch.float64) if options["solver"].solver_error else None
    settings = {}
    ctx_blocks = shared_blocks[first_row]  # [n_items]
    items = torch.nonzero(ctx_blocks > 0)[:, 0]
    if len(items):  # the context: once per item
        width = int(ctx_blocks[items].max()) * bs
        z0 = u[:, first_row[items], :width].contiguous()
        p = None if probes is None else probes[:, :, first_row[items], :width].contiguous()
        r = cnf.block_causal_log_prob(_counted(model.prior_velocity, cost, d), z0, bs, lengths=(ctx_blocks[items] * bs).to(u.device).expand(k, -1), probes=p, **options)
        _count_history(model, cost, z0, d)
        cost.nfe, cost.error_nfe = cost.nfe + r.nfe, cost.error_nfe + r.error_nfe
        in_context = torch.arange(r.block_logp.shape[-1]) < shared_blocks[:, None]
        for target, values in ((out, r.block_logp), (error, r.block_logp_error)):
            if target is not None:
                per_item = torch.zeros(k, batch.n_items, values.shape[-1], dtype=torch.float64)
                per_item[:, items] = values.cpu()
                target[..., : values.shape[-1]] += per_item[:, batch.item] * in_context  # [k, R, nbc] per row
    for start in shared_blocks.unique().tolist():  # each choice: the blocks its continuation touches
        group = torch.nonzero(shared_blocks == start)[:, 0]
        s, end = start * bs, int(joint_blocks[group].max()) * bs
        history = u[:, group, :end].contiguous()  # clean: the context's and the choice's own latents
        z0 = history[..., s:, :]
        p = None if probes is None else probes[:, :, group, s:end].contiguous()
        velocity = _window_velocity(model, history, s, cost, d)
        lengths = (joint_blocks[group] * bs - s).to(u.device).expand(k, -1)
        r = cnf.block_causal_log_prob(velocity, z0, bs, lengths=lengths, probes=p, **options)
        _count_history(model, cost, history, d)
        cost.nfe, cost.error_nfe = cost.nfe + r.nfe, cost.error_nfe + r.error_nfe
        settings = r.settings
        out[:, group, start : start + r.block_logp.shape[-1]] = r.block_logp.cpu()
        if error is not None:
            error[:, group, start : start + r.block_logp.shape[-1]] = r.block_logp_error.cpu()
    return out, error, settings


def _counted(velocity, cost: _Cost, d: int):
    """``velocity`` that adds the rows it is evaluated at to ``cost``."""

    def counted(u_t, t, clean):
        cost.dit_rows += u_t.numel() // d
        return velocity(u_t, t, clean)

    return counted


def _count_history(model, cost: _Cost, clean: Tensor, d: int) -> None:
    """A model that caches the clean history computes it once per solve: its rows."""
    if getattr(model, "cache_clean_history", False):
        cost.history_rows += clean.numel() // d


def _window_velocity(model, history: Tensor, start: int, cost: _Cost, d: int):
    """The velocity of positions ``start ..`` of ``history`` [..., E, d] (a multiple of the
    block size) given the clean history before them: ``velocity(u_t, t, clean)`` with ``u_t``
    [..., E - start, d] as ``cnf.block_causal_log_prob`` calls it (its ``clean`` is the
    window's own part of ``history``). A model with ``prior_velocity_window`` evaluates those
    rows only; otherwise the window is padded back to the full 2L layout with the history at
    ``t = 0`` (exact by block causality: block ``b`` sees only clean blocks ``< b``)."""
    window = getattr(model, "prior_velocity_window", None)

    def velocity(u_t: Tensor, t: Tensor, clean: Tensor) -> Tensor:
        if window is not None:
            cost.dit_rows += u_t.numel() // d
            return window(u_t, t, history, start)
        full_u = torch.cat([history[..., :start, :], u_t], -2)
        t = torch.as_tensor(t, dtype=u_t.dtype, device=u_t.device).expand(u_t.shape[:-1])
        full_t = torch.cat([t.new_zeros(*t.shape[:-1], start), t], -1)
        cost.dit_rows += full_u.numel() // d
        return model.prior_velocity(full_u, full_t, history)[..., start:, :]

    return velocity


def _dataset(model, batch, keys, weights, settings, cost, n_samples, seed, chunk_size, share_context) -> xr.Dataset:
    """Scatter the rows' [K, R] log-weights (and solver errors) to [item, choice, sample] and
    summarise."""
    I, C = batch.n_items, batch.n_choices
    dims = ("item", "choice", "sample")

    def grid(values: Tensor):
        out = np.full((I, C, n_samples), np.nan)
        out[batch.item.numpy(), batch.choice.numpy()] = values.T.numpy()
        return (dims, out)

    coords = {"item": keys.numpy(), "choice": np.arange(C), "sample": np.arange(n_samples)}
    ds = xr.Dataset({"log_weight": grid(weights["joint"]), "log_weight_context": grid(weights["context"])}, coords=coords)
    if "joint_error" in weights:
        for name, weight in (("joint", "log_weight"), ("context", "log_weight_context")):
            ds[f"log_{name}_solver_error"] = statistics.solver_error(ds[weight], xr.DataArray(grid(weights[f"{name}_error"])[1], dims=dims), weighted=True)
        # The two solver errors need not cancel: the difference's is at most their sum.
        ds["log_likelihood_solver_error"] = ds["log_joint_solver_error"] + ds["log_context_solver_error"]
        settings = {**settings, "solver_error_nfe": cost.error_nfe}

    def per_row(values, fill, dtype):
        out = np.full((I, C), fill, dtype=dtype)
        out[batch.item.numpy(), batch.choice.numpy()] = values.numpy()
        return (("item", "choice"), out)

    ds["choice_valid"] = per_row(torch.ones(len(batch.item), dtype=torch.bool), False, bool)
    ds["n_tokens"] = per_row(batch.total_tokens - batch.context_tokens, 0, np.int64)
    ds["n_bytes"] = per_row(batch.n_bytes, 0, np.int64)
    ds["context_tokens"] = per_row(batch.context_tokens, 0, np.int64)
    ds["log_joint"] = statistics.log_mean_exp(ds["log_weight"])
    ds["log_joint_se"] = statistics.log_mean_exp_se(ds["log_weight"])
    ds["log_context"] = statistics.log_mean_exp(ds["log_weight_context"])
    ds["log_context_se"] = statistics.log_mean_exp_se(ds["log_weight_context"])
    ds["log_likelihood"] = ds["log_joint"] - ds["log_context"]
    ds["log_likelihood_se"] = statistics.paired_log_mean_exp_se(ds["log_weight"], ds["log_weight_context"])
    ds["khat"] = statistics.pareto_khat(ds["log_weight"])
    ds["khat_context"] = statistics.pareto_khat(ds["log_weight_context"])
    ds["khat_threshold"] = statistics.khat_threshold(n_samples)
    ds["ess"] = statistics.ess(ds["log_weight"])
    # The context term's covering block is drawn from the joint row's posterior, which has
    # seen the continuation: where the context ends inside a block its weights can be
    # heavy-tailed (see colaprob.estimators.conditional); say so where k-hat can tell.
    ds["context_heavy_tailed"] = bool(statistics.khat_computable(n_samples)) & (ds["khat_context"] > ds["khat_threshold"])
    if ds["context_heavy_tailed"].any():
        where = np.argwhere(ds["context_heavy_tailed"].values)
        named = ", ".join(f"item {ds.item.values[i]} choice {c}" for i, c in where)
        warnings.warn(
            f"the context term log p(context) of {named} has heavy-tailed importance weights (k-hat above its threshold), "
            "so its value and standard error may be far off; use more samples (K) and see context_heavy_tailed.",
            stacklevel=3,
        )
    ds.attrs.update(
        {
            "estimator": ESTIMATOR.format(K=n_samples),
            **{key: value for key, value in settings.items() if value is not None},
            "K": n_samples,
            "seed": seed,
            "chunk_size": chunk_size,
            "share_context": int(share_context),
            "nfe": cost.nfe,
            "dit_rows": cost.dit_rows,
            "dit_history_rows": cost.history_rows,
            "block_size": model.block_size,
            "patch_size": model.patch_size,
            "latent_scale": model.latent_scale,
            "latent_shift": model.latent_shift,
        }
    )
    return ds
