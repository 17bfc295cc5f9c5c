"""Running a command over a corpus: where it reads and writes (``Target``), the run key made
from its settings (``run_record``), the model with its identity, the checks before any work
(``preflight``), and the whole-corpus diagnostics' run.

A command's settings are one frozen dataclass (``score.Settings``, ``eval.Settings``, ...):
what it runs with and, by ``run_record``, the key that decides whether an existing result
may be resumed or read back. Every field is in the key, so a setting cannot be left out of
it by hand.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from colaprob.commands.options import MAX_SAMPLES
from colaprob.errors import ColaprobError
from colaprob.estimators.solver import Solver


@dataclass(frozen=True, kw_only=True)
class Target:
    """What a run reads and writes, and where: ``inputs``, the ``output`` file, the ``model``
    (a folder, ORG/NAME with ``revision`` and ``download``, or ``tiny``), ``max_memory``
    (bytes; None: the device's free memory), ``overwrite`` an existing result made with
    other settings, ``progress`` bars. Not part of the run key: the model and the inputs
    enter it through their hashes, the rest do not change a number."""

    inputs: tuple[Path, ...]
    output: Path
    model: str = "tiny"
    revision: str | None = None
    download: bool = False
    max_memory: int | None = None
    overwrite: bool = False
    progress: bool = True

    @classmethod
    def from_args(cls, args) -> "Target":
        return cls(
            inputs=tuple(args.inputs),
            output=args.output,
            model=args.model,
            revision=args.revision,
            download=args.download,
            max_memory=args.max_memory,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )


@dataclass(frozen=True, kw_only=True)
class Reading:
    """The part of a command's settings that says how text inputs become documents:
    ``per_line`` (every non-blank line of a text file its own document), ``jsonl`` (every
    input read as JSONL whatever its name) and ``split`` (texts over the model's context cut
    into independent windows). A command's settings dataclass inherits it."""

    per_line: bool = False
    jsonl: bool = False
    split: bool = False


def settings_from_args(cls, args, **given):
    """A command's settings (dataclass ``cls``) from the parsed options of the same names;
    ``given``: the fields that are not an option of their own name (the solver, ...)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in given}, **given)


def run_command(args, settings, execute: Callable, report: Callable) -> int:
    """A sharded command's ``run``: ``execute(settings, target, ctx)`` in this process's
    distributed context (``colaprob.distributed``), then ``report(merged, args)`` on rank 0."""
    from colaprob import distributed

    target = Target.from_args(args)
    ctx = distributed.from_environment(args.device)
    try:
        merged = execute(settings, target, ctx)
    finally:
        distributed.shutdown(ctx)
    if ctx.is_main:
        report(merged, args)
    return 0


def run_job(prepare: Callable, settings, target: Target, ctx, desc: str):
    """``prepare(settings, target, ctx)`` on every rank together (a refusal stops them all),
    then its job (``plan``, ``score_batch``, ``finish``) through ``colaprob.runner``; the
    merged dataset on rank 0."""
    from colaprob import runner

    job = ctx.agree(lambda: prepare(settings, target, ctx))
    return runner.run(job.plan, job.score_batch, target.output, finish=job.finish, ctx=ctx, overwrite=target.overwrite, progress=target.progress, desc=desc)


def in_calls(items: range, step: int, chunk, solve: Callable):
    """``solve(rows, samples_at_once)`` over ``items``, ``step`` rows a call (the memory plan's),
    each call run through ``chunk`` (a ``colaprob.memory.AdaptiveChunk``: retried with half
    the samples when it fails to allocate); the calls' datasets concatenated along
    ``sequence``."""
    from colaprob import runner

    parts = [chunk.run(lambda samples: solve(items[i : i + step], samples)) for i in range(0, len(items), step)]
    return parts[0] if len(parts) == 1 else runner.concat_sequences(parts)


def solve_to_target(estimate: Callable, solver: Solver, target: float | None, error_of: Callable):
    """``estimate(solver)``, re-run with ``solver.tighter()`` (tolerances / 10, or twice the
    steps) while some row's estimated solver error (``error_of(ds)`` [rows] nats, None when the
    estimate has none) is above ``target``, until none is or the solver cannot be tightened:
    ``(ds, solver)``, the last estimate and the settings it was solved with. The dataset gains
    ``solver_setting`` (those settings) and, with a target, ``solver_error_target_met``
    [rows], both over ``sequence``."""
    while True:
        ds = estimate(solver)
        error = error_of(ds)
        if error is None or target is None or not (error > target).any() or solver.tighter() is None:
            break
        solver = solver.tighter()
    ds["solver_setting"] = ("sequence", np.full(ds.sizes["sequence"], solver.label))
    if target is not None and error is not None:
        ds["solver_error_target_met"] = ("sequence", ~(error > target))
    return ds, solver


def run_record(settings) -> dict:
    """Every field of a command's ``settings`` dataclass, a ``Solver``'s fields inline (by
    their own names), as the run key's entries."""
    record = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        record |= value.to_record() if isinstance(value, Solver) else {f.name: value}
    return record


def load_model(target: Target, device):
    """``colaprob.load`` of ``target.model`` in float32 evaluation mode on ``device``, plus its
    identity: ``{"model": name, "model_config_hash": ..., "model_weights_hash": ...}`` (and
    the snapshot's ``model_revision`` for a Hugging Face name, ``colaprob.hub``)."""
    import colaprob
    from colaprob import hub
    from colaprob.checkpoint import config_hash, weights_hash

    name = target.model
    identity = {"model": str(name)}
    if hub.is_repo_id(name):
        path = hub.resolve(name, target.revision, download=target.download)
        identity["model_revision"] = path.name  # the snapshot folder is named by its commit
    elif target.revision is not None or target.download:
        raise ColaprobError(f"--revision and --download are for Hugging Face names (ORG/NAME), not for {name!r}.")
    else:
        path = name
    model = colaprob.load(path)
    identity |= {"model_config_hash": config_hash(model), "model_weights_hash": weights_hash(model)}
    model = model.to(device).eval()
    return model, identity


def preflight(
    model, rows: Sequence, target: Target, device, what: str, *, solver: Solver, samples: int, chunk: int, batch: int, longest: int | None = None
):
    """The checks of the settings against the model and the corpus, before any work: the
    sample count, the Hutchinson probes (more than ``block_size * latent_dim`` would cost
    more than the exact trace) and an output that is one of the inputs; then the memory
    plan (``colaprob.memory.plan``) for batches of ``batch`` rows, ``chunk`` samples at a
    time, under ``--max-memory`` or the free memory, which it returns. ``longest``: the
    longest sequence one solve sees, when it is not a row's framed length (the rolling chain
    scores a long document one window pair at a time)."""
    from colaprob.windows import framed_length_fn

    if samples > MAX_SAMPLES:
        raise ColaprobError(f"{samples:,} samples is more than the {MAX_SAMPLES:,} (2**20) colaprob takes; a run that large would not finish.")
    exact_cost = model.block_size * model.latent_dim
    if solver.hutchinson and solver.n_probes > exact_cost:
        raise ColaprobError(
            f"--probes {solver.n_probes} is more than block_size x latent_dim = {exact_cost}, the vector-Jacobian products of "
            "the exact trace; use --trace exact, which is cheaper and has no variance."
        )
    check_output_is_not_an_input(target.output, target.inputs)
    framed_length = framed_length_fn(model)
    tokens = longest or max(framed_length(row.document.text, row.document.prompt) for row in rows)
    return plan_memory(model, target, device, what, solver=solver, batch=min(batch, len(rows)), tokens=tokens, samples=samples, chunk=chunk)


def plan_memory(model, target: Target, device, what: str, *, solver: Solver, batch: int, tokens: int, samples: int, chunk: int):
    """``colaprob.memory.plan`` of a run: the VJP chunk, the samples solved together and the
    rows per model call lowered (in that order) until the estimated peak fits ``--max-memory``
    or the free memory of ``device``; refused in one sentence when one row, one sample and one
    product at a time do not fit. A lowering is said on stderr; none changes a number beyond
    float rounding (each sample and block takes its own solver steps)."""
    from colaprob import memory

    request = memory.Request(
        batch=batch, tokens=tokens, samples=samples, chunk=min(chunk, samples), probes=solver.n_probes if solver.hutchinson else None, vjp_chunk=solver.vjp_chunk
    )
    budget = memory.budget(target.max_memory, device)
    source = "--max-memory" if target.max_memory is not None else "the free memory of this machine"
    planned = memory.plan(model, request, budget if budget is not None else 2**62, source)  # unknown free memory: as asked
    lowered = [
        f"{name} {asked} -> {got}"
        for name, asked, got in (("vjp chunk", min(request.vjp_chunk, memory.vjps_per_evaluation(model, request.probes)), planned.vjp_chunk), ("samples solved together", request.chunk, planned.chunk), ("rows per model call", request.batch, planned.batch))
        if got < asked
    ]
    if lowered and budget is not None:
        print(
            f"colaprob: {what}: {', '.join(lowered)} so that the estimated peak ({memory.human(planned.peak_bytes)}) fits "
            f"{source} ({memory.human(budget)}).",
            file=sys.stderr,
        )
    return planned


def check_output_is_not_an_input(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output (or its run folder) that is one of the input files: writing the
    result would destroy the text it is computed from."""
    target = Path(output).resolve()
    for path in inputs:
        if str(path) != "-" and Path(path).resolve() in (target, target.with_name(target.name + ".run")):
            raise ColaprobError(f"the output {output} is the input file {path}; choose another --output, or the input would be overwritten.")


def row_variables(rows: Sequence) -> dict:
    """What each row is, as variables over ``sequence``: ``document`` (its index in the
    input), ``window`` (0 unless split), ``source`` (file name), ``text``, and ``prompt``
    for pairs."""
    variables = {
        "document": ("sequence", np.array([row.index for row in rows])),
        "window": ("sequence", np.array([row.window for row in rows])),
        "source": ("sequence", np.array([row.source for row in rows], dtype=object)),
        "text": ("sequence", np.array([row.document.text for row in rows], dtype=object)),
    }
    if rows and rows[0].document.prompt is not None:
        variables["prompt"] = ("sequence", np.array([row.document.prompt for row in rows], dtype=object))
    return variables


def run_whole_corpus(settings, target: Target, device_name: str, name: str, compute: Callable, *, samples: int, finish: Callable = lambda ds: ds, min_sequences: int = 1):
    """Run a corpus-level diagnostic (``compute(model, batch, memory_plan) -> Dataset`` over
    ``sequence``, ``memory_plan`` the ``colaprob.memory.MemoryPlan`` of the run)
    on the plain texts of ``target.inputs`` as one batch through ``colaprob.runner``: the
    same checks, provenance, atomic output and refusal of other settings as ``score``, the
    run key made from ``settings`` (which must have ``per_line``, ``jsonl``, ``split``,
    ``batch_size``, ``seed`` and ``solver``). A diagnostic such as the aggregate posterior
    needs every sequence at once, so it is not split into shards. Returns the dataset on
    rank 0, else None."""
    from colaprob import distributed

    ctx = distributed.from_environment(device_name)
    try:
        return ctx.agree(lambda: _prepare_whole_corpus(settings, target, ctx, name, compute, samples, finish, min_sequences))()
    finally:
        distributed.shutdown(ctx)


def _prepare_whole_corpus(settings, target, ctx, name, compute, samples, finish, min_sequences):
    """Every check of ``run_whole_corpus``; returns the run itself, to start once every rank
    has passed them."""
    from colaprob import data, results, runner, windows

    documents = data.read_inputs(target.inputs, per_line=settings.per_line, jsonl=settings.jsonl)
    if any(doc.prompt is not None for doc, _ in documents):
        raise ColaprobError(f"{name} takes plain texts, but the input holds prompt-response pairs.")
    model, identity = load_model(target, ctx.device)
    rows = windows.rows_to_score(model, documents, settings.split)
    if len(rows) < min_sequences:
        raise ColaprobError(
            f"{name} needs at least {min_sequences} documents, but the input holds {len(rows)}; "
            "give more text (--per-line makes every line a document)."
        )
    planned = preflight(model, rows, target, ctx.device, name, solver=settings.solver, samples=samples, chunk=samples, batch=settings.batch_size)
    results.check_writable(target.output)
    record = {
        **identity,
        "inputs": [path.name for path in target.inputs],
        "input_fingerprint": data.fingerprint([row.document for row in rows]),
        "diagnostic": name,
        **run_record(settings),
        "device_type": ctx.device.type,
        "windows": windows.windows_note(rows),
    }
    plan = runner.Plan(record, n_items=len(rows), batch_size=len(rows))

    def compute_all(items: range):
        batch = model.frame([rows[i].document.text for i in items])
        return compute(model, batch, planned).assign(row_variables(rows))

    return lambda: runner.run(plan, compute_all, target.output, finish=finish, ctx=ctx, overwrite=target.overwrite, progress=False)
