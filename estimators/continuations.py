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

The context term's proposal has seen the context only (``draws.prefix_only_proposal``: for
Cola the encoder on the context framed as a whole text, its end-of-text token and padding
filling the block the context ends inside). The joint row's posterior has seen the
continuation in that block, so its weights for ``p(x_{< n_c})`` are heavy-tailed and differ
from choice to choice (on a tractable model up to 1.45 nats, 12 SE, off at K = 4096; on the
embedded model the context terms of one item's choices spread over up to 11 nats). So the
context term is one number per item, whatever the choices. The same holds for a joint that
ends inside a prior block: the row's posterior has seen what follows it (for Cola the
end-of-text token and padding, which is the joint framed as a whole text, so nothing
changes; for a model without one, padding it has read as tokens), and those blocks draw from
the joint's prefix-only proposal.

Shared context. Blocks wholly inside the context (``F = n_c // (patch_size * block_size)`` of
them) are the same for every choice: their latents are the context term's draws (the same
random stream for every choice, keyed by the item), and their prior terms come from the
context term's ODE solve, ONE per item over the blocks covering the context. Each choice then
integrates only the blocks from ``F`` on, with the context's latents as clean history (the
model's ``prior_velocity_window`` when it has one: the DiT sees only those rows, the clean
history's keys and values computed once per solve; otherwise the full 2L layout, which gives
the same numbers at the full cost). With a causal encoder the context posterior equals each
joint row's there, so the result is exactly (to float rounding) the independent per-choice
computation (``share_context=False``: every row integrates its whole sequence, and its
context term is solved for it alone) on the same draws; with any encoder the weights stay
valid importance weights.

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
from colaprob.estimators.draws import covering_rows, marginal_terms, prefix_only_proposal, weight_carrying
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
    ``context_heavy_tailed`` and ``joint_heavy_tailed`` (k-hat of that term computable and
    above its threshold; a warning names the items); with ``solver_error`` (a field of the solver) also
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
    parts, solves, settings = [], [], {}
    # The solver error's companion waits until every sample's weight is known: only the
    # samples that carry weight get one (``draws.weight_carrying``).
    main = solver.replace(solver_error=False)
    for k0 in range(0, n_samples, chunk_size):
        indices = range(k0, min(k0 + chunk_size, n_samples))
        weights, chunk_solves, settings = _weights(model, batch, keys, indices, seed, main, share_context, cost)
        parts.append(weights)
        solves.append(chunk_solves)
    settings.update(solver.to_attrs())  # the probes were drawn here, of the solver's kind
    weights = {name: torch.cat([part[name] for part in parts], 0) for name in parts[0]}
    if solver.solver_error:
        weights |= _solver_errors(weights, solves, solver, cost)
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
    ``context``; the solves behind them (``_Solves``, for their solver errors); and the
    settings."""
    P, bs = model.patch_size, model.block_size
    rows = batch.token_batch()
    q = _joint_proposal(model, rows, batch.total_tokens)
    layout = LatentLayout.of(model, rows)
    context = _Context.of(model, batch, keys, share_context)
    shared_blocks = batch.context_tokens // (P * bs) if share_context else torch.zeros(len(batch.item), dtype=torch.long)
    if shared_blocks.any():
        q = context.in_rows(q, shared_blocks * bs)
    options = dict(seed=seed, solver=solver)
    eps, probes = _streams(q, keys[batch.item], indices, layout.positions(), options)
    with torch.no_grad():
        z = q.sample(eps)  # [k, R, L, d]
        decoder = model.decoder_log_prob(z, rows).double().cpu()  # [k, R, N]
        posterior = q.log_prob(z).cpu()  # [k, R, L]
    u = to_prior_space(model, z)
    weights, context_solve, settings = context.weights(model, indices, cost, options)
    block_prior, window_solves, row_settings = _block_prior(model, u, probes, shared_blocks, layout.blocks(batch.total_tokens), context, context_solve, cost, options)
    weights["joint"] = _marginal_log_weight(model, layout, decoder, block_prior, posterior, batch.total_tokens)
    solves = _Solves(context_solve, window_solves, shared_blocks, layout.block_mask(batch.total_tokens))
    return weights, solves, row_settings or settings


@dataclass
class _Solve:
    """One finished block-causal solve, kept for its companion: ``velocity_of(select)`` the
    velocity of its elements ``select`` [k, n] alone (in ``z0[select]``'s order), ``z0`` [k, n,
    L, d], ``lengths``, ``probes``, the result ``solved``; ``rows`` [n] the rows of its second
    dim (for the contexts' solve: each row's context, -1 without one), ``start`` its first
    absolute block, and ``blocks`` [n, n_blocks] the blocks each element's own term covers
    (the contexts')."""

    velocity_of: object
    z0: Tensor
    lengths: Tensor
    probes: Tensor | None
    solved: cnf.BlockLogProb
    rows: Tensor
    start: int = 0
    blocks: Tensor | None = None


@dataclass
class _Solves:
    """A chunk's solves: the contexts' (``context``; None without contexts) and the joint
    rows' windows, with the rows' ``shared_blocks`` [R] (taken from their context's solve)
    and ``joint_blocks`` [R, n_blocks] (the blocks their joint covers)."""

    context: _Solve | None
    windows: list[_Solve]
    shared_blocks: Tensor
    joint_blocks: Tensor


def _solver_errors(weights, solves: list[_Solves], solver: cnf.Solver, cost: _Cost) -> dict:
    """``joint_error`` and ``context_error`` [K, R]: each term's solver error per sample (its
    covering blocks' estimated errors summed), the companion solved only where a sample
    carries weight in that term (``draws.weight_carrying``); NaN elsewhere, 0 for a row
    without context. A context's sample is solved where its context term, or a joint row
    that takes its shared blocks from it, needs it."""
    joint_carry = weight_carrying(weights["joint"].T).T  # [K, R]
    context_carry = weight_carrying(weights["context"].T).T
    K, R = weights["joint"].shape
    joint_error = torch.full((K, R), math.nan, dtype=torch.float64)
    context_error = torch.zeros(K, R, dtype=torch.float64)
    column = 0
    for chunk in solves:
        k = chunk.windows[0].z0.shape[0]  # every row has a window: its continuation's blocks
        carry_joint, carry_context = joint_carry[column : column + k], context_carry[column : column + k]
        uses_context = carry_joint & (chunk.shared_blocks > 0)
        block_error = torch.full((k, R, chunk.joint_blocks.shape[-1]), math.nan, dtype=torch.float64)
        if chunk.context is not None:
            c = chunk.context
            rows = torch.nonzero(c.rows >= 0)[:, 0]
            unit = c.rows[rows]
            needs = (carry_context[:, rows] | uses_context[:, rows]).long()
            wanted = torch.zeros(k, c.z0.shape[1], dtype=torch.long).index_add_(1, unit, needs) > 0  # any row of the unit
            errors, nfe = _companion(c, wanted, solver)
            cost.error_nfe += nfe
            context_error[column : column + k, rows] = (errors * c.blocks).sum(-1)[:, unit]
            width = min(errors.shape[-1], block_error.shape[-1])
            shared = torch.arange(width) < chunk.shared_blocks[rows, None]  # [rows, width]
            block_error[:, rows, :width] = torch.where(shared, errors[:, unit, :width], block_error[:, rows, :width])
        for w in chunk.windows:
            errors, nfe = _companion(w, carry_joint[:, w.rows], solver)
            cost.error_nfe += nfe
            block_error[:, w.rows, w.start : w.start + errors.shape[-1]] = errors
        covered = torch.where(chunk.joint_blocks.bool(), block_error, 0.0).sum(-1)
        joint_error[column : column + k] = covered.where(carry_joint, math.nan)
        column += k
    return {"joint_error": joint_error, "context_error": context_error}


def _companion(solve: _Solve, select: Tensor, solver: cnf.Solver) -> tuple[Tensor, int]:
    """The block errors [k, n, n_blocks] of ``solve`` on its elements ``select`` [k, n] (NaN
    elsewhere) and the companion's evaluations."""
    select = select.to(solve.z0.device)
    block_error, _, nfe = cnf.block_causal_solver_error(
        solve.velocity_of(select), solve.z0, solve.solved.settings["block_size"], solve.solved, select, lengths=solve.lengths, probes=solve.probes, solver=solver
    )
    return block_error.cpu(), nfe


def _joint_proposal(model, rows: TokenBatch, tokens: Tensor) -> DiagonalGaussian:
    """The joint rows' proposal [R, L, d]: their posterior, except on the blocks covering a
    joint that ends inside a prior block, where it is the prefix-only proposal of the joint's
    ``tokens`` [R] (``draws.prefix_only_proposal``). The row's posterior has seen its padding
    there, tokens the joint term integrates out (on a tractable model 2.1 nats, 11 SE, off
    at K = 4096). For Cola the two are the same: its row is the joint framed as a whole text."""
    with torch.no_grad():
        q = model.posterior(rows)
    block_tokens = model.patch_size * model.block_size
    inside = torch.nonzero(tokens % block_tokens != 0)[:, 0]
    if not len(inside):
        return q
    covering = covering_rows(model, rows.select(inside), tokens[inside])
    alone = prefix_only_proposal(model, covering, tokens[inside])
    width = alone.mean.shape[-2]
    positions = -(-tokens[inside] // block_tokens) * model.block_size  # the covering blocks' latents
    where = (torch.arange(width) < positions[:, None])[..., None].to(q.mean.device)
    mean, logvar = q.mean.clone(), q.logvar.clone()
    mean[inside, :width] = torch.where(where, alone.mean.to(mean.dtype), mean[inside, :width])
    logvar[inside, :width] = torch.where(where, alone.logvar.to(logvar.dtype), logvar[inside, :width])
    return DiagonalGaussian(mean, logvar)


def _streams(q: DiagonalGaussian, keys: Tensor, indices, positions: Tensor, options) -> tuple[Tensor, Tensor | None]:
    """The posterior draws' ``eps`` [k, B, L, d] of the sequences keyed ``keys`` and, for a
    Hutchinson solver, their probes [n_probes, k, B, L, d], on ``q``'s grid and device (zero
    beyond each sequence's ``positions``)."""
    L, d = q.mean.shape[-2:]
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, L - x.shape[-2])).to(q.mean.device, q.mean.dtype)
    seed, solver = options["seed"], options["solver"]
    eps = pad(streams.draws(seed, streams.POSTERIOR, keys, indices, positions, d))
    if not solver.hutchinson:
        return eps, None
    return eps, pad(streams.draws(seed, streams.PROBE, keys, indices, positions, d, solver.probe, leading=(solver.n_probes,)))


