"""``colaprob probe``: why likelihood and generation quality disagree, token by token.

For every token and prior block of a corpus of plain texts
(``colaprob.diagnostics.probes``): the decoder probe, the posterior hit and prior hit rates,
the generation probability, the density percentile of the gold latent under the prior, and
each token's share of the ELBO; the corpus summary (``summarize_probes``: NLL against prior
hit, the 2x2 table of likelihood against generation) is stored in the same file. One pass
over the corpus (the probes draw their noise for the whole corpus at once).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import xarray as xr

from colaprob.commands import options, output, runs
from colaprob.estimators.solver import Solver

HELP = "per-token probes: decoder probe, posterior/prior hit, generation probability, density percentile (NetCDF)"


@dataclass(frozen=True, kw_only=True)
class Settings(runs.Reading):
    """What ``colaprob probe`` runs with, and its run key: ``posterior_samples`` per sequence,
    teacher-forced ``prior_samples`` per block, ``batch_size`` sequences per model call, the
    prior's ``solver``, the ``seed``, and how the inputs are read (``runs.Reading``)."""

    posterior_samples: int = 16
    prior_samples: int = 16
    batch_size: int = 4
    solver: Solver = options.DEFAULT_SOLVER
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> "Settings":
        return runs.settings_from_args(cls, args, solver=options.solver_from_args(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_input_options(parser)
    options.add_model_options(parser)
    group = parser.add_argument_group("probes")
    group.add_argument("--posterior-samples", type=options.positive_int, default=16, help="posterior draws per sequence (default: 16)")
    group.add_argument("--prior-samples", type=options.positive_int, default=16, help="teacher-forced prior draws per block (default: 16)")
    group.add_argument("--batch-size", type=options.positive_int, default=4, help="sequences per model call (default: 4)")
    options.add_solver_options(parser)
    options.add_output_options(parser, "probes.nc")


def run(args: argparse.Namespace) -> int:
    ds = execute(Settings.from_args(args), runs.Target.from_args(args), args.device)
    if ds is not None:
        report(ds, args)
    return 0


def execute(settings: Settings, target: runs.Target, device: str = "auto"):
    """The probes of ``target``'s corpus into ``target.output``; the dataset on rank 0."""
    from colaprob.diagnostics import probes

    def compute(model, batch, planned):
        return probes(
            model,
            batch,
            n_posterior=settings.posterior_samples,
            n_prior=settings.prior_samples,
            batch_size=planned.batch,
            chunk_size=planned.chunk,
            seed=settings.seed,
            solver=settings.solver.replace(vjp_chunk=planned.vjp_chunk),
            progress=target.progress,
        )

    samples = max(settings.posterior_samples, settings.prior_samples)
    return runs.run_whole_corpus(settings, target, device, "probes", compute, samples=samples, finish=with_summary)


def with_summary(ds: xr.Dataset) -> xr.Dataset:
    """The probes and their corpus summary in one dataset (their variables do not overlap)."""
    from colaprob.diagnostics import summarize_probes

    summary = summarize_probes(ds)
    return xr.merge([ds, summary.drop_attrs()], compat="no_conflicts", join="exact").assign_attrs(
        ds.attrs, summary_definition=summary.attrs.get("definition", "")
    )


def report(ds: xr.Dataset, args) -> None:
    row = output.summary(ds)
    if args.json:
        output.print_json({**row, "output": str(args.output)})
        return
    columns = [(k, k.replace("_", " ")) for k in ("sequences", "tokens", *output.PROBES)]
    output.print_table([row], columns)
    print(
        f"high-NLL tokens still generated: {row['high_nll_generated_fraction']:.1%}; low-NLL tokens missed: "
        f"{row['low_nll_missed_fraction']:.1%}; Spearman(NLL, prior hit) = {row['spearman_nll_prior_hit']:.2f}; "
        f"mean density percentile of the gold latent: {row['density_percentile_mean']:.3f}"
    )
    print(f"results: {args.output}")
