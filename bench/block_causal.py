"""Block-causal prior density: one 2L solve against one solve per block.

``cnf.block_causal_log_prob`` integrates every block of a sequence in ONE ODE solve (the 2L
layout ``[clean | noisy]``, a probe repeated in every block). The alternative is one
``cnf.log_prob`` solve per block, each block's conditional given its clean history:

* DiT, "per block (KV cache)": the strongest per-block baseline, the generation path: the
  clean history ``z^(<b)`` is prefilled into the DiT's key/value cache once per block
  (``dit.prefill``), and every evaluation runs only the block's own rows over it
  (``dit.block_velocity``). Its prefill time is counted.
* "per block (2L prefix)": what the 2L velocity API alone gives: the model's velocity on the
  prefix ``z^(<=b)`` with the history rows clean at ``t = 0``, keeping block ``b``'s output.
  Its cost grows with ``b``. Run for the tractable prior, and for the DiT with
  ``--dit-prefix``.

Hutchinson: the same Rademacher probes for both (cut per block), so the values differ only by
the solver's steps. Reported: median CPU time of each (interleaved), the speed-up, velocity
evaluations (per-block: summed over the blocks), the largest difference of a block's
``log p(z^(b) | z^(<b))`` between the two, and for the tractable prior the largest error of
each against the analytic conditional (for the DiT, with ``--reference-tol``, against one
solve at that tighter tolerance, the same probes). DiT in float32, tractable prior in float64.

    python bench/block_causal.py                 # B = 1, 2, 4, 8, 16
    python bench/block_causal.py --blocks 16 --dit-tol 1e-5 --skip tractable
    python bench/block_causal.py --quick         # smoke run
"""

from __future__ import annotations

import torch

import common
from colaprob.estimators import cnf
from colaprob.model import T_SCALE


def dit_cached_velocity(model, u: torch.Tensor, b: int):
    """Velocity of block ``b`` of ``u`` given its clean history, over a prefilled KV cache."""
    bs = model.block_size
    with torch.no_grad():
        cache = model.dit.prefill(u[:, : b * bs]) if b > 0 else None

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.dit.block_velocity(z, (T_SCALE * t).expand(z.shape[:2]), cache)

    return velocity


def prefix_velocity(velocity_2l, u: torch.Tensor, b: int, bs: int):
    """Velocity of block ``b`` of ``u`` from a 2L velocity run on the prefix ``u[:(b+1) bs]``
    (history rows held clean at ``t = 0``)."""
    history, clean = u[..., : b * bs, :], u[..., : (b + 1) * bs, :]
    t_history = torch.zeros(b * bs, dtype=u.dtype)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_all = torch.cat([t_history, t.to(u.dtype).expand(z.shape[-2])])
        return velocity_2l(torch.cat([history.to(z.dtype), z], -2), t_all, clean)[..., b * bs :, :]

    return velocity


def per_block(make_velocity, u: torch.Tensor, bs: int, trace: str, probes, tol: float):
    """Every block's conditional by its own ``cnf.log_prob`` solve: ([..., B] log-densities,
    total velocity evaluations)."""
    values, nfe = [], 0
    for b in range(u.shape[-2] // bs):
        block = slice(b * bs, (b + 1) * bs)
        r = cnf.log_prob(
            make_velocity(b),
            u[..., block, :],
            event_dims=2,
            trace=trace,
            rtol=tol,
            atol=tol,
            probes=None if probes is None else probes[..., block, :],
        )
        values.append(r.logp)
        nfe += r.nfe
    return torch.stack(values, -1), nfe


def one_solve(velocity_2l, u: torch.Tensor, bs: int, trace: str, probes, tol: float):
    r = cnf.block_causal_log_prob(velocity_2l, u, bs, trace, rtol=tol, atol=tol, probes=probes)
    return r.block_logp, r.nfe


def compare(variants: dict, repeats: int, reference=None):
    """Time the variants (first = the one solve) and summarise against the first."""
    timings = common.interleaved(variants, repeats)
    names = list(variants)
    base = timings[names[0]]
    row = {"one solve CPU s": base.median, "one solve nfe": base.result[1]}
    if reference is not None:
        row["one solve err"] = (base.result[0] - reference).abs().max().item()
    for name in names[1:]:
        other = timings[name]
        row[f"{name} CPU s"] = other.median
        row[f"{name} nfe"] = other.result[1]
        row[f"{name} speed-up"] = other.median / base.median
        row[f"{name} max diff"] = (other.result[0] - base.result[0]).abs().max().item()
        if reference is not None:
            row[f"{name} err"] = (other.result[0] - reference).abs().max().item()
    return row


def probes_for(trace: str, u: torch.Tensor, seed: int = 0):
    if trace != "hutchinson":
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (1, *u.shape), generator=g) * 2 - 1).to(u.dtype)


