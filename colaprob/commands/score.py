"""``colaprob score``: log-likelihood of every document of a corpus, resumable and shardable.

Documents come from text files (a whole file, or one per line with ``--per-line``) and
JSONL files (``{"text": ...}``; ``{"prompt": ..., "ground_truth" | "response": ...}`` pairs
are scored as prefix-response, ``log p(response | prompt)``). They are scored in batches of
``--batch-size`` in corpus order, each batch saved as it finishes (see
``colaprob.runner``), and merged into one NetCDF file with a row per scored sequence.

A text whose framed length exceeds the model's ``max_tokens`` is refused (with both numbers)
unless ``--split`` cuts it into consecutive windows at whitespace; each window is then scored
as an independent document, so a split document's log-likelihood is the sum over windows
of ``log p(window)``, not ``log p(document)``.
"""

from __future__ import annotations

import argparse

import numpy as np
import xarray as xr

from colaprob import distributed, results, runner
from colaprob.commands import _shared
from colaprob.errors import ColaprobError

HELP = "score documents: ELBO or IWAE log-likelihood, nats/token, bits/byte, perplexity (NetCDF output)"

ESTIMATORS = ("elbo", "iwae")
WINDOW_NOTE = "documents longer than max_tokens were cut at whitespace into windows, each scored as an independent document"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _shared.add_input_options(parser)
    _shared.add_model_options(parser)
    group = parser.add_argument_group("estimator")
    group.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="elbo",
        help="elbo: a lower bound, cheap, its SE shrinks with K; iwae: IWAE-K, a tighter bound in expectation, "
        "with k-hat reliability (default: elbo)",
    )
    group.add_argument("-K", "--samples", type=_shared.positive_int, default=16, help="posterior samples per document (default: 16)")
    group.add_argument(
        "--chunk-size",
        type=_shared.positive_int,
        default=32,
        help="samples solved together; bounds memory (part of the settings: with an adaptive solver it moves "
        "the numbers within the tolerance) (default: 32)",
    )
    group.add_argument("--batch-size", type=_shared.positive_int, default=8, help="documents per batch and per saved shard (default: 8)")
    _shared.add_cnf_options(parser)
    _shared.add_output_options(parser, "scores.nc")


def run(args: argparse.Namespace) -> int:
    ctx = distributed.from_environment(args.device)
    try:
        job = prepare(args, ctx)
        merged = runner.run(
            job.plan, job.score_batch, args.output, finish=finish, ctx=ctx, overwrite=args.overwrite, progress=not args.quiet
        )
    finally:
        distributed.shutdown(ctx)
    if ctx.is_main:
        report(merged, args)
    return 0


class Job:
    """Everything ``runner.run`` needs, built and checked before any work starts: the
    sequences to score (documents or their windows), the model and the settings."""

    def __init__(self, args, ctx, model, identity, sequences):
        self.args, self.model, self.sequences = args, model, sequences
        self.cnf_options = _shared.cnf_options(args)
        settings = {
            **identity,
            "inputs": [path.name for path in args.inputs],
            "input_fingerprint": _shared.fingerprint([s.document for s in sequences]),
            "reading": "jsonl" if args.jsonl else ("per-line" if args.per_line else "whole-file or jsonl by suffix"),
            "estimator_name": args.estimator,
            "K": args.samples,
            "chunk_size": args.chunk_size,
            "trace": args.trace,
            **self.cnf_options,
            "seed": args.seed,
            "device_type": ctx.device.type,
            "max_tokens": model.framing.max_tokens,
            "windows": WINDOW_NOTE if any(s.window > 0 for s in sequences) else "none",
        }
        self.plan = runner.Plan(settings, n_items=len(sequences), batch_size=args.batch_size)

    def score_batch(self, items: range) -> xr.Dataset:
        from colaprob.estimators import elbo, iwae

        chosen = [self.sequences[i] for i in items]
        batch = self.model.frame([s.document.text for s in chosen])
        estimate = {"elbo": elbo, "iwae": iwae}[self.args.estimator]
        ds = estimate(
            self.model,
            batch,
            self.args.samples,
            seed=self.args.seed,
            sequence_ids=list(items),
            chunk_size=self.args.chunk_size,
            trace=self.args.trace,
            **self.cnf_options,
        )
        return with_identity(ds, chosen)


