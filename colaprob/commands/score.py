"""``colaprob score``: log-likelihood of every document of a corpus, resumable and shardable.

Documents come from text files (a whole file, or one per line with ``--per-line``) and
JSONL files (``{"text": ...}``, or ``{"prompt": ..., "ground_truth" | "response": ...}``
pairs, scored as prefix-response: ``log p(response | prompt)`` with the conditional
estimator). They are scored in batches of ``--batch-size`` in corpus order, each batch saved
as it finishes (``colaprob.runner``), and merged into one NetCDF file, a row per sequence.

A pair is framed as ``[bos] + tokens(prompt) + tokens(response) + [eos]`` and padding, the
prompt tokenized on its own as generation does; the units (nats/token, bits/byte,
perplexities) count the response alone.

A text whose framed length exceeds the model's ``max_tokens`` is refused (with both numbers)
unless ``--split`` cuts it into consecutive windows at whitespace; each window is then scored
as an independent document, so a split document's log-likelihood is the sum over windows of
``log p(window)``, not ``log p(document)``. Pairs are never split.

``--rolling`` scores every plain text as one chain of windows instead
(``colaprob.estimators.rolling``): ``log p(w_1) + sum_j log p(w_j | w_{j-1})``, one
``log p(document)`` per document, the text's tokens only (no end-of-text), comparable with
an autoregressive model's rolling perplexity.
"""

from __future__ import annotations

import argparse

import numpy as np
import xarray as xr

from colaprob import distributed, results, runner, windows
from colaprob.commands import _shared
from colaprob.errors import ColaprobError
from colaprob.estimators.statistics import KHAT_MIN_SAMPLES, khat_computable

HELP = "score documents: ELBO, IWAE or prompt-response log-likelihood, nats/token, bits/byte, perplexity (NetCDF)"

ESTIMATORS = ("elbo", "iwae", "conditional", "rolling")
UNITS = ("nats_per_token", "bits_per_byte", "token_perplexity", "word_perplexity")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _shared.add_input_options(parser)
    _shared.add_model_options(parser)
    group = parser.add_argument_group("estimator")
    group.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=None,
        help="elbo: a lower bound, cheapest; iwae: IWAE-K, a lower bound in expectation that tightens with K, "
        "with a k-hat reliability flag; conditional: log p(response | prompt) for prompt-response pairs "
        "(default: elbo for texts, conditional for pairs); rolling: the same as --rolling",
    )
    group.add_argument(
        "--rolling",
        action="store_true",
        help="score each text, however long, as one chain of windows log p(w_1) + sum_j log p(w_j | w_(j-1)): one "
        "log p(document) per document, text tokens only, as lm-evaluation-harness's rolling log-likelihood "
        "(unlike --split, whose windows are scored independently)",
    )
    group.add_argument("-K", "--samples", type=_shared.positive_int, default=16, help="posterior samples per document (default: 16)")
    group.add_argument(
        "--max-samples",
        type=_shared.positive_int,
        default=None,
        help="iwae: double a document's K (continuing its random stream) while its k-hat is not computable "
        f"(K < {KHAT_MIN_SAMPLES}) or above the threshold, up to this many samples (default: no doubling)",
    )
    group.add_argument(
        "--chunk-size",
        type=_shared.positive_int,
        default=32,
        help="samples solved together, to bound memory; part of the settings, since with an adaptive solver it "
        "moves the numbers within the tolerance (default: 32)",
    )
    group.add_argument("--batch-size", type=_shared.positive_int, default=8, help="documents per batch and per saved shard (default: 8)")
    group.add_argument(
        "--no-direct",
        action="store_true",
        help="pairs: skip the direct estimate log p(response | prompt latents) that conditional adds (halves the cost)",
    )
    group.add_argument(
        "--no-solver-error",
        action="store_true",
        help="skip the second, finer ODE solve that estimates each number's solver error in nats (it costs 1.3-3x "
        "the solve); the table then says the error was not estimated",
    )
    _shared.add_cnf_options(parser, target_error=True)
    _shared.add_output_options(parser, "scores.nc")


