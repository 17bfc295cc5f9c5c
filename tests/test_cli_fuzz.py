"""Arbitrary bytes as input files and arbitrary arguments, thrown at the CLI in-process:
the exit status is 0 or 2, nothing escapes as an exception, and no partial file is left."""

import tempfile
from pathlib import Path

import pytest
from cli_support import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from colaprob import results

# Cheap settings first; the drawn arguments come after and may override them, but only with
# values that keep a run to a fraction of a second.
CHEAP_CNF = ["--trace", "hutchinson", "--method", "euler", "--steps", "1", "--quiet"]
CHEAP = {
    "score": ["-K", "1", "--batch-size", "8", *CHEAP_CNF],
    "decompose": ["-K", "1", *CHEAP_CNF],
    "probe": ["--posterior-samples", "1", "--prior-samples", "1", *CHEAP_CNF],
    "nonsense": [],
}
JSON_LINES = [b'{"text": "', b'{"prompt": "a", "ground_truth": "', b'{"prompt": 1, "response": "', b'"}', b"}", b"\n", b"\\ud800", b"\\u0000"]


def input_bytes():
    """Raw bytes, UTF-8 text, and bytes built from JSONL fragments, so that the reading,
    JSON and scoring paths are all reached."""
    fragments = st.lists(st.sampled_from(JSON_LINES) | st.binary(max_size=8), max_size=8).map(b"".join)
    text = st.text(max_size=80).map(lambda s: s.encode("utf-8", "surrogatepass"))
    return st.binary(max_size=120) | text | fragments


def assert_clean(folder: Path, outcome, output: Path):
    """Status 0 or 2 (a user error, one line); on 2 no output; never a temporary file."""
    assert outcome.code in (0, 2), outcome
    assert "Traceback" not in outcome.err
    if outcome.code == 2:
        assert not output.exists()
        assert outcome.err.count("\n") == 1, outcome.err
    assert not [p for p in folder.rglob("*") if results.TEMP_MARK in p.name]


@settings(max_examples=40, deadline=None)
@given(content=input_bytes(), suffix=st.sampled_from([".txt", ".jsonl"]), flags=st.sets(st.sampled_from(["--per-line", "--jsonl", "--split"])))
def test_arbitrary_input_files(fixture_dirs, content, suffix, flags):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = folder / f"input{suffix}"
        text.write_bytes(content)
        output = folder / "out" / "scores.nc"
        outcome = run_cli("score", text, "--model", fixture_dirs[0], *CHEAP["score"], *sorted(flags), "-o", output)
        assert_clean(folder, outcome, output)
        if outcome.code == 0:
            assert results.read_dataset(output).sizes["sequence"] >= 1


OPTION_VALUES = {
    "-K": st.sampled_from(["0", "1", "2", "-3", "x", ""]),
    "--samples": st.sampled_from(["1", "0"]),
    "--batch-size": st.sampled_from(["1", "3", "0", "1e3"]),
    "--chunk-size": st.sampled_from(["1", "2", "0"]),
    "--rtol": st.sampled_from(["1e-3", "-1", "0", "inf", "nan", "abc"]),
    "--atol": st.sampled_from(["1e-3", "-0.5", "0"]),
    "--trace": st.sampled_from(["exact", "hutchinson", "bogus"]),
    "--probes": st.sampled_from(["1", "2", "0"]),
    "--method": st.sampled_from(["euler", "rk4", "midpoint", "dopri5", "nope"]),
    "--steps": st.sampled_from(["1", "2", "0", "-1"]),
    "--estimator": st.sampled_from(["elbo", "iwae", "conditional", "x"]),
    "--seed": st.sampled_from(["0", "7", "-1", "seed"]),
    "--device": st.sampled_from(["cpu", "gpu"]),
    "--sequence": st.sampled_from(["0", "5", "-1"]),
    "--window-blocks": st.sampled_from(["1", "0", "99"]),
    "--posterior-samples": st.sampled_from(["1", "0"]),
    "--prior-samples": st.sampled_from(["1", "0"]),
}
SWITCHES = ["--per-line", "--jsonl", "--split", "--json", "--overwrite", "--no-direct", "--no-labels", "--quiet"]


@st.composite
def arguments(draw):
    """A command, one of a few input files, and a shuffle of options, values and junk."""
    command = draw(st.sampled_from(["score", "decompose", "probe", "viz", "nonsense"]))
    words = [draw(st.sampled_from(["texts.txt", "pairs.jsonl", "missing.txt", "result.nc", "out"]))]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 2))
        if kind == 0:
            option = draw(st.sampled_from(sorted(OPTION_VALUES)))
            words += [option, draw(OPTION_VALUES[option])]
        elif kind == 1:
            words.append(draw(st.sampled_from(SWITCHES)))
        else:
            words.append(draw(st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), max_size=6)))
    return [command, *words]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, fixture_dirs):
    """A folder with a text file, a pairs file and a finished result (for viz)."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "texts.txt").write_text("first text\nsecond text\n")
    (folder / "pairs.jsonl").write_text('{"prompt": "a", "response": " b"}\n')
    first = run_cli("decompose", folder / "texts.txt", "--per-line", "--model", fixture_dirs[0], *CHEAP["decompose"], "-o", folder / "result.nc")
    assert first.code == 0, first.err
    return folder


@settings(max_examples=40, deadline=None)
@given(args=arguments())
def test_arbitrary_arguments(fixture_dirs, inputs, args):
    command, path, *rest = args
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "out" / "drawn.nc"
        extra = [] if command == "viz" else ["--model", fixture_dirs[0], *CHEAP[command], "-o", output]
        outcome = run_cli(command, inputs / path, *extra, *rest)
        assert_clean(Path(tmp), outcome, output)
        assert_clean(inputs, outcome, output)
