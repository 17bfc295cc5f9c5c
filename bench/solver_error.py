"""Solver error in nats against cost, and how well the reported estimate covers it.

For each solver choice (dopri5 at several tolerances, every block of every sequence on its own
steps; rk4 on uniform grids; rk4 on a grid concentrated near both ends of ``t``) one
block-causal solve (``cnf.block_causal_log_prob(..., solver_error=True)``) of

* the analytic harness: a ``colaprob.testing.BlockMixturePrior`` (exact block densities
  known), float32 latents drawn from it, exact trace;
* the embedded DiT (``colaprob.load("tiny")``): posterior means of held-out texts, one fixed
  Rademacher probe (Hutchinson; the exact trace is 64 times the work per step, ``--exact``),
  against a float64 copy of the model solved by dopri5 at rtol = atol = 1e-10 on the same
  probe: the ODE's own answer, so the difference is the solver error alone.

Reported per choice: velocity evaluations of the solve and of its error estimate, the largest
true error per sequence and per block (nats), the share of sequences and of blocks whose
reported error bounds the true one, and the share where it is within 10 times of it (true
errors below 1e-6 nats, at float32 rounding, count as met).

torchode (the ``bench`` extra; its rows are left out, and said so, without it): its dopri5
with an integral controller at the same tolerances, every block of every sequence one
element of its batch with its own steps (the one solver in the field that does this), on the
same augmented state ``[z, log-det]`` in float64 and the same error norm (the larger of the
RMS of ``z``'s scaled error and the log-det's). It has no error estimate, so its coverage
columns read n/a; ``nfe`` counts evaluations of the whole batch, as for the others.

The concentrated grid: rk4 on ``n`` equal steps of ``s`` with ``t = g(s) = s - a sin(2 pi s) /
(2 pi)``, run as the warped field ``dz/ds = g'(s) v(z, g(s))`` (its divergence is ``g'(s) div
v``, so the density is unchanged): ``g'(s) = 1 - a cos(2 pi s)`` makes the steps in ``t``
``(1 + a) / (1 - a)`` times denser at both ends than in the middle (``a = WARP``).

``--skip N`` measures on other sequences: the embedded model's held-out texts after the
first ``N``, the harness's draws from seed ``1 + N`` (a check of a safety factor chosen on
the default ones).

    python bench/solver_error.py
    python bench/solver_error.py --sequences 12 --skip 12
    python bench/solver_error.py --quick
"""

from __future__ import annotations

import math
import time

import common
import torch

from colaprob.estimators import cnf
from colaprob.estimators.solver import SAFETY

FLOOR = 1e-6  # nats: float32 rounding of the embedded model's densities
WARP = 0.8  # the concentrated grid's steps are 9 times denser at t = 0 and 1 than at 1/2


def choices(quick: bool) -> list[dict]:
    if quick:
        return [dict(rtol=1e-3, atol=1e-3), dict(method="rk4", steps=4), dict(method="rk4", steps=4, warp=WARP)]
    return [
        *(dict(rtol=t, atol=t) for t in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)),
        *(dict(method="rk4", steps=n) for n in (8, 16, 32, 64)),
        *(dict(method="rk4", steps=n, warp=WARP) for n in (16, 32, 64)),
    ]


def torchode_tolerances(quick: bool) -> list[float]:
    return [1e-3] if quick else [1e-4, 1e-5, 1e-6, 1e-7]


def label(choice: dict) -> str:
    if "warp" in choice:
        return f"rk4, {choice['steps']} steps near ends"
    return f"rk4, {choice['steps']} steps" if "steps" in choice else f"dopri5 {choice['rtol']:g}"


def warped(velocity, a: float):
    """The field in ``s`` of the grid concentrated near both ends (module docstring)."""

    def field(u_t, s, clean):
        s = torch.as_tensor(s, dtype=u_t.dtype, device=u_t.device)
        t = s - a * torch.sin(2 * torch.pi * s) / (2 * torch.pi)
        rate = 1 - a * torch.cos(2 * torch.pi * s)
        return rate.expand(u_t.shape[:-1])[..., None] * velocity(u_t, t, clean)

    return field


