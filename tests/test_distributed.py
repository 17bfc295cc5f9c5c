"""Sharding across processes: batch i -> rank i % world, and a 2-process torchrun gives
exactly the numbers of a 1-process run."""

import subprocess
import sys

import pytest
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
    assert {k: str(v) for k, v in merged.attrs.items() if k not in ("created_utc", "history")} == {
        k: str(v) for k, v in single.attrs.items() if k not in ("created_utc", "history")
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.nc", "single.nc", "texts.txt"]


def launched_equals_single(tmp_path, fixture, launch, envs=None):
    """Score 5 lines with ``launch`` (a command prefix, or one process per env in ``envs``)
    and with one process; the two files must be identical but for the creation time."""
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"line {i} of the corpus\n" for i in range(5)))
    args = ["score", str(texts), "--per-line", "--model", str(fixture), *FAST, "--batch-size", "1", "--device", "cpu"]
    launched = tmp_path / "launched.nc"
    command = [*launch, *args, "-o", str(launched)]
    if envs is None:
        done = [subprocess.run(command, capture_output=True, text=True, timeout=300, env=subprocess_env())]
    else:
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**subprocess_env(), **e}) for e in envs]
        done = [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    assert sum(d.stdout.count("results:") for d in done) == 1  # only rank 0 reports
    assert run_cli(*args, "-o", tmp_path / "single.nc").code == 0
    single, merged = results.read_dataset(tmp_path / "single.nc"), results.read_dataset(launched)
    xr.testing.assert_identical(merged.drop_attrs(), single.drop_attrs())


def test_slurm_environment_maps_to_ranks():
    from colaprob.distributed import launch_environment

    job = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08],cpu1", "SLURM_JOB_ID": "1234"}
    assert launch_environment(job) == {"RANK": 3, "WORLD_SIZE": 4, "LOCAL_RANK": 1, "MASTER_ADDR": "gpu07", "MASTER_PORT": 29500 + 234}
    assert launch_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}  # one task: one process
    assert launch_environment({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}) == {}  # single-process accelerate
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "7"}
    assert launch_environment({**torchrun, **job}) == {"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 1, "MASTER_ADDR": "h", "MASTER_PORT": 7}


@pytest.mark.slow
def test_slurm_tasks_map_to_ranks(tmp_path, fixture_dirs, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    job = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242"}
    envs = [{**job, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in range(2)]
    launched_equals_single(tmp_path, fixture_dirs[0], [sys.executable, "-m", "colaprob"], envs)


@pytest.mark.slow
def test_accelerate_launch_works_like_torchrun(tmp_path, fixture_dirs):
    pytest.importorskip("accelerate", reason="accelerate is an optional launcher; torchrun is tested above")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533", "-m", "colaprob"]
    launched_equals_single(tmp_path, fixture_dirs[0], launch)


def _agree_on_two_ranks(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    from colaprob.errors import ColaprobError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = Context(rank=rank, world_size=2)

    def step():
        if rank == 1:
            raise ColaprobError("the disk of rank 1 is full.")
        return "fine"

    try:
        ctx.agree(step)
    except ColaprobError as err:
        queue.put((rank, type(err).__name__, str(err)))
    dist.destroy_process_group()


def test_a_failure_on_one_rank_stops_all_and_is_said_by_rank_zero():
    """Rank 1 fails alone: rank 0 does not wait for it at the next barrier, it raises rank
    1's sentence; rank 1 raises quietly (the command prints nothing there)."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_agree_on_two_ranks, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    reported = sorted(queue.get(timeout=5) for _ in range(2))
    assert reported[0] == (0, "ColaprobError", "on rank 1: the disk of rank 1 is full.")
    assert reported[1][:2] == (1, "ReportedByRankZero")


def _bug_on_rank_one(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = Context(rank=rank, world_size=2)

    def step():
        if rank == 1:
            raise ZeroDivisionError("a bug")

    try:
        ctx.agree(step)
    except Exception as err:
        queue.put((rank, type(err).__name__))
    dist.destroy_process_group()


def test_a_bug_on_one_rank_stops_all():
    """A bug on rank 1 keeps its traceback there and stops rank 0 instead of leaving it at
    the next barrier."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_bug_on_rank_one, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert sorted(queue.get(timeout=5) for _ in range(2)) == [(0, "ReportedByRankZero"), (1, "ZeroDivisionError")]
