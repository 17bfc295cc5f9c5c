"""Resumable runs: whole shards only, nothing lost or counted twice, other settings refused."""

import numpy as np
import pytest
import xarray as xr

from colaprob import results, runner
from colaprob.errors import ColaprobError

SETTINGS = {"model": "fake", "seed": 0}


def fake_scores(items: range) -> xr.Dataset:
    """Numbers that depend only on the corpus positions, like a real estimator's."""
    positions = np.arange(items.start, items.stop)
    return xr.Dataset({"log_likelihood": ("sequence", -1.5 * positions), "n_tokens": ("sequence", positions + 1)})


class Counting:
    """A scorer that records the batches it computed and can be told to be interrupted."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[int] = []
        self.interrupt_at = interrupt_at

    def __call__(self, items: range) -> xr.Dataset:
        if items.start == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(items.start)
        return fake_scores(items)


def test_plan_cuts_batches_in_order():
    plan = runner.Plan(SETTINGS, n_items=7, batch_size=3)
    assert [list(plan.batch(i)) for i in range(plan.n_batches)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan.key != runner.Plan(SETTINGS, n_items=7, batch_size=2).key


def test_interrupted_run_keeps_whole_shards_and_resumes_without_repeats(tmp_path):
    plan = runner.Plan(SETTINGS, n_items=10, batch_size=3)
    output = tmp_path / "scores.nc"
    first = Counting(interrupt_at=6)
    with pytest.raises(KeyboardInterrupt):
        runner.run(plan, first, output, progress=False)
    folder = runner.run_folder(output)
    assert not output.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["batch-000000.nc", "batch-000001.nc", "manifest.json"]

    second = Counting()
    merged = runner.run(plan, second, output, progress=False)
    assert first.calls == [0, 3] and second.calls == [6, 9]
    xr.testing.assert_equal(merged.drop_vars("sequence"), fake_scores(range(10)))
    assert list(merged.sequence.values) == list(range(10))
    assert not folder.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["scores.nc"]


def test_finished_output_is_read_back_not_recomputed(tmp_path):
    plan = runner.Plan(SETTINGS, n_items=4, batch_size=2)
    first = runner.run(plan, fake_scores, tmp_path / "s.nc", progress=False)
    again = Counting()
    second = runner.run(plan, again, tmp_path / "s.nc", progress=False)
    assert again.calls == []
    xr.testing.assert_identical(first, second)


def test_other_settings_are_refused_in_one_sentence_unless_overwrite(tmp_path):
    output = tmp_path / "s.nc"
    runner.run(runner.Plan(SETTINGS, n_items=4, batch_size=2), fake_scores, output, progress=False)
    other = runner.Plan({**SETTINGS, "seed": 1}, n_items=4, batch_size=2)
    with pytest.raises(ColaprobError, match=r"different run \(seed 0 there, 1 now\); pass --overwrite"):
        runner.run(other, fake_scores, output, progress=False)
    runner.run(other, fake_scores, output, overwrite=True, progress=False)
    assert results.read_dataset(output).attrs["seed"] == 1


def test_unfinished_run_with_other_settings_is_refused(tmp_path):
    output = tmp_path / "s.nc"
    with pytest.raises(KeyboardInterrupt):
        runner.run(runner.Plan(SETTINGS, n_items=4, batch_size=2), Counting(interrupt_at=2), output, progress=False)
    with pytest.raises(ColaprobError, match="unfinished run with different settings .*model 'fake' there, 'other' now"):
        runner.run(runner.Plan({**SETTINGS, "model": "other"}, n_items=4, batch_size=2), fake_scores, output, progress=False)


def test_foreign_file_at_output_is_refused(tmp_path):
    output = tmp_path / "s.nc"
    output.write_text("my notes")
    with pytest.raises(ColaprobError, match="not written by a colaprob run"):
        runner.run(runner.Plan(SETTINGS, n_items=2, batch_size=2), fake_scores, output, progress=False)
    assert output.read_text() == "my notes"


def test_stale_temporary_files_of_a_killed_run_are_removed(tmp_path):
    output = tmp_path / "s.nc"
    plan = runner.Plan(SETTINGS, n_items=4, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        runner.run(plan, Counting(interrupt_at=2), output, progress=False)
    (runner.run_folder(output) / f".batch-000001.nc{results.TEMP_MARK}abc").write_bytes(b"half")
    runner.run(plan, fake_scores, output, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["s.nc"]


# ---------------------------------------------------------------------------------------------
# The real command, killed with SIGKILL after its first shard


def test_killed_score_run_resumes_to_the_uninterrupted_result(tmp_path, fixture_dirs):
    import os
    import signal
    import subprocess
    import sys
    import time

    from cli_support import FAST, run_cli, subprocess_env

    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"document {i} has a few words\n" for i in range(24)))
    args = ["score", str(texts), "--per-line", "--model", str(fixture_dirs[0]), *FAST, "--batch-size", "1"]
    killed = tmp_path / "killed" / "scores.nc"
    folder = runner.run_folder(killed)
    process = subprocess.Popen([sys.executable, "-m", "colaprob", *args, "-o", str(killed)], stderr=subprocess.PIPE, env=subprocess_env())
    try:
        deadline = time.monotonic() + 120
        while not list(folder.glob("batch-*.nc")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    shards = sorted(folder.glob("batch-*.nc"))
    assert not killed.exists() and 1 <= len(shards) < 24, process.stderr.read().decode()
    assert all(results.read_dataset(shard).sizes["sequence"] == 1 for shard in shards)

    assert run_cli(*args, "-o", killed).code == 0
    assert run_cli(*args, "-o", tmp_path / "whole" / "scores.nc").code == 0
    resumed, whole = (results.read_dataset(p) for p in (killed, tmp_path / "whole" / "scores.nc"))
    xr.testing.assert_identical(resumed.drop_attrs(), whole.drop_attrs())
    assert resumed.attrs[runner.RUN_KEY] == whole.attrs[runner.RUN_KEY]
    assert [p.name for p in killed.parent.iterdir()] == ["scores.nc"]


def test_merged_strings_keep_their_full_length(tmp_path):
    """A shard read back holds its strings at a fixed width; the merge must not cut the
    longer strings of later shards to the first one's width."""
    paths = []
    for i, text in enumerate(["ab", "abcdefghijklmnop qrstuv"]):
        part = xr.Dataset({"text": ("sequence", np.array([text], dtype=object))}, coords={"sequence": [i]})
        paths.append(results.write_dataset(part, tmp_path / f"part{i}.nc"))
    merged = runner.concat_sequences([results.read_dataset(p) for p in paths])
    back = results.read_dataset(results.write_dataset(merged, tmp_path / "merged.nc"))
    assert list(back.text.values) == ["ab", "abcdefghijklmnop qrstuv"]
