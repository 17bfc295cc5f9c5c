"""``colaprob demo`` end to end: wall and CPU time and peak memory of the whole command.

Runs the installed ``colaprob demo`` (default settings unless given after ``--``) in a fresh
subprocess writing into a fresh temporary folder, ``--repeats`` times; torch's threads are set
through ``OMP_NUM_THREADS``. CPU time: user + system of the child (``RUSAGE_CHILDREN``); on one
thread it is the wall time an idle machine would take. Memory: the child's maximum resident set size
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, read after each run; the largest child so
far, so the runs are reported by their maximum). The demo's own headline table is printed.

    python bench/demo.py                      # colaprob demo on the embedded model
    python bench/demo.py -- -K 4 --sequences 8
    python bench/demo.py --quick              # the official fixture, cheap settings
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

FIXTURE = common.REPO / "tests" / "fixtures" / "official-tiny-a"
QUICK = ["--sequences", "2", "-K", "2", "--prior-samples", "2", "--trace", "hutchinson", "--method", "euler", "--steps", "2"]


def colaprob_command() -> list[str]:
    exe = Path(sys.executable).with_name("colaprob")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "colaprob"]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=1)
    p.add_argument("--model", default=None, help="checkpoint for --model (default: the demo's own default, tiny)")
    args = p.parse_args(own)
    if args.quick:
        extra = QUICK + extra
        args.model = args.model or str(FIXTURE)
    common.start(args, "colaprob demo, end to end")
    base = colaprob_command() + ["demo", "--quiet"] + (["--model", args.model] if args.model else []) + extra
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    shown = [common.relative(part) for part in base]
    print(f"- demo command: `{' '.join(shown)} -o <fresh folder>` with OMP_NUM_THREADS={args.threads}")
    print()
    seconds, cpu, output = [], [], ""
    for _ in range(args.repeats):
        folder = Path(tempfile.mkdtemp(prefix="colaprob-bench-demo-"))
        try:
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            out = subprocess.run(base + ["-o", str(folder / "demo")], capture_output=True, text=True, env=env)
            seconds.append(time.perf_counter() - t0)
            now = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if out.returncode != 0:
            raise SystemExit(f"colaprob demo failed ({out.returncode}):\n{out.stderr[-3000:]}")
        output = out.stdout
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    common.table(
        ["runs", "median CPU s", "median wall s", "min wall s", "max wall s", "peak RSS MiB (largest child)"],
        [[len(seconds), statistics.median(cpu), statistics.median(seconds), min(seconds), max(seconds), peak]],
    )
    print("Demo output (last run):")
    print()
    print(output.rstrip())


if __name__ == "__main__":
    main()
