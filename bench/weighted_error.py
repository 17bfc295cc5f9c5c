"""What the solver-error estimate costs when only some samples get the companion solve: the
ones that carry an importance-weighted estimate's weight, every 8th of a plain average's.

IWAE-K's solver error is the weight-averaged error of its samples (``statistics.solver_error``),
so a sample with almost no self-normalised weight contributes almost nothing to it:
``draws.draw(importance_weighted=True)`` (what ``iwae`` and ``conditional`` run) solves the
companion only for the samples with at least ``UNESTIMATED_WEIGHT / K`` of the weight and
counts the rest as no better than the worst estimated one. Here, on the embedded model
(``colaprob.load("tiny")``, held-out texts framed to ``--tokens`` tokens, Hutchinson trace, one
probe), side by side in one run:

* ``no estimate``: ``iwae`` without the solver error;
* ``every sample``: the same draws with the companion on every sample (as before);
* ``weight-carrying``: ``iwae`` with the solver error (the companion on the carrying samples).

Reported per (K, tolerance): CPU seconds of each and the estimate's extra cost over ``no
estimate``, the share of samples that got a companion, the companion's rows over the solve's
(evaluations times the samples evaluated: what the cost is at widths where the network's
products dominate, not the embedded model's per-call overhead), and the largest relative difference of
the two reported errors (how well the companion of every sample bounds the true error is
section 8's measurement; here the question is whether leaving the light samples out changes
what is reported).

The ELBO (a plain average, every sample weighs the same): ``elbo`` without the solver error,
with the companion on every sample (as before), and with it on samples 0, 8, 16, ...
(``draws.ERROR_SUBSAMPLE_STRIDE``; what ``elbo`` does now), on the same texts: CPU seconds,
the extra cost of each over the solve, the companion's rows over the solve's, and the
largest relative difference of the two reported errors (whether the subsample still bounds
the true error is ``bench/elbo_error.py``'s question).

Task scores (``continuation_log_prob``, what ``colaprob eval`` runs) on ``--items`` items of
the embedded cloze (``colaprob.tasks.embedded_cloze``, 4 choices, shared context): CPU
seconds without and with the estimate, and the DiT rows the companion added over the rows of
the solve (``dit_rows``: latent positions evaluated, summed over evaluations).

    python bench/weighted_error.py
    python bench/weighted_error.py --quick
"""

from __future__ import annotations

import common
import numpy as np

from colaprob.estimators import cnf, draws, elbo, iwae, statistics, streams
from colaprob.estimators.draws import draw, summarise


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=2, help="held-out texts (default 2)")
    p.add_argument("--tokens", type=int, default=64, help="framed tokens per text (default 64: 4 blocks)")
    p.add_argument("--items", type=int, default=4, help="cloze items of the task-score table (default 4)")
    p.add_argument("--tables", nargs="+", choices=("iwae", "elbo", "task"), default=["iwae", "elbo", "task"], help="which tables (default all)")
    args = p.parse_args()
    common.start(args, "The solver-error estimate on the weight-carrying samples only")
    model, label = common.cola_model("tiny")
    batch = model.frame(common.texts_of_length(model, args.tokens, 1 if args.quick else args.sequences))
    keys = streams.sequence_keys(batch, None)
    print(f"Model: {label}. Hutchinson trace, one Rademacher probe.")
    print()
    if "iwae" in args.tables:
        print(f"IWAE: {len(batch)} held-out texts of {args.tokens} framed tokens.")
        print()
        iwae_scores(model, batch, keys, [(4, 1e-3)] if args.quick else [(16, 1e-3), (64, 1e-3), (16, 1e-4)], args.repeats)
    if "elbo" in args.tables:
        print(f"ELBO: {len(batch)} held-out texts of {args.tokens} framed tokens.")
        print()
        elbo_scores(model, batch, [(4, 1e-3)] if args.quick else [(16, 1e-3), (16, 1e-4), (64, 1e-3)], args.repeats)
    if "task" in args.tables:
        task_scores(model, 1 if args.quick else args.items, [(4, 1e-3)] if args.quick else [(16, 1e-3), (16, 1e-4)], args.repeats)
    common.finish()