class Sequence:
    """One scored row: a document, or window ``window`` of document ``index``."""

    def __init__(self, document, index: int, window: int, source: str):
        self.document, self.index, self.window, self.source = document, index, window, source


def prepare(args, ctx) -> Job:
    """Read and check everything, so a mistake stops the run before any file is written."""
    _shared.cnf_options(args)
    documents = _shared.read_inputs(args.inputs, per_line=args.per_line, jsonl=args.jsonl)
    if any(doc.prompt is not None for doc, _ in documents):
        raise ColaprobError("prompt-response pairs need the conditional estimator, which this build does not have yet.")
    model, identity = _shared.load_model(args.model, ctx.device)
    sequences = windows(model, documents, args.split)
    results.check_writable(args.output)
    return Job(args, ctx, model, identity, sequences)


def windows(model, documents, split: bool) -> list[Sequence]:
    """The rows to score: every document that fits, and with ``split`` the windows of those
    that do not (see the module docstring); without ``split`` a long document is refused."""
    from colaprob.data import Document

    limit = model.framing.max_tokens
    framed_length = _shared.framed_length_fn(model)
    if not split:
        _shared.check_lengths([doc.text for doc, _ in documents], framed_length, limit)
        return [Sequence(doc, i, 0, source) for i, (doc, source) in enumerate(documents)]
    fits = lambda text: limit is None or framed_length(text) <= limit
    rows = []
    for i, (doc, source) in enumerate(documents):
        pieces = [doc.text] if fits(doc.text) else _shared.split_into_windows(doc.text, fits)
        rows += [Sequence(Document(piece, doc.prompt), i, w, source) for w, piece in enumerate(pieces)]
    return rows


def with_identity(ds: xr.Dataset, chosen: list[Sequence]) -> xr.Dataset:
    """The estimate of a batch with what each row is, and without the corpus-level numbers
    of this batch alone (``finish`` computes them for the whole corpus). The batch's
    function evaluations, an attribute of the estimate, become a per-row variable."""
    per_row = ds.drop_vars([name for name, var in ds.data_vars.items() if "sequence" not in var.dims])
    nfe = ds.attrs.get("nfe")
    per_row.attrs.pop("nfe", None)
    return per_row.assign(
        document=("sequence", np.array([s.index for s in chosen])),
        window=("sequence", np.array([s.window for s in chosen])),
        source=("sequence", np.array([s.source for s in chosen], dtype=object)),
        text=("sequence", np.array([s.document.text for s in chosen], dtype=object)),
        batch_nfe=("sequence", np.full(len(chosen), -1 if nfe is None else int(nfe))),
    )


def finish(merged: xr.Dataset) -> xr.Dataset:
    """Corpus-level units of the merged rows (totals over totals)."""
    from colaprob.estimators import units

    return units.with_units(merged)


# ---------------------------------------------------------------------------------------------
# The summary


def summary(ds: xr.Dataset, output) -> dict:
    """The corpus-level numbers of a score result, as printed and as ``--json``."""
    row = {
        "estimator": ds.attrs.get("estimator", ""),
        "sequences": int(ds.sizes["sequence"]),
        "documents": int(np.unique(ds["document"].values).size),
        "tokens": int(ds["n_tokens"].sum()),
        "log_likelihood": float(ds["log_likelihood"].sum()),
    }
    for name in ("nats_per_token", "bits_per_byte", "token_perplexity", "word_perplexity"):
        row[name] = float(ds[f"corpus_{name}"])
        row[f"{name}_se"] = float(ds[f"corpus_{name}_se"])
    if "reliable" in ds:
        row["reliable_fraction"] = float(ds["reliable"].mean())
    row["output"] = str(output)
    return row


def report(ds: xr.Dataset, args) -> None:
    row = summary(ds, args.output)
    if args.json:
        _shared.print_json(row)
        return
    table = {k: row[k] for k in ("estimator", "sequences", "tokens")}
    for name in ("nats_per_token", "bits_per_byte", "token_perplexity", "word_perplexity"):
        table[name] = _shared.plus_minus(row[name], row[f"{name}_se"])
    columns = [(k, k.replace("_", " ")) for k in table]
    if "reliable_fraction" in row:
        table["reliable_fraction"] = row["reliable_fraction"]
        columns.append(("reliable_fraction", "k-hat reliable"))
    _shared.print_table([table], columns)
    print(f"results: {args.output}")
