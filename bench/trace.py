"""Exact trace against Hutchinson: cost, and error against the analytic density, as the latent
dimension and the block size grow.

Two tractable models of ``colaprob.testing`` with densities in closed form:

* a Gaussian mixture in ``D`` dimensions (its exact flow-matching velocity) by
  ``cnf.log_prob``: the exact divergence costs ``D`` vector-Jacobian products per
  evaluation, Hutchinson one per probe;
* a block-causal mixture prior of ``n_blocks`` blocks by ``cnf.block_causal_log_prob``: the
  exact divergence costs ``block_size * d`` products per evaluation.

For each size: median CPU time of each trace (interleaved), velocity evaluations, the
error of the log-density against the analytic value over a batch of exact draws (exact:
largest |error|; Hutchinson: root-mean-square and mean error over the batch, the mean being
the bias, which should vanish, and the RMS the probe noise). Float64, dopri5.

    python bench/trace.py
    python bench/trace.py --quick
"""

from __future__ import annotations

import torch

import common
from colaprob.estimators import cnf


def errors(logp: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    e = logp - reference
    return e.abs().max().item(), e.pow(2).mean().sqrt().item(), e.mean().item()


def measure(variants: dict, reference: torch.Tensor, repeats: int, size: dict) -> dict:
    timings = common.interleaved(variants, repeats)
    exact = timings["exact"]
    row = {**size, "exact CPU s": exact.median, "exact nfe": exact.result.nfe, "exact max err": errors(exact.result.logp, reference)[0]}
    for name, t in timings.items():
        if name == "exact":
            continue
        _, rms, bias = errors(t.result.logp, reference)
        row.update({f"{name} CPU s": t.median, f"{name} nfe": t.result.nfe, f"exact/{name} time": exact.median / t.median, f"{name} rms err": rms, f"{name} mean err": bias})
    return row


def print_rows(rows: list[dict]) -> None:
    columns = list(rows[0])
    common.table(columns, [[r.get(c) for c in columns] for r in rows])


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64], help="Gaussian-mixture dimensions D")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="block sizes (latent d = --latent-dim)")
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--n-blocks", type=int, default=4, help="blocks per sequence (default 4)")
    p.add_argument("--block-batch", type=int, default=16, help="exact draws per block size (default 16)")
    p.add_argument("--probes", type=int, nargs="+", default=[1, 8], help="Hutchinson probe counts (default 1 8)")
    p.add_argument("--batch", type=int, default=32, help="exact draws per size (default 32)")
    p.add_argument("--tol", type=float, default=1e-5, help="dopri5 rtol = atol (default 1e-5)")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.block_sizes, args.batch, args.block_batch, args.probes = [2, 4], [1, 2], 4, 4, [1]
    common.start(args, "Exact trace vs Hutchinson: cost and error against the analytic density")
    print(f"dopri5, rtol = atol = {args.tol}, float64, Rademacher probes, median CPU seconds of {args.repeats} interleaved repeats")
    print()

    def variants(solve):
        out = {"exact": lambda: solve("exact", 1)}
        for n in args.probes:
            out[f"hutch{n}"] = lambda n=n: solve("hutchinson", n)
        return out

    print(f"## Gaussian mixture (3 components, full covariances), cnf.log_prob, {args.batch} exact draws")
    print()
    rows = []
    for D in args.dims:
        flow = common.gaussian_mixture(D)
        z0 = flow.sample(args.batch, torch.Generator().manual_seed(1))
        reference = flow.log_prob(z0)
        solve = lambda trace, n: cnf.log_prob(flow.velocity, z0, 1, trace, args.tol, args.tol, n_probes=n)
        rows.append(measure(variants(solve), reference, args.repeats, {"D": D}))
    print_rows(rows)

    # The mixture prior depends on block size and d only through block_size * d (its blocks
    # are mixtures over block_size * d coordinates), so one sweep covers both; the DiT's
    # exact trace costs block_size * d VJPs per evaluation, each over all L positions.
    print(f"## Block-causal mixture prior, {args.n_blocks} blocks of block size x d = {args.latent_dim}, cnf.block_causal_log_prob, {args.block_batch} exact draws")
    print()
    rows = []
    for bs in args.block_sizes:
        prior = common.block_mixture(bs, args.latent_dim)
        u = common.mixture_samples(prior, args.n_blocks * bs, args.block_batch, seed=1)
        reference = prior.log_prob(u)
        solve = lambda trace, n: cnf.block_causal_log_prob(prior.velocity, u, bs, trace, rtol=args.tol, atol=args.tol, n_probes=n)
        rows.append(measure(variants(solve), reference, args.repeats, {"block size": bs, "d": args.latent_dim, "VJPs/eval (exact)": bs * args.latent_dim}))
    print_rows(rows)

if __name__ == "__main__":
    main()
    common.finish()
