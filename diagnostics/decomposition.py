"""Where the bound goes: the ELBO split into distortion, mutual information and prior mismatch.

For a corpus ``x_1..x_N`` with posteriors ``q_i = q_phi(z | x_i)`` and the aggregate posterior
``q_bar(z) = (1/N) sum_j q_j(z)`` (Hoffman & Johnson, "ELBO surgery")::

    ELBO_i   = E_{q_i}[log p(x_i | z)] - KL(q_i || p_psi)
    distortion_i = E_{q_i}[-log p(x_i | z)]
    rate_i       = KL(q_i || p_psi) = E_{q_i}[log q_i(z) - log p_psi(z)]
    mean_i rate_i = I_q(X; Z) + KL(q_bar || p_psi)
    I_q(X; Z)        = mean_i E_{q_i}[log q_i(z) - log q_bar(z)]
    KL(q_bar || p_psi) = mean_i E_{q_i}[log q_bar(z) - log p_psi(z)]

All three expectations use the same posterior samples ``z_ik ~ q_i`` (k = 1..K), so the
identity holds sample by sample up to float64 rounding. ``log p_psi`` is the block-causal
CNF density moved to the posterior's space by the latent Jacobian.

**Common latent shape.** Sequences have different numbers of latent blocks, and ``q_bar`` is
only a density on one space. It is defined on the first ``W`` prior blocks (``W *
block_size`` latent positions), ``W`` = the fewest blocks of any sequence by default. The
block-causal prior makes ``log p_psi`` of that window the sum of its first ``W`` block
conditionals -- an exact marginal, out of the same solve as the whole sequence -- and the
posterior factorises over positions, so the window's ``log q_i`` is exact too. Distortion and
rate are reported for whole sequences as well: they are sums of the per-sample, per-block
terms of ``colaprob.estimators.draws`` (the draws of ``elbo``), so distortion + rate = -ELBO
by construction; the identity is checked on the window rate.

**The MI estimate is capped.** ``log q_i - log q_bar <= log N`` because ``q_bar >= q_i / N``,
so the estimate never exceeds ``log N``: it is the mutual information of the *empirical* data
distribution, and it saturates at ``log N`` once the posteriors barely overlap. Its value on
nested random subsets of the corpus (sizes 2, 4, 8, ..., N) shows whether it has converged in N
or is still tracking ``log n``.

**Active units** (Burda et al., 2016): channel ``c`` is active if ``Var_x(E_q[z_c | x]) >=
0.01``. Every valid latent position of every sequence is one data point (a channel is one
unit shared by all positions); the variance is the population variance on the posterior's
space.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from colaprob.diagnostics._latent import chunks
from colaprob.estimators import cnf, streams
from colaprob.estimators.draws import draw
from colaprob.estimators.layout import LatentLayout
from colaprob.protocol import LatentModel, TokenBatch

ACTIVE_THRESHOLD = 0.01


def decompose(
    model: LatentModel,
    batch: TokenBatch,
    *,
    n_samples: int = 8,
    window_blocks: int | None = None,
    batch_size: int = 16,
    chunk_size: int | None = None,
    seed: int = 0,
    solver: cnf.Solver | None = None,
    active_threshold: float = ACTIVE_THRESHOLD,
    progress: bool = True,
    **solver_keywords,
) -> xr.Dataset:
    """The ELBO decomposition of ``batch`` (see the module docstring), in nats.

    ``n_samples``: K posterior samples per sequence; ``window_blocks``: W, the leading prior
    blocks on which ``q_bar`` lives (default: the fewest blocks of any sequence);
    ``batch_size``: sequences per model call and ``chunk_size`` samples solved together
    (default: all K; each sequence's draws come from its own random stream -- the same as ``colaprob.estimators.elbo`` with this ``seed`` -- so the result does
    not depend on it beyond float32 rounding); ``solver``: how the prior's CNF is
    solved (``cnf.Solver``, or its fields as keywords, as in ``colaprob.estimators.elbo``);
    ``progress``: a progress bar over the batches.

    Returns an ``xarray.Dataset`` with, over ``sequence``: ``distortion``, ``rate``,
    ``elbo``, ``n_tokens``, ``n_blocks``, ``window_rate``, ``mi_term``, ``marginal_kl_term``;
    corpus scalars ``mutual_information``, ``marginal_kl``, ``window_rate_mean`` (each with
    ``*_se``, the standard error over sequences), ``identity_residual`` (``window_rate_mean -
    mutual_information - marginal_kl``), ``log_n``; over ``subset`` (nested subset sizes):
    ``mutual_information_nested``, ``marginal_kl_nested``, ``log_n_nested``; over
    ``channel``: ``posterior_mean_variance``, ``active``; and ``n_active``.
    """
    solver = cnf.Solver.build(solver, **solver_keywords)
    n_seq = len(batch)
    if n_seq < 2:
        raise ValueError("the aggregate posterior needs at least 2 sequences")
    blocks = LatentLayout.of(model, batch).blocks()
    w = int(blocks.min()) if window_blocks is None else int(window_blocks)
    if not 1 <= w <= int(blocks.min()):
        raise ValueError(f"window_blocks must be in [1, {int(blocks.min())}] (the shortest sequence), got {w}")
    w_pos = w * model.block_size
    keys = streams.sequence_keys(batch)

    distortion, rate, lq_w, lp_w, means, z_w, mean_w, logvar_w = ([] for _ in range(8))
    for rows in chunks(n_seq, batch_size, "decompose", progress):
        sub = batch.select(rows)
        # The draws of colaprob.estimators.elbo (the same streams); all K solved together.
        drawn = draw(model, sub, n_samples, seed=seed, keys=keys[rows], chunk_size=chunk_size or n_samples, solver=solver, per_block=True, keep_latents=True)
        lq_blk, lp_blk = (drawn.blocks[name].transpose(0, 1) for name in ("posterior", "prior"))  # [K, B, n_blocks]
        q, z = drawn.proposal, drawn.latents
        distortion.append(-drawn.per_sample["decoder"].T)
        rate.append((lq_blk - lp_blk).sum(-1))  # sum_b of the terms whose sums make the ELBO
        lq_w.append(lq_blk[..., :w].sum(-1))
        lp_w.append(lp_blk[..., :w].sum(-1))
        z_w.append(z[..., :w_pos, :].double())
        mean_w.append(q.mean[:, :w_pos].double())
        logvar_w.append(q.logvar[:, :w_pos].double())
        pos_valid = LatentLayout.of(model, sub).block_mask().repeat_interleave(model.block_size, -1)
        means.append(q.mean.double()[pos_valid])

    cat = lambda xs: torch.cat(xs, dim=-1)  # noqa: E731 -- per-sample values are [K, B]
    distortion, rate, lq_w, lp_w = (cat(x).detach() for x in (distortion, rate, lq_w, lp_w))
    # The very samples the model saw: a near-deterministic encoder (log-variance -30) turns
    # float32 rounding of z into nats, so z must not be recomputed here.
    z_w, mean_w, logvar_w = torch.cat(z_w, dim=1), torch.cat(mean_w), torch.cat(logvar_w)
    # Nested subsets are taken in a seeded random order: corpora are often sorted by topic.
    order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(seed))
    cross = cross_log_prob(z_w[:, order], mean_w[order], logvar_w[order])

    window_rate = lq_w - lp_w
    mi, mkl = aggregate_terms(lq_w[:, order], lp_w[:, order], cross)
    inverse = torch.argsort(order)
    mi_term, mkl_term = mi.mean(0)[inverse], mkl.mean(0)[inverse]
    sizes = nested_sizes(n_seq)
    nested = [aggregate_terms(lq_w[:, order[:n]], lp_w[:, order[:n]], cross[:, :n, :n]) for n in sizes]

    au = active_units(torch.cat(means), threshold=active_threshold)
    seq_mean = lambda x: x.mean(0).numpy()  # noqa: E731 -- Monte Carlo average over K
    ds = xr.Dataset(
        {
            "distortion": ("sequence", seq_mean(distortion)),
            "rate": ("sequence", seq_mean(rate)),
            "elbo": ("sequence", seq_mean(-distortion - rate)),
            "n_tokens": ("sequence", batch.n_tokens.numpy()),
            "n_blocks": ("sequence", blocks.numpy()),
            "window_rate": ("sequence", seq_mean(window_rate)),
            "mi_term": ("sequence", mi_term.numpy()),
            "marginal_kl_term": ("sequence", mkl_term.numpy()),
            **_mean_and_se("window_rate_mean", window_rate.mean(0)),
            **_mean_and_se("mutual_information", mi_term),
            **_mean_and_se("marginal_kl", mkl_term),
            "identity_residual": ((window_rate.mean() - mi.mean() - mkl.mean()).item()),
            "log_n": math.log(n_seq),
            "mutual_information_nested": ("subset", np.array([m.mean().item() for m, _ in nested])),
            "marginal_kl_nested": ("subset", np.array([k.mean().item() for _, k in nested])),
            "log_n_nested": ("subset", np.log(sizes)),
        },
        coords={"sequence": np.arange(n_seq), "subset": np.array(sizes)},
    ).merge(au)
    ds.attrs.update(
        units="nats",
        estimator=(
            f"Monte Carlo over {n_samples} posterior samples per sequence; log p_psi by the block-causal "
            f"CNF (trace={solver.trace}) plus the latent Jacobian; the same samples in every term"
        ),
        aggregate_posterior=(
            f"uniform mixture of the {n_seq} posteriors on the first {w} prior blocks ({w_pos} latent positions)"
        ),
        window_blocks=w,
        window_positions=w_pos,
        n_sequences=n_seq,
        n_samples=n_samples,
        **solver.to_attrs(),
        seed=seed,
        mutual_information_note=(
            f"estimate <= log N = {math.log(n_seq):.4f} nats (MI of the empirical data distribution); "
            "see mutual_information_nested over nested random subsets for its convergence in N"
        ),
        identity="window_rate_mean = mutual_information + marginal_kl (same samples)",
        **au.attrs,
    )
    return ds


def cross_log_prob(z: Tensor, mean: Tensor, logvar: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """``log q_j(z_ik)`` for every sample of every sequence under every posterior, float64.

    ``z``: [K, N, L, d] samples (sample k of sequence i); ``mean``, ``logvar``: [N, L, d].
    Returns [K, N, N] indexed ``[k, i, j]``. Computed directly (not by expanding the square,
    which cancels badly for narrow posteriors), in chunks of sequences ``i`` to bound memory.
    """
    k, n = z.shape[:2]
    zf, mf, vf = z.reshape(k, n, -1), mean.reshape(n, -1), logvar.reshape(n, -1)
    const = vf.sum(-1) + zf.shape[-1] * math.log(2 * math.pi)  # [N]
    step = max(1, chunk_elements // max(1, k * n * zf.shape[-1]))
    out = []
    for i in range(0, n, step):
        r = (zf[:, i : i + step, None, :] - mf) ** 2 * torch.exp(-vf)  # [K, chunk, N, D]
        out.append(-0.5 * (r.sum(-1) + const))
    return torch.cat(out, dim=1)


def aggregate_terms(lq: Tensor, lp: Tensor, cross: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample MI and marginal-KL terms for the aggregate posterior of ``n`` sequences.

    ``lq``: [K, n] ``log q_i(z_ik)``; ``lp``: [K, n] ``log p_psi(z_ik)``; ``cross``: [K, n, n]
    ``log q_j(z_ik)``. With ``log q_bar(z) = logsumexp_j log q_j(z) - log n``, returns
    ``(lq - log q_bar, log q_bar - lp)``, each [K, n]; their sum is ``lq - lp``.
    """
    log_qbar = torch.logsumexp(cross, dim=-1) - math.log(cross.shape[-1])
    return lq - log_qbar, log_qbar - lp


