"""The commands end to end on the official-format fixture checkpoint, in-process, with cheap
settings: help, tables, --json, NetCDF layout and provenance, windows, pairs, diagnostics,
figures and the demo folder."""

import json

import numpy as np
import pytest
from cli_support import FAST, checkpoint_with_limit, run_cli

from colaprob import results

COMMANDS = ("score", "decompose", "probe", "viz", "demo")
PROVENANCE = ("model", "model_config_hash", "model_weights_hash", "seed", "colaprob_version", "torch_version",
              "torchdiffeq_version", "xarray_version", "python_version", "created_utc", "run_key")
CHEAP_CNF = ["--trace", "hutchinson", "--method", "euler", "--steps", "2", "--quiet"]


@pytest.fixture
def fixture(fixture_dirs):
    return fixture_dirs[0]


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("The quick brown fox.\nA second line of text.\n\nthird\n")
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    outcome = run_cli(command, "--help")
    assert outcome.code == 0 and "usage: colaprob " + command in outcome.out


def test_score_writes_one_row_per_document_with_provenance(tmp_path, fixture, texts):
    output = tmp_path / "scores.nc"
    outcome = run_cli("score", texts, "--per-line", "--model", fixture, "-o", output, *FAST)
    assert outcome.code == 0, outcome.err
    assert "nats per token" in outcome.out and "ELBO K=2" in outcome.out
    ds = results.read_dataset(output)
    assert ds.sizes["sequence"] == 3 and list(ds["text"].values) == ["The quick brown fox.", "A second line of text.", "third"]
    assert {"log_likelihood", "log_likelihood_se", "nats_per_token", "bits_per_byte", "log_weight", "corpus_nats_per_token"} <= set(ds)
    assert ds["log_weight"].dims == ("sequence", "sample") and ds["token_decoder_log_prob"].dims == ("sequence", "token")
    assert all(key in ds.attrs for key in PROVENANCE)
    assert ds.attrs["estimator"] == "ELBO (lower bound)" and ds.attrs["K"] == 2 and ds.attrs["windows"] == "none"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".nc"] == ["scores.nc"]


def test_score_json_summary_is_machine_readable(tmp_path, fixture, texts):
    outcome = run_cli("score", texts, "--per-line", "--model", fixture, "-o", tmp_path / "s.nc", "--json", "--estimator", "iwae", *FAST)
    summary = json.loads(outcome.out)
    assert summary["sequences"] == 3 and summary["estimator"].startswith("IWAE-2")
    assert summary["nats_per_token"] > 0 and summary["reliable_fraction"] is None and summary["khat_not_computable"] == 3  # K = 2 < 21


def test_threads_option_sets_torch_threads_and_is_recorded(tmp_path, fixture, texts):
    outcome = run_cli("score", texts, "--per-line", "--model", fixture, "-o", tmp_path / "s.nc", "--threads", "2", *FAST)
    assert outcome.code == 0, outcome.err
    assert results.read_dataset(tmp_path / "s.nc").attrs["torch_threads"] == 2
    refused = run_cli("score", texts, "--model", fixture, "--threads", "0")
    assert refused.code == 2 and "--threads" in refused.err and "Traceback" not in refused.err


def test_split_scores_windows_that_fit(tmp_path, fixture):
    limited = checkpoint_with_limit(fixture, tmp_path / "limited", max_tokens=16)
    long = tmp_path / "long.txt"
    long.write_text("one two three four five six seven eight nine ten eleven twelve")
    outcome = run_cli("score", long, "--model", limited, "--split", "-o", tmp_path / "s.nc", *FAST)
    assert outcome.code == 0, outcome.err
    ds = results.read_dataset(tmp_path / "s.nc")
    assert ds.sizes["sequence"] > 1 and set(ds["document"].values) == {0}
    assert list(ds["window"].values) == list(range(ds.sizes["sequence"]))
    assert " ".join(ds["text"].values) == long.read_text()
    assert "independent document" in ds.attrs["windows"]


def test_prompt_response_pairs_use_the_conditional_estimator(tmp_path, fixture):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "The quick", "ground_truth": " brown fox."}\n{"prompt": "A", "response": " line"}\n')
    outcome = run_cli("score", pairs, "--model", fixture, "-o", tmp_path / "p.nc", *FAST)
    assert outcome.code == 0, outcome.err
    ds = results.read_dataset(tmp_path / "p.nc")
    assert list(ds["prompt"].values) == ["The quick", "A"] and list(ds["text"].values) == [" brown fox.", " line"]
    assert "common random numbers" in ds.attrs["estimator"]
    # The units count the response alone: its bytes and its tokens plus the end-of-text token.
    assert list(ds["n_bytes"].values) == [11, 5]
    np.testing.assert_allclose(ds["nats_per_token"], -ds["log_likelihood"] / ds["n_tokens"])


def test_decompose_probe_and_viz(tmp_path, fixture, texts):
    common = [texts, "--per-line", "--model", fixture, *CHEAP_CNF]
    # One sequence per batch: several batches, so only --quiet keeps the progress bars away.
    dec = run_cli("decompose", *common, "-K", "2", "--batch-size", "1", "-o", tmp_path / "dec.nc")
    assert dec.code == 0 and "I_q(X;Z)" in dec.out, dec.err
    probes = run_cli("probe", *common, "--posterior-samples", "2", "--prior-samples", "2", "--batch-size", "1", "-o", tmp_path / "probes.nc", "--json")
    assert probes.code == 0 and 0 <= json.loads(probes.out)["prior_hit"] <= 1, probes.err
    assert "%|" not in dec.err + probes.err
    ds = results.read_dataset(tmp_path / "probes.nc")
    assert ds["decoder_probe"].dims == ("sequence", "token") and "count" in ds and ds.attrs["diagnostic"] == "probes"

    assert run_cli("viz", tmp_path / "dec.nc", "--no-labels").code == 0
    assert run_cli("viz", tmp_path / "probes.nc", "--sequence", "1").code == 0
    assert {"dec.png", "probes_sequence1.png", "probes_summary.png"} <= {p.name for p in tmp_path.iterdir()}
    assert run_cli("viz", tmp_path / "probes.nc", "--sequence", "9").code == 2


def test_demo_writes_the_report_folder_and_resumes(tmp_path, fixture):
    args = ["demo", "--model", fixture, "--sequences", "3", "-K", "2", "--diagnostic-samples", "2", "--prior-samples", "2", "-o", tmp_path / "demo", *CHEAP_CNF]
    first = run_cli(*args)
    assert first.code == 0, first.err
    assert "(exact trace)" in first.out and "IWAE-2 (Hutchinson)" in first.out
    folder = tmp_path / "demo"
    assert {"README.md", "demo.json", "heldout.jsonl", "scores_elbo.nc", "scores_iwae.nc", "report"} <= {p.name for p in folder.iterdir()}
    assert (folder / "report" / "summary.md").exists() and (folder / "report" / "decomposition.png").exists()
    assert "held-out cloze" in first.out and {"cloze.jsonl", "cloze.nc"} <= {p.name for p in folder.iterdir()}
    again = run_cli(*args)
    assert again.code == 0 and again.out == first.out
    refused = run_cli(*args[:-len(CHEAP_CNF)], "--seed", "1", *CHEAP_CNF)
    assert refused.code == 2 and "other settings (seed 0 there, 1 now)" in refused.err