def iwae_scores(model, batch, keys, grid, repeats: int) -> None:
    def every_sample(K, solver):
        d = draw(model, batch, K, keys=keys, seed=0, chunk_size=K, solver=solver)
        return summarise(model, batch, keys, d, statistics.log_mean_exp, statistics.log_mean_exp_se, "IWAE", 0, K, weighted=True)

    subset_table(model, batch, grid, repeats, iwae, every_sample, "weight-carrying", "(carrying)")


def elbo_scores(model, batch, grid, repeats: int) -> None:
    subset_table(model, batch, grid, repeats, elbo, lambda K, solver: elbo(model, batch, K, chunk_size=K, solver=solver), "every 8th", "(every 8th)")


def subset_table(model, batch, grid, repeats: int, estimate, every_sample, subset: str, rows_label: str) -> None:
    """Per (K, tolerance): ``estimate`` without the solver error, ``every_sample(K, solver)``
    (the same draws with the companion on every sample) and ``estimate`` with it on its
    ``subset`` of samples; the table's columns."""
    rows = []
    for K, tol in grid:
        solver = cnf.Solver(rtol=tol, atol=tol, trace="hutchinson")
        with_error = solver.replace(solver_error=True)
        variants = {
            "no estimate": lambda: estimate(model, batch, K, chunk_size=K, solver=solver),
            "every sample": lambda: companion_on_every_sample(lambda: every_sample(K, with_error)),
            subset: lambda: estimate(model, batch, K, chunk_size=K, solver=with_error),
        }
        t = common.interleaved(variants, repeats)
        full, part = t["every sample"].result, t[subset].result
        base = t["no estimate"].median
        e_full, e_part = full["log_likelihood_solver_error"].values, part["log_likelihood_solver_error"].values
        share = float(part["prior_solver_error"].notnull().mean())
        rows.append(
            [
                K,
                f"{tol:g}",
                base,
                t["every sample"].median / base - 1,
                t[subset].median / base - 1,
                share,
                full.attrs["solver_error_nfe"] / full.attrs["nfe"],
                share * part.attrs["solver_error_nfe"] / part.attrs["nfe"],
                float(np.max(np.abs(e_part - e_full) / e_full)),
                float(np.max(e_full)),
            ]
        )
    columns = ["K", "tolerance", "no estimate CPU s", "every sample: extra", f"{subset}: extra", "samples with a companion",
               "companion rows / solve's (every)", rows_label, "max rel. diff of errors", "max reported error"]
    common.table(columns, rows)


def companion_on_every_sample(fn):
    """``fn()`` with a plain draw's companion on every sample (the stride set to 1)."""
    stride, draws.ERROR_SUBSAMPLE_STRIDE = draws.ERROR_SUBSAMPLE_STRIDE, 1
    try:
        return fn()
    finally:
        draws.ERROR_SUBSAMPLE_STRIDE = stride


def task_scores(model, n_items: int, grid, repeats: int) -> None:
    from colaprob.estimators.continuations import continuation_log_prob
    from colaprob.tasks import embedded_cloze

    items = embedded_cloze(n_items).items
    contexts, choices = [item.context for item in items], [item.choices for item in items]
    print(f"Task scores: {len(items)} embedded cloze items of {len(choices[0])} choices, shared context; Hutchinson trace, one probe.")
    print()
    rows = []
    for K, tol in grid:
        solver = cnf.Solver(rtol=tol, atol=tol, trace="hutchinson")
        variants = {
            "no estimate": lambda: continuation_log_prob(model, contexts, choices, K, chunk_size=K, solver=solver),
            "weight-carrying": lambda: continuation_log_prob(model, contexts, choices, K, chunk_size=K, solver=solver.replace(solver_error=True)),
        }
        t = common.interleaved(variants, repeats)
        without, with_error = t["no estimate"].result, t["weight-carrying"].result
        rows.append(
            [
                K,
                f"{tol:g}",
                t["no estimate"].median,
                t["weight-carrying"].median / t["no estimate"].median - 1,
                with_error.attrs["dit_rows"] / without.attrs["dit_rows"] - 1,
                float(with_error["log_likelihood_solver_error"].max()),
            ]
        )
    common.table(["K", "tolerance", "no estimate CPU s", "weight-carrying: extra", "companion DiT rows / solve's", "max reported error"], rows)


if __name__ == "__main__":
    main()
