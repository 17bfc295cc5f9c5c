"""What the diagnostics share: chunks with progress bars, the posterior streams' draws,
gold-token decoding, and the block-causal prior's conditional densities on the posterior's
space (which tokens, positions and blocks count: ``colaprob.estimators.layout``).

Shapes as in ``colaprob.protocol``: ``B`` sequences, ``N`` tokens, ``L = N / P`` latent
positions, ``d`` channels, ``n_blocks = L / block_size`` prior blocks; ``...`` leading sample
dimensions.
"""

from __future__ import annotations


import torch
from torch import Tensor
from colaprob.progress import bar

from colaprob.estimators import cnf, streams
from colaprob.protocol import LatentModel, TokenBatch, from_prior_space, latent_log_jacobian, to_prior_space


def chunks(n: int, size: int, desc: str, progress: bool = True):
    """Consecutive slices of ``range(n)`` of at most ``size`` items, with a progress bar
    (shown only with ``progress`` and more than one chunk)."""
    starts = range(0, n, size)
    for start in bar(starts, desc=desc, unit="chunk", show=progress and len(starts) >= 2):
        yield slice(start, min(start + size, n))


def standard_normal(model: LatentModel, batch: TokenBatch, n: int, seed: int, stream: int = streams.POSTERIOR) -> Tensor:
    """[n, B, L, d] float64 standard-normal draws of ``stream`` (``colaprob.estimators.streams``;
    sequence ``i`` keyed by its row): the posterior stream gives the very draws of
    ``colaprob.estimators.elbo``."""
    positions = -(-batch.lengths // model.patch_size)
    draws = streams.draws(seed, stream, streams.sequence_keys(batch), range(n), positions, model.latent_dim)
    width = batch.ids.shape[-1] // model.patch_size
    return torch.nn.functional.pad(draws, (0, 0, 0, width - draws.shape[-2]))


def decode_gold(model: LatentModel, z: Tensor, batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """``log p_theta(x_i | z)`` of the gold tokens (float64) and the argmax tokens, both
    [..., B, N], from one ``decoder_logits`` call. ``z``: [..., B, L, d], posterior space."""
    logits = model.decoder_logits(z, batch).double()
    gold = batch.ids.expand(logits.shape[:-1])
    return torch.log_softmax(logits, -1).gather(-1, gold[..., None])[..., 0], logits.argmax(-1)


def with_history(model: LatentModel, history_u: Tensor, shape: torch.Size):
    """The prior velocity with the clean history fixed to ``history_u`` [B, L, d] (scaled
    space), broadcast to ``shape`` [..., B, L, d].

    Block ``b``'s velocity reads only its own noisy block and the clean blocks ``< b``, so one
    solve with this velocity gives, for every block at once, the conditional density of the
    block under test given the *gold* history (teacher forcing) -- the block under test may
    be a prior sample, a grid point or anything else. The expanded tensor is built once, so
    the model sees the same ``clean`` object at every evaluation and may cache on it.
    """
    clean = history_u.expand(shape)

    def velocity(u_t: Tensor, t: Tensor, _clean: Tensor) -> Tensor:
        return model.prior_velocity(u_t, t, clean)

    return velocity


def prior_block_log_prob(
    model: LatentModel,
    z: Tensor,
    *,
    history: Tensor | None = None,
    lengths: Tensor | None = None,
    seed: int = 0,
    solver: cnf.Solver,
) -> Tensor:
    """``log p_psi(z^(b) | z^(<b))`` per prior block on the posterior's space, float64.

    ``z``: [..., B, L, d] in the posterior's space. ``history``: [B, L, d] posterior-space
    latents used as the clean history of every block instead of ``z`` itself (teacher forcing
    on gold latents); ``None`` conditions each block on ``z``'s own earlier blocks, which makes
    the sum over blocks the joint ``log p_psi(z)``. ``lengths``: [B] latent positions per
    sequence (whole blocks); blocks beyond are not integrated and report 0. Each block's
    density on ``u`` is moved to ``z`` by its share ``block_size * d * log|scale|`` of the
    latent Jacobian. ``solver``: how the CNF is solved (``cnf.Solver``).

    Returns [..., B, n_blocks].
    """
    u = to_prior_space(model, z)
    velocity = model.prior_velocity if history is None else with_history(model, to_prior_space(model, history), u.shape)
    length = None if lengths is None else lengths.expand(u.shape[:-2])
    r = cnf.block_causal_log_prob(velocity, u, model.block_size, seed=seed, lengths=length, solver=solver)
    return torch.where(r.integrated, r.block_logp.double() + latent_log_jacobian(model, model.block_size), 0.0)


def prior_samples(
    model: LatentModel, history: Tensor, noise: Tensor | int, *, seed: int = 0, sampler: cnf.Solver = cnf.SAMPLER
) -> Tensor:
    """Teacher-forced prior draws of every block, ``z^(b) ~ p_psi(. | history^(<b))``.

    ``history``: [B, L, d] posterior-space latents (the gold posterior means). ``noise``: the
    standard-normal starting points [n, B, L, d], or a count ``n`` to draw them from ``seed``.
    Returns [n, B, L, d] in the posterior's space, from ``cnf.sample`` (``sampler``:
    its solver; default 16 Euler steps as in Cola generation).
    """
    n = noise if isinstance(noise, int) else noise.shape[0]
    u = to_prior_space(model, history).expand(n, *history.shape)
    start = None if isinstance(noise, int) else noise
    draws = cnf.sample(model.prior_velocity, u, model.block_size, noise=start, seed=seed, solver=sampler)
    return from_prior_space(model, draws)


def generated_latents(
    model: LatentModel,
    n: int,
    n_positions: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    sampler: cnf.Solver = cnf.SAMPLER,
) -> Tensor:
    """``n`` latent sequences generated freely by the prior, block after block, each block
    drawn given the blocks generated before it. Returns [n, n_positions, d] of ``dtype`` (the
    model's), posterior space.

    ``cnf.sample`` draws every block given a fixed history, so block ``b`` is drawn with the
    generated blocks ``< b`` as history (one solve per block, over blocks ``<= b`` only).
    """
    bs = model.block_size
    u = torch.zeros(n, n_positions, model.latent_dim, dtype=dtype)
    for b in range(-(-n_positions // bs)):
        end = min((b + 1) * bs, n_positions)
        draw = cnf.sample(model.prior_velocity, u[:, :end], bs, seed=seed + b, solver=sampler)
        u[:, b * bs : end] = draw[:, b * bs : end]
    return from_prior_space(model, u)
