"""``colaprob decompose``: where the bound goes, on a corpus of plain texts.

``ELBO = -distortion - rate`` per sequence, and over the corpus ``mean rate = I_q(X;Z) +
KL(q_bar || p_psi)`` (``colaprob.diagnostics.decompose``, "ELBO surgery"), plus the active
units of the latent. One NetCDF file; the aggregate posterior needs every sequence at once,
so the corpus is computed in one pass (no shards).
"""

from __future__ import annotations

import argparse

from colaprob.commands import _shared

HELP = "where the bound goes: distortion, rate, I_q(X;Z), KL(q_bar || p_psi), active units (NetCDF)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _shared.add_input_options(parser)
    _shared.add_model_options(parser)
    group = parser.add_argument_group("decomposition")
    group.add_argument("-K", "--samples", type=_shared.positive_int, default=8, help="posterior samples per sequence (default: 8)")
    group.add_argument(
        "--window-blocks",
        type=_shared.positive_int,
        default=None,
        help="leading prior blocks on which q_bar is defined (default: the fewest blocks of any sequence)",
    )
    group.add_argument("--batch-size", type=_shared.positive_int, default=16, help="sequences per model call; does not change the numbers (default: 16)")
    _shared.add_cnf_options(parser)
    _shared.add_output_options(parser, "decomposition.nc")


def run(args: argparse.Namespace) -> int:
    from colaprob.diagnostics import decompose

    cnf_options = _shared.cnf_options(args)
    # window_blocks as asked (None: automatic); the dataset attribute records the value used.
    settings = {"K": args.samples, "window_blocks_requested": args.window_blocks, "trace": args.trace, **cnf_options}

    def compute(model, batch):
        return decompose(
            model,
            batch,
            n_samples=args.samples,
            window_blocks=args.window_blocks,
            batch_size=args.batch_size,
            trace=args.trace,
            seed=args.seed,
            cnf_options=cnf_options,
            progress=not args.quiet,
        )

    # The aggregate posterior q_bar mixes the posteriors of at least two documents.
    ds = _shared.run_whole_corpus(args, "decomposition", compute, settings, min_sequences=2)
    if ds is not None:
        report(ds, args)
    return 0


def summary(ds) -> dict:
    """Headline numbers: per-token terms of the bound, the corpus split of the rate."""
    tokens = float(ds["n_tokens"].sum())
    return {
        "sequences": int(ds.sizes["sequence"]),
        "tokens": int(tokens),
        "neg_elbo_nats_per_token": -float(ds["elbo"].sum()) / tokens,
        "distortion_nats_per_token": float(ds["distortion"].sum()) / tokens,
        "rate_nats_per_token": float(ds["rate"].sum()) / tokens,
        "mutual_information": float(ds["mutual_information"]),
        "mutual_information_se": float(ds["mutual_information_se"]),
        "marginal_kl": float(ds["marginal_kl"]),
        "marginal_kl_se": float(ds["marginal_kl_se"]),
        "window_blocks": int(ds.attrs["window_blocks"]),
        "active_units": int(ds["n_active"]),
        "channels": int(ds.sizes["channel"]),
    }


def report(ds, args) -> None:
    row = summary(ds)
    if args.json:
        _shared.print_json({**row, "output": str(args.output)})
        return
    table = {
        "sequences": row["sequences"],
        "-ELBO": row["neg_elbo_nats_per_token"],
        "distortion": row["distortion_nats_per_token"],
        "rate": row["rate_nats_per_token"],
        "I_q(X;Z)": _shared.plus_minus(row["mutual_information"], row["mutual_information_se"]),
        "KL(q_bar||p)": _shared.plus_minus(row["marginal_kl"], row["marginal_kl_se"]),
        "active units": f"{row['active_units']}/{row['channels']}",
    }
    _shared.print_table([table], [(k, k) for k in table])
    print(f"(-ELBO, distortion, rate in nats/token; I_q and KL in nats/sequence on the first {row['window_blocks']} blocks)")
    print(f"results: {args.output}")
