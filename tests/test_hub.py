"""``--model ORG/NAME [--revision REV]``: checkpoints from the local Hugging Face cache, built
here in the cache's own layout (``models--ORG--NAME/refs``, ``snapshots/<commit>``)."""

import shutil

import pytest

from cli_support import FAST, assert_one_line_error, run_cli

huggingface_hub = pytest.importorskip("huggingface_hub", reason="Hugging Face names need the extra colaprob[hf]")
from huggingface_hub import constants, errors  # noqa: E402

import colaprob  # noqa: E402
from colaprob import hub  # noqa: E402
from colaprob.results import read_dataset  # noqa: E402

MAIN, OLD = "a" * 40, "b" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch, fixture_dirs):
    """A Hugging Face cache holding ``org/cola-tiny`` at two commits: ``main`` and tag ``v0``."""
    root = tmp_path / "hub"
    repo = root / "models--org--cola-tiny"
    for commit in (MAIN, OLD):
        shutil.copytree(fixture_dirs[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v0").write_text(OLD)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def test_name_resolves_to_the_cached_snapshot_of_the_revision(cache):
    assert hub.resolve("org/cola-tiny") == cache / "models--org--cola-tiny" / "snapshots" / MAIN
    assert hub.resolve("org/cola-tiny", "v0").name == OLD
    assert hub.resolve("org/cola-tiny", OLD).name == OLD
    model = colaprob.load("org/cola-tiny")  # the Python API takes the name too
    assert model.latent_dim > 0


def test_score_records_the_name_and_the_commit(cache, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("Hello there.\n")
    outcome = run_cli("score", text, "--model", "org/cola-tiny", "--revision", "v0", *FAST, "-o", tmp_path / "s.nc")
    assert outcome.code == 0, outcome
    attrs = read_dataset(tmp_path / "s.nc").attrs
    assert attrs["model"] == "org/cola-tiny" and attrs["model_revision"] == OLD


def test_viz_labels_tokens_with_the_snapshot_the_file_was_scored_with(cache, monkeypatch):
    from colaprob.commands import viz

    loaded = []
    real_load = colaprob.load
    monkeypatch.setattr(colaprob, "load", lambda path: loaded.append(path) or real_load(path))
    assert viz.token_label("org/cola-tiny", OLD)(65) is not None
    assert viz.token_label("org/cola-tiny")(65) is not None
    assert [p.name for p in loaded] == [OLD, MAIN]


def test_a_name_missing_from_the_cache_says_which_command_fetches_it(cache, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("Hello.\n")
    outcome = run_cli("score", text, "--model", "org/elsewhere", "--revision", "v2", *FAST, "-o", tmp_path / "s.nc")
    assert_one_line_error(outcome, "org/elsewhere", "nor in the local Hugging Face cache", "hf download org/elsewhere --revision v2", "--download")
    outcome = run_cli("score", text, "--model", "tiny", "--revision", "v2", *FAST, "-o", tmp_path / "s.nc")
    assert_one_line_error(outcome, "--revision and --download are for Hugging Face names")


def test_download_fetches_the_snapshot_then_loads_it_from_the_cache(cache, monkeypatch, fixture_dirs):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None, **_):
        # What the Hub client does: put the snapshot into the cache, return its folder.
        calls.append((repo_id, revision, local_files_only, allow_patterns))
        folder = cache / "models--org--new" / "snapshots" / MAIN
        if not local_files_only:
            shutil.copytree(fixture_dirs[0], folder, dirs_exist_ok=True)
        if not folder.is_dir():
            raise errors.LocalEntryNotFoundError("not cached")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(colaprob.errors.ColaprobError, match="nor in the local Hugging Face cache"):
        hub.resolve("org/new")
    assert hub.resolve("org/new", download=True).name == MAIN
    assert calls[-1][2] is False and "*.safetensors" in calls[-1][3] and "*.bin" not in calls[-1][3]
    assert hub.resolve("org/new").name == MAIN  # now cached: no download
    assert calls[-1][2] is True