def print_rows(rows: list[dict]) -> None:
    columns = list(rows[0])
    common.table(columns, [[r.get(c) for c in columns] for r in rows])


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="blocks per sequence B")
    p.add_argument("--traces", nargs="+", default=["exact", "hutchinson"], choices=["exact", "hutchinson"])
    p.add_argument("--batch", type=int, default=1, help="sequences per solve (default 1)")
    p.add_argument("--tol", type=float, default=1e-5, help="dopri5 rtol = atol of the tractable prior (default 1e-5, the API default)")
    p.add_argument("--dit-tol", type=float, default=1e-4, help="dopri5 rtol = atol of the DiT (default 1e-4: at 1e-5 the trained DiT needs ~3x the evaluations)")
    p.add_argument("--model", default="auto", help="tiny, random, a checkpoint path, or auto (tiny if built)")
    p.add_argument("--dit-prefix", action="store_true", help="also time the DiT per block through the 2L velocity on the prefix")
    p.add_argument("--reference-tol", type=float, help="also solve the DiT once at this tighter tolerance and report both methods' error against it")
    p.add_argument("--skip", nargs="*", default=[], choices=["dit", "tractable"], help="leave out a model")
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.batch, args.tol, args.dit_tol = [1, 2], 1, 1e-2, 1e-2
    common.start(args, "Block-causal prior density: one 2L solve vs one solve per block")
    print(f"dopri5, batch {args.batch}, median CPU seconds of {args.repeats} interleaved repeats; nfe of per-block solves summed over the blocks")
    print()

    if "dit" not in args.skip:
        model, label = common.cola_model("random" if args.quick else args.model)
        bs = model.block_size
        print(f"## DiT: {label}; {common.model_size(model)}; float32, clean-history cache on; rtol = atol = {args.dit_tol}")
        print()
        u_all = common.prior_latents(model, label, max(args.blocks) * bs, args.batch)
        for trace in args.traces:
            rows = []
            for B in args.blocks:
                u = u_all[:, : B * bs].contiguous()
                probes = probes_for(trace, u)
                variants = {
                    "one solve": lambda: one_solve(model.prior_velocity, u, bs, trace, probes, args.dit_tol),
                    "per block (KV cache)": lambda: per_block(lambda b: dit_cached_velocity(model, u, b), u, bs, trace, probes, args.dit_tol),
                }
                if args.dit_prefix:
                    variants["per block (2L prefix)"] = lambda: per_block(
                        lambda b: prefix_velocity(model.prior_velocity, u, b, bs), u, bs, trace, probes, args.dit_tol
                    )
                reference = None
                if args.reference_tol:
                    reference = one_solve(model.prior_velocity, u, bs, trace, probes, args.reference_tol)[0]
                rows.append({"trace": trace, "B": B, **compare(variants, args.repeats, reference)})
            print_rows(rows)

    if "tractable" not in args.skip:
        bs, d = 4, 16
        prior = common.block_mixture(bs, d)
        print(f"## Tractable: BlockMixturePrior, block size {bs}, d = {d}, 3 components; float64, exact draws; rtol = atol = {args.tol}")
        print()
        u_all = common.mixture_samples(prior, max(args.blocks) * bs, args.batch)
        for trace in args.traces:
            rows = []
            for B in args.blocks:
                u = u_all[:, : B * bs].contiguous()
                probes = probes_for(trace, u)
                reference = prior.block_log_prob(u)
                variants = {
                    "one solve": lambda: one_solve(prior.velocity, u, bs, trace, probes, args.tol),
                    "per block (2L prefix)": lambda: per_block(lambda b: prefix_velocity(prior.velocity, u, b, bs), u, bs, trace, probes, args.tol),
                }
                rows.append({"trace": trace, "B": B, **compare(variants, args.repeats, reference)})
            print_rows(rows)


if __name__ == "__main__":
    main()
    common.finish()