def _marginal_log_weight(model, layout, decoder, block_prior, posterior, tokens) -> Tensor:
    """``log w`` [k, B] of the marginal of the first ``tokens`` [B] tokens: their decoder terms
    (``decoder`` [k, B, N]) and the prior (``block_prior`` [k, B, n_blocks], of ``u``) and
    posterior (``posterior`` [k, B, L]) of the blocks covering them."""
    bs, d = model.block_size, model.latent_dim
    block_prior = block_prior + bs * d * math.log(abs(model.latent_scale))  # on z, per whole block
    dec, prior, post = marginal_terms(layout, decoder, block_prior, layout.per_block(posterior), tokens)
    return dec + prior - post


@dataclass(frozen=True)
class _Context:
    """The contexts of the rows, each alone: one per item with ``share_context`` (every choice
    given its item's), one per row without. ``unit`` [R]: each row's context (-1 for a row
    without one); per context ``keys`` (the item's random stream: on the blocks wholly
    inside the context its draws are the very draws of the joint rows), ``tokens`` (the
    context's), ``batch`` (its row cut to the blocks covering the context) and the
    prefix-only proposal there (``proposal`` [U, Lc, d])."""

    unit: Tensor
    keys: Tensor
    tokens: Tensor
    batch: TokenBatch | None
    proposal: DiagonalGaussian | None

    @classmethod
    def of(cls, model, batch: ContinuationBatch, keys: Tensor, share_context: bool) -> "_Context":
        R = len(batch.item)
        if share_context:  # the first row of every item stands for it
            source = torch.full((batch.n_items,), -1, dtype=torch.long)
            for r in reversed(range(R)):
                source[batch.item[r]] = r
            of_row = batch.item
        else:
            source, of_row = torch.arange(R), torch.arange(R)
        n = batch.context_tokens[source]
        has = torch.nonzero(n > 0)[:, 0]
        slot = torch.full((len(source),), -1, dtype=torch.long)
        slot[has] = torch.arange(len(has))
        unit, rows, n = slot[of_row], source[has], n[has]
        if not len(has):
            return cls(unit, keys[:0], n, None, None)
        alone = covering_rows(model, batch.token_batch().select(rows), n)
        return cls(unit, keys[batch.item[rows]], n, alone, prefix_only_proposal(model, alone, n))

    def in_rows(self, q: DiagonalGaussian, positions: Tensor) -> DiagonalGaussian:
        """``q`` of the rows with each row's first ``positions`` [R] latent positions (whole
        context blocks) taken from its context's proposal: the same for every choice."""
        L = q.mean.shape[-2]
        source = self.unit.clamp_min(0)
        pad = lambda x: torch.nn.functional.pad(x[source], (0, 0, 0, max(L - x.shape[-2], 0)))[..., :L, :]
        where = (torch.arange(L) < positions[:, None])[..., None].to(q.mean.device)  # [R, L, 1]
        return DiagonalGaussian(torch.where(where, pad(self.proposal.mean), q.mean), torch.where(where, pad(self.proposal.logvar), q.logvar))

    def weights(self, model, indices, cost: _Cost, options) -> tuple[dict, _Solve | None, dict]:
        """The context term of samples ``indices``: ``context`` [k, R] log-weights of the rows,
        each row given its context's, 0 without one; the solve of the covering blocks, once
        per context (None without contexts), of which the joint rows take their shared
        blocks; and the solver settings."""
        k, d, R = len(indices), model.latent_dim, len(self.unit)
        out = {"context": torch.zeros(k, R, dtype=torch.float64)}
        if self.batch is None:
            return out, None, {}
        layout = LatentLayout.of(model, self.batch)
        eps, probes = _streams(self.proposal, self.keys, indices, layout.positions(), options)
        with torch.no_grad():
            z = self.proposal.sample(eps)  # [k, U, Lc, d]
            decoder = model.decoder_log_prob(z, self.batch).double().cpu()
            posterior = self.proposal.log_prob(z).cpu()
        u = to_prior_space(model, z)
        lengths = layout.positions().to(u.device).expand(k, -1)
        velocity = _counted(model.prior_velocity, cost, d)
        r = cnf.block_causal_log_prob(velocity, u, model.block_size, lengths=lengths, probes=probes, **options)
        _count_history(model, cost, u, d)
        cost.nfe += r.nfe
        has = self.unit >= 0
        out["context"][:, has] = _marginal_log_weight(model, layout, decoder, r.block_logp.cpu(), posterior, self.tokens)[:, self.unit[has]]
        solve = _Solve(lambda select: velocity, u, lengths, probes, r, self.unit, blocks=layout.block_mask(self.tokens))
        return out, solve, r.settings


