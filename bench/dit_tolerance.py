"""The embedded model's prior density against the solver tolerance: evaluations, time, and
how far the values are from the tightest tolerance's.

One 2L solve (``cnf.block_causal_log_prob``) of held-out posterior means (B blocks), exact
and Hutchinson (one fixed Rademacher probe, the same at every tolerance), dopri5 at each
rtol = atol. Reported: velocity evaluations, median CPU seconds, ``log p`` of the sequence,
and the largest per-block and total differences from the tightest tolerance of the list.

    python bench/dit_tolerance.py
    python bench/dit_tolerance.py --quick
"""

from __future__ import annotations

import common
from block_causal import one_solve, probes_for


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6], help="rtol = atol values (default 1e-3 .. 1e-6)")
    p.add_argument("--blocks", type=int, default=16, help="blocks B (default 16)")
    p.add_argument("--model", default="auto", help="tiny, random, a checkpoint path, or auto (tiny if built)")
    args = p.parse_args(argv)
    if args.quick:
        args.tols, args.blocks, args.model = [1e-1, 1e-2], 1, "random"
    common.start(args, "Prior density of the embedded model against the solver tolerance")
    model, label = common.cola_model(args.model)
    bs = model.block_size
    u = common.prior_latents(model, label, args.blocks * bs, 1)
    print(f"{label}; {common.model_size(model)}; {args.blocks} blocks of held-out posterior means; dopri5; median CPU seconds of {args.repeats} repeats")
    print()
    tols = sorted(args.tols, reverse=True)
    for trace in ("exact", "hutchinson"):
        probes = probes_for(trace, u)
        variants = {tol: (lambda tol=tol: one_solve(model.prior_velocity, u, bs, trace, probes, tol)) for tol in tols}
        timings = common.interleaved(variants, args.repeats)
        best = timings[tols[-1]].result[0]
        rows = []
        for tol in tols:
            block_logp, nfe = timings[tol].result
            rows.append([trace, tol, nfe, timings[tol].median, f"{block_logp.sum().item():.3f}", (block_logp - best).abs().max().item(), (block_logp.sum() - best.sum()).abs().item()])
        common.table(["trace", "rtol = atol", "nfe", "CPU s", "log p (nats)", "max block diff vs tightest", "total diff vs tightest"], rows)


if __name__ == "__main__":
    main()
    common.finish()
