"""What every benchmark shares: options, the machine header, interleaved timing with medians,
markdown tables, and the models measured (the embedded Cola model and tractable ones).

Timing rule: variants compared with each other are run in one process, interleaved (the
order rotates every repeat), and reported as the median of the repeats; ratios are taken
between medians of the same run. Torch runs on ``--threads`` threads (default 1: on a shared,
oversubscribed machine two OpenMP threads that wait for each other cost far more than they
bring). The seconds reported are the process's CPU time (``time.process_time``), which on
one thread equals the wall time of an idle machine but, unlike wall time, does not count
the time other people's processes hold the core; ``finish`` prints the wall/CPU totals so
the reader sees how contended the run was.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Options and the header


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per variant; the median is reported (default 3)")
    p.add_argument("--quick", action="store_true", help="one tiny configuration, one repeat: a smoke run, not a measurement")
    return p


def start(args: argparse.Namespace, title: str) -> None:
    """Fix threads and print what the figures depend on: date, cores, threads, versions, load."""
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"# {title}")
    print()
    print(f"- command: `{command_line()}`")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {git_commit()}")
    print(f"- machine: {cores} cores available ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}, load average {load}")
    print(f"- versions: python {platform.python_version()}, torch {torch.__version__}")
    print()


def command_line() -> str:
    return shlex.join(["python", relative(sys.argv[0]), *sys.argv[1:]])


def relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (a reader's checkout differs)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """CPU and wall seconds of every repeat of one variant and the result of its last call."""

    seconds: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    result: object = None

    @property
    def median(self) -> float:
        """Median CPU seconds."""
        return statistics.median(self.seconds)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)


TOTALS = {"cpu": 0.0, "wall": 0.0}


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """``(cpu seconds, wall seconds, result)`` of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    TOTALS["cpu"] += cpu
    TOTALS["wall"] += wall
    return cpu, wall, result


def finish() -> None:
    """Print how much of a core the timed calls got (CPU / wall over the whole run)."""
    cpu, wall = TOTALS["cpu"], TOTALS["wall"]
    if wall > 0:
        print(f"Timed calls: {cpu:.1f} s CPU in {wall:.1f} s wall ({cpu / wall:.0%} of a core on average).")


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: bool = False) -> dict[str, Timing]:
    """Run every variant ``repeats`` times, interleaved, the order rotating each round so no
    variant always runs first (or right after another); optionally one untimed warm-up call
    each first."""
    names = list(variants)
    timings = {name: Timing() for name in names}
    if warmup:
        for name in names:
            variants[name]()
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cpu, wall, result = timed(variants[name])
            timings[name].seconds.append(cpu)
            timings[name].wall.append(wall)
            timings[name].result = result
    return timings


# ---------------------------------------------------------------------------------------------
# Output


def fmt(x, digits: int = 3) -> str:
    """Numbers for a table: 3 significant digits, scientific notation when small or large."""
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 1)}e}"


