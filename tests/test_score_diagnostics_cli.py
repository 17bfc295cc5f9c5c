"""What ``colaprob score`` says about how far its numbers can be off: k-hat below the sample
count where PSIS is defined, K doubling, on the official-format fixture checkpoint."""

import numpy as np
import pytest
from cli_support import run_cli

from colaprob import results

CHEAP = ["--trace", "hutchinson", "--method", "euler", "--steps", "2", "--batch-size", "3", "--quiet"]


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("The quick brown fox.\nA second line of text.\nthird\n")
    return path


def test_khat_at_k8_is_not_computable_in_the_file_and_the_table(tmp_path, fixture_dirs, texts):
    output = tmp_path / "s.nc"
    outcome = run_cli("score", texts, "--per-line", "--model", fixture_dirs[0], "--estimator", "iwae", "-K", "8", "-o", output, *CHEAP)
    assert outcome.code == 0, outcome.err
    assert "n/a (K < 21)" in outcome.out and "0.0000" not in outcome.out.splitlines()[1].split()[-1]
    ds = results.read_dataset(output)
    assert np.isnan(ds["khat"]).all() and np.isnan(ds["khat_threshold"]).all() and not ds["khat_computable"].any()


def test_max_samples_doubles_k_until_khat_is_computable(tmp_path, fixture_dirs, texts):
    output = tmp_path / "s.nc"
    args = ("score", texts, "--per-line", "--model", fixture_dirs[0], "--estimator", "iwae", "-K", "8", "-o", output, *CHEAP)
    outcome = run_cli(*args, "--max-samples", "32")
    assert outcome.code == 0, outcome.err
    ds = results.read_dataset(output)
    # At 8 and 16 no k-hat exists, which is no verdict, so every row doubles on to 32.
    assert (ds["n_samples"].values == 32).all() and ds["khat_computable"].all() and ds.attrs["max_samples"] == 32
    assert "n/a (K < 21)" not in outcome.out
    refused = run_cli(*args, "--max-samples", "4", "--overwrite")
    assert refused.code == 2 and "--max-samples 4 is below -K 8" in refused.err
    wrong = run_cli("score", texts, "--per-line", "--model", fixture_dirs[0], "-K", "8", "--max-samples", "32", "-o", tmp_path / "e.nc", *CHEAP)
    assert wrong.code == 2 and "--estimator iwae only" in wrong.err


def test_the_table_prints_the_solver_error_and_target_error_tightens_until_met(tmp_path, fixture_dirs, texts):
    output = tmp_path / "s.nc"
    args = ("score", texts, "--per-line", "--model", fixture_dirs[0], "-K", "2", "--method", "rk4", "--steps", "2", "--trace", "hutchinson")
    coarse = run_cli(*args, "-o", output, "--quiet")
    assert coarse.code == 0, coarse.err
    assert "solver error nats/token" in coarse.out
    loose = results.read_dataset(output)["log_likelihood_solver_error"].values
    assert (loose > 0).all()
    target = float(loose.min()) / 4
    outcome = run_cli(*args, "-o", tmp_path / "t.nc", "--quiet", "--target-error", repr(target))
    assert outcome.code == 0, outcome.err
    ds = results.read_dataset(tmp_path / "t.nc")
    assert (ds["log_likelihood_solver_error"].values <= target).all() and ds["solver_error_target_met"].all()
    assert all(setting.startswith("rk4 steps ") and int(setting.split()[-1]) > 2 for setting in ds["solver_setting"].values)
    assert ds.attrs["target_error"] == target
