"""Every benchmark script runs once at a tiny size (``--quick``) and prints its tables.

Smoke runs only: no timing is asserted anywhere. The flow-matching comparison needs the
optional ``flow-matching`` package (the ``bench`` extra) and is skipped without it. The demo
benchmark's smoke run is the demo on the official-format fixture with cheap settings (about
20 s).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| " in out.stdout and "torch threads 1" in out.stdout, out.stdout[-2000:]
    return out.stdout


def test_block_causal_bench_compares_one_solve_with_per_block_solves():
    out = run_bench("block_causal.py")
    assert "per block (KV cache) speed-up" in out and "per block (2L prefix) err" in out


def test_tolerance_bench_compares_with_the_tightest_tolerance():
    out = run_bench("dit_tolerance.py")
    assert "max block diff vs tightest" in out


def test_trace_bench_reports_errors_against_the_analytic_density():
    out = run_bench("trace.py")
    assert "exact max err" in out and "hutch1 rms err" in out


def test_flow_matching_bench_runs_the_three_tools():
    pytest.importorskip("flow_matching")
    out = run_bench("vs_flow_matching.py")
    assert "flow_matching/colaprob time" in out and "Neural field" in out


def test_iwae_bench_measures_memory_in_fresh_processes():
    out = run_bench("iwae.py")
    assert "cache on peak RSS MiB" in out and "on/off speed-up" in out


def test_demo_bench_times_the_demo_end_to_end():
    out = run_bench("demo.py")
    assert "median wall s" in out and "IWAE" in out


def test_shared_context_bench_counts_rows_of_both_paths():
    out = run_bench("shared_context.py")
    assert "rows ratio" in out and "max |diff| log p" in out


def test_install_footprint_bench_measures_this_environment():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "install_footprint.py"), "--quick"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| this |" in out.stdout and "site-packages MB" in out.stdout, out.stdout


def test_solver_error_bench_reports_coverage_against_the_references():
    out = run_bench("solver_error.py")
    assert "bounds (seq)" in out and "Analytic harness" in out and "Embedded DiT" in out
    # The safety-factor table: a larger factor can only bound more cases and over-report more.
    study = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| adaptive") or line.startswith("| grid")]
    assert study
    runs = []  # consecutive rows of one kind and unit: one model's factors in increasing order
    for kind, unit, _, factor, bounds, within in study:
        if not runs or runs[-1][0] != (kind, unit):
            runs.append(((kind, unit), []))
        runs[-1][1].append((float(factor), float(bounds), float(within)))
    assert len(runs) == 8  # two models x (adaptive, grid) x (sequence, block)
    for _, rows in runs:
        factors, bounds, within = zip(*rows)
        assert list(factors) == sorted(factors) and list(bounds) == sorted(bounds) and list(within) == sorted(within, reverse=True)


def test_scale_bench_runs_beside_a_reference_checkout_and_plans_memory():
    out = run_bench("scale.py", "--reference", str(REPO))  # this checkout as its own reference
    assert "new/today time" in out and "rel diff vs today" in out and "Memory plan" in out and "planned estimate" in out


def test_batch_independence_bench_runs_beside_a_reference_checkout():
    out = run_bench("batch_independence.py", "--reference", str(REPO), "--method", "dopri5", "bosh3")  # this checkout as its own reference
    assert "moved (nats)" in out and "| this checkout" in out and "| reference" in out and "| bosh3" in out


def test_context_proposal_bench_compares_both_proposals():
    out = run_bench("context_proposal.py")
    assert "framed as a whole text" in out and "prior noise after the context" in out and "spread over choices" in out


def test_weighted_error_bench_compares_the_companion_on_every_sample_and_on_the_carrying_ones():
    out = run_bench("weighted_error.py")
    iwae_row, elbo_row, _ = (line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 4 "))  # K = 4; tasks last
    share = float(iwae_row[5])
    assert "weight-carrying: extra" in out and 0 < share <= 1
    assert "every 8th: extra" in out and float(elbo_row[5]) == 0.25  # sample 0 of 4


def test_elbo_error_bench_checks_the_subsampled_estimate_against_a_reference():
    out = run_bench("elbo_error.py")
    assert "draws 0, 8, ...: bounds" in out and "median reported / true" in out
