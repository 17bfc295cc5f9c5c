"""What the scoring and diagnostic commands share: option types and groups, loading the
model with a fingerprint, reading and windowing documents, and printing the summary.

Not a subcommand itself (``colaprob.cli`` lists those by name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from colaprob import windows
from colaprob.errors import ColaprobError
from colaprob.estimators import cnf
from colaprob.windows import Row

# Every method of the solver registry (colaprob.estimators.cnf): adaptive ones first.
FIXED_GRID_METHODS = tuple(sorted(cnf.FIXED_GRID_METHODS))
ODE_METHODS = (*cnf.ADAPTIVE_METHODS, *FIXED_GRID_METHODS)
TOLERANCE_FLOOR = 1e-7
SEED_LIMIT = 2**63
MAX_SAMPLES = 2**20
"""-K, posterior samples: a million already takes days on the embedded model."""
MAX_THREADS_PER_CORE = 4
MAX_STEPS = 100_000

# ---------------------------------------------------------------------------------------------
# Option types: a bad value is an argparse error (one line, exit status 2).


def positive_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def tolerance(text: str) -> float:
    value = _parse(float, text, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    if value < TOLERANCE_FLOOR:
        raise argparse.ArgumentTypeError(
            f"{text} is below {TOLERANCE_FLOOR:g}: the model computes in float32 (machine epsilon 1.2e-7), so no solver "
            "step can meet a tighter tolerance"
        )
    return value


def finite_float(text: str) -> float:
    value = _parse(float, text, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def seed(text: str) -> int:
    value = non_negative_int(text)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be below 2**63 (a seed is a 63-bit integer), got {text}")
    return value


def samples(text: str) -> int:
    value = positive_int(text)
    if value > MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SAMPLES:,} (2**20); got {value:,}")
    return value


def threads(text: str) -> int:
    value = positive_int(text)
    cores = os.cpu_count() or 1
    if value > MAX_THREADS_PER_CORE * cores:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS_PER_CORE * cores} ({MAX_THREADS_PER_CORE} per CPU core of this machine); got {value}")
    return value


def memory_size(text: str) -> int:
    from colaprob.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parse(kind, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="tiny",
        help="checkpoint folder (official HuggingFace layout: cola_dlm/ and tokenizer.json), a Hugging Face name "
        "ORG/NAME read from the local Hugging Face cache, or 'tiny', the embedded model (default)",
    )
    parser.add_argument("--revision", default=None, help="with --model ORG/NAME: the branch, tag or commit (default: main)")
    parser.add_argument(
        "--download",
        action="store_true",
        help="with --model ORG/NAME: fetch the model from the Hugging Face Hub if it is not cached (default: the cache only)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute (default: a GPU if torch sees one)")
    parser.add_argument(
        "--max-memory",
        type=memory_size,
        default=None,
        help="refuse a run whose estimated peak memory exceeds this (8G, 512M, ...; default: the free memory of the device)",
    )
    add_threads_option(parser)


def add_threads_option(parser) -> None:
    """``--threads``, applied by ``colaprob.cli.main`` before the command runs."""
    parser.add_argument(
        "--threads",
        type=threads,
        help="CPU threads for torch (default: torch's choice; on a busy machine 1 is often fastest for a small model)",
    )


def add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="text files (each file one document, or one per line with --per-line) or JSONL files "
        "(.jsonl, or any name with --jsonl) of {\"text\": ...} or {\"prompt\": ..., \"ground_truth\" | \"response\": ...}",
    )
    parser.add_argument("--per-line", action="store_true", help="in text files, every non-blank line is its own document")
    parser.add_argument("--jsonl", action="store_true", help="read every input as JSONL whatever its name")
    parser.add_argument(
        "--split",
        action="store_true",
        help="cut a text longer than the model's max_tokens into consecutive windows at whitespace and score "
        "each window as its own document (default: refuse such texts)",
    )


def add_cnf_options(
    parser: argparse.ArgumentParser, *, default_trace: str = "exact", default_tolerance: float = 1e-7, target_error: bool = False
) -> None:
    group = parser.add_argument_group("prior density (CNF)")
    group.add_argument(
        "--trace",
        choices=("exact", "hutchinson"),
        default=default_trace,
        help=f"divergence along the flow: exact (block_size*d VJPs per step) or Hutchinson probes (default: {default_trace})",
    )
    group.add_argument("--probes", type=positive_int, default=1, help="Hutchinson probes per solve, at most block_size * latent_dim (the exact trace's cost) (default: 1)")
    group.add_argument("--rtol", type=tolerance, default=default_tolerance, help=f"ODE relative tolerance of an adaptive method (default: {default_tolerance:g})")
    group.add_argument("--atol", type=tolerance, default=default_tolerance, help=f"ODE absolute tolerance of an adaptive method (default: {default_tolerance:g})")
    group.add_argument(
        "--method",
        choices=ODE_METHODS,
        default="dopri5",
        help="ODE solver: adaptive (dopri5, bosh3, ...; --rtol/--atol) or a fixed grid (euler, midpoint, rk4, "
        "fixed_adams, ...; needs --steps) (default: dopri5)",
    )
    group.add_argument("--steps", type=positive_int, default=None, help="steps of a fixed-grid method")
    if target_error:
        group.add_argument(
            "--target-error",
            type=tolerance,
            default=None,
            metavar="NATS",
            help="tighten the solver (tolerances / 10, or twice the steps) until every document's estimated solver error "
            "is below NATS; the settings reached are recorded per document (default: the given settings)",
        )


def cnf_options(args: argparse.Namespace) -> dict:
    """The CNF keyword arguments of the parsed options; a fixed grid needs ``--steps``."""
    fixed = args.method in FIXED_GRID_METHODS
    if fixed != (args.steps is not None):
        raise ColaprobError(
            f"--method {args.method} needs --steps." if fixed else f"--steps is for fixed-grid methods, not for --method {args.method}."
        )
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if not fixed and value < cnf.TOLERANCE_FLOOR:
            raise ColaprobError(
                f"--{name} {value:g} is below {cnf.TOLERANCE_FLOOR:g}, where the solver's steps underflow before t = 1; give {cnf.TOLERANCE_FLOOR:g} or more."
            )
    options = {"method": args.method, "steps": args.steps} if fixed else {"method": args.method, "rtol": args.rtol, "atol": args.atol}
    if args.trace == "hutchinson":
        options["n_probes"] = args.probes
    return options


def add_output_options(parser: argparse.ArgumentParser, default_output: str) -> None:
    parser.add_argument("-o", "--output", type=Path, default=Path(default_output), help=f"result file (default: {default_output})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing result or unfinished run made with other settings")
    parser.add_argument("--seed", type=seed, default=0, help="random seed, an integer in [0, 2**63) (default: 0)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------
# The model


def load_model(name: str, device, revision: str | None = None, download: bool = False):
    """``colaprob.load(name)`` in float32 evaluation mode on ``device``, plus its identity:
    ``{"model": name, "model_config_hash": ..., "model_weights_hash": ...}`` (and the
    snapshot's ``model_revision`` for a Hugging Face name, ``colaprob.hub``)."""
    import colaprob
    from colaprob import hub

    identity = {"model": str(name)}
    if hub.is_repo_id(name):
        path = hub.resolve(name, revision, download=download)
        identity["model_revision"] = path.name  # the snapshot folder is named by its commit
    elif revision is not None or download:
        raise ColaprobError(f"--revision and --download are for Hugging Face names (ORG/NAME), not for {name!r}.")
    else:
        path = name
    model = colaprob.load(path)
    identity |= {"model_config_hash": config_hash(model), "model_weights_hash": weights_hash(model)}
    model = model.to(device).eval()
    return model, identity


def config_hash(model) -> str:
    """A short hash of everything that configures the model: both network configurations,
    the framing and the decoder's input space."""
    config = {
        "vae": model.vae_config.to_dict(),
        "dit": model.dit_config.to_dict(),
        "framing": model.framing.to_dict(),
        "decoder_space": model.decoder_space,
    }
    return _short_hash(json.dumps(config, sort_keys=True).encode("utf-8"))


def weights_hash(model) -> str:
    """A short hash of every weight's bytes, so retrained weights under the same name and
    configuration count as another model."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Documents


def read_inputs(paths: Sequence[Path], *, per_line: bool, jsonl: bool) -> list[tuple]:
    """``(document, file name)`` for every document of every input file, in order
    (``colaprob.data.read_documents``)."""
    from colaprob.data import read_documents

    documents = []
    for path in paths:
        if jsonl or path.suffix.lower() == ".jsonl":
            mode = "jsonl"
        else:
            mode = "lines" if per_line else "file"
        documents += [(doc, path.name) for doc in read_documents(path, mode)]
    return documents


def fingerprint(documents: Sequence) -> str:
    """A short hash of the documents' texts and prompts: a resumed run must score the same."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(json.dumps([doc.prompt, doc.text]).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


def framed_length_fn(model) -> Callable[..., int]:
    """``(text, prompt=None) -> framed length in tokens`` for ``model``: bos, the prompt's
    tokens, the text's tokens, eos, padding to whole blocks (as ``model.frame`` counts). For a
    text that cannot fit the context, a lower bound (still over the context) instead."""
    framing = model.framing
    multiple = model.patch_size * model.block_size
    extra = (framing.bos_id is not None) + (framing.eos_id is not None)

    def framed_length(text: str, prompt: str | None = None) -> int:
        # A text surely over the context is not tokenized: its lower bound is over already.
        n = model.tokenizer.fewest_tokens(text) + model.tokenizer.fewest_tokens(prompt or "") + extra
        if framing.max_tokens is None or n <= framing.max_tokens:
            n = len(model.tokenizer.encode(text)) + len(model.tokenizer.encode(prompt or "")) + extra
        return n + (-n % multiple)

    return framed_length


def check_lengths(documents: Sequence, framed_length: Callable[..., int], max_tokens: int | None) -> None:
    """Refuse, before any work, the first document (prompt included) whose framed length
    exceeds ``max_tokens``."""
    if max_tokens is None:
        return
    for i, doc in enumerate(documents):
        n = framed_length(doc.text, doc.prompt)
        if n > max_tokens:
            advice = "shorten the pair" if doc.prompt is not None else "shorten it or pass --split to score it in windows"
            raise ColaprobError(f"document {i} is at least {n} tokens long once framed, more than the model's limit of {max_tokens}; {advice}.")


def preflight(args, model, rows: Sequence["Row"], device, what: str, longest: int | None = None) -> None:
    """The checks of the settings against the model and the corpus, before any work: the
    sample counts, the fixed grid's steps, the Hutchinson probes (more than ``block_size * latent_dim`` would cost
    more than the exact trace), an output that is one of the inputs, and the estimated peak
    memory of one batch (``colaprob.memory``) against ``--max-memory`` or the free memory.
    ``longest``: the longest sequence one solve sees, when it is not a row's framed length
    (the rolling chain scores a long document one window pair at a time)."""
    from colaprob import memory

    samples = max(getattr(args, name, 0) or 0 for name in ("samples", "posterior_samples", "prior_samples"))
    if samples > MAX_SAMPLES:
        raise ColaprobError(f"{samples:,} samples is more than the {MAX_SAMPLES:,} (2**20) colaprob takes; a run that large would not finish.")
    if getattr(args, "steps", None) is not None and args.steps > MAX_STEPS:
        raise ColaprobError(
            f"--steps {args.steps:,} is more than the {MAX_STEPS:,} a fixed grid may take; far fewer already bring the "
            "discretisation error below float32 rounding."
        )
    exact_cost = model.block_size * model.latent_dim
    if args.trace == "hutchinson" and args.probes > exact_cost:
        raise ColaprobError(
            f"--probes {args.probes} is more than block_size x latent_dim = {exact_cost}, the vector-Jacobian products of "
            "the exact trace; use --trace exact, which is cheaper and has no variance."
        )
    check_output_is_not_an_input(args.output, args.inputs)
    framed_length = framed_length_fn(model)
    tokens = longest or max(framed_length(row.document.text, row.document.prompt) for row in rows)
    chunk = min(getattr(args, "chunk_size", None) or samples or 1, samples or 1)
    work = memory.Workload(batch=min(args.batch_size, len(rows)), tokens=tokens, chunk=chunk, probes=args.probes if args.trace == "hutchinson" else None)
    memory.check_fits(model, work, args.max_memory, device, what)


def check_output_is_not_an_input(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output (or its run folder) that is one of the input files: writing the
    result would destroy the text it is computed from."""
    target = Path(output).resolve()
    for path in inputs:
        if str(path) != "-" and Path(path).resolve() in (target, target.with_name(target.name + ".run")):
            raise ColaprobError(f"the output {output} is the input file {path}; choose another --output, or the input would be overwritten.")


def cut_rows(model, documents, split: bool) -> list[Row]:
    """The sequences to score: every ``(document, source)``, and with ``split`` the windows
    of texts that exceed the model's ``max_tokens``, each scored as an independent document
    (``colaprob.windows``). Without ``split``, or for a prompt-response pair, a text too
    long is refused before any work."""
    rows = windows.cut_rows(model, documents, "independent" if split else None)
    check_lengths([row.document for row in rows], framed_length_fn(model), model.framing.max_tokens)
    return rows


def row_variables(rows: Sequence[Row]) -> dict:
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


def windows_note(rows: Sequence[Row]) -> str:
    """The attribute that says whether (and how) long documents were windowed."""
    return windows.INDEPENDENT_NOTE if any(row.window > 0 for row in rows) else "none"


# ---------------------------------------------------------------------------------------------
# Printing


def print_table(rows: list[dict], columns: list[tuple[str, str]], file=None) -> None:
    """A plain aligned table: ``columns`` are (key, heading) pairs; floats get 4 digits."""
    file = file or sys.stdout
    cells = [[heading for _, heading in columns]]
    cells += [[format_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))), file=file)


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def plus_minus(value: float, se: float) -> str:
    """``value ± se`` with 4 decimals, or 4 significant digits for large numbers."""
    if abs(value) < 1e4:
        return f"{value:.4f} ± {se:.4f}"
    return f"{value:.4g} ± {se:.2g}"


def refuse_non_finite(ds, output) -> None:
    """Refuse to summarise a result with a non-finite log-likelihood: name its rows and the
    likely causes (the file stays, so the rows can be inspected)."""
    values = np.asarray(ds["log_likelihood"].values, dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:10]) + (f" and {bad.size - 10} more" if bad.size > 10 else "")
        raise ColaprobError(
            f"{output} holds a non-finite log-likelihood (NaN or infinite) in row(s) {shown}, so no corpus figure is "
            "printed; likely causes are weights or a configuration that give NaN (check colaprob inspect) or an ODE "
            "solve that diverged (try --method rk4 --steps 32)."
        )


def print_json(summary: dict) -> None:
    """``summary`` as strict JSON on stdout: NaN and infinities become null."""
    print(json.dumps(_finite(summary), indent=2, sort_keys=True, allow_nan=False))


def _finite(value):
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------
# Diagnostics over a whole corpus


def run_whole_corpus(args, name: str, compute: Callable, settings: dict, finish: Callable = lambda ds: ds, min_sequences: int = 1):
    """Run a corpus-level diagnostic (``compute(model, batch) -> Dataset`` over ``sequence``)
    on the plain texts of ``args.inputs`` as one batch through ``colaprob.runner``: the same
    checks, provenance, atomic output and refusal of other settings as ``score``. A
    diagnostic such as the aggregate posterior needs every sequence at once, so it is not
    split into shards. Returns the dataset on rank 0, else None."""
    from colaprob import distributed

    ctx = distributed.from_environment(args.device)
    try:
        return ctx.agree(lambda: _prepare_whole_corpus(args, ctx, name, compute, settings, finish, min_sequences))()
    finally:
        distributed.shutdown(ctx)


def _prepare_whole_corpus(args, ctx, name, compute, settings, finish, min_sequences):
    """Every check of ``run_whole_corpus``; returns the run itself, to start once every rank
    has passed them."""
    from colaprob import results, runner

    documents = read_inputs(args.inputs, per_line=args.per_line, jsonl=args.jsonl)
    if any(doc.prompt is not None for doc, _ in documents):
        raise ColaprobError(f"{name} takes plain texts, but the input holds prompt-response pairs.")
    model, identity = load_model(args.model, ctx.device, args.revision, args.download)
    rows = cut_rows(model, documents, args.split)
    if len(rows) < min_sequences:
        raise ColaprobError(
            f"{name} needs at least {min_sequences} documents, but the input holds {len(rows)}; "
            "give more text (--per-line makes every line a document)."
        )
    preflight(args, model, rows, ctx.device, name)
    results.check_writable(args.output)
    record = {
        **identity,
        "inputs": [path.name for path in args.inputs],
        "input_fingerprint": fingerprint([row.document for row in rows]),
        "diagnostic": name,
        **settings,
        "seed": args.seed,
        "device_type": ctx.device.type,
        "windows": windows_note(rows),
    }
    plan = runner.Plan(record, n_items=len(rows), batch_size=len(rows))

    def compute_all(items: range):
        batch = model.frame([rows[i].document.text for i in items])
        return compute(model, batch).assign(row_variables(rows))

    return lambda: runner.run(plan, compute_all, args.output, finish=finish, ctx=ctx, overwrite=args.overwrite, progress=False)
