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
import dataclasses
from dataclasses import dataclass

import numpy as np
import xarray as xr

from colaprob import data, results, runner, windows
from colaprob.commands import options, output, runs
from colaprob.errors import ColaprobError
from colaprob.estimators.solver import Solver
from colaprob.estimators.statistics import KHAT_MIN_SAMPLES

HELP = "score documents: ELBO, IWAE or prompt-response log-likelihood, nats/token, bits/byte, perplexity (NetCDF)"

ESTIMATORS = ("elbo", "iwae", "conditional", "rolling")
# Every number score writes carries its estimated solver error.
SOLVER = options.DEFAULT_SOLVER.replace(solver_error=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_input_options(parser)
    options.add_model_options(parser)
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
    group.add_argument("-K", "--samples", type=options.positive_int, default=16, help="posterior samples per document (default: 16)")
    group.add_argument(
        "--max-samples",
        type=options.positive_int,
        default=None,
        help="iwae: double a document's K (continuing its random stream) while its k-hat is not computable "
        f"(K < {KHAT_MIN_SAMPLES}) or above the threshold, up to this many samples (default: no doubling)",
    )
    group.add_argument(
        "--chunk-size",
        type=options.positive_int,
        default=32,
        help="samples solved together at most, to bound memory (the memory plan may lower it); part of the settings, "
        "since it can move a number by float32 rounding amplified by the solver's step control (default: 32)",
    )
    group.add_argument("--batch-size", type=options.positive_int, default=8, help="documents per batch and per saved shard (default: 8)")
    group.add_argument(
        "--no-direct",
        action="store_true",
        help="pairs: skip the direct estimate log p(response | prompt latents) that conditional adds (halves the cost)",
    )
    options.add_solver_error_options(group, "document")
    options.add_solver_options(parser, SOLVER)
    options.add_output_options(parser, "scores.nc")


@dataclass(frozen=True, kw_only=True)
class Settings(runs.Reading):
    """What ``colaprob score`` runs with, and its run key. ``estimator_name``: elbo, iwae,
    conditional or rolling (None: conditional for prompt-response pairs, elbo for texts);
    ``samples``: K per document; ``max_samples``: iwae's cap for doubling K; ``chunk_size``:
    samples solved together; ``batch_size``: documents per batch and saved shard;
    ``direct``: pairs also get the direct conditional; ``solver``: the prior's solver
    (``solver_error``: estimate each number's solver error); ``target_error``: tighten the
    solver until every document's estimated error is below it (nats); ``seed``; how the
    inputs are read and windowed (``runs.Reading``)."""

    estimator_name: str | None = None
    samples: int = 16
    max_samples: int | None = None
    chunk_size: int = 32
    batch_size: int = 8
    direct: bool = True
    solver: Solver = SOLVER
    target_error: float | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> "Settings":
        if args.rolling and args.estimator not in (None, "rolling"):
            raise ColaprobError(f"--rolling is its own estimator; drop --estimator {args.estimator}.")
        estimator = "rolling" if args.rolling else args.estimator
        solver = options.solver_from_args(args, SOLVER, solver_error=not args.no_solver_error)
        return runs.settings_from_args(cls, args, estimator_name=estimator, direct=not args.no_direct, solver=solver)


def run(args: argparse.Namespace) -> int:
    return runs.run_command(args, Settings.from_args(args), execute, report)


def execute(settings: Settings, target: runs.Target, ctx, desc: str = "scoring"):
    """Score ``target``'s corpus into ``target.output`` through ``colaprob.runner`` (resumed,
    or read back when finished, with the same settings), every rank of ``ctx`` together; the merged dataset."""
    return runs.run_job(prepare, settings, target, ctx, desc)


def prepare(settings: Settings, target: runs.Target, ctx) -> "Job":
    """Read and check everything, so a mistake stops the run before any file is written."""
    documents = data.read_inputs(target.inputs, per_line=settings.per_line, jsonl=settings.jsonl)
    settings = dataclasses.replace(settings, estimator_name=choose_estimator(settings, [doc for doc, _ in documents]))
    check_options(settings)
    model, identity = runs.load_model(target, ctx.device)
    checks = dict(solver=settings.solver, samples=settings.max_samples or settings.samples, chunk=settings.chunk_size, batch=settings.batch_size)
    if settings.estimator_name == "rolling":
        rows = windows.cut_rows(model, documents, None)
        planned = runs.preflight(model, rows, target, ctx.device, "scoring", longest=model.framing.max_tokens, **checks)
    else:
        rows = windows.rows_to_score(model, documents, settings.split)
        planned = runs.preflight(model, rows, target, ctx.device, "scoring", **checks)
    results.check_writable(target.output)
    return Job(settings, target, ctx, model, identity, rows, planned)


def choose_estimator(settings: Settings, documents) -> str:
    """``conditional`` for prompt-response pairs, ``elbo``, ``iwae`` or ``rolling`` for plain texts."""
    asked = settings.estimator_name
    pairs = sum(doc.prompt is not None for doc in documents)
    if asked == "rolling" and settings.split:
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


def check_options(settings: Settings) -> None:
    """Options that need a particular estimator: --max-samples (iwae), --target-error (an
    estimated solver error)."""
    options.check_target_error(settings.target_error, settings.solver)
    if settings.max_samples is None:
        return
    if settings.estimator_name != "iwae":
        raise ColaprobError(f"--max-samples doubles K of --estimator iwae only, not of {settings.estimator_name}; drop it or use --estimator iwae.")
    if settings.max_samples < settings.samples:
        raise ColaprobError(f"--max-samples {settings.max_samples} is below -K {settings.samples}; give a cap of at least -K.")


class Job:
    """Everything ``runner.run`` needs: the rows, the model, the settings and the memory plan
    (``colaprob.memory.MemoryPlan``: a batch is solved ``planned.batch`` rows at a time,
    ``chunk`` samples and ``vjp_chunk`` products at a time; a solve that still fails to
    allocate is retried with half the samples, and the rest of the run keeps the half)."""

    def __init__(self, settings: Settings, target: runs.Target, ctx, model, identity, rows, planned):
        from colaprob import memory

        self.settings, self.model, self.rows, self.planned = settings, model, rows, planned
        self.chunk = memory.AdaptiveChunk(planned.chunk, what="scoring")
        record = {
            **identity,
            "inputs": [path.name for path in target.inputs],
            "input_fingerprint": data.fingerprint([row.document for row in rows]),
            **runs.run_record(settings),
            "device_type": ctx.device.type,
            "max_tokens": model.framing.max_tokens,
            "windows": windows.CHAIN_NOTE if settings.estimator_name == "rolling" else windows.windows_note(rows),
        }
        self.plan = runner.Plan(record, n_items=len(rows), batch_size=settings.batch_size)

    def score_batch(self, items: range) -> xr.Dataset:
        """The batch's estimate; with ``target_error``, re-solved with tighter settings
        until every row's solver error is below the target (or the tolerance floor is hit)."""
        error_of = lambda ds: ds["log_likelihood_solver_error"].values if "log_likelihood_solver_error" in ds else None
        ds, _ = runs.solve_to_target(lambda solver: self.estimate(items, solver), self.settings.solver, self.settings.target_error, error_of)
        return ds

    def finish(self, merged: xr.Dataset) -> xr.Dataset:
        return finish(merged)

    def estimate(self, items: range, solver: Solver) -> xr.Dataset:
        """The rows ``items``, ``planned.batch`` at a time."""
        solver = solver.replace(vjp_chunk=self.planned.vjp_chunk)
        return runs.in_calls(items, self.planned.batch, self.chunk, lambda rows, chunk: self.estimate_rows(rows, solver, chunk))

    def estimate_rows(self, items: range, solver: Solver, chunk_size: int) -> xr.Dataset:
        from colaprob import estimators

        s = self.settings
        chosen = [self.rows[i] for i in items]
        options = dict(seed=s.seed, sequence_ids=list(items), chunk_size=chunk_size, solver=solver)
        if s.estimator_name == "conditional":
            documents = [row.document for row in chosen]
            batch, prefix_tokens, response = self.model.frame_pairs([d.prompt for d in documents], [d.text for d in documents])
            ds = estimators.conditional(self.model, batch, prefix_tokens, s.samples, response=response, direct=s.direct, **options)
        elif s.estimator_name == "rolling":
            from colaprob.estimators.rolling import rolling_log_prob

            options["document_ids"] = options.pop("sequence_ids")
            ds = rolling_log_prob(self.model, [row.document.text for row in chosen], s.samples, **options)
            ds = ds.drop_vars(["window_text"])  # the windows are the text's own partition; kept out of the result file
        else:
            batch = self.model.frame([row.document.text for row in chosen])
            if s.estimator_name == "iwae":
                options["max_samples"] = s.max_samples
            ds = getattr(estimators, s.estimator_name)(self.model, batch, s.samples, **options)
        ds = with_identity(ds, chosen)
        # What the memory plan and any retry chose: they bound memory, not the numbers.
        return ds.assign(samples_solved_together=("sequence", np.full(len(chosen), chunk_size)), vjps_per_pass=("sequence", np.full(len(chosen), solver.vjp_chunk)))


def with_identity(ds: xr.Dataset, chosen: list[windows.Row]) -> xr.Dataset:
    """The estimate of a batch with what each row is, and without the corpus-level numbers
    of this batch alone (``finish`` computes them for the whole corpus). The batch's
    function evaluations, an attribute of the estimate, become a per-row variable."""
    per_row = ds.drop_vars([name for name, var in ds.data_vars.items() if "sequence" not in var.dims])
    nfe = per_row.attrs.pop("nfe", -1)
    return per_row.assign({**runs.row_variables(chosen), "batch_nfe": ("sequence", np.full(len(chosen), int(nfe)))})


def finish(merged: xr.Dataset) -> xr.Dataset:
    """Corpus-level units of the merged rows (totals over totals)."""
    from colaprob.estimators import units

    return units.with_units(merged)


# ---------------------------------------------------------------------------------------------
# The summary


def report(ds: xr.Dataset, args) -> None:
    output.refuse_non_finite(ds, args.output)
    row = output.summary(ds)
    if args.json:
        output.print_json({**row, "output": str(args.output)})
        return
    table = {"estimator": output.short_name(ds), "sequences": row["sequences"], "tokens": row["tokens"]}
    table.update({name: output.plus_minus(row[name], row[f"{name}_se"]) for name in output.UNITS})
    columns = [(key, key.replace("_", " ")) for key in table]
    table["solver_error"] = f"{row['nats_per_token_solver_error']:.1e}" if "nats_per_token_solver_error" in row else "not estimated"
    columns.append(("solver_error", "solver error nats/token"))
    if "reliable_fraction" in row:
        table["reliable_fraction"] = output.khat_cell(row)
        columns.append(("reliable_fraction", "k-hat reliable"))
    if "direct_nats_per_token" in row:
        table["direct_nats_per_token"] = row["direct_nats_per_token"]
        columns.append(("direct_nats_per_token", "direct nats/token"))
    output.print_table([table], columns)
    print(f"results: {args.output}")
