"""What installing colaprob costs: the size of a virtual environment's site-packages, and the
time to ``import colaprob`` and to run ``colaprob score --help``, for two environments side by
side (for example a fresh ``pip install colaprob`` without extras, against the same install
of an older commit).

    python bench/install_footprint.py --env today=/tmp/venv-today --env new=/tmp/venv-new

The third timing is ``colaprob.diagnostics`` plus what ``geometry.embedding`` imports with its
default ``methods``: umap-learn where the default includes UMAP. Each environment is a virtual
environment folder with colaprob installed. Timings are wall
seconds of a fresh child process (Python start-up included), the median of ``--repeats``
runs, the environments interleaved and their order rotated every repeat. ``--quick`` (a
smoke run that measures nothing) times this interpreter's environment once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROBES = {
    "import colaprob": ["{python}", "-c", "import colaprob"],
    "colaprob score --help": ["{python}", "-m", "colaprob", "score", "--help"],
    # What a default report paid on top: geometry.embedding imports umap when its default
    # methods include it (numba compiles on first use; this times the import alone).
    "diagnostics + default embedding imports": [
        "{python}",
        "-c",
        "import inspect; from colaprob.diagnostics import geometry as g; "
        "'umap' in inspect.signature(g.embedding).parameters['methods'].default and __import__('umap')",
    ],
}


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def distributions(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.name.endswith(".dist-info"))


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VENV", help="an environment to measure (repeatable)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke run: this interpreter's environment, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        envs = {"this": Path(sys.executable)}
        args.repeats = 1
    else:
        if len(args.env) < 1:
            parser.error("give at least one --env NAME=VENV")
        envs = {name: Path(folder) / "bin" / "python" for name, folder in (e.split("=", 1) for e in args.env)}

    sizes = {}
    for name, python in envs.items():
        folder = site_packages(python)
        sizes[name] = (folder_bytes(folder), distributions(folder))

    times = {(name, probe): [] for name in envs for probe in PROBES}
    order = list(envs)
    for repeat in range(args.repeats):
        for name in order[repeat % len(order):] + order[: repeat % len(order)]:
            for probe, command in PROBES.items():
                times[name, probe].append(wall_seconds([part.format(python=envs[name]) for part in command]))

    first = order[0]
    print(f"| environment | site-packages MB | distributions | {' | '.join(f'{p} (s, median of {args.repeats})' for p in PROBES)} |")
    print("|---|---|---|" + "---|" * len(PROBES))
    for name in envs:
        cells = [f"{statistics.median(times[name, p]):.2f}" for p in PROBES]
        print(f"| {name} | {sizes[name][0] / 1e6:.0f} | {sizes[name][1]} | {' | '.join(cells)} |")
    for name in order[1:]:
        size_ratio = sizes[name][0] / sizes[first][0]
        ratios = [statistics.median(times[name, p]) / statistics.median(times[first, p]) for p in PROBES]
        print(f"| {name} / {first} | {size_ratio:.2f} | | {' | '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()
