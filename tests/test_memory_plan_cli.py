"""The memory plan and the allocation retry, through ``colaprob score`` on the fixture
checkpoint: a run under a memory cap completes with the chunks the plan chose (and the
numbers of an unconstrained run), or is refused in one sentence before any work; a solve
that fails to allocate is run again with half the samples."""

from pathlib import Path

import numpy as np
import pytest
import torch

import colaprob
from colaprob import memory, results
from colaprob.estimators import cnf

from cli_support import assert_one_line_error, run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny-a"
GRID = ["--trace", "hutchinson", "--method", "rk4", "--steps", "2", "--no-solver-error", "--quiet", "--batch-size", "2"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("The value of x.\nA list is a sequence.\n")
    return path


def _tokens(model, path):
    return max(int(n) for n in model.frame(path.read_text().splitlines()).lengths)


def test_a_cap_lowers_the_chunks_and_changes_no_number(corpus, tmp_path):
    model = colaprob.load(FIXTURE)
    tokens = _tokens(model, corpus)
    # A cap that fits one sample at a time (with the products one at a time) but not four.
    fits = memory.peak_bytes(model, memory.Workload(batch=2, tokens=tokens, chunk=1, probes=1, vjp_chunk=1))
    too_big = memory.peak_bytes(model, memory.Workload(batch=2, tokens=tokens, chunk=2, probes=1, vjp_chunk=1))
    assert fits < too_big
    free = run_cli("score", corpus, "--per-line", "--model", FIXTURE, "-K", "4", *GRID, "-o", tmp_path / "free.nc")
    capped = run_cli("score", corpus, "--per-line", "--model", FIXTURE, "-K", "4", *GRID, "--max-memory", str(fits), "-o", tmp_path / "capped.nc")
    assert free.code == 0 and capped.code == 0, capped.err
    assert "samples solved together 4 -> 1" in capped.err and "fits --max-memory" in capped.err
    a, b = results.read_dataset(tmp_path / "free.nc"), results.read_dataset(tmp_path / "capped.nc")
    assert (a["samples_solved_together"] == 4).all() and (b["samples_solved_together"] == 1).all()
    np.testing.assert_allclose(b["log_likelihood"], a["log_likelihood"], rtol=0, atol=1e-9)  # a fixed grid: chunking changes nothing


def test_a_cap_below_one_sequence_is_refused_before_work(corpus, tmp_path):
    outcome = run_cli("score", corpus, "--per-line", "--model", FIXTURE, "-K", "4", *GRID, "--max-memory", "1K", "-o", tmp_path / "s.nc")
    assert_one_line_error(outcome, "one sequence of", "with one sample and one vector-Jacobian product at a time would need about")
    assert not (tmp_path / "s.nc").exists() and not (tmp_path / "s.nc.run").exists()


def test_a_failed_allocation_is_retried_with_half_the_samples(corpus, tmp_path, monkeypatch):
    """The allocator is made to fail for any solve of more than one sample at a time: the run
    still completes, one sample at a time, with the numbers of a run asked for that."""
    real = cnf.block_causal_log_prob
    failures = []

    def failing(velocity, z0, *args, **kwargs):
        if z0.shape[0] > 1:  # [samples, rows, L, d]
            failures.append(z0.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(velocity, z0, *args, **kwargs)

    monkeypatch.setattr(cnf, "block_causal_log_prob", failing)
    retried = run_cli("score", corpus, "--per-line", "--model", FIXTURE, "-K", "4", "--chunk-size", "4", *GRID, "-o", tmp_path / "retried.nc")
    assert retried.code == 0, retried.err
    assert failures == [4, 2]  # halved twice, then one sample at a time
    monkeypatch.setattr(cnf, "block_causal_log_prob", real)
    one = run_cli("score", corpus, "--per-line", "--model", FIXTURE, "-K", "4", "--chunk-size", "1", *GRID, "-o", tmp_path / "one.nc")
    assert one.code == 0, one.err
    a, b = results.read_dataset(tmp_path / "retried.nc"), results.read_dataset(tmp_path / "one.nc")
    assert (a["samples_solved_together"] == 1).all()
    np.testing.assert_allclose(a["log_likelihood"], b["log_likelihood"], rtol=0, atol=1e-9)


def test_an_allocation_failure_at_one_sample_is_one_sentence(corpus, tmp_path, monkeypatch):
    def always(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 999999 bytes")

    monkeypatch.setattr(cnf, "block_causal_log_prob", always)
    outcome = run_cli("score", corpus, "--per-line", "--model", FIXTURE, "-K", "2", *GRID, "-o", tmp_path / "s.nc")
    assert_one_line_error(outcome, "ran out of memory even one at a time")
