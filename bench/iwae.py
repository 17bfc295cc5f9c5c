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

Settings: a K sweep (1 .. 5000, Hutchinson trace, K processed ``--chunk`` samples at a time),
a sequence-length sweep, each with the cache on and off (``model.cache_clean_history``), and
the exact trace where it is affordable.

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


def child(setting: dict) -> dict:
    """Run one setting in this process and return its measurements."""
    import torch

    from colaprob.estimators import iwae

    torch.set_num_threads(setting["threads"])
    model, label = common.cola_model(setting["model"])
    model.cache_clean_history = setting["cache"]
    n_bytes = setting["tokens"] - (model.framing.bos_id is not None) - (model.framing.eos_id is not None)
    texts = [t.encode()[:n_bytes].decode(errors="ignore") for t in common.heldout_texts(n_bytes, setting["batch"])]
    batch = model.frame(texts)
    solver = dict(method=setting["method"])
    if setting["method"] in ("euler", "midpoint", "rk4"):
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
    """Every setting ``repeats`` times, interleaved (order rotating); medians."""
    results = [[] for _ in settings]
    for r in range(repeats):
        order = list(range(len(settings)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            results[i].append(run_child(settings[i]))
    rows = []
    for setting, runs in zip(settings, results):
        seconds = statistics.median(x["seconds"] for x in runs)
        common.TOTALS["cpu"] += sum(x["seconds"] for x in runs)
        common.TOTALS["wall"] += sum(x["wall"] for x in runs)
        rows.append(
            {
                **setting,
                "seconds": seconds,
                "seq/s": setting["batch"] / seconds,
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
    """One line per value of ``key``: cache on and off side by side."""
    by = {}
    for r in rows:
        by.setdefault((r[key], r["trace"]), {})[r["cache"]] = r
    columns = [key, "trace", "tokens", "nfe", "cache on CPU s", "cache on seq/s", "cache off seq/s", "on/off speed-up",
               "cache on peak RSS MiB", "cache on growth MiB", "cache off growth MiB", "IWAE (nats/seq)", "on - off IWAE"]
    lines = []
    for (value, trace), pair in by.items():
        on, off = pair.get(True), pair.get(False)
        lines.append([
            value, trace, on["tokens"], on["nfe"], on["seconds"], on["seq/s"], off["seq/s"] if off else None,
            off["seconds"] / on["seconds"] if off else None, on["peak_mib"], on["growth_mib"], off["growth_mib"] if off else None,
            on["iwae"], on["iwae"] - off["iwae"] if off else None,
        ])
    common.table(columns, lines)


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse_suppress())
    p.add_argument("--model", default="auto", help="tiny, random, a checkpoint path, or auto (tiny if built)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000, 5000], help="K of the K sweep")
    p.add_argument("--k-tokens", type=int, default=16, help="framed tokens per sequence in the K sweep (default 16)")
    p.add_argument("--k-batch", type=int, default=1, help="sequences in the K sweep (default 1)")
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128], help="framed tokens of the length sweep")
    p.add_argument("--length-k", type=int, default=16, help="K of the length sweep (default 16)")
    p.add_argument("--length-batch", type=int, default=4, help="sequences in the length sweep (default 4)")
    p.add_argument("--exact-lengths", type=int, nargs="*", default=[16, 32], help="lengths also run with the exact trace")
    p.add_argument("--chunk", type=int, default=250, help="samples per chunk (default 250)")
    p.add_argument("--method", default="dopri5", help="ODE solver (default dopri5)")
    p.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of an adaptive solver (default 1e-3)")
    p.add_argument("--steps", type=int, default=8, help="steps of a fixed-grid solver")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.quick:
        args.ks, args.lengths, args.exact_lengths, args.method, args.steps = [2], [], [], "euler", 2
        args.k_tokens = 8
        args.model = "random" if args.model == "auto" else args.model
    common.start(args, "IWAE on the embedded model: throughput and peak memory")
    solver = f"{args.method}, {args.steps} steps" if args.method in ("euler", "midpoint", "rk4") else f"{args.method}, rtol = atol = {args.tol}"
    base = dict(model=args.model, threads=args.threads, method=args.method, tol=args.tol, steps=args.steps, chunk=args.chunk)

    k_settings = [dict(base, K=K, tokens=args.k_tokens, batch=args.k_batch, trace="hutchinson", cache=c) for K in args.ks for c in (True, False)]
    rows = measure(k_settings, args.repeats)
    print(f"model: {rows[0]['model']}; solver {solver}; Rademacher probe, 1 per sample; K in chunks of {args.chunk}; median of {args.repeats} interleaved fresh-process runs")
    print()
    print(f"## K sweep: {args.k_batch} sequence(s) of {args.k_tokens} framed tokens, Hutchinson trace")
    print()
    print_pairs(rows, "K")

    length_settings = [
        dict(base, K=args.length_k, tokens=n, batch=args.length_batch, trace=trace, cache=c)
        for n in args.lengths
        for trace in ("hutchinson", "exact")
        if trace == "hutchinson" or n in args.exact_lengths
        for c in (True, False)
    ]
    if not length_settings:
        common.finish()
        return
    rows = measure(length_settings, args.repeats)
    print(f"## Length sweep: {args.length_batch} sequences, K = {args.length_k}")
    print()
    print_pairs(rows, "tokens")
    common.finish()


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
