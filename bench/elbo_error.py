"""The ELBO's solver error estimated from every 8th sample: does it still bound the true error?

The ELBO is a plain average over K posterior samples, so its solver error is the mean of its
samples' errors; ``elbo`` estimates that mean from samples 0, 8, 16, ...
(``draws.ERROR_SUBSAMPLE_STRIDE``) instead of running the companion solve on every sample.
Here, on the embedded model (``colaprob.load("tiny")``), ``--documents`` held-out texts of
``--tokens`` framed tokens, K = ``--samples`` posterior draws each, one Rademacher probe per
draw (Hutchinson; the decoder and posterior terms are exact, so the prior's density is the
ELBO's only solved term):

* a reference: a float64 copy of the model, dopri5 at ``--reference-tolerance`` on the same
  draws and probes (the ODE's own answer, so a difference is the solver's error alone);
* per tolerance, one solve of every draw with the companion on every draw
  (``cnf.block_causal_log_prob(..., solver_error=True)``; the companion of a subset equals
  the whole batch's there, ``tests/test_solver_error.py``).

Per document and tolerance, the ELBO's true solver error ``|mean_k (log p_k - ref_k)|`` against
the reported one: from every draw (``mean_k e_k``, before), from draws 0, 8, ... (what
``elbo`` reports now) and, as exchangeable replicates of that subsample, from each of the 8
offsets ``{j, j + 8, ...}``; the share that bounds the true error and that is within 10x of
it (true errors below 1e-6 nats count as met), and the draws' own (per-sample) coverage.

The estimate adds the draws' error sizes, while their signed errors partly cancel in the
average. As an alternative (not what ``elbo`` reports), the same companion's *signed*
differences ``d_k = SAFETY (log p_k - companion_k) r / (r - 1)`` (a second solve at the
companion's tolerance, run here for the purpose) averaged before the absolute value:
``|mean_k d_k|`` over every draw and over draws 0, 8, ...

    python bench/elbo_error.py
    python bench/elbo_error.py --quick
"""

from __future__ import annotations

import time

import common
import torch

import colaprob
from colaprob.estimators import cnf, streams
from colaprob.estimators.draws import ERROR_SUBSAMPLE_STRIDE, draw
from colaprob.estimators.solver import SAFETY
from colaprob.protocol import to_prior_space

FLOOR = 1e-6  # nats: float32 rounding of the embedded model's densities
NAMES = ("every draw", "draws 0, 8, ...", "any offset", "per draw", "signed, every draw", "signed, draws 0, 8, ...", "signed, any offset")


def covers(est, true) -> float:
    return float((est >= true).double().mean())


def within(est, true) -> float:
    return float(((est <= 10 * true) | (true < FLOOR) & (est <= 10 * FLOOR)).double().mean())


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--documents", type=int, default=4, help="held-out texts (default 4)")
    p.add_argument("--tokens", type=int, default=16, help="framed tokens per text (default 16: 4 blocks)")
    p.add_argument("--samples", type=int, default=16, help="posterior draws per text, K (default 16, the CLI's)")
    p.add_argument("--tolerances", type=float, nargs="+", default=[1e-4, 1e-5, 1e-6], help="dopri5 rtol = atol (default 1e-4 1e-5 1e-6)")
    p.add_argument("--reference-tolerance", type=float, default=1e-9, help="the float64 reference's tolerance (default 1e-9)")
    args = p.parse_args()
    common.start(args, "The ELBO's solver error from every 8th sample")
    if args.quick:
        args.documents, args.tokens, args.samples, args.tolerances, args.reference_tolerance = 1, 8, 8, [1e-2], 1e-4
    model, label = common.cola_model("tiny")
    batch = model.frame(common.texts_of_length(model, args.tokens, args.documents))
    keys = streams.sequence_keys(batch, None)
    K, D = args.samples, len(batch)
    drawn = draw(model, batch, K, seed=0, keys=keys, chunk_size=K, solver=cnf.Solver(method="euler", steps=1), keep_latents=True)
    u = to_prior_space(model, drawn.latents).contiguous()  # [K, D, L, d]
    probes = (torch.randint(0, 2, (1, *u.shape), generator=torch.Generator().manual_seed(0)) * 2 - 1).float()
    bs = model.block_size
    print(f"Model: {label}. {D} held-out texts of {args.tokens} framed tokens ({u.shape[-2] // bs} blocks), K = {K} posterior draws each, one Rademacher probe per draw.")
    print()
    double = colaprob.load("tiny").eval().double()
    start = time.process_time()
    reference = cnf.block_causal_log_prob(double.prior_velocity, u.double(), bs, "hutchinson", probes=probes.double(), rtol=args.reference_tolerance, atol=args.reference_tolerance)
    print(f"Reference: float64 copy, dopri5 at rtol = atol = {args.reference_tolerance:g}: {reference.nfe} evaluations, {time.process_time() - start:.0f} s CPU.")
    print()
    subsample = torch.arange(K) % ERROR_SUBSAMPLE_STRIDE == 0
    offsets = [torch.arange(K) % ERROR_SUBSAMPLE_STRIDE == j for j in range(min(ERROR_SUBSAMPLE_STRIDE, K))]
    rows, pooled = [], {}
    for tol in args.tolerances:
        start = time.process_time()
        solver = cnf.Solver(rtol=tol, atol=tol, trace="hutchinson")
        r = cnf.block_causal_log_prob(model.prior_velocity, u, bs, probes=probes, solver=solver.replace(solver_error=True))
        seconds = time.process_time() - start
        companion = cnf.block_causal_log_prob(model.prior_velocity, u, bs, probes=probes, solver=solver.companion())
        ratio = solver.error_ratio()
        d = SAFETY * (r.logp - companion.logp) * ratio / (ratio - 1)  # [K, D] signed
        signed = r.logp - reference.logp  # [K, D]
        true = signed.mean(0).abs()  # the ELBO's error per document
        est = r.logp_error  # [K, D]
        reported = {
            "every draw": est.mean(0),
            "draws 0, 8, ...": est[subsample].mean(0),
            "any offset": torch.stack([est[o].mean(0) for o in offsets]).flatten(),
            "per draw": est.flatten(),
            "signed, every draw": d.mean(0).abs(),
            "signed, draws 0, 8, ...": d[subsample].mean(0).abs(),
            "signed, any offset": torch.stack([d[o].mean(0).abs() for o in offsets]).flatten(),
        }
        truths = {name: true.repeat(len(reported[name]) // D) for name in reported}
        truths["per draw"] = signed.abs().flatten()
        row = [f"dopri5 {tol:g}", f"{seconds:.0f}", common.fmt(float(true.max())), common.fmt(float(signed.abs().mean()))]
        for name in NAMES:
            row += [f"{covers(reported[name], truths[name]):.2f}", f"{within(reported[name], truths[name]):.2f}"]
            pooled.setdefault(name, []).append((reported[name], truths[name]))
        rows.append(row)
    columns = ["solver", "CPU s", "max true ELBO error", "mean true error per draw"]
    for name in NAMES:
        columns += [f"{name}: bounds", "within 10x"]
    common.table(columns, rows)
    print("Pooled over the tolerances:")
    print()
    summary = []
    for name, pairs in pooled.items():
        est, true = (torch.cat(x) for x in zip(*pairs))
        summary.append([name, len(true), f"{covers(est, true):.3f}", f"{within(est, true):.3f}", common.fmt(float((est / true.clamp_min(FLOOR)).median()))])
    common.table(["reported from", "cases", "bounds", "within 10x", "median reported / true"], summary)
    common.finish()


if __name__ == "__main__":
    main()