def torchode_block_log_prob(velocity, u, bs, trace, probes, tol: float) -> tuple[torch.Tensor, int]:
    """``([B, n_blocks] log p of every block, nfe)`` by torchode's dopri5, one element per
    block (module docstring); ``u`` [B, L, d] with L a multiple of ``bs``."""
    import torchode

    B, L, d = u.shape
    nb, width = L // bs, bs * d
    colours = ((torch.arange(L) % bs)[:, None] * d + torch.arange(d)) if trace == "exact" else None
    nfe = 0

    def dynamics(t, y):  # t [B * nb], y [B * nb, width + 1]
        nonlocal nfe
        nfe += 1
        with torch.enable_grad():
            z = y[:, :width].reshape(B, L, d).to(u.dtype).requires_grad_(True)
            v = velocity(z, t.to(u.dtype).view(B, nb).repeat_interleave(bs, 1), u)
            if colours is None:
                terms = (probes * cnf._vjp(v, z, probes)).mean(0)
            else:
                terms = cnf._jacobian_diagonal(v, z, colours, bs * d, 32)
        divergence = terms.detach().reshape(B * nb, width).sum(-1, keepdim=True)
        return torch.cat([v.detach().reshape(B * nb, width), divergence], -1).double()

    def norm(error):  # the scaled error of one element -> its norm, as colaprob's dopri5
        return torch.maximum(error[:, :width].pow(2).mean(-1).sqrt(), error[:, width].abs())

    term = torchode.ODETerm(dynamics)
    step = torchode.Dopri5(term=term)
    control = torchode.IntegralController(atol=tol, rtol=tol, term=term, norm=norm)
    y0 = torch.cat([u.double().reshape(B * nb, width), torch.zeros(B * nb, 1, dtype=torch.float64)], -1)
    t_eval = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(B * nb, 2)
    solution = torchode.AutoDiffAdjoint(step, control).solve(torchode.InitialValueProblem(y0=y0, t_eval=t_eval))
    if not bool((solution.status == 0).all()):
        raise RuntimeError(f"torchode did not finish: status {solution.status.unique().tolist()}")
    end = solution.ys[:, -1]
    z1, delta = end[:, :width], end[:, width]
    prior = (-0.5 * z1.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
    return (prior + delta).view(B, nb), nfe


def torchode_rows(velocity, u, bs, reference, trace, probes, tolerances) -> list:
    """One row per tolerance, in ``COLUMNS``; none (and a line saying so) without torchode."""
    try:
        import torchode  # noqa: F401
    except ImportError:
        print("torchode is not installed (the bench extra): its rows are left out.")
        print()
        return []
    rows = []
    for tol in tolerances:
        start = time.process_time()
        block_logp, nfe = torchode_block_log_prob(velocity, u, bs, trace, probes, tol)
        seconds = time.process_time() - start
        true_seq = (block_logp.sum(-1) - reference.logp).abs()
        true_block = (block_logp - reference.block_logp).abs()
        rows.append([f"torchode dopri5 {tol:g}", nfe, "n/a", f"{seconds:.1f}", f"{float(true_seq.max()):.2e}", "n/a",
                     f"{float(true_block.max()):.2e}", "n/a", "n/a", "n/a", "n/a"])
    return rows


def measure(velocity, u, bs, lengths, reference, trace, probes, choice, study: dict) -> list:
    """One row of ``COLUMNS``; ``(true, reported)`` errors per sequence and per block go to
    ``study`` under the choice's kind (``safety_rows``)."""
    name, choice = label(choice), dict(choice)
    kind = "grid" if "steps" in choice else "adaptive"
    if "warp" in choice:
        velocity = warped(velocity, choice.pop("warp"))
    start = time.process_time()
    r = cnf.block_causal_log_prob(velocity, u, bs, trace, lengths=lengths, probes=probes, solver_error=True, **choice)
    seconds = time.process_time() - start
    integrated = r.integrated
    true_seq = (r.logp - reference.logp).abs()
    true_block = (r.block_logp - reference.block_logp).abs()[integrated]
    est_seq, est_block = r.logp_error, r.block_logp_error[integrated]
    for unit, true, est in (("seq", true_seq, est_seq), ("block", true_block, est_block)):
        study.setdefault((kind, unit), []).append((true.flatten(), est.flatten()))
    return [
        name, r.nfe, r.error_nfe, f"{seconds:.1f}",
        f"{float(true_seq.max()):.2e}", f"{float(est_seq.max()):.2e}", f"{float(true_block.max()):.2e}",
        f"{covers(est_seq, true_seq):.2f}", f"{covers(est_block, true_block):.2f}",
        f"{within(est_seq, true_seq):.2f}", f"{within(est_block, true_block):.2f}",
    ]


def covers(est, true) -> float:
    return float((est >= true).double().mean())


def within(est, true) -> float:
    return float(((est <= 10 * true) | (true < FLOOR) & (est <= 10 * FLOOR)).double().mean())


SAFETY_FACTORS = (1.0, 2.0, 3.0, 4.0, 5.0)


def safety_rows(study: dict) -> list:
    """Coverage of the reported error had its safety factor been ``s`` instead of
    ``solver.SAFETY`` (the estimate scales with it), pooled over the rows of one kind:
    one row per kind, unit and ``s`` in ``SAFETY_FACTORS``."""
    rows = []
    for (kind, unit), pairs in study.items():
        true, est = (torch.cat(x) for x in zip(*pairs))
        for s in SAFETY_FACTORS:
            scaled = est * s / SAFETY
            rows.append([kind, unit, len(true), f"{s:g}", f"{covers(scaled, true):.3f}", f"{within(scaled, true):.3f}"])
    return rows


SAFETY_COLUMNS = ["solver kind", "unit", "cases", "safety factor", "bounds", "within 10x"]


def print_study(study: dict) -> None:
    print(f"Coverage against the safety factor (the reported errors of the rows above scaled by s / {SAFETY:g}; torchode has none):")
    print()
    common.table(SAFETY_COLUMNS, safety_rows(study))


COLUMNS = ["solver", "nfe", "estimate nfe", "CPU s", "max true error/seq", "max reported/seq", "max true error/block",
           "bounds (seq)", "bounds (block)", "within 10x (seq)", "within 10x (block)"]


def analytic(args) -> None:
    prior = common.block_mixture(block_size=2, latent_dim=2, seed=3)
    n_blocks = 2 if args.quick else 6
    u = common.mixture_samples(prior, 2 * n_blocks, 4 if args.quick else 16, seed=1 + args.skip).float()
    exact = prior.block_log_prob(u.double())  # [B, n_blocks]
    reference = cnf.BlockLogProb(logp=exact.sum(-1), block_logp=exact, block_prior_logp=torch.zeros_like(exact), integrated=torch.ones_like(exact, dtype=torch.bool),
                                 prior_logp=exact.sum(-1), delta_logp=exact.sum(-1), z1=u.double(), nfe=0, settings={})
    print(f"## Analytic harness: BlockMixturePrior (block 2, d 2), {u.shape[0]} sequences of {n_blocks} blocks drawn from seed {1 + args.skip}, float32 latents, exact trace")
    print()
    study = {}
    rows = [measure(prior.velocity, u, 2, None, reference, "exact", None, c, study) for c in choices(args.quick)]
    rows += torchode_rows(prior.velocity, u, 2, reference, "exact", None, torchode_tolerances(args.quick))
    common.table(COLUMNS, rows)
    print_study(study)


def embedded(args) -> None:
    import colaprob

    model, name = common.cola_model("random" if args.quick else "tiny")
    n_blocks, batch = (1, 2) if args.quick else (args.blocks, args.sequences)
    u = common.prior_latents(model, name, n_blocks * model.block_size, batch, skip=args.skip)
    trace = "exact" if args.exact else "hutchinson"
    probes = None if args.exact else (torch.randint(0, 2, (1, *u.shape), generator=torch.Generator().manual_seed(0)) * 2 - 1).float()
    if args.quick:
        double = model
        double.double()
        ref_tol = 1e-4
    else:
        double, ref_tol = colaprob.load("tiny").eval().double(), 1e-10
    start = time.process_time()
    reference = cnf.block_causal_log_prob(
        double.prior_velocity, u.double(), model.block_size, trace, probes=None if probes is None else probes.double(), rtol=ref_tol, atol=ref_tol
    )
    ref_seconds = time.process_time() - start
    if args.quick:
        model.float()
    print(f"## Embedded DiT: {name}, {batch} held-out posterior means of {n_blocks} blocks (texts {args.skip + 1} to {args.skip + batch}), {trace} trace")
    print()
    print(f"Reference: float64 copy, dopri5 at rtol = atol = {ref_tol:g}: {reference.nfe} evaluations, {ref_seconds:.0f} s CPU.")
    print()
    study = {}
    rows = [measure(model.prior_velocity, u, model.block_size, None, reference, trace, probes, c, study) for c in choices(args.quick)]
    rows += torchode_rows(model.prior_velocity, u, model.block_size, reference, trace, probes, torchode_tolerances(args.quick))
    common.table(COLUMNS, rows)
    print_study(study)


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4, help="blocks per sequence of the embedded model (default 4)")
    p.add_argument("--sequences", type=int, default=4, help="held-out sequences of the embedded model (default 4)")
    p.add_argument("--exact", action="store_true", help="the exact trace on the embedded model (64 VJPs per step)")
    p.add_argument("--skip-embedded", action="store_true", help="the analytic harness only")
    p.add_argument("--skip", type=int, default=0, help="other sequences: held-out texts after the first N, harness draws from seed 1 + N (default 0)")
    args = p.parse_args(argv)
    common.start(args, "Solver error in nats against cost")
    analytic(args)
    if not args.skip_embedded:
        embedded(args)
    common.finish()


if __name__ == "__main__":
    main()
