"""The adversarial cases: inputs, files, settings and launch environments a user can give
that once ended in a traceback, a hang, a lost result or a silent NaN. Each is now one
sentence on stderr and exit status 2, within a time limit, with nothing written and no input
or earlier result touched.

Every case is a row of ``CASES``: a name, a function that prepares what the user types (in a
fresh folder) and the fragment the sentence must contain. The command runs in this process
(``colaprob.cli.main``), under an alarm that fails the test after ``TIME_LIMIT`` seconds.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from cli_support import FAST, assert_one_line_error, run_cli

import colaprob
from colaprob import results, runner
from colaprob.errors import ColaprobError

TIME_LIMIT = 10  # seconds; several of these cases used to hang


@dataclass
class Case:
    name: str
    prepare: Callable[[Path, Path], list]  # (folder, fixture) -> the command's arguments
    fragment: str
    env: dict = field(default_factory=dict)


def text(folder: Path, content: str = "a short text\nanother one\n", name: str = "texts.txt") -> Path:
    path = folder / name
    path.write_text(content, encoding="utf-8")
    return path


def score(folder: Path, fixture: Path, *inputs, extra=()) -> list:
    inputs = inputs or (text(folder),)
    return ["score", *inputs, "--per-line", "--model", fixture, "-o", folder / "out" / "scores.nc", *FAST, *extra]


def with_config(part: str, **changes) -> Callable[[Path, Path], list]:
    """A copy of the fixture whose ``part`` (cola_vae / cola_dit) config.json has ``changes``."""

    def prepare(folder: Path, fixture: Path) -> list:
        copy = shutil.copytree(fixture, folder / "model")
        path = copy / "cola_dlm" / part / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return score(folder, copy)

    return prepare


def with_options(options: dict) -> Callable[[Path, Path], list]:
    def prepare(folder: Path, fixture: Path) -> list:
        copy = shutil.copytree(fixture, folder / "model")
        (copy / "colaprob.json").write_text(json.dumps(options))
        return score(folder, copy)

    return prepare


def with_index(entry: Callable[[Path], str]) -> Callable[[Path, Path], list]:
    """A copy of the fixture whose DiT weights are named by an index entry ``entry(folder)``
    (a file outside the checkpoint, planted by the case)."""

    def prepare(folder: Path, fixture: Path) -> list:
        copy = shutil.copytree(fixture, folder / "model")
        dit = copy / "cola_dlm" / "cola_dit"
        from safetensors import safe_open

        with safe_open(str(dit / "model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
        outside = folder / "outside.safetensors"
        (dit / "model.safetensors").rename(outside)
        name = entry(dit)
        (dit / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
        return score(folder, copy)

    return prepare


def symlinked_weights(dit: Path) -> str:
    (dit / "linked.safetensors").symlink_to(dit.parent.parent.parent / "outside.safetensors")
    return "linked.safetensors"


def input_file(make: Callable[[Path], Path]) -> Callable[[Path, Path], list]:
    return lambda folder, fixture: score(folder, fixture, make(folder))


def fifo(folder: Path) -> Path:
    os.mkfifo(folder / "fifo")
    return folder / "fifo"


def unix_socket(folder: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock"))
    sock.close()
    return folder / "sock"


def symlink_loop(folder: Path) -> Path:
    (folder / "loop").symlink_to(folder / "loop")
    return folder / "loop"


def jsonl(line: str) -> Callable[[Path], Path]:
    return lambda folder: text(folder, line + "\n", "records.jsonl")


def bad_tokenizer(folder: Path, fixture: Path) -> list:
    """A tokenizer.json whose pre-tokenizer regex backtracks past the regex engine's limit,
    which panics inside the Rust library."""
    copy = shutil.copytree(fixture, folder / "model")
    spec = json.loads((copy / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False}
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split] + ([spec["pre_tokenizer"]] if spec.get("pre_tokenizer") else [])}
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    return score(folder, copy, text(folder, "a" * 2000 + "!\n"))


def generate(*options) -> Callable[[Path, Path], list]:
    return lambda folder, fixture: ["generate", "--model", fixture, "--prompt", "hi", "--max-new-tokens", "4", "--steps", "1", *options]


def output_is_input(folder: Path, fixture: Path) -> list:
    corpus = text(folder)
    return ["score", corpus, "--per-line", "--model", fixture, "-o", corpus, "--overwrite", *FAST]


def run_folder_is_a_file(folder: Path, fixture: Path) -> list:
    (folder / "out").mkdir()
    (folder / "out" / "scores.nc.run").write_text("not a folder")
    return score(folder, fixture)


def train_into_a_file(folder: Path, fixture: Path) -> list:
    (folder / "blocker").write_text("a file where a folder is needed")
    return ["train", "--out", folder / "blocker" / "model"]


def corrupt_demo(folder: Path, fixture: Path) -> list:
    (folder / "demo").mkdir()
    (folder / "demo" / "demo.json").write_text("{ not json")
    return ["demo", "--output-dir", folder / "demo", "--sequences", "2"]


LAUNCH = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}

CASES = [
    # results and inputs that were destroyed
    Case("output-is-the-input", output_is_input, "is the input file"),
    # inputs that are not regular files
    Case("dev-zero", input_file(lambda folder: Path("/dev/zero")), "character device, not a regular file"),
    Case("fifo-without-writer", input_file(fifo), "FIFO (named pipe), not a regular file"),
    Case("socket", input_file(unix_socket), "socket, not a regular file"),
    Case("symlink-loop", input_file(symlink_loop), "loops back on itself"),
    Case("path-under-a-file", input_file(lambda folder: text(folder) / "x"), "a folder on its path is a file"),
    Case("name-too-long", input_file(lambda folder: folder / ("n" * 300)), "name too long"),
    # JSONL edge cases
    Case("deep-nesting", input_file(jsonl('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}")), "nests arrays or objects deeper"),
    Case("huge-integer", input_file(jsonl('{"text": "a", "n": ' + "7" * 5000 + "}")), "integer of 5,000 digits"),
    Case("lone-surrogate-text", input_file(jsonl('{"text": "ab\\ud800c"}')), "lone surrogate \\ud800"),
    Case("lone-surrogate-prompt", input_file(jsonl('{"prompt": "x\\udfffy", "ground_truth": "z"}')), '"prompt" holds the lone surrogate'),
    # long texts on a model whose framing states no limit (the official one)
    Case("20kB-line", input_file(lambda folder: text(folder, "word " * 4000 + "\n")), "more than the model's limit of 2048"),
    Case("10MB-line", input_file(lambda folder: text(folder, "x" * 10_000_000 + "\n")), "more than the model's limit of 2048"),
    # configurations that give NaN or meaningless numbers
    Case("scaling-nan", with_config("cola_vae", scaling_factor=float("nan")), "scaling_factor to nan"),
    Case("scaling-inf", with_config("cola_vae", scaling_factor=float("inf")), "scaling_factor to inf"),
    Case("shifting-nan", with_config("cola_vae", shifting_factor=float("nan")), "shifting_factor to nan"),
    Case("layer-norm-eps-negative", with_config("cola_vae", layer_norm_eps=-1e-6), "layer_norm_eps to -1e-06, but it must be greater than 0"),
    Case("layer-norm-eps-nan", with_config("cola_vae", layer_norm_eps=float("nan")), "layer_norm_eps to nan"),
    Case("norm-eps-negative", with_config("cola_dit", norm_eps=-1e-5), "norm_eps to -1e-05"),
    Case("norm-eps-nan", with_config("cola_dit", norm_eps=float("nan")), "norm_eps to nan"),
    Case("rope-theta-zero", with_config("cola_vae", rope_theta=0), "rope_theta to 0"),
    Case("rope-theta-negative", with_config("cola_vae", rope_theta=-10000), "rope_theta to -10000"),
    Case("rope-theta-nan", with_config("cola_vae", rope_theta=float("nan")), "rope_theta to nan"),
    # configurations that cannot match their weights
    Case("vae-dim-1e9", with_config("cola_vae", dim=10**9), "dim to 1000000000, larger than any dimension"),
    Case("encoder-blocks-1e9", with_config("cola_vae", encoder_num_blocks=10**9), "the weights hold 2 such layers"),
    Case("dit-layers-1e6", with_config("cola_dit", num_layers=10**6), "num_layers to 1000000, but the weights hold 2"),
    Case("dit-block-size-1e9", with_config("cola_dit", block_size=10**9), "longer than its context of 2048 tokens"),
    Case("eos-outside-vocabulary", with_options({"framing": {"bos_id": 316, "eos_id": 5000, "pad_id": 319}}), "eos_id to 5000, outside the vocabulary"),
    Case("pad-outside-vocabulary", with_options({"framing": {"bos_id": 316, "eos_id": 316, "pad_id": 320}}), "pad_id to 320, outside the vocabulary"),
    Case("info-not-an-object", with_options({"info": ["a", "list"]}), "info to ['a', 'list'], but it must be a JSON object"),
    Case("tokenizer-panics", bad_tokenizer, "failed to tokenize the text"),
    # index entries that lead out of the checkpoint
    Case("index-dotdot", with_index(lambda dit: "../../../outside.safetensors"), "lies outside"),
    Case("index-absolute", with_index(lambda dit: "/etc/passwd"), "lies outside"),
    Case("index-symlink-out", with_index(symlinked_weights), "lies outside"),
    # settings
    Case("K-1e9", lambda folder, fixture: score(folder, fixture, extra=["-K", "1000000000"]), "more than the 1,048,576"),
    Case("K-2^63", lambda folder, fixture: score(folder, fixture, extra=["-K", str(2**63)]), "more than the 1,048,576"),
    Case("probes-1e7", lambda folder, fixture: score(folder, fixture, extra=["--probes", "10000000"]), "more than block_size x latent_dim"),
    Case("steps-1e9", lambda folder, fixture: ["score", text(folder), "--model", fixture, "-o", folder / "out" / "s.nc", "--method", "euler", "--steps", "1000000000"], "more than the 100,000"),
    Case("atol-1e-300", lambda folder, fixture: score(folder, fixture, extra=["--method", "dopri5", "--atol", "1e-300"]), "below 1e-07"),
    Case("seed-2^64", lambda folder, fixture: score(folder, fixture, extra=["--seed", str(2**64)]), "must be below 2**63"),
    Case("threads-100000", lambda folder, fixture: score(folder, fixture, extra=["--threads", "100000"]), "per CPU core"),
    Case("memory-over-limit", lambda folder, fixture: score(folder, fixture, extra=["--max-memory", "1M"]), "more than --max-memory (1.0 MB)"),
    Case("generate-guidance-nan", generate("--guidance", "nan"), "must be a finite number"),
    Case("generate-temperature-nan", generate("--temperature", "nan"), "must be a finite number"),
    Case("generate-seed-2^70", generate("--seed", str(2**70)), "must be below 2**63"),
    Case("train-into-a-file", train_into_a_file, "cannot write"),
    Case("train-lr-nan", lambda folder, fixture: ["train", "--out", folder / "m", "--lr", "nan"], "must be a finite number"),
    Case("train-a-billion-layers", lambda folder, fixture: ["train", "--out", folder / "m", "--dit-layers", "1000000000"], "must be at most 65,536"),
    Case("train-too-large-for-memory", lambda folder, fixture: ["train", "--out", folder / "m", "--vae-dim", "65536", "--vae-ffn-dim", "65536"], "exceed the free memory"),
    Case("viz-a-fifo", lambda folder, fixture: ["viz", fifo(folder), "-o", folder / "out" / "figure.png"], "FIFO (named pipe), not a regular file"),
    Case("demo-corrupt-manifest", corrupt_demo, "is unreadable or not JSON"),
    Case("run-folder-is-a-file", run_folder_is_a_file, "is taken by a file"),
    # launch environments
    Case("stray-rank-1", lambda folder, fixture: score(folder, fixture), "RANK is set but", env={"RANK": "1"}),
    Case("world-size-without-master", lambda folder, fixture: score(folder, fixture), "WORLD_SIZE is set but", env={"WORLD_SIZE": "2"}),
    Case("ranks-without-master", lambda folder, fixture: score(folder, fixture), "MASTER_ADDR and MASTER_PORT are not set", env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}),
    Case("world-size-abc", lambda folder, fixture: score(folder, fixture), "WORLD_SIZE is 'abc'", env={**LAUNCH, "WORLD_SIZE": "abc"}),
    Case("world-size-0", lambda folder, fixture: score(folder, fixture), "WORLD_SIZE is 0", env={**LAUNCH, "WORLD_SIZE": "0"}),
    Case("rank-outside-world", lambda folder, fixture: score(folder, fixture), "RANK is 2, outside 0..1", env={**LAUNCH, "RANK": "2"}),
    Case("slurm-without-nodelist", lambda folder, fixture: score(folder, fixture), "cannot find each other", env={"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}),
]
LAUNCH_VARIABLES = {*LAUNCH, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID"}


def snapshot(folder: Path) -> dict:
    """Every regular file under ``folder`` and the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


