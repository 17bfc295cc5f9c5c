"""The command line's options: value types, the option groups the commands share, and the
prior solver's options, generated from the fields of ``colaprob.estimators.cnf.Solver``.

A bad value is an argparse error (one line, exit status 2); a combination that cannot run is
a ``ColaprobError`` naming the options (``solver_from_args``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

from colaprob.errors import ColaprobError
from colaprob.estimators.solver import FIXED_GRID_METHODS, Solver

CLI_TOLERANCE_FLOOR = 1e-7
"""Tolerances below float32's machine epsilon cannot be met by a float32 velocity."""
SEED_LIMIT = 2**63
MAX_SAMPLES = 2**20
"""-K, posterior samples: a million already takes days on the embedded model."""
MAX_THREADS_PER_CORE = 4
MAX_STEPS = 100_000
DEFAULT_SOLVER = Solver(rtol=1e-7, atol=1e-7)
"""The commands' solver: tighter than the library's 1e-5, since a command's numbers are read
as results (on the embedded model 1e-7 is about 0.01 nats per sequence, BENCHMARKS.md)."""


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
    if value < CLI_TOLERANCE_FLOOR:
        raise argparse.ArgumentTypeError(
            f"{text} is below {CLI_TOLERANCE_FLOOR:g}: the model computes in float32 (machine epsilon 1.2e-7), so no solver "
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


# The prior's solver: one option per field of ``Solver`` (its metadata holds the help and the
# kind of value), parsed back into one ``Solver`` by ``solver_from_args``.
OPTION_KINDS = {"tolerance": tolerance, "positive": positive_int}


def add_solver_error_options(group, unit: str) -> None:
    """``--no-solver-error`` and ``--target-error NATS``, of the number of each ``unit``
    (document, item)."""
    group.add_argument(
        "--no-solver-error",
        action="store_true",
        help="skip the second, finer ODE solve that estimates each number's solver error in nats (on the embedded "
        "model it adds 0.23-0.43x to the solve); the table then says the error was not estimated",
    )
    group.add_argument(
        "--target-error",
        type=tolerance,
        default=None,
        metavar="NATS",
        help=f"tighten the solver (tolerances / 10, or twice the steps) batch by batch until every {unit}'s estimated solver "
        f"error is below NATS; the settings reached are recorded per {unit} (default: the given settings)",
    )


def check_target_error(target_error: float | None, solver: Solver) -> None:
    """``--target-error`` needs the estimate that ``--no-solver-error`` turns off."""
    if target_error is not None and not solver.solver_error:
        raise ColaprobError("--target-error needs the solver-error estimate, which --no-solver-error does not make; drop one of them.")


def add_solver_options(parser: argparse.ArgumentParser, defaults: Solver = DEFAULT_SOLVER) -> None:
    """``--method --rtol --atol --steps --trace --probes --probe --vjp-chunk``; ``defaults``:
    this command's defaults (its trace, method and tolerances)."""
    group = parser.add_argument_group("prior density (CNF)")
    for f in dataclasses.fields(Solver):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        default = getattr(defaults, f.name)
        kind = {"type": OPTION_KINDS[meta["kind"]]} if "kind" in meta else {"choices": meta["choices"]}
        shown = f" (default: {default:g})" if isinstance(default, float) else (f" (default: {default})" if default is not None else "")
        # Tolerances and steps default to None so that one given for the wrong kind of method
        # can be refused; the command's default is applied in ``solver_from_args``.
        value = None if f.name in ("rtol", "atol", "steps") else default
        group.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), dest=f.name, default=value, help=meta["help"] + shown, **kind)


def solver_from_args(args: argparse.Namespace, defaults: Solver = DEFAULT_SOLVER, **fields) -> Solver:
    """The ``Solver`` of the parsed options (``fields``: those the command sets itself, such
    as ``solver_error``). A fixed grid needs ``--steps`` and takes no tolerance; an adaptive
    method takes ``--rtol`` / ``--atol`` (default: the command's) and no ``--steps``."""
    fixed = args.method in FIXED_GRID_METHODS
    if fixed and args.steps is None:
        raise ColaprobError(f"--method {args.method} needs --steps.")
    if not fixed and args.steps is not None:
        raise ColaprobError(f"--steps is for fixed-grid methods, not for --method {args.method}.")
    if args.steps is not None and args.steps > MAX_STEPS:
        raise ColaprobError(
            f"--steps {args.steps:,} is more than the {MAX_STEPS:,} a fixed grid may take; far fewer already bring the "
            "discretisation error below float32 rounding."
        )
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Solver) if hasattr(args, f.name)}
    if fixed:
        wrong = [name for name in ("rtol", "atol") if given[name] is not None]
        if wrong:
            raise ColaprobError(f"--{wrong[0]} is for adaptive methods; --method {args.method} runs on a grid of --steps.")
    else:
        for name in ("rtol", "atol"):
            if given[name] is None:
                given[name] = getattr(defaults, name) if not defaults.fixed_grid else None
    try:
        return Solver(**{**given, **fields})
    except (TypeError, ValueError) as err:
        raise ColaprobError(f"the solver options: {err}.") from None


def add_output_options(parser: argparse.ArgumentParser, default_output: str) -> None:
    parser.add_argument("-o", "--output", type=Path, default=Path(default_output), help=f"result file (default: {default_output})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing result or unfinished run made with other settings")
    parser.add_argument("--seed", type=seed, default=0, help="random seed, an integer in [0, 2**63) (default: 0)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


