"""The ``colaprob`` command line: one entry point, one module per subcommand.

Each subcommand lives in ``colaprob/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
command runs, so ``colaprob --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from colaprob.errors import ColaprobError

COMMANDS = {
    "score": "colaprob.commands.score",
    "eval": "colaprob.commands.eval",
    "decompose": "colaprob.commands.decompose",
    "probe": "colaprob.commands.probe",
    "viz": "colaprob.commands.viz",
    "generate": "colaprob.commands.generate",
    "train": "colaprob.commands.train",
    "inspect": "colaprob.commands.inspect",
    "demo": "colaprob.commands.demo",
    "lm-eval": "colaprob.commands.lm_eval",
}


# Failures to write that a user can fix (space, permissions); any write the commands do not
# report themselves is still one sentence.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit with status 2 and one line (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="colaprob", description=__doc__.splitlines()[0])
    from colaprob import __version__

    parser.add_argument("--version", action="version", version=f"colaprob {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    # Import only the module of the command being run; list the others by name.
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, module_name in COMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            sub.add_parser(name, help="(not available in this build)")
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args._run(args) or 0)
    except ColaprobError as err:
        if not getattr(err, "quiet", False):  # reported by rank 0 for every rank
            print(f"colaprob: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        from colaprob.results import write_failure

        print(f"colaprob: error: {write_failure(err.filename or 'a file', err)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        # torch reports a failed allocation as a RuntimeError (OutOfMemoryError on a GPU).
        if isinstance(err, RuntimeError) and not _out_of_memory(err):
            raise
        print(
            "colaprob: error: the machine ran out of memory; lower --chunk-size or --batch-size, shorten the texts, "
            "or set --max-memory to what is really free so the run is refused before it starts.",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("colaprob: interrupted; finished work is saved and a rerun resumes it", file=sys.stderr)
        return 130


def _out_of_memory(err: RuntimeError) -> bool:
    return type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(err) or "out of memory" in str(err)


if __name__ == "__main__":
    sys.exit(main())