def run(args: argparse.Namespace) -> int:
    ctx = distributed.from_environment(args.device)
    try:
        job = ctx.agree(lambda: prepare(args, ctx))
        merged = runner.run(
            job.plan, job.score_batch, args.output, finish=finish, ctx=ctx, overwrite=args.overwrite, progress=not args.quiet
        )
    finally:
        distributed.shutdown(ctx)
    if ctx.is_main:
        report(merged, args)
    return 0


def prepare(args, ctx) -> "Job":
    """Read and check everything, so a mistake stops the run before any file is written."""
    cnf_options = _shared.cnf_options(args)
    documents = _shared.read_inputs(args.inputs, per_line=args.per_line, jsonl=args.jsonl)
    estimator = choose_estimator("rolling" if args.rolling else args.estimator, [doc for doc, _ in documents], args)
    check_max_samples(args, estimator)
    model, identity = _shared.load_model(args.model, ctx.device, args.revision, args.download)
    if estimator == "rolling":
        rows = windows.cut_rows(model, documents, None)
        _shared.preflight(args, model, rows, ctx.device, "scoring", longest=model.framing.max_tokens)
    else:
        rows = _shared.cut_rows(model, documents, args.split)
        _shared.preflight(args, model, rows, ctx.device, "scoring")
    results.check_writable(args.output)
    return Job(args, ctx, model, identity, rows, estimator, cnf_options)


def choose_estimator(asked: str | None, documents, args=None) -> str:
    """``conditional`` for prompt-response pairs, ``elbo``, ``iwae`` or ``rolling`` for plain texts."""
    pairs = sum(doc.prompt is not None for doc in documents)
    if args is not None and args.rolling and args.estimator not in (None, "rolling"):
        raise ColaprobError(f"--rolling is its own estimator; drop --estimator {args.estimator}.")
    if asked == "rolling" and args is not None and args.split:
        raise ColaprobError("--rolling and --split window a text in two different ways; choose one.")
    if 0 < pairs < len(documents):
        raise ColaprobError(
            f"the input mixes {pairs} prompt-response pairs with {len(documents) - pairs} plain texts; score them in separate runs."
        )
    if asked is None:
        return "conditional" if pairs else "elbo"
    if (asked == "conditional") != bool(pairs):
        needed = "prompt-response pairs" if asked == "conditional" else "plain texts (the input holds prompt-response pairs)"
        raise ColaprobError(f"--estimator {asked} scores {needed}; use --estimator {'conditional' if pairs else 'elbo, iwae or rolling'}.")
    return asked


def check_max_samples(args, estimator: str) -> None:
    """Options that need a particular estimator: --max-samples (iwae), --target-error (an
    estimated solver error)."""
    if args.target_error is not None and not solver_error_estimated(args, estimator):
        why = "--no-solver-error" if args.no_solver_error else "the rolling chain"
        raise ColaprobError(f"--target-error needs the solver-error estimate, which {why} does not make; drop one of them.")
    if args.max_samples is None:
        return
    if estimator != "iwae":
        raise ColaprobError(f"--max-samples doubles K of --estimator iwae only, not of {estimator}; drop it or use --estimator iwae.")
    if args.max_samples < args.samples:
        raise ColaprobError(f"--max-samples {args.max_samples} is below -K {args.samples}; give a cap of at least -K.")


