"""``colaprob inspect PATH``: what a checkpoint holds and whether its pieces fit together."""

from __future__ import annotations

import json

from colaprob.checkpoint import describe, inspect_checkpoint

HELP = "describe a checkpoint: both configs, parameter counts, dtypes and every inconsistency"


def add_arguments(parser) -> None:
    parser.add_argument("path", help="checkpoint folder (official HuggingFace layout), or 'tiny' for the embedded model")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    print(json.dumps(inspect_checkpoint(args.path), indent=2) if args.json else describe(args.path))
    return 0
