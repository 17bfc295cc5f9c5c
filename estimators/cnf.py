"""Densities of continuous normalising flows by the instantaneous change of variables.

A velocity field ``v(z_t, t)`` with data at ``t = 0`` and noise ``z1 ~ N(0, I)`` at ``t = 1``
defines the density of its data end (Chen et al. 2018, Grathwohl et al. 2019):

    log p0(z0) = log N(z1; 0, I) + integral_0^1 div v(z_t, t) dt,

where ``z_t`` solves ``dz/dt = v(z, t)`` from ``z0``. The state ``[z, log-det]`` is integrated
from ``t = 0`` to ``t = 1``: adaptive (``rtol`` / ``atol``) by colaprob's own Runge-Kutta pairs
(torchdiffeq's adaptive methods: ``dopri5``, ``dopri8``, ``bosh3``, ``fehlberg2``,
``adaptive_heun``), in which every independent element takes its own steps
(``colaprob.estimators.stepping``), or on a fixed grid by ``torchdiffeq.odeint`` (``euler``,
``midpoint``, ``rk4``, ... with ``steps`` steps)

The divergence is either

* ``"exact"``: the Jacobian diagonal by vector-Jacobian products with one-hot probes. Elements
  whose cross-derivatives vanish may share a probe (a *colour*): independent batch elements
  always do, and in the block-causal prior the same (position in block, channel) of every
  block does, so an evaluation costs ``block_size * d`` VJPs whatever the sequence length;
* ``"hutchinson"``: ``E[eps^T J eps] = tr J`` with Rademacher or Gaussian probes ``eps``, each
  fixed along its solve (all probes share one solve of ``z``). Unbiased for the log-determinant,
  hence biased inside a log-sum-exp (an IWAE).

Probes are applied ``vjp_chunk`` at a time in one batched backward pass
(``torch.autograd.grad(..., is_grads_batched=True)``), which bounds memory.

How a density is solved (method, tolerances or steps, trace, probes, VJP chunk, whether the
solver error is estimated) is one value, ``Solver`` (``colaprob.estimators.solver``); every
function here takes it as ``solver=``, or builds it from the same fields given as keywords.

Precision: the velocity runs in the dtype of ``z0`` (float32 for a model); the ODE state,
log-determinants and densities are float64. No gradient flows back to ``z0`` or parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint

from colaprob.errors import ColaprobError
from colaprob.estimators import _checks, stepping
from colaprob.estimators.layout import sum_per_block
from colaprob.estimators.solver import ADAPTIVE_METHODS, FIXED_GRID_METHODS, SAFETY, Solver

__all__ = ["ADAPTIVE_METHODS", "FIXED_GRID_METHODS", "SAMPLER", "BlockLogProb", "LogProb", "Solver", "SolverFailure", "block_causal_log_prob", "block_causal_solver_error", "log_prob", "sample"]

_LOG_2PI = math.log(2 * math.pi)
# Units of float rounding per nat of the density that a velocity in float32 leaves in it.
ROUNDING_ULPS = 1


class SolverFailure(ColaprobError, ArithmeticError):
    """The ODE solver could not reach ``t = 1`` (its step size underflowed)."""


def solver_error_bound(prior: Tensor, delta: Tensor, companion: Tensor, solver: Solver, dtype: torch.dtype) -> Tensor:
    """The estimated solver error of ``prior + delta`` [n_probes, ...] (the two terms of the
    density) from the companion solve's values, in nats, averaged over probes: [...].

    Truncation: with ``e`` the main solve's error and ``r`` the ratio of it to the companion's,
    ``|value - companion| ~ (1 - 1 / r) |e|``, so ``|e| ~ |value - companion| r / (r - 1)``:
    ``r = 2^order`` for a grid twice as fine (Richardson), ``ADAPTIVE_ERROR_RATIO`` for an
    adaptive method at tightened tolerances (``Solver.error_ratio``); times ``SAFETY``.
    Rounding: the velocity's ``dtype`` rounds every evaluation alike in both solves, which
    their difference cannot see: ``ROUNDING_ULPS * eps(dtype) * (|prior| + |delta|)`` is
    added for it."""
    ratio = solver.error_ratio()
    truncation = SAFETY * (prior + delta - companion).abs() * ratio / (ratio - 1)
    rounding = ROUNDING_ULPS * torch.finfo(dtype).eps * (prior.abs() + delta.abs())
    return (truncation + rounding).mean(0)


def _check_probes(probes: Tensor | None, z0: Tensor) -> None:
    if probes is not None:
        _checks.floating_tensor("probes", probes, min_dims=z0.dim() + 1)
        if tuple(probes.shape[1:]) != tuple(z0.shape) or probes.shape[0] < 1:
            raise ValueError(f"probes must have shape [n_probes, *z0.shape] = [n, {', '.join(map(str, z0.shape))}], got {tuple(probes.shape)}")


@dataclass(kw_only=True)
class LogProb:
    """The density of ``z0`` under a flow and how it was computed.

    ``logp``: float64 over the batch dims (the mean over probes for Hutchinson);
    ``prior_logp``: ``log N(z1; 0, I)``; ``delta_logp``: ``integral div v dt`` (probe mean);
    ``z1``: the noise end of the flow, float64; ``nfe``: velocity evaluations;
    ``probe_logp``: [n_probes, ...] one estimate per Hutchinson probe (None when exact);
    ``settings``: the trace, solver and tolerances used; ``logp_error``: with
    ``solver_error``, the estimated solver error of ``logp`` in nats (``solver_error_bound``;
    None otherwise), apart from the Monte Carlo error of the probes; ``error_nfe``: the
    velocity evaluations that estimate cost.
    """

    logp: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    z1: Tensor
    nfe: int
    settings: dict
    probe_logp: Tensor | None = None
    logp_error: Tensor | None = None
    error_nfe: int = 0

    @property
    def logp_se(self) -> Tensor | None:
        """Standard error of ``logp`` over the Hutchinson probes (None when exact, NaN for
        one probe)."""
        if self.probe_logp is None:
            return None
        n = self.probe_logp.shape[0]
        spread = self.probe_logp.std(0) if n > 1 else torch.full_like(self.logp, float("nan"))
        return spread / math.sqrt(n)


@dataclass(kw_only=True)
class BlockLogProb(LogProb):
    """``LogProb`` of a block-causal flow with each block's conditional density.

    ``block_logp``: [..., n_blocks] ``log p(z^(b) | z^(<b))`` of the integrated positions of
    each block (0 where ``integrated`` is False: blocks wholly inside the clean prefix or at or
    beyond the sequence length); ``logp``: their sum; ``block_prior_logp``: [..., n_blocks]
    each block's ``log N(z1; 0, I)`` term; ``probe_block_logp``: [n_probes, ...,
    n_blocks] for Hutchinson; ``block_logp_error``: [..., n_blocks] each block's estimated
    solver error with ``solver_error`` (``logp_error`` is that of their sum).
    """

    block_logp: Tensor
    block_prior_logp: Tensor
    integrated: Tensor
    probe_block_logp: Tensor | None = None
    block_logp_error: Tensor | None = None


def log_prob(
    velocity,
    z0: Tensor,
    event_dims: int = 1,
    trace: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    *,
    solver: Solver | None = None,
    probes: Tensor | None = None,
    **solver_keywords,
) -> LogProb:
    """``log p0(z0)`` of the flow ``dz/dt = velocity(z, t)`` (noise ``N(0, I)`` at ``t = 1``).

    ``velocity(z_t, t)``: ``z_t`` [..., *event], ``t`` a 0-dim tensor -> same shape as ``z_t``;
    the batch dims ``...`` must be independent samples. ``z0``: [..., *event] with
    ``event_dims`` trailing event dims. ``solver``: the method, tolerances or steps, trace
    and probes (``Solver``; or its fields as keywords: ``trace``, ``rtol``, ``atol``,
    ``method``, ``steps``, ``n_probes``, ``probe``, ``vjp_chunk``, ``solver_error``).
    Hutchinson probes are drawn from ``seed``, or given as ``probes`` [n, *z0.shape].
    With ``solver.solver_error`` the solver error is estimated in nats
    (``solver_error_bound``: a second solve on the same probes).
    """
    solver = Solver.build(solver, trace=trace, rtol=rtol, atol=atol, **solver_keywords)
    event_dims = _checks.integer("event_dims", event_dims, minimum=1)
    _checks.floating_tensor("z0", z0, min_dims=event_dims)
    _check_probes(probes, z0)
    _checks.integer("seed", seed, minimum=0)
    event_shape = z0.shape[z0.dim() - event_dims :]
    event_axes = tuple(range(-event_dims, 0))
    # Each event element its own colour; batch elements are independent, so they share it.
    colours = torch.arange(math.prod(event_shape), device=z0.device).reshape(event_shape)
    trace_terms = _trace_terms(solver, colours, z0, probes, seed)

    def field(z: Tensor, t: Tensor) -> Tensor:
        return velocity(z, t.to(z0.dtype))

    # The velocity takes one t for the whole batch, so the batch is one element of the solver
    # (shared steps) and its norm the largest per-sample norm.
    def error_norm(ratio: tuple[Tensor, Tensor]) -> Tensor:
        z_ratio, logdet_ratio = ratio
        return torch.maximum(z_ratio.pow(2).mean(event_axes).sqrt().max(), logdet_ratio.abs().max())

    def spread(x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x

    def reduce(terms: Tensor) -> Tensor:  # [n, ..., *event] -> [n, ...]
        return terms.sum(event_axes)

    def solve(solver):
        z1, delta, nfe = _integrate(field, trace_terms, reduce, z0, (error_norm, spread, None), solver)
        prior = (-0.5 * z1.pow(2) - 0.5 * _LOG_2PI).sum(event_axes)
        return z1, prior, delta, nfe  # per probe: prior + delta, [n, ...]

    z1, prior, delta, nfe = solve(solver)
    per_probe = prior + delta
    settings = _settings(solver, probes, seed, event_dims=event_dims)
    error, error_nfe = None, 0
    if solver.solver_error:
        _, prior_2, delta_2, error_nfe = solve(solver.companion())
        error = solver_error_bound(prior, delta, prior_2 + delta_2, solver, z0.dtype)
    return LogProb(
        logp=per_probe.mean(0),
        prior_logp=prior,
        delta_logp=delta.mean(0),
        z1=z1,
        nfe=nfe,
        settings=settings,
        probe_logp=per_probe if solver.hutchinson else None,
        logp_error=error,
        error_nfe=error_nfe,
    )


def block_causal_log_prob(
    velocity,
    z0: Tensor,
    block_size: int,
    trace: str | None = None,
    prefix_len: Tensor | int | None = None,
    seed: int = 0,
    *,
    lengths: Tensor | int | None = None,
    solver: Solver | None = None,
    probes: Tensor | None = None,
    **solver_keywords,
) -> BlockLogProb:
    """Every block's ``log p(z^(b) | z^(<b))`` of a block-causal flow, from one solve.

    ``z0``: [..., L, d]. ``velocity(z_t, t, clean)``: ``z_t`` [..., L, d], ``t`` [..., L] per
    position, ``clean`` [..., L, d] -> [..., L, d], where the output of block ``b`` may depend
    only on ``z_t`` in block ``b`` and ``clean`` in blocks ``< b`` (the 2L layout). ``clean``
    is ``z0`` itself, the same object at every evaluation, so a model may cache its history.

    Every block of every sample is its own ODE: with an adaptive method each takes its own
    steps (``colaprob.estimators.stepping``), so a block's density does not depend on the
    other blocks or samples in the batch beyond float rounding; all are evaluated together,
    each at its own ``t``. A fixed grid gives every block the same ``t``. Since the Jacobian across blocks is zero, a
    one-hot probe at (position ``j`` of a block, channel ``c``) repeated in every block yields
    every block's diagonal at once: ``block_size * d`` VJPs per evaluation; per-block sums give
    each block's divergence. Hutchinson probes need no colouring (the cross-block terms vanish).

    ``prefix_len`` ([...] or int): positions ``< prefix_len`` are clean: held at ``z0`` with
    ``t = 0`` (a prefix ending inside a block is given to that block as in training) and left
    out of the divergence and of ``N(z1; 0, I)``. ``lengths`` ([...] or int, a multiple of
    ``block_size`` or ``>= L``): positions at or beyond it are not integrated either. A block
    with no integrated position reports 0 and ``integrated = False``. ``solver``, ``probes``
    and the keyword conveniences as in ``log_prob``; with ``solver.solver_error`` also each
    block's estimated solver error in nats (``solver_error_bound``).
    """
    solver = Solver.build(solver, trace=trace, **solver_keywords)
    flow = _BlockFlow(velocity, z0, block_size, prefix_len, lengths, solver, probes, seed)
    z1, prior, delta, nfe = flow.solve(solver)
    per_probe = prior + delta
    block_logp = per_probe.mean(0)
    result = BlockLogProb(
        logp=block_logp.sum(-1),
        block_logp=block_logp,
        block_prior_logp=prior,
        integrated=flow.noisy_blocks,
        prior_logp=prior.sum(-1),
        delta_logp=delta.mean(0).sum(-1),
        z1=z1,
        nfe=nfe,
        settings=_settings(solver, probes, seed, block_size=block_size),
        probe_logp=per_probe.sum(-1) if solver.hutchinson else None,
        probe_block_logp=per_probe if solver.hutchinson else None,
    )
    if solver.solver_error:
        result.block_logp_error, result.logp_error, result.error_nfe = flow.companion_error(solver, prior, delta)
    return result


def block_causal_solver_error(
    velocity,
    z0: Tensor,
    block_size: int,
    solved: BlockLogProb,
    select: Tensor,
    *,
    prefix_len: Tensor | int | None = None,
    lengths: Tensor | int | None = None,
    solver: Solver,
    probes: Tensor | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor, int]:
    """The solver error of a finished ``block_causal_log_prob`` solve (``solved``, made with
    these arguments and ``solver``), estimated on the batch elements ``select`` [...] (bool)
    only: the companion solve runs on those alone (gathered into one batch, so ``velocity``
    must take any batch shape), which is what lets an importance-weighted estimator pay for
    the samples that carry its weight and no others. Returns ``(block_error [..., n_blocks],
    error [...], nfe)``: nats, as ``block_logp_error`` and ``logp_error``, NaN where not
    selected; ``nfe`` the companion's evaluations."""
    _checks.floating_tensor("z0", z0, min_dims=2)
    batch_shape = tuple(z0.shape[:-2])
    if not isinstance(solved, BlockLogProb) or tuple(solved.block_logp.shape[:-1]) != batch_shape:
        raise ValueError(f"solved must be the BlockLogProb that block_causal_log_prob returned for this z0 (batch shape {batch_shape})")
    select = torch.as_tensor(select, dtype=torch.bool, device=z0.device)
    if tuple(select.shape) != batch_shape:
        raise ValueError(f"select must have the batch shape of z0, {batch_shape}, got {tuple(select.shape)}")
    n_blocks = solved.block_logp.shape[-1]
    block_error = torch.full((*batch_shape, n_blocks), math.nan, dtype=torch.float64, device=z0.device)
    error = torch.full(batch_shape, math.nan, dtype=torch.float64, device=z0.device)
    if not select.any():
        return block_error, error, 0
    pick = lambda x: torch.as_tensor(x, device=z0.device).expand(batch_shape)[select]
    if solver.hutchinson and probes is None:  # the main solve's probes, drawn for the whole batch
        probes = _draw_probes(solver.probe, (solver.n_probes, *z0.shape), seed)
    prior = solved.block_prior_logp[select]
    per_probe = solved.probe_block_logp[:, select] if solved.probe_block_logp is not None else solved.block_logp[select][None]
    flow = _BlockFlow(
        velocity,
        z0[select],
        block_size,
        None if prefix_len is None else pick(prefix_len),
        None if lengths is None else pick(lengths),
        solver,
        None if probes is None else probes[:, select],
        seed,
    )
    block_error[select], error[select], nfe = flow.companion_error(solver, prior, per_probe - prior)
    return block_error, error, nfe


