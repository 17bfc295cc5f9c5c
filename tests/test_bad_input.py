"""Every user mistake: one clear sentence on stderr, exit status 2, no traceback, nothing
half-written."""

import shutil

import pytest
from cli_support import FAST, assert_one_line_error, checkpoint_with_limit, run_cli


@pytest.fixture
def fixture(fixture_dirs):
    return fixture_dirs[0]


def score(tmp_path, fixture, *extra, text_file=None):
    if text_file is None:
        text_file = tmp_path / "texts.txt"
        text_file.write_text("a short text\nanother one\n")
    return run_cli("score", text_file, "--per-line", "--model", fixture, "-o", tmp_path / "out" / "scores.nc", *FAST, *extra)


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "is empty or holds only blank lines"),
        (b"\n  \n\t\n", "is empty or holds only blank lines"),
        (b"caf\xe9 au lait\n", "is not UTF-8 text"),
    ],
    ids=["empty", "blank-lines", "not-utf8"],
)
def test_unreadable_text(tmp_path, fixture, content, fragment):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert_one_line_error(score(tmp_path, fixture, text_file=bad), fragment)
    assert_nothing_written(tmp_path)


def test_text_longer_than_the_context(tmp_path, fixture):
    limited = checkpoint_with_limit(fixture, tmp_path / "limited", max_tokens=16)
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "many words in a line " * 5 + "\n")
    outcome = score(tmp_path, limited, text_file=long)
    assert_one_line_error(outcome, "document 1 is", "more than the model's limit of 16", "--split")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name", ["no-such-model", "/nonexistent/checkpoint"])
def test_unknown_model(tmp_path, name):
    assert_one_line_error(score(tmp_path, name), "does not exist")
    assert_nothing_written(tmp_path)


def test_corrupt_checkpoint(tmp_path, fixture):
    broken = tmp_path / "broken"
    shutil.copytree(fixture, broken)
    weights = broken / "cola_dlm" / "cola_dit" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(score(tmp_path, broken), "model.safetensors")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["-K", "0"], "must be at least 1"),
        (["--rtol=-1e-3", "--method", "dopri5"], "must be a positive finite number"),
        (["--atol", "nan"], "must be a positive finite number"),
        (["--batch-size", "-2"], "must be at least 1"),
        (["--method", "dopri5"], "--steps is for fixed-grid methods"),
        (["--seed=-1"], "must be 0 or more"),
    ],
    ids=["K<1", "negative-rtol", "nan-atol", "negative-batch", "steps-without-grid", "negative-seed"],
)
def test_impossible_settings(tmp_path, fixture, options, fragment):
    assert_one_line_error(score(tmp_path, fixture, *options), fragment)
    assert_nothing_written(tmp_path)


def test_unwritable_output(tmp_path, fixture):
    (tmp_path / "a_file").write_text("not a folder")
    texts = tmp_path / "texts.txt"
    texts.write_text("some text\n")
    outcome = run_cli("score", texts, "--model", fixture, "-o", tmp_path / "a_file" / "scores.nc", *FAST)
    assert_one_line_error(outcome, "cannot write results to", "a_file")


def test_existing_output_from_another_model_is_not_resumed(tmp_path, fixture):
    assert score(tmp_path, fixture).code == 0
    before = (tmp_path / "out" / "scores.nc").read_bytes()
    other = checkpoint_with_limit(fixture, tmp_path / "other", max_tokens=4096)
    outcome = score(tmp_path, other)
    assert_one_line_error(outcome, "holds results of a different run", "model", "--overwrite")
    assert (tmp_path / "out" / "scores.nc").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.nc"]
