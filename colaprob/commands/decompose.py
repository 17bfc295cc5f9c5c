"""``colaprob decompose``: where the bound goes, on a corpus of plain texts.

``ELBO = -distortion - rate`` per sequence, and over the corpus ``mean rate = I_q(X;Z) +
KL(q_bar || p_psi)`` (``colaprob.diagnostics.decompose``, "ELBO surgery"), plus the active
units of the latent. One NetCDF file; the aggregate posterior needs every sequence at once,
so the corpus is computed in one pass (no shards).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from colaprob.commands import options, output, runs
from colaprob.estimators.solver import Solver

HELP = "where the bound goes: distortion, rate, I_q(X;Z), KL(q_bar || p_psi), active units (NetCDF)"


@dataclass(frozen=True, kw_only=True)
class Settings(runs.Reading):
    """What ``colaprob decompose`` runs with, and its run key: K posterior ``samples`` per
    sequence, the ``window_blocks_requested`` of q_bar (None: the fewest blocks of any
    sequence; the result's attribute ``window_blocks`` records the value used), ``batch_size`` sequences per
    model call, the prior's ``solver``, the ``seed``, and how the inputs are read (``runs.Reading``)."""

    samples: int = 8
    window_blocks_requested: int | None = None
    batch_size: int = 16
    solver: Solver = options.DEFAULT_SOLVER
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> "Settings":
        return runs.settings_from_args(cls, args, solver=options.solver_from_args(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_input_options(parser)
    options.add_model_options(parser)
    group = parser.add_argument_group("decomposition")
    group.add_argument("-K", "--samples", type=options.positive_int, default=8, help="posterior samples per sequence (default: 8)")
    group.add_argument(
        "--window-blocks",
        dest="window_blocks_requested",
        type=options.positive_int,
        default=None,
        help="leading prior blocks on which q_bar is defined (default: the fewest blocks of any sequence)",
    )
    group.add_argument("--batch-size", type=options.positive_int, default=16, help="sequences per model call (default: 16)")
    options.add_solver_options(parser)
    options.add_output_options(parser, "decomposition.nc")


def run(args: argparse.Namespace) -> int:
    ds = execute(Settings.from_args(args), runs.Target.from_args(args), args.device)
    if ds is not None:
        report(ds, args)
    return 0


def execute(settings: Settings, target: runs.Target, device: str = "auto"):
    """The decomposition of ``target``'s corpus into ``target.output`` (resumed or read back
    when one made with the same settings is there); the dataset on rank 0, else None."""
    from colaprob.diagnostics import decompose

    def compute(model, batch, planned):
        return decompose(
            model,
            batch,
            n_samples=settings.samples,
            window_blocks=settings.window_blocks_requested,
            batch_size=planned.batch,
            chunk_size=planned.chunk,
            seed=settings.seed,
            solver=settings.solver.replace(vjp_chunk=planned.vjp_chunk),
            progress=target.progress,
        )

    # The aggregate posterior q_bar mixes the posteriors of at least two documents.
    return runs.run_whole_corpus(settings, target, device, "decomposition", compute, samples=settings.samples, min_sequences=2)


def report(ds, args) -> None:
    row = output.summary(ds)
    if args.json:
        output.print_json({**row, "output": str(args.output)})
        return
    table = {
        "sequences": row["sequences"],
        "-ELBO": row["neg_elbo_nats_per_token"],
        "distortion": row["distortion_nats_per_token"],
        "rate": row["rate_nats_per_token"],
        "I_q(X;Z)": output.plus_minus(row["mutual_information"], row["mutual_information_se"]),
        "KL(q_bar||p)": output.plus_minus(row["marginal_kl"], row["marginal_kl_se"]),
        "active units": f"{row['active_units']}/{row['channels']}",
    }
    output.print_table([table], [(k, k) for k in table])
    print(f"(-ELBO, distortion, rate in nats/token; I_q and KL in nats/sequence on the first {row['window_blocks']} blocks)")
    print(f"results: {args.output}")