def _block_prior(model, u, probes, shared_blocks, joint_blocks, context: _Context, context_solve: _Solve | None, cost, options):
    """``log p(u^(b) | u^(<b))`` per row and absolute block, [k, R, n_blocks] float64 (0 beyond
    a row's covering blocks), the window solves behind it (``_Solve``) and the solver
    settings. The ``shared_blocks`` [R] of a row come from its context's solve
    (``context_solve``, ``_Context.weights``); the rest from one solve per group of rows that
    share where it starts."""
    bs = model.block_size
    k, R, L, d = u.shape
    n_blocks = -(-L // bs)
    out = torch.zeros(k, R, n_blocks, dtype=torch.float64)
    settings, solves = {}, []
    if shared_blocks.any():
        source = context.unit.clamp_min(0)
        values = context_solve.solved.block_logp.cpu()
        width = min(values.shape[-1], n_blocks)
        in_context = torch.arange(width) < shared_blocks[:, None]  # [R, width]
        out[..., :width] += values[:, source, :width] * in_context
    for start in shared_blocks.unique().tolist():  # each choice: the blocks its continuation touches
        group = torch.nonzero(shared_blocks == start)[:, 0]
        s, end = start * bs, int(joint_blocks[group].max()) * bs
        history = u[:, group, :end].contiguous()  # clean: the context's and the choice's own latents
        z0 = history[..., s:, :]
        p = None if probes is None else probes[:, :, group, s:end].contiguous()
        lengths = (joint_blocks[group] * bs - s).to(u.device).expand(k, -1)
        r = cnf.block_causal_log_prob(_window_velocity(model, history, s, cost, d), z0, bs, lengths=lengths, probes=p, **options)
        _count_history(model, cost, history, d)
        cost.nfe += r.nfe
        settings = r.settings
        out[:, group, start : start + r.block_logp.shape[-1]] = r.block_logp.cpu()
        of_selected = lambda select, history=history, s=s: _window_velocity(model, history[select], s, cost, d)
        solves.append(_Solve(of_selected, z0, lengths, p, r, group, start))
    return out, solves, settings


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
    # The context term draws from a proposal that has seen the context only, but a fitted
    # Gaussian can still be heavy-tailed against the prefix marginal's posterior (a sharp
    # decoder, a narrow encoder); say so where k-hat can tell. One term per item.
    # The joint term, likewise: its proposal is the row's posterior (the prefix-only one on a
    # block the joint ends inside), which can be as heavy-tailed.
    computable = bool(statistics.khat_computable(n_samples))
    for name, term, khat in (("context", "the context term log p(context)", "khat_context"), ("joint", "the joint term log p(context + continuation)", "khat")):
        ds[f"{name}_heavy_tailed"] = computable & (ds[khat] > ds["khat_threshold"])
        if ds[f"{name}_heavy_tailed"].any():
            named = ", ".join(str(item) for item in ds.item.values[ds[f"{name}_heavy_tailed"].any("choice").values])
            warnings.warn(
                f"{term} of item(s) {named} has heavy-tailed importance weights (k-hat above its threshold), "
                f"so its value and standard error may be far off; use more samples (K) and see {name}_heavy_tailed.",
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