class Job:
    """Everything ``runner.run`` needs: the rows, the model and the settings."""

    def __init__(self, args, ctx, model, identity, rows, estimator, cnf_options):
        self.args, self.model, self.rows, self.estimator = args, model, rows, estimator
        self.cnf_options = cnf_options
        settings = {
            **identity,
            "inputs": [path.name for path in args.inputs],
            "input_fingerprint": _shared.fingerprint([row.document for row in rows]),
            "reading": "jsonl" if args.jsonl else ("per-line" if args.per_line else "whole-file (jsonl by suffix)"),
            "estimator_name": estimator,
            "direct": estimator == "conditional" and not args.no_direct,
            "K": args.samples,
            "max_samples": args.max_samples,
            "chunk_size": args.chunk_size,
            "trace": args.trace,
            **cnf_options,
            "target_error": args.target_error,
            "solver_error_estimated": solver_error_estimated(args, estimator),
            "seed": args.seed,
            "device_type": ctx.device.type,
            "max_tokens": model.framing.max_tokens,
            "windows": windows.CHAIN_NOTE if estimator == "rolling" else _shared.windows_note(rows),
        }
        self.plan = runner.Plan(settings, n_items=len(rows), batch_size=args.batch_size)

    def score_batch(self, items: range) -> xr.Dataset:
        """The batch's estimate; with ``--target-error``, re-solved with tighter settings
        until every row's solver error is below the target (or the tolerance floor is hit)."""
        options = dict(self.cnf_options)
        while True:
            ds = self.estimate(items, options)
            target = self.args.target_error
            if "log_likelihood_solver_error" not in ds:
                break
            error = ds["log_likelihood_solver_error"].values
            if target is None or not (error > target).any() or tighter(options) is None:
                break
            options = tighter(options)
        ds["solver_setting"] = ("sequence", np.full(ds.sizes["sequence"], solver_label(options)))
        if target is not None:
            ds["solver_error_target_met"] = ("sequence", ~(ds["log_likelihood_solver_error"].values > target))
        return ds

    def estimate(self, items: range, cnf_options: dict) -> xr.Dataset:
        from colaprob import estimators

        chosen = [self.rows[i] for i in items]
        options = dict(
            seed=self.args.seed, sequence_ids=list(items), chunk_size=self.args.chunk_size, trace=self.args.trace, **cnf_options
        )
        if solver_error_estimated(self.args, self.estimator):
            options["solver_error"] = True
        if self.estimator == "conditional":
            documents = [row.document for row in chosen]
            batch, prefix_tokens, response = self.model.frame_pairs([d.prompt for d in documents], [d.text for d in documents])
            ds = estimators.conditional(
                self.model, batch, prefix_tokens, self.args.samples, response=response, direct=not self.args.no_direct, **options
            )
        elif self.estimator == "rolling":
            from colaprob.estimators.rolling import rolling_log_prob

            options["document_ids"] = options.pop("sequence_ids")
            ds = rolling_log_prob(self.model, [row.document.text for row in chosen], self.args.samples, **options)
            ds = ds.drop_vars(["window_text"])  # the windows are the text's own partition; kept out of the result file
        else:
            batch = self.model.frame([row.document.text for row in chosen])
            if self.estimator == "iwae":
                options["max_samples"] = self.args.max_samples
            ds = getattr(estimators, self.estimator)(self.model, batch, self.args.samples, **options)
        return with_identity(ds, chosen)


def solver_error_estimated(args, estimator: str) -> bool:
    """Whether the scores carry a solver-error estimate: unless ``--no-solver-error``, and not
    for the rolling chain, whose continuation scores do not estimate it yet."""
    return not args.no_solver_error and estimator != "rolling"


def tighter(options: dict) -> dict | None:
    """The next solver settings toward ``--target-error``: tolerances / 10 (None below the
    floor where the solver's steps underflow), or twice the steps of a fixed grid (None past
    4096 steps)."""
    from colaprob.estimators import cnf

    if "steps" in options:
        return {**options, "steps": 2 * options["steps"]} if options["steps"] < 4096 else None
    rtol, atol = options["rtol"] / 10, options["atol"] / 10
    return {**options, "rtol": rtol, "atol": atol} if min(rtol, atol) >= cnf.TOLERANCE_FLOOR else None


def solver_label(options: dict) -> str:
    if "steps" in options:
        return f"{options['method']} steps {options['steps']}"
    return f"{options['method']} rtol {options['rtol']:g} atol {options['atol']:g}"


