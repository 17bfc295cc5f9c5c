"""IWAE on the embedded model: sequences per second and peak memory against K, sequence
length, the trace, and the clean-history key/value cache.

Every setting runs in a FRESH subprocess (so its memory high-water mark is its own), the
settings interleaved and repeated; the tables give medians. Memory is the process's maximum
resident set size, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (it sees every torch CPU
allocation): ``peak RSS`` is the whole process (Python, torch, the model included) and
``growth`` the rise of that high-water mark during the ``iwae`` call over its value just
before. Time is the CPU time of the ``iwae`` call alone (the model loaded and the text framed
beforehand); sequences per second = sequences / that CPU time (on one thread, the wall time
of an idle machine).

Settings: a K sweep (1 .. 5000, Hutchinson trace, K processed ``--chunk`` samples at a time,
a fixed Euler grid so that K = 5000 fits in minutes: the sweep measures how cost and memory
scale with K, per evaluation), and a sequence-length sweep with the adaptive solver, each
with the cache on and off (``model.cache_clean_history``), and the exact trace where it is
affordable.

    python bench/iwae.py
    python bench/iwae.py --quick
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import common

FIXED = ("euler", "midpoint", "rk4")

def child(setting: dict) -> dict:
    """Run one setting in this process and return its measurements."""
    import torch

    from colaprob.estimators import iwae

    torch.set_num_threads(setting["threads"])
    model, label = common.cola_model(setting["model"])
    model.cache_clean_history = setting["cache"]
    batch = model.frame(common.texts_of_length(model, setting["tokens"], setting["batch"]))
    solver = dict(method=setting["method"])
    if setting["method"] in FIXED:
        solver["steps"] = setting["steps"]
    else:
        solver.update(rtol=setting["tol"], atol=setting["tol"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu, wall, ds = common.timed(lambda: iwae(model, batch, setting["K"], seed=0, chunk_size=setting["chunk"], trace=setting["trace"], **solver))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": cpu,
        "wall": wall,
        "peak_mib": peak / 1024,
        "growth_mib": (peak - before) / 1024,
        "nfe": int(ds.attrs["nfe"]),
        "iwae": float(ds["log_likelihood"].mean()),
        "tokens": int(batch.ids.shape[1]),
        "model": label,
    }


def run_child(setting: dict) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(setting)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"setting {setting} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(settings: list[dict], repeats: int) -> list[dict]:
    """Every setting ``setting["repeats"]`` (default ``repeats``) times, interleaved (order
    rotating); medians."""
    results = [[] for _ in settings]
    for r in range(repeats):
        order = list(range(len(settings)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            if r < settings[i].get("repeats", repeats):
                results[i].append(run_child(settings[i]))
    rows = []
    for setting, runs in zip(settings, results):
        seconds = statistics.median(x["seconds"] for x in runs)
        common.TOTALS["cpu"] += sum(x["seconds"] for x in runs)
        common.TOTALS["wall"] += sum(x["wall"] for x in runs)
        rows.append(
            {
                **setting,
                "runs": len(runs),
                "seconds": seconds,
                "seq/s": setting["batch"] / seconds,
                "samples/s": setting["batch"] * setting["K"] / seconds,
                "peak_mib": statistics.median(x["peak_mib"] for x in runs),
                "growth_mib": statistics.median(x["growth_mib"] for x in runs),
                "nfe": runs[-1]["nfe"],
                "iwae": runs[-1]["iwae"],
                "tokens": runs[-1]["tokens"],
                "model": runs[-1]["model"],
            }
        )
    return rows


def print_pairs(rows: list[dict], key: str) -> None:
    """One line per value of ``key`` and trace: cache on and off side by side."""
    by = {}
    for r in rows:
        by.setdefault((r[key], r["trace"]), {})[r["cache"]] = r
    columns = [key, "trace", "tokens", "runs", "nfe", "cache on CPU s", "cache on seq/s", "cache on samples/s", "cache off seq/s",
               "on/off speed-up", "cache on peak RSS MiB", "cache on growth MiB", "cache off growth MiB", "IWAE (nats/seq)", "on - off IWAE"]
    lines = []
    for (value, trace), pair in by.items():
        on, off = pair.get(True), pair.get(False)
        lines.append([
            value, trace, on["tokens"], on["runs"], on["nfe"], on["seconds"], on["seq/s"], on["samples/s"], off["seq/s"] if off else None,
            off["seconds"] / on["seconds"] if off else None, on["peak_mib"], on["growth_mib"], off["growth_mib"] if off else None,
            on["iwae"], on["iwae"] - off["iwae"] if off else None,
        ])
    common.table(columns, lines)


def describe(method: str, tol: float, steps: int) -> str:
    return f"{method}, {steps} steps" if method in FIXED else f"{method}, rtol = atol = {tol}"


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse_suppress())
    p.add_argument("--model", default="auto", help="tiny, random, a checkpoint path, or auto (tiny if built)")
    p.add_argument("--chunk", type=int, default=250, help="samples per chunk (default 250)")
    k = p.add_argument_group("K sweep")
    k.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000, 5000], help="K of the K sweep")
    k.add_argument("--k-tokens", type=int, default=16, help="framed tokens per sequence (default 16)")
    k.add_argument("--k-batch", type=int, default=1, help="sequences (default 1)")
    k.add_argument("--k-method", default="euler", help="ODE solver of the K sweep (default euler)")
    k.add_argument("--k-steps", type=int, default=8, help="its steps (default 8, as Cola generation uses few Euler steps)")
    k.add_argument("--k-tol", type=float, default=1e-3, help="its rtol = atol if adaptive")
    k.add_argument("--once-above", type=int, default=1000, help="K above this run once, not --repeats times (default 1000)")
    n = p.add_argument_group("length sweep")
    n.add_argument("--lengths", type=int, nargs="*", default=[16, 32, 64], help="framed tokens (the embedded model takes at most 64)")
    n.add_argument("--length-k", type=int, default=4, help="K (default 4)")
    n.add_argument("--length-batch", type=int, default=2, help="sequences (default 2)")
    n.add_argument("--exact-lengths", type=int, nargs="*", default=[16], help="lengths also run with the exact trace (default 16)")
    n.add_argument("--method", default="dopri5", help="ODE solver of the length sweep (default dopri5)")
    n.add_argument("--tol", type=float, default=1e-3, help="its rtol = atol (default 1e-3)")
    n.add_argument("--steps", type=int, default=8, help="its steps if fixed-grid")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.quick:
        args.ks, args.lengths, args.exact_lengths, args.k_steps, args.k_tokens = [2], [], [], 2, 8
        args.model = "random" if args.model == "auto" else args.model
    common.start(args, "IWAE on the embedded model: throughput and peak memory")
    base = dict(model=args.model, threads=args.threads, chunk=args.chunk)

    k_solver = dict(method=args.k_method, tol=args.k_tol, steps=args.k_steps)
    k_settings = [
        dict(base, **k_solver, K=K, tokens=args.k_tokens, batch=args.k_batch, trace="hutchinson", cache=c, repeats=1 if K > args.once_above else args.repeats)
        for K in args.ks
        for c in (True, False)
    ]
    rows = measure(k_settings, args.repeats)
    print(f"model: {rows[0]['model']}; K in chunks of {args.chunk}; median CPU seconds of the fresh-process runs (runs column), interleaved")
    print()
    print(f"## K sweep: {args.k_batch} sequence(s) of {args.k_tokens} framed tokens, Hutchinson trace (1 Rademacher probe per sample), {describe(**k_solver)}")
    print()
    print_pairs(rows, "K")

    length_settings = [
        dict(base, method=args.method, tol=args.tol, steps=args.steps, K=args.length_k, tokens=n, batch=args.length_batch, trace=trace, cache=c)
        for n in args.lengths
        for trace in ("hutchinson", "exact")
        if trace == "hutchinson" or n in args.exact_lengths
        for c in (True, False)
    ]
    if length_settings:
        rows = measure(length_settings, args.repeats)
        print(f"## Length sweep: {args.length_batch} sequences, K = {args.length_k}, {describe(args.method, args.tol, args.steps)}")
        print()
        print_pairs(rows, "tokens")
    common.finish()


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