class TookTooLong(Exception):
    pass


def within_time_limit(call):
    def alarm(signum, frame):
        raise TookTooLong(f"no answer within {TIME_LIMIT} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIME_LIMIT)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_adversarial_case(case, tmp_path, fixture_dirs, monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    args = case.prepare(tmp_path, fixture_dirs[0])
    before = snapshot(tmp_path)
    outcome = within_time_limit(lambda: run_cli(*args))
    assert_one_line_error(outcome, case.fragment)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
    assert not (tmp_path / "out" / "scores.nc").exists()


# ---------------------------------------------------------------------------------------------
# Cases that need more than one command: earlier results, a second process, a full disk


def corpus_args(tmp_path, fixture, *extra):
    texts = text(tmp_path, "".join(f"sentence {i} of the corpus\n" for i in range(5)))
    return ["score", texts, "--per-line", "--model", fixture, "-o", tmp_path / "scores.nc", *FAST, *extra]


def test_overwrite_interrupted_keeps_the_old_result(tmp_path, fixture_dirs, monkeypatch):
    assert run_cli(*corpus_args(tmp_path, fixture_dirs[0])).code == 0
    old = (tmp_path / "scores.nc").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.results, "write_dataset", interrupted)
    outcome = run_cli(*corpus_args(tmp_path, fixture_dirs[0], "-K", "3", "--overwrite"))
    assert outcome.code == 130
    assert (tmp_path / "scores.nc").read_bytes() == old  # the old result is still whole
    monkeypatch.undo()
    assert run_cli(*corpus_args(tmp_path, fixture_dirs[0], "-K", "3", "--overwrite")).code == 0
    assert results.read_dataset(tmp_path / "scores.nc").attrs["K"] == 3