def table(columns: list[str], rows: list[list]) -> None:
    """Print a markdown table."""
    cells = [[fmt(x) for x in row] for row in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"
    print(line(columns))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print(line(row))
    print(flush=True)


# ---------------------------------------------------------------------------------------------
# Models


def reference_dit(root: Path) -> type:
    """The ``DiT`` class of the checkout at ``root``: its ``dit.py`` run with its own
    ``attention.py`` in place of this checkout's (restored afterwards)."""

    def load(name: str, path: Path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    saved = importlib.import_module("colaprob.attention")
    try:
        sys.modules["colaprob.attention"] = load("reference_attention", root / "colaprob" / "attention.py")
        return load("reference_dit", root / "colaprob" / "dit.py").DiT
    finally:
        sys.modules["colaprob.attention"] = saved


def cola_model(spec: str = "auto"):
    """``(model, label)``: the embedded model (``"tiny"``), a checkpoint path, or ``"random"``:
    a freshly initialised model of the embedded model's size (the ``colaprob train``
    defaults) whose DiT linears get PyTorch's default initialisation (the training
    initialisation, adaLN-Zero, would give a zero velocity). ``"auto"``: the embedded model if
    it is built, otherwise random."""
    import colaprob
    from colaprob.checkpoint import TINY

    if spec == "auto":
        spec = "tiny" if TINY.is_dir() else "random"
    if spec != "random":
        model = colaprob.load(spec).eval()
        return model, f"{spec} (trained)" if spec == "tiny" else spec
    from colaprob.commands import train as train_command

    model = train_command.build_model()  # the embedded model's network (colaprob.config.ByteNetwork)
    torch.manual_seed(0)
    for module in model.dit.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return model.eval(), "random DiT of the embedded size (untrained)"


def model_size(model) -> str:
    c = model.dit_config
    n = sum(p.numel() for p in model.dit.parameters())
    return f"DiT {c.num_layers} layers x width {c.txt_dim}, {n / 1e6:.2f}M parameters, latent d = {model.latent_dim}, block size {model.block_size}"


def trained(label: str) -> bool:
    return not label.startswith("random")


def heldout_texts(min_tokens: int, n: int, max_bytes: int = 127) -> list[str]:
    """``n`` documents of the embedded held-out split with at least ``min_tokens`` bytes
    (byte-level tokens), the longest first, cycled when there are fewer."""
    from colaprob.data import embedded_corpus

    docs = sorted((d.text for d in embedded_corpus("heldout", max_bytes)), key=lambda s: -len(s.encode()))
    long_enough = [t for t in docs if len(t.encode()) >= min_tokens] or docs[:1]
    return [long_enough[i % len(long_enough)] for i in range(n)]


def texts_of_length(model, tokens: int, n: int, skip: int = 0) -> list[str]:
    """``n`` held-out texts, after the first ``skip``, cut so that each frames to ``tokens``
    tokens (byte-level tokenizer; the framing's bos/eos included)."""
    n_bytes = tokens - (model.framing.bos_id is not None) - (model.framing.eos_id is not None)
    return [t.encode()[:n_bytes].decode(errors="ignore") for t in heldout_texts(n_bytes, skip + n)[skip:]]


def prior_latents(model, label: str, n_positions: int, batch: int = 1, seed: int = 0, skip: int = 0) -> torch.Tensor:
    """[batch, n_positions, d] latents on the prior's (DiT) space, float32: posterior means
    of held-out text (after the first ``skip`` texts) for a trained model (cut to
    ``n_positions``), N(0, I) draws for a random one (its posterior means nothing)."""
    from colaprob.protocol import to_prior_space

    if not trained(label):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, n_positions, model.latent_dim, generator=g)
    texts = texts_of_length(model, n_positions * model.patch_size, batch, skip)
    with torch.no_grad():
        mean = model.posterior(model.frame(texts)).mean
    u = to_prior_space(model, mean)
    if u.shape[1] < n_positions:
        raise SystemExit(f"the held-out texts give only {u.shape[1]} latent positions, not {n_positions}")
    return u[:, :n_positions].contiguous()


def block_mixture(block_size: int, latent_dim: int, components: int = 3, seed: int = 0):
    """A tractable block-causal prior (``colaprob.testing.BlockMixturePrior``) with
    history-dependent weights and means, parameters drawn from ``seed`` (the ranges of
    ``colaprob.testing.strategies``)."""
    from colaprob.testing import BlockMixturePrior

    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
    K, bs, d = components, block_size, latent_dim
    return BlockMixturePrior(
        logits=torch.randn(K, generator=g, dtype=torch.float64),
        logit_weight=u(-1, 1, K, bs, d) / math.sqrt(bs * d),
        means=u(-2, 2, K, bs, d),
        mean_weight=u(-1, 1, K, bs, d),
        log_std=u(math.log(0.3), math.log(1.5), K, bs, d),
    )


def mixture_samples(prior, n_positions: int, batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, n_positions, d] exact draws of a ``BlockMixturePrior``, block after block
    (each block drawn given the blocks already drawn), float64."""
    g = torch.Generator().manual_seed(seed)
    bs = prior.block_size
    u = torch.zeros(batch, n_positions, prior.latent_dim, dtype=torch.float64)
    for start in range(0, n_positions, bs):
        u[:, start : start + bs] = prior.sample(u, g)[:, start : start + bs]
    return u


def gaussian_mixture(dim: int, components: int = 3, seed: int = 0, spread: float = 1.5):
    """A tractable flow (``colaprob.testing.GaussianMixture``) in ``dim`` dimensions: full
    covariances with eigenvalues >= 0.1 and O(1) spread, means ``spread`` apart."""
    from colaprob.testing import GaussianMixture

    g = torch.Generator().manual_seed(seed)
    factor = 0.6 * torch.randn(components, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    covariances = factor @ factor.transpose(-1, -2) + 0.1 * torch.eye(dim, dtype=torch.float64)
    means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.randn(components, generator=g, dtype=torch.float64), means, covariances)
