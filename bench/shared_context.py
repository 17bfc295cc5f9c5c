"""Multiple choice: the context paid for once against once per choice.

``colaprob.estimators.continuations.continuation_log_prob`` scores the choices of an item on
common posterior draws. With ``share_context=True`` (what ``colaprob eval`` runs) the prior
blocks wholly inside the context are integrated in one ODE solve per item and each choice
solves only the blocks its continuation touches, over the context's clean history (the DiT
evaluates those rows only: ``ColaModel.prior_velocity_window``). With ``share_context=False``
every choice integrates its whole sequence and solves its own context term, as independent
per-choice scoring (the conditional estimator, choice by choice) would. Both
give the same numbers on the same draws (to the solver's tolerance with an adaptive solver:
the step sizes are chosen per solve; to float rounding on a fixed grid).

Model: the official-format fixture ``tests/fixtures/official-tiny-a`` (random weights; DiT 2
layers x width 64, d = 8, DiT block 4 positions, patch 1: a block is 4 tokens). Items: a
context of the median length in characters of an official task's ``few_shot_prefix +
prompt`` (MMLU 567, HellaSwag 896: measured on the official files), made of held-out text of
the embedded corpus and cut so that it ends on a block boundary, and 4 choices of at most 4
tokens: each continuation touches one block. Default trace: Hutchinson with one probe (the
row counts do not depend on the trace; the exact trace multiplies the CPU time of both paths). Reported per item, the median over items and
repeats: DiT row-evaluations (latent positions the network is evaluated at, summed over the
ODE's evaluations; the clean history's rows, computed once per solve, separately), velocity
evaluations, CPU seconds, and the largest difference of ``log p(choice | context)`` between
the two paths.

    python bench/shared_context.py                     # MMLU and HellaSwag lengths, K = 8
    python bench/shared_context.py --quick             # smoke run
"""

from __future__ import annotations

import statistics
import numpy as np

import common
import colaprob
from colaprob.estimators.continuations import continuation_log_prob, frame_continuations

FIXTURE = common.REPO / "tests" / "fixtures" / "official-tiny-a"
OFFICIAL_MEDIAN_CHARS = {"mmlu": 567, "hellaswag": 896}
CHOICES = [" yes", " no", " red", " blue"]
COLUMNS = [
    "context",
    "context tokens",
    "solver",
    "per-choice DiT rows",
    "shared DiT rows",
    "rows ratio",
    "history rows (per-choice / shared)",
    "NFE (per-choice / shared)",
    "per-choice CPU s",
    "shared CPU s",
    "CPU ratio",
    "max |diff| log p (nats)",
]


def contexts_of(model, chars: int, n: int) -> list[str]:
    """``n`` held-out texts of about ``chars`` characters, each cut to end on a block boundary."""
    texts, pieces = [], common.heldout_texts(0, 10_000, max_bytes=400)
    multiple = model.patch_size * model.block_size
    start = 0
    for _ in range(n):
        text = ""
        while len(text) < chars:
            text += pieces[start % len(pieces)] + " "
            start += 1
        text = text[:chars].rstrip()
        framed = lambda t: int(frame_continuations(model, [t + "\nAnswer:"], [[" x"]]).context_tokens[0])
        while framed(text) % multiple:
            text = text[:-1].rstrip()
        texts.append(text + "\nAnswer:")
    return texts


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4, help="K posterior draws per item (default 4)")
    p.add_argument("--trace", choices=("exact", "hutchinson"), default="hutchinson", help="divergence (default hutchinson, one Rademacher probe; exact costs block_size * d = 32 VJPs per evaluation)")
    p.add_argument("--items", type=int, default=2, help="items per context length (default 2)")
    p.add_argument("--methods", nargs="+", default=["rk4", "dopri5"], choices=("dopri5", "rk4", "euler"), help="solvers: dopri5 (rtol = atol = 1e-5) and/or a fixed grid of 8 steps")
    args = p.parse_args()
    common.start(args, "Multiple choice: shared context against per-choice scoring")
    model = colaprob.load(str(FIXTURE)).eval()
    lengths = {"quick": 40} if args.quick else OFFICIAL_MEDIAN_CHARS
    if args.quick:
        args.samples, args.items, args.methods = 2, 1, ["euler"]
    print(f"Model: official-format fixture (random weights), K = {args.samples}, {args.trace} trace, {len(CHOICES)} choices of <= 4 tokens (one block each); {args.items} items per length.")
    print()
    for task, chars in lengths.items():
        rows = []
        contexts = contexts_of(model, chars, args.items)
        tokens = [int(frame_continuations(model, [c], [CHOICES]).context_tokens[0]) for c in contexts]
        for method in args.methods:
            options = dict(method="dopri5", rtol=1e-5, atol=1e-5) if method == "dopri5" else dict(method=method, steps=2 if args.quick else 8)
            options["trace"] = args.trace
            measured = {"shared": [], "per choice": []}
            for i, context in enumerate(contexts):
                run = lambda share: continuation_log_prob(model, [context], [CHOICES], args.samples, item_ids=[i], share_context=share, **options)
                timings = common.interleaved({"shared": lambda: run(True), "per choice": lambda: run(False)}, args.repeats)
                for name, t in timings.items():
                    measured[name].append((t.median, t.result))
            shared, alone = measured["shared"], measured["per choice"]
            stat = lambda runs, key: statistics.median(r.attrs[key] for _, r in runs)
            cpu = lambda runs: statistics.median(s for s, _ in runs)
            diff = max(float(np.nanmax(np.abs(a.log_likelihood.values - b.log_likelihood.values))) for (_, a), (_, b) in zip(shared, alone))
            rows.append(
                [
                    task,
                    statistics.median(tokens),
                    "dopri5 1e-5" if method == "dopri5" else f"{method}, {options['steps']} steps",
                    stat(alone, "dit_rows"),
                    stat(shared, "dit_rows"),
                    stat(alone, "dit_rows") / stat(shared, "dit_rows"),
                    f"{stat(alone, 'dit_history_rows'):.0f} / {stat(shared, 'dit_history_rows'):.0f}",
                    f"{stat(alone, 'nfe'):.0f} / {stat(shared, 'nfe'):.0f}",
                    cpu(alone),
                    cpu(shared),
                    cpu(alone) / cpu(shared),
                    diff,
                ]
            )
        common.table(COLUMNS, rows)  # one table per context length, printed as it finishes


if __name__ == "__main__":
    main()
    common.finish()