def nested_sizes(n: int) -> list[int]:
    """Subset sizes 2, 4, 8, ... below ``n``, then ``n``."""
    sizes = [2**e for e in range(1, max(1, n.bit_length())) if 2**e < n]
    return sizes + [n]


def active_units(means: Tensor, threshold: float = ACTIVE_THRESHOLD) -> xr.Dataset:
    """Active latent channels (Burda et al.): ``Var_x(E_q[z_c | x]) >= threshold``.

    ``means``: [n, d] posterior means, one row per valid latent position of the corpus.
    Returns ``posterior_mean_variance`` and ``active`` over ``channel`` and the count
    ``n_active``.
    """
    var = means.double().var(dim=0, unbiased=False)
    active = var >= threshold
    ds = xr.Dataset(
        {
            "posterior_mean_variance": ("channel", var.numpy()),
            "active": ("channel", active.numpy()),
            "n_active": int(active.sum()),
        },
        coords={"channel": np.arange(means.shape[-1])},
    )
    ds.attrs.update(
        active_threshold=threshold,
        active_units_definition=(
            "channel active iff the population variance over all valid latent positions of the corpus "
            f"of the posterior mean (posterior space) is >= {threshold}"
        ),
    )
    return ds


def _mean_and_se(name: str, per_sequence: Tensor) -> dict:
    """``{name: mean, name_se: standard error over sequences}``."""
    x = per_sequence.double()
    return {name: x.mean().item(), f"{name}_se": (x.std() / math.sqrt(x.numel())).item()}