def with_identity(ds: xr.Dataset, chosen: list[_shared.Row]) -> xr.Dataset:
    """The estimate of a batch with what each row is, and without the corpus-level numbers
    of this batch alone (``finish`` computes them for the whole corpus). The batch's
    function evaluations, an attribute of the estimate, become a per-row variable."""
    per_row = ds.drop_vars([name for name, var in ds.data_vars.items() if "sequence" not in var.dims])
    nfe = per_row.attrs.pop("nfe", -1)
    return per_row.assign({**_shared.row_variables(chosen), "batch_nfe": ("sequence", np.full(len(chosen), int(nfe)))})


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
        "log_likelihood_se": float(np.sqrt((ds["log_likelihood_se"] ** 2).sum())),
    }
    if "log_likelihood_solver_error" in ds:
        # Solver errors are systematic, not independent: they add, unlike standard errors.
        row["log_likelihood_solver_error"] = float(ds["log_likelihood_solver_error"].sum())
        row["nats_per_token_solver_error"] = row["log_likelihood_solver_error"] / max(row["tokens"], 1)
    for name in UNITS:
        row[name] = float(ds[f"corpus_{name}"])
        row[f"{name}_se"] = float(ds[f"corpus_{name}_se"])
    if "reliable" in ds:
        # Rows whose k-hat is not computable (K < 21) are no verdict: left out of the share.
        computable = np.asarray(khat_computable(ds["n_samples"].values))
        row["khat_not_computable"] = int((~computable).sum())
        row["reliable_fraction"] = float(ds["reliable"].values[computable].mean()) if computable.any() else None
    if "direct_log_likelihood" in ds:
        applies = ds["direct_applies"].values.astype(bool)
        row["direct_nats_per_token"] = -float(ds["direct_log_likelihood"].values[applies].sum()) / max(int(ds["n_tokens"].values[applies].sum()), 1)
    row["output"] = str(output)
    return row


def short_name(ds: xr.Dataset) -> str:
    """``ELBO K=16``, ``IWAE-16`` or ``conditional IWAE-16`` (the full name is in the attrs)."""
    K = ds.attrs.get("K")
    names = {"elbo": f"ELBO K={K}", "iwae": f"IWAE-{K}", "conditional": f"conditional IWAE-{K}", "rolling": f"rolling chain IWAE-{K}"}
    return names[ds.attrs["estimator_name"]]


def khat_cell(row: dict) -> str:
    """The share of reliable rows, ``n/a (K < 21)`` when no row's k-hat is computable, and the
    count of rows left out when only some are."""
    if row["reliable_fraction"] is None:
        return f"n/a (K < {KHAT_MIN_SAMPLES})"
    share = f"{row['reliable_fraction']:.4f}"
    return share if not row["khat_not_computable"] else f"{share} ({row['khat_not_computable']} n/a)"


def report(ds: xr.Dataset, args) -> None:
    _shared.refuse_non_finite(ds, args.output)
    row = summary(ds, args.output)
    if args.json:
        _shared.print_json(row)
        return
    table = {"estimator": short_name(ds), "sequences": row["sequences"], "tokens": row["tokens"]}
    table.update({name: _shared.plus_minus(row[name], row[f"{name}_se"]) for name in UNITS})
    columns = [(key, key.replace("_", " ")) for key in table]
    table["solver_error"] = f"{row['nats_per_token_solver_error']:.1e}" if "nats_per_token_solver_error" in row else "not estimated"
    columns.append(("solver_error", "solver error nats/token"))
    if "reliable_fraction" in row:
        table["reliable_fraction"] = khat_cell(row)
        columns.append(("reliable_fraction", "k-hat reliable"))
    if "direct_nats_per_token" in row:
        table["direct_nats_per_token"] = row["direct_nats_per_token"]
        columns.append(("direct_nats_per_token", "direct nats/token"))
    _shared.print_table([table], columns)
    print(f"results: {args.output}")