class _BlockFlow:
    """The block-causal flow of ``block_causal_log_prob`` on one batch, set up once:
    ``solve(solver)`` -> ``(z1, prior [..., n_blocks], delta [n, ..., n_blocks], nfe)``, and
    ``companion_error``, the solver error of a solve's ``prior + delta`` from a second,
    finer solve on the same probes."""

    def __init__(self, velocity, z0: Tensor, block_size: int, prefix_len, lengths, solver: Solver, probes: Tensor | None, seed: int):
        _checks.floating_tensor("z0", z0, min_dims=2)
        block_size = _checks.integer("block_size", block_size, minimum=1)
        _check_probes(probes, z0)
        _checks.integer("seed", seed, minimum=0)
        *batch_shape, L, d = z0.shape
        position = torch.arange(L, device=z0.device)
        prefix = _checks.integer_tensor("prefix_len", 0 if prefix_len is None else prefix_len, batch_shape, minimum=0, maximum=L).to(z0.device)
        length = _checks.integer_tensor("lengths", L if lengths is None else lengths, batch_shape, minimum=0, maximum=2**62).to(z0.device)
        if ((length % block_size != 0) & (length < L)).any():
            raise ValueError("lengths must end on a block boundary (or reach the end of z0)")
        noisy = (position >= prefix[..., None]) & (position < length[..., None])  # [..., L]
        self.noisy_blocks = sum_per_block(noisy.to(z0.dtype), block_size) > 0  # [..., n_blocks]
        self.z0, self.dtype = z0, z0.dtype
        # Position j of every block, channel c: one colour (cross-block derivatives are zero).
        colours = (position % block_size)[:, None] * d + torch.arange(d, device=z0.device)
        self.trace_terms = _trace_terms(solver, colours, z0, probes, seed)
        mask = noisy[..., None]
        positions = _block_to_positions(block_size, L)

        def field(z: Tensor, t: Tensor) -> Tensor:  # t: 0-dim (shared) or [..., n_blocks]
            u = torch.where(mask, z, z0)
            t = t.to(z0.dtype) if t.dim() == 0 else positions(t.to(z0.dtype))
            t_position = torch.where(noisy, t, torch.zeros((), dtype=z0.dtype, device=z0.device))
            return torch.where(mask, velocity(u, t_position, z0), 0.0)

        def reduce(terms: Tensor) -> Tensor:  # [n, ..., L, d] -> [n, ..., n_blocks]
            return sum_per_block((terms * mask).sum(-1), block_size)

        def error_norm(ratio: tuple[Tensor, Tensor]) -> Tensor:  # -> [..., n_blocks]
            z_ratio, logdet_ratio = ratio
            sq = sum_per_block((z_ratio.pow(2) * mask).sum(-1), block_size)
            count = sum_per_block(noisy.to(sq.dtype), block_size).clamp_min(1) * d
            return torch.maximum((sq / count).sqrt(), logdet_ratio.abs().amax(0))

        def spread(x: Tensor) -> tuple[Tensor, Tensor]:  # [..., n_blocks] -> to z and to log-det
            return positions(x)[..., None], x[None]

        self.field, self.reduce, self.elements = field, reduce, (error_norm, spread, ~self.noisy_blocks)
        self.mask, self.block_size = mask, block_size

    def solve(self, solver: Solver):
        z1, delta, nfe = _integrate(self.field, self.trace_terms, self.reduce, self.z0, self.elements, solver)
        prior = sum_per_block(((-0.5 * z1.pow(2) - 0.5 * _LOG_2PI) * self.mask).sum(-1), self.block_size)
        return z1, prior, delta, nfe  # per probe: prior + delta, [n, ..., n_blocks]

    def companion_error(self, solver: Solver, prior: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(block_error [..., n_blocks], error [...], nfe)`` of the solve that gave ``prior``
        [..., n_blocks] and ``delta`` [n, ..., n_blocks] (``solver_error_bound``)."""
        _, prior_2, delta_2, nfe = self.solve(solver.companion())
        block_error = solver_error_bound(prior, delta, prior_2 + delta_2, solver, self.dtype)
        error = solver_error_bound(prior.sum(-1), delta.sum(-1), (prior_2 + delta_2).sum(-1), solver, self.dtype)
        return block_error, error, nfe


# Cola generation's sampler: 16 Euler steps per block.
SAMPLER = Solver(method="euler", steps=16)


def sample(
    velocity,
    clean: Tensor,
    block_size: int,
    *,
    prefix_len: Tensor | int | None = None,
    noise: Tensor | None = None,
    seed: int = 0,
    solver: Solver | None = None,
    **solver_keywords,
) -> Tensor:
    """Teacher-forced draws of every block from ``p(z^(b) | clean^(<b))``, all blocks at once.

    Transports ``noise`` [..., L, d] (drawn from ``seed`` when None) from ``t = 1`` to ``t = 0``
    under ``velocity(z_t, t, clean)`` (see ``block_causal_log_prob``), each block conditioned
    on the GIVEN history ``clean`` [..., L, d], not on the other samples. Positions
    ``< prefix_len`` are held at ``clean`` with ``t = 0``. ``solver`` (or its fields as
    keywords; its trace is not used): default ``SAMPLER``, 16 Euler steps as in Cola
    generation (without guidance); ``method="dopri5"`` for an adaptive solve.
    Returns [..., L, d] in the dtype of ``clean``.
    """
    solver = Solver.build(solver, **solver_keywords) if solver is not None or any(v is not None for v in solver_keywords.values()) else SAMPLER
    _checks.floating_tensor("clean", clean, min_dims=2)
    block_size = _checks.integer("block_size", block_size, minimum=1)
    if noise is not None and tuple(noise.shape) != tuple(clean.shape):
        raise ValueError(f"noise must have the shape of clean, {tuple(clean.shape)}, got {tuple(noise.shape)}")
    *batch_shape, L, d = clean.shape
    if noise is None:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64).to(clean.device)
    position = torch.arange(L, device=clean.device)
    prefix = torch.as_tensor(0 if prefix_len is None else prefix_len, device=clean.device).expand(batch_shape)
    pinned = (position < prefix[..., None])[..., None]
    t_zero = torch.zeros((), dtype=clean.dtype, device=clean.device)

    positions = _block_to_positions(block_size, L)

    def dynamics(t: Tensor, z: Tensor) -> Tensor:  # t: 0-dim (shared) or [..., n_blocks]
        u = torch.where(pinned, clean, z.to(clean.dtype))
        t = t.to(clean.dtype) if t.dim() == 0 else positions(t.to(clean.dtype))
        v = velocity(u, torch.where(pinned[..., 0], t_zero, t), clean)
        return torch.where(pinned, 0.0, v).double()

    def error_norm(ratio: Tensor) -> Tensor:  # -> [..., n_blocks]
        return sum_per_block(ratio.pow(2).mean(-1), block_size).div(block_size).sqrt()

    def spread(x: Tensor) -> Tensor:
        return positions(x)[..., None]

    with torch.no_grad():
        z = _solve(dynamics, noise.double(), (error_norm, spread, None), solver, reverse=True)
    return torch.where(pinned, clean, z.to(clean.dtype))


def _trace_terms(solver: Solver, colours, z0, probes, seed):
    """``(n, terms)`` with ``terms(v, z) -> [n, *z.shape]`` the elementwise summands of the
    divergence: ``n = 1`` for the exact diagonal, one row per probe for Hutchinson (``probes``,
    or ``solver.n_probes`` of kind ``solver.probe`` drawn from ``seed``)."""
    if not solver.hutchinson:
        n_colours = int(colours.max()) + 1
        return 1, lambda v, z: _jacobian_diagonal(v, z, colours, n_colours, solver.vjp_chunk)[None]
    if probes is None:
        probes = _draw_probes(solver.probe, (solver.n_probes, *z0.shape), seed)
    probes = probes.to(device=z0.device, dtype=z0.dtype)
    return probes.shape[0], lambda v, z: _hutchinson_terms(v, z, probes, solver.vjp_chunk)


def _jacobian_diagonal(v: Tensor, z: Tensor, colours: Tensor, n_colours: int, chunk: int) -> Tensor:
    """``diag(dv/dz)`` shaped like ``z``, by one VJP per colour (``colours`` broadcasts against
    ``z``; elements of one colour must have zero cross-derivatives)."""
    diagonal = torch.zeros_like(z)
    extra = (1,) * colours.dim()
    for start in range(0, n_colours, chunk):
        ids = torch.arange(start, min(start + chunk, n_colours), device=z.device)
        one_hot = (colours == ids.view(-1, *extra)).to(z.dtype)
        probes = one_hot.reshape(len(ids), *(1,) * (z.dim() - colours.dim()), *colours.shape).expand(len(ids), *z.shape).contiguous()
        diagonal += (probes * _vjp(v, z, probes)).sum(0)
    return diagonal


def _hutchinson_terms(v: Tensor, z: Tensor, probes: Tensor, chunk: int) -> Tensor:
    """``eps * (J^T eps)`` per probe ``eps``: [n, *z.shape]; sums to unbiased traces."""
    parts = []
    for start in range(0, probes.shape[0], chunk):
        eps = probes[start : start + chunk]
        parts.append(eps * _vjp(v, z, eps))
    return torch.cat(parts)


def _vjp(v: Tensor, z: Tensor, probes: Tensor) -> Tensor:
    """``probe^T dv/dz`` for each of ``probes`` [n, *z.shape], in one backward pass. A single
    probe skips the batching (vmap) machinery, which costs more than the pass itself on a
    small model."""
    if probes.shape[0] == 1:
        return torch.autograd.grad(v, z, probes[0], retain_graph=True)[0][None]
    return torch.autograd.grad(v, z, probes, retain_graph=True, is_grads_batched=True)[0]


def _draw_probes(kind: str, shape: tuple[int, ...], seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, dtype=torch.float64) * 2 - 1
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    raise ValueError(f"probe must be 'rademacher' or 'gaussian', not {kind!r}")


def _integrate(field, trace_terms, reduce, z0, elements, solver: Solver):
    """Solve ``d[z, logdet]/dt = [v, reduce(div terms)]`` from 0 to 1: (z1, logdet, nfe).
    ``elements``: as ``_solve``'s."""
    n_terms, terms = trace_terms
    nfe = 0

    def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        with torch.enable_grad():
            z = state[0].detach().to(z0.dtype).requires_grad_(True)
            v = field(z, t)
            divergence = reduce(terms(v, z))
        return v.detach().double(), divergence.detach().double()

    with torch.no_grad():
        logdet0 = reduce(torch.zeros((n_terms, *z0.shape), dtype=torch.float64, device=z0.device))
        z1, logdet = _solve(dynamics, (z0.detach().double(), logdet0), elements, solver)
    return z1, logdet, nfe


def _solve(dynamics, state0, elements, solver: Solver, reverse: bool = False):
    """The state at the far end of ``[0, 1]`` (of ``[1, 0]`` when ``reverse``).

    ``elements = (norm, spread, done)`` describes the independent elements of the state:
    ``norm(ratio)`` is each element's error norm [*E] of scaled errors shaped like the state,
    ``spread(x)`` an element-shaped ``x`` broadcast to the state, ``done`` [*E] the elements
    with nothing to integrate (or None). An adaptive method steps every element on its own
    (``stepping.solve``; ``dynamics`` then gets ``t`` [*E]); a fixed grid is torchdiffeq's
    (``t`` 0-dim)."""
    norm, spread, done = elements
    if not solver.fixed_grid:
        return _solve_per_element(dynamics, state0, solver, norm, spread, done, reverse)
    device = state0[0].device if isinstance(state0, tuple) else state0.device
    grid = torch.linspace(0.0, 1.0, solver.steps + 1, dtype=torch.float64, device=device)
    solution = odeint(dynamics, state0, grid.flip(0) if reverse else grid, method=solver.method)
    return tuple(s[-1] for s in solution) if isinstance(solution, tuple) else solution[-1]


def _solve_per_element(dynamics, state0, solver: Solver, norm, spread, done, reverse):
    """``_solve`` by ``stepping.solve``; the reverse direction runs ``s = 1 - t`` forward."""
    single = not isinstance(state0, tuple)
    as_tuple = (lambda x: (x,)) if single else (lambda x: x)

    def f(t: Tensor, state: tuple) -> tuple:
        if not reverse:
            return as_tuple(dynamics(t, state[0] if single else state))
        return tuple(-v for v in as_tuple(dynamics(1.0 - t, state[0] if single else state)))

    try:
        y, _ = stepping.solve(
            f,
            as_tuple(state0),
            spread=lambda x: as_tuple(spread(x)),
            norm=lambda r: norm(r[0] if single else r),
            rtol=solver.rtol,
            atol=solver.atol,
            done=done,
            method=solver.method,
        )
    except stepping.StepUnderflow as failure:
        if not failure.finite:
            raise SolverFailure(
                f"the velocity was not finite at t = {failure.time:.4g}, so the {solver.method} solver cannot go on; check the model's weights and its input latents."
            ) from None
        raise _underflow(solver.method, solver.rtol, solver.atol) from None
    return y[0] if single else y


def _underflow(method: str, rtol: float, atol: float) -> SolverFailure:
    return SolverFailure(
        f"the {method} solver's step size underflowed before t reached the end (rtol {rtol:g}, atol {atol:g}): the "
        "velocity's float32 rounding cannot meet these tolerances; loosen them (1e-8 or more) or use a fixed grid."
    )


def _block_to_positions(block_size: int, L: int):
    """``x`` [..., n_blocks] -> [..., L]: each position takes its block's value."""
    return lambda x: x.repeat_interleave(block_size, -1)[..., :L]


def _settings(solver: Solver, probes: Tensor | None, seed: int, **extra) -> dict:
    """What a ``LogProb`` records: the solver's attributes (given ``probes`` counted and named
    as given), the seed and ``extra``."""
    settings = {**solver.to_attrs(), **extra}
    if solver.hutchinson and probes is not None:
        settings.update(n_probes=probes.shape[0], probe="given")
    settings["seed"] = seed
    return settings
