"""Sharding across processes: batch i -> rank i % world, and a 2-process torchrun gives
exactly the numbers of a 1-process run."""

import subprocess
import sys

import xarray as xr
from cli_support import FAST, run_cli, subprocess_env

from colaprob import results
from colaprob.distributed import Context


def test_batches_go_to_ranks_round_robin():
    ranks = [Context(rank=r, world_size=3) for r in range(3)]
    owners = [[r.rank for r in ranks if r.owns(i)] for i in range(7)]
    assert owners == [[0], [1], [2], [0], [1], [2], [0]]


def test_two_process_torchrun_equals_one_process(tmp_path, fixture_dirs):
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"sentence {i} of the corpus, {'more ' * i}words\n" for i in range(7)))
    args = ["score", str(texts), "--per-line", "--model", str(fixture_dirs[0]), *FAST, "--batch-size", "2", "--device", "cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "colaprob"]
    sharded = tmp_path / "sharded.nc"
    done = subprocess.run([*launch, *args, "-o", str(sharded)], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results:") == 1  # only rank 0 reports

    # torchrun gives each rank one CPU thread, and so does run_cli: float32 sums round the
    # same only with the same thread count (the files record it as torch_threads).
    assert run_cli(*args, "-o", tmp_path / "single.nc").code == 0
    single, merged = results.read_dataset(tmp_path / "single.nc"), results.read_dataset(sharded)
    xr.testing.assert_identical(merged.drop_attrs(), single.drop_attrs())
    assert {k: str(v) for k, v in merged.attrs.items() if k != "created_utc"} == {
        k: str(v) for k, v in single.attrs.items() if k != "created_utc"
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.nc", "single.nc", "texts.txt"]