def test_a_second_process_on_the_same_output_is_refused(tmp_path, fixture_dirs):
    args = corpus_args(tmp_path, fixture_dirs[0])
    folder = runner.run_folder(tmp_path / "scores.nc")
    folder.mkdir()
    holder = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # another process at work
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert_one_line_error(run_cli(*args), "another colaprob process is working on")
        assert list(folder.iterdir()) == []
    finally:
        os.close(holder)
    assert run_cli(*args).code == 0  # once the other process is gone the run goes ahead
    assert not folder.exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["ENOSPC", "EROFS", "EACCES"])
def test_a_failed_write_keeps_finished_shards_and_resumes(tmp_path, fixture_dirs, monkeypatch, code):
    """The disk fills (or turns read-only, or refuses) at the third shard: one sentence,
    the two finished shards intact, and the same command afterwards finishes the run."""
    write = results.write_dataset.__wrapped__
    calls = []

    def failing(ds, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(code, os.strerror(code), str(path))
        return write(ds, path)

    monkeypatch.setattr(runner.results, "write_dataset", results.reports_write_failures(failing))
    args = corpus_args(tmp_path, fixture_dirs[0], "--batch-size", "1")
    assert_one_line_error(run_cli(*args), "cannot write", "files already finished are kept")
    folder = runner.run_folder(tmp_path / "scores.nc")
    kept = sorted(p.name for p in folder.glob("batch-*.nc"))
    assert kept == ["batch-000000.nc", "batch-000001.nc"]
    assert all(results.read_dataset(folder / name).sizes["sequence"] == 1 for name in kept)
    monkeypatch.undo()
    assert run_cli(*args).code == 0
    assert results.read_dataset(tmp_path / "scores.nc").sizes["sequence"] == 5


def test_a_really_full_disk(tmp_path, fixture_dirs):
    """The same on a real 128 KB tmpfs, where the machine lets the tests mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=128k tmpfs {disk} 2>/dev/null") != 0:
        pytest.skip("mounting a tmpfs needs root; test_a_failed_write_keeps_finished_shards_and_resumes injects the same error")
    try:
        texts = text(tmp_path, "".join(f"sentence {i} {'word ' * 40}\n" for i in range(30)))
        args = ["score", texts, "--per-line", "--model", fixture_dirs[0], "-o", disk / "scores.nc", *FAST, "--batch-size", "1"]
        outcome = run_cli(*args)
        assert_one_line_error(outcome, "no space is left on the device")
        shards = sorted(runner.run_folder(disk / "scores.nc").glob("batch-*.nc"))
        assert shards and all(results.read_dataset(p).sizes["sequence"] == 1 for p in shards)
        assert not list(disk.rglob(f"*{results.TEMP_MARK}*"))  # nothing half-written
    finally:
        os.system(f"umount {disk}")


def test_save_over_a_checkpoint_keeps_other_files(tmp_path, fixture_dirs):
    model = colaprob.load(fixture_dirs[0])
    target = shutil.copytree(fixture_dirs[0], tmp_path / "ckpt")
    (target / "NOTES.md").write_text("my notes")
    colaprob.save(model, target)
    assert (target / "NOTES.md").read_text() == "my notes"
    assert colaprob.load(target).framing == model.framing
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no leftover temporary folder


def test_per_line_splits_only_at_line_feeds(tmp_path, fixture_dirs):
    lines = ["one\u2028still one", "two\x85still two", "three\x1cstill three", "four\r"]
    corpus = tmp_path / "lines.txt"
    corpus.write_bytes("\n".join(lines[:3]).encode() + b"\r\nfour\n")
    from colaprob.data import read_documents

    assert [d.text for d in read_documents(corpus, "lines")] == lines[:3] + ["four"]


def test_errors_under_torchrun_are_said_once(tmp_path, fixture_dirs):
    """A mistake every rank makes is printed once, by rank 0, and no rank prints a traceback
    (torchrun itself still reports, with its own traceback, that its children failed)."""
    import subprocess
    import sys

    from cli_support import subprocess_env

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "colaprob"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    done = subprocess.run([*launch, *score(tmp_path, fixture_dirs[0], bad), "--device", "cpu"], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert done.returncode != 0
    assert done.stderr.count("colaprob: error:") == 1, done.stderr[-3000:]
    assert "is not UTF-8 text" in done.stderr
    # No frame of colaprob's own code (torchrun's frames in site-packages may sit under a
    # folder that happens to be called colaprob, as a clone's is).
    assert not re.search(r'File "(?![^"]*site-packages)[^"]*colaprob/', done.stderr), done.stderr[-3000:]


def test_api_refuses_what_it_cannot_frame(fixture_dirs):
    model = colaprob.load(fixture_dirs[0])
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        model.frame("one string")
    with pytest.raises(ValueError, match="texts is an empty list"):
        model.frame([])
    from colaprob.tokenizer import Framing, frame

    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        frame(model.tokenizer, Framing(bos_id=None, eos_id=None, pad_id=319), ["a", ""], multiple=4)
    with pytest.raises(ValueError, match="as many"):
        model.frame_pairs(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="path_or_name"):
        colaprob.load(3)
    with pytest.raises(ColaprobError, match="lone surrogate"):
        model.frame(["a\ud800"])
    batch = model.frame(["abc"])
    for bad in (-1, model.vae.encoder.wte.weight.shape[0]):
        wrong = batch.ids.clone()
        wrong[0, 1] = bad
        with pytest.raises(ValueError, match=f"token id {bad}, outside"):
            model.posterior(dataclasses.replace(batch, ids=wrong))



def test_a_non_finite_result_is_not_summarised(tmp_path, fixture_dirs, monkeypatch):
    """A row whose log-likelihood comes out NaN (here: forced, as a model with NaN weights
    would make it) is named, and the corpus figures are not printed as if they were numbers."""
    from colaprob import estimators

    elbo = estimators.elbo

    def with_a_nan(*args, **kwargs):
        ds = elbo(*args, **kwargs)
        values = ds["log_likelihood"].values.copy()
        values[-1] = float("nan")
        return ds.assign(log_likelihood=(ds["log_likelihood"].dims, values))

    monkeypatch.setattr(estimators, "elbo", with_a_nan)
    outcome = run_cli(*corpus_args(tmp_path, fixture_dirs[0], "--batch-size", "5"))
    assert_one_line_error(outcome, "non-finite log-likelihood", "row(s) 4")
    assert outcome.out == ""


def test_standard_input_is_an_input(tmp_path, fixture_dirs, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"first line\nsecond line\n")))
    outcome = run_cli("score", "-", "--per-line", "--model", fixture_dirs[0], "-o", tmp_path / "scores.nc", *FAST)
    assert outcome.code == 0, outcome.err
    assert list(results.read_dataset(tmp_path / "scores.nc")["text"].values) == ["first line", "second line"]
