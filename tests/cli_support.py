"""Helpers for the command-line tests: run ``colaprob.cli.main`` in-process, cheap estimator
settings, and variants of the official-format fixture checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from colaprob.cli import main

# Seconds, not minutes: two samples, one Hutchinson probe, two Euler steps.
FAST = ["-K", "2", "--trace", "hutchinson", "--method", "euler", "--steps", "2", "--batch-size", "2", "--quiet"]


@dataclass
class Outcome:
    code: int
    out: str
    err: str


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread, as torchrun gives each rank: the same float32 rounding as a
    subprocess with OMP_NUM_THREADS=1, and on shared cores much faster for tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args) -> Outcome:
    """``colaprob ARGS`` in this process on one thread; usage errors (argparse's
    SystemExit) included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), one_thread():
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
    return Outcome(code, out.getvalue(), err.getvalue())


def checkpoint_with_limit(fixture: Path, destination: Path, max_tokens: int) -> Path:
    """A copy of ``fixture`` whose framing refuses texts longer than ``max_tokens`` (the
    official framing of that tokenizer, plus the limit)."""
    shutil.copytree(fixture, destination)
    framing = {"bos_id": 316, "eos_id": 316, "pad_id": 319, "max_tokens": max_tokens}
    (destination / "colaprob.json").write_text(json.dumps({"framing": framing}))
    return destination


def assert_one_line_error(outcome: Outcome, *fragments: str) -> None:
    """Exit status 2, one line on stderr naming each fragment, no traceback."""
    assert outcome.code == 2, outcome
    lines = outcome.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in outcome.err, outcome.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
