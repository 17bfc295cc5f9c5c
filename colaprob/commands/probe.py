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

import numpy as np
import xarray as xr

from colaprob.commands import _shared

HELP = "per-token probes: decoder probe, posterior/prior hit, generation probability, density percentile (NetCDF)"
PROBES = ("decoder_probe", "posterior_hit", "prior_hit", "generation_prob")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _shared.add_input_options(parser)
    _shared.add_model_options(parser)
    group = parser.add_argument_group("probes")
    group.add_argument("--posterior-samples", type=_shared.positive_int, default=16, help="posterior draws per sequence (default: 16)")
    group.add_argument("--prior-samples", type=_shared.positive_int, default=16, help="teacher-forced prior draws per block (default: 16)")
    group.add_argument("--batch-size", type=_shared.positive_int, default=4, help="sequences per model call; does not change the numbers (default: 4)")
    _shared.add_cnf_options(parser)
    _shared.add_output_options(parser, "probes.nc")


def run(args: argparse.Namespace) -> int:
    from colaprob.diagnostics import probes

    cnf_options = _shared.cnf_options(args)
    settings = {"n_posterior": args.posterior_samples, "n_prior": args.prior_samples, "trace": args.trace, **cnf_options}

    def compute(model, batch):
        return probes(
            model,
            batch,
            n_posterior=args.posterior_samples,
            n_prior=args.prior_samples,
            batch_size=args.batch_size,
            trace=args.trace,
            seed=args.seed,
            cnf_options=cnf_options,
            progress=not args.quiet,
        )

    ds = _shared.run_whole_corpus(args, "probes", compute, settings, finish=with_summary)
    if ds is not None:
        report(ds, args)
    return 0


def with_summary(ds: xr.Dataset) -> xr.Dataset:
    """The probes and their corpus summary in one dataset (their variables do not overlap)."""
    from colaprob.diagnostics import summarize_probes

    summary = summarize_probes(ds)
    return xr.merge([ds, summary.drop_attrs()], compat="no_conflicts", join="exact").assign_attrs(
        ds.attrs, summary_definition=summary.attrs.get("definition", "")
    )


def summary(ds: xr.Dataset) -> dict:
    valid = ds["valid"].values.astype(bool)
    row = {name: float(np.mean(ds[name].values[valid])) for name in PROBES}
    row.update(
        sequences=int(ds.sizes["sequence"]),
        tokens=int(valid.sum()),
        density_percentile_mean=float(ds["density_percentile_mean"]),
        high_nll_generated_fraction=float(ds["high_nll_generated_fraction"]),
        low_nll_missed_fraction=float(ds["low_nll_missed_fraction"]),
        spearman_nll_prior_hit=float(ds["spearman_nll_prior_hit"]),
    )
    return row


def report(ds: xr.Dataset, args) -> None:
    row = summary(ds)
    if args.json:
        _shared.print_json({**row, "output": str(args.output)})
        return
    columns = [(k, k.replace("_", " ")) for k in ("sequences", "tokens", *PROBES)]
    _shared.print_table([row], columns)
    print(
        f"high-NLL tokens still generated: {row['high_nll_generated_fraction']:.1%}; low-NLL tokens missed: "
        f"{row['low_nll_missed_fraction']:.1%}; Spearman(NLL, prior hit) = {row['spearman_nll_prior_hit']:.2f}; "
        f"mean density percentile of the gold latent: {row['density_percentile_mean']:.3f}"
    )
    print(f"results: {args.output}")
