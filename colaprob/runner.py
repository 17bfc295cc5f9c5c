"""The resumable, shardable loop behind ``colaprob score`` and ``colaprob demo``.

A corpus of ``n_items`` sequences is cut into batches by a fixed rule (in order,
``batch_size`` sequences each, the last one shorter), and the numbers of a batch depend only
on its sequences and the settings (each estimator draws its randomness from the seed and the
sequence key). So a batch can be computed by any process at any time and give the same
numbers, which is what makes runs resumable and shardable:

* every finished batch is written as its own file, ``batch-000012.nc``, in a run folder next
  to the output (``scores.nc`` -> ``scores.nc.run/``), atomically, so the folder only ever
  holds whole batches; the folder's ``manifest.json`` records the settings;
* a rerun with the same settings skips the batches already there (a batch is never lost nor
  counted twice); a run folder or output made with other settings is refused, unless
  ``overwrite`` starts over;
* under ``torchrun`` batch ``i`` belongs to rank ``i % world_size``; after a barrier rank 0
  merges the batches, in order, into the output (atomically) and removes the run folder.

The merged dataset is the same whichever processes computed which batches.

Two guarantees protect results already on disk. A run holds an exclusive lock on its run
folder (``flock`` on the folder itself) from the moment it writes there until the folder is
removed, so a second process on the same output is refused instead of racing on the same
batches. And ``overwrite`` never deletes a finished output first: the new result replaces it
in one atomic rename when it is complete, so an interrupted ``--overwrite`` leaves the old
result in place. Every step that can fail on one rank is agreed on by all of them
(``Context.agree``): the failure is reported once, by rank 0, and no rank waits forever.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from colaprob import results
from colaprob.distributed import Context
from colaprob.errors import ColaprobError
from colaprob.progress import bar as progress_bar

SEQUENCE = "sequence"
MANIFEST = "manifest.json"
RUN_KEY = "run_key"
"""Attribute (and manifest entry) holding the hash of the settings that made a result."""


@dataclass(frozen=True)
class Plan:
    """What a run computes: ``n_items`` sequences in batches of ``batch_size``, with
    ``settings`` (JSON-serialisable) naming everything that determines the numbers: model
    and its hash, input fingerprint, estimator, solver, seed."""

    settings: Mapping
    n_items: int
    batch_size: int

    def __post_init__(self):
        if self.batch_size < 1:
            raise ColaprobError(f"batch size must be at least 1, got {self.batch_size}.")

    @property
    def record(self) -> dict:
        """The settings plus the shard layout: all a rerun must agree on to resume (named
        apart from a command's own ``batch_size``, which may be its model calls' size)."""
        return {**self.settings, "n_sequences": self.n_items, "shard_size": self.batch_size}

    @property
    def key(self) -> str:
        canonical = json.dumps(self.record, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    @property
    def n_batches(self) -> int:
        return -(-self.n_items // self.batch_size)

    def batch(self, index: int) -> range:
        start = index * self.batch_size
        return range(start, min(start + self.batch_size, self.n_items))


def run_folder(output: Path) -> Path:
    return output.with_name(output.name + ".run")


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"batch-{index:06d}.nc"


def run(
    plan: Plan,
    score_batch: Callable[[range], xr.Dataset],
    output: str | Path,
    *,
    finish: Callable[[xr.Dataset], xr.Dataset] = lambda merged: merged,
    ctx: Context = Context(),
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "scoring",
) -> xr.Dataset | None:
    """Compute every batch of ``plan`` not already done, then merge them into ``output``.

    ``score_batch(items)`` returns the dataset of the sequences ``items`` (a ``range`` of
    corpus positions), with a ``sequence`` dimension of that length; its ``sequence``
    coordinate is set here to the corpus positions. Variables without a ``sequence``
    dimension must be the same in every batch: corpus-level numbers are computed by
    ``finish(merged)`` instead, before the output is written. Returns the merged dataset on
    rank 0 and ``None`` on the other ranks. An ``output`` already holding this run's result
    is read back, not recomputed.
    """
    output = Path(output)
    folder = run_folder(output)
    # Every rank checks (read-only, before anyone writes), so all of them refuse together.
    if ctx.agree(lambda: not overwrite and (_finished(output, plan) or _refuse_other_run(output, folder, plan))):
        return results.read_dataset(output) if ctx.is_main else None
    held: list[RunLock] = []
    try:
        # Rank 0 claims the folder; it may find that another process just finished this run.
        if ctx.agree(lambda: ctx.is_main and _claim_folder(output, folder, plan, overwrite, held), share=True)[0]:
            return results.read_dataset(output) if ctx.is_main else None
        ctx.agree(lambda: _compute_my_batches(plan, score_batch, folder, ctx, progress, desc))
        return ctx.agree(lambda: _merge_into_output(plan, folder, output, finish) if ctx.is_main else None)
    finally:
        for lock in held:
            lock.release()


def _merge_into_output(plan: Plan, folder: Path, output: Path, finish) -> xr.Dataset:
    merged = finish(_merge(plan, folder))
    merged.attrs.update(results.provenance(plan.record), **{RUN_KEY: plan.key})
    results.write_dataset(merged, output)
    shutil.rmtree(folder)
    return merged


class RunLock:
    """An exclusive ``flock`` on the run folder, held while this process works in it."""

    def __init__(self, folder: Path):
        self.fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ColaprobError(
                f"another colaprob process is working on {folder} (its lock is held); wait for it to finish, "
                "or choose another --output."
            ) from None

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor releases the lock


# ---------------------------------------------------------------------------------------------
# Checking and preparing the run folder


def _finished(output: Path, plan: Plan) -> bool:
    if not output.exists():
        return False
    attrs = _attrs_of(output)
    return attrs is not None and attrs.get(RUN_KEY) == plan.key


def _refuse_other_run(output: Path, folder: Path, plan: Plan) -> bool:
    """Raise if ``output`` or its run folder belongs to another run; False otherwise."""
    if folder.exists() and not folder.is_dir():
        raise ColaprobError(f"{folder}, where this run keeps its batches, is taken by a file; move that file away or choose another --output.")
    if output.exists() and not output.is_file():
        raise ColaprobError(f"cannot write results to {output}: it is not a regular file; give a file name.")
    if output.exists():
        attrs = _attrs_of(output)
        if attrs is None or RUN_KEY not in attrs:
            raise ColaprobError(
                f"{output} already exists and was not written by a colaprob run; "
                "pass --overwrite to replace it or choose another --output."
            )
        theirs = results.read_settings(attrs, plan.record)
        raise ColaprobError(
            f"{output} holds results of a different run ({describe_difference(theirs, plan.record)}); "
            "pass --overwrite to replace it or choose another --output."
        )
    manifest = folder / MANIFEST
    if manifest.exists():
        recorded = _read_manifest(manifest)
        if recorded.get(RUN_KEY) != plan.key:
            raise ColaprobError(
                f"{folder} holds an unfinished run with different settings "
                f"({describe_difference(recorded.get('settings', {}), plan.record)}); rerun with the same "
                "settings to resume it, or pass --overwrite to start over."
            )
    elif folder.exists() and any(folder.iterdir()):
        raise ColaprobError(
            f"{folder} exists but is not a colaprob run folder; remove it, pass --overwrite, "
            "or choose another --output."
        )
    return False


def _claim_folder(output: Path, folder: Path, plan: Plan, overwrite: bool, held: list) -> bool:
    """Create and lock the run folder (appending the lock to ``held``) and record the
    settings; with ``overwrite``, an unfinished run there is cleared (a finished ``output``
    stays until the new one replaces it). True if, once locked, ``output`` turns out to hold
    this run's result already (another process finished it meanwhile)."""
    try:
        for attempt in range(3):  # a process that just finished may remove the folder meanwhile
            folder.mkdir(parents=True, exist_ok=True)
            try:
                held.append(RunLock(folder))
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
    except FileExistsError:
        raise ColaprobError(f"{folder}, where this run keeps its batches, is taken by a file; move that file away or choose another --output.") from None
    except OSError as err:
        raise ColaprobError(results.write_failure(folder, err)) from None
    if not overwrite and _finished(output, plan):
        return True
    if overwrite:
        for entry in folder.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    results.remove_stale_temp_files(folder)
    manifest = {RUN_KEY: plan.key, "settings": plan.record}
    results.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n", folder / MANIFEST)
    return False


def _attrs_of(path: Path) -> dict | None:
    """The global attributes of a result file, read without its variables (opening it as a
    dataset reads every variable's metadata: most of a resume check's time)."""
    import h5netcdf

    try:
        with h5netcdf.File(path, "r") as f:
            return dict(f.attrs.items())
    except (OSError, ValueError):
        return None


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ColaprobError(f"{path} is unreadable; remove its folder or pass --overwrite.") from None


def describe_difference(theirs: Mapping, ours: Mapping, limit: int = 3) -> str:
    """The first few settings that differ, as ``name X there, Y now``."""
    names = [k for k in sorted(set(theirs) | set(ours)) if _normal(theirs.get(k)) != _normal(ours.get(k))]
    shown = [f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "; ".join(shown) + more if shown else "its settings hash differs"


def _normal(value):
    # Settings read back from NetCDF attributes are numbers, strings or decoded JSON.
    return json.dumps(value, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# Computing and merging


def _compute_my_batches(plan, score_batch, folder, ctx, progress, desc) -> None:
    mine = [i for i in range(plan.n_batches) if ctx.owns(i)]
    todo = [i for i in mine if not shard_path(folder, i).exists()]
    bar = progress_bar(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=desc,
        unit="batch",
        file=sys.stderr,
        show=progress and ctx.is_main,
        dynamic_ncols=True,
    )
    with bar:
        for index in todo:
            items = plan.batch(index)
            ds = score_batch(items)
            if ds.sizes.get(SEQUENCE) != len(items):
                raise AssertionError(f"batch {index}: expected {len(items)} sequences, got {ds.sizes.get(SEQUENCE)}")
            ds = ds.assign_coords({SEQUENCE: np.arange(items.start, items.stop)})
            results.write_dataset(ds, shard_path(folder, index))
            bar.update(1)


def _merge(plan: Plan, folder: Path) -> xr.Dataset:
    missing = [i for i in range(plan.n_batches) if not shard_path(folder, i).exists()]
    if missing:
        raise ColaprobError(f"{folder} lacks batches {missing[:5]}; rerun the same command to compute them.")
    parts = [results.read_dataset(shard_path(folder, i)) for i in range(plan.n_batches)]
    return concat_sequences(parts).assign_attrs(_common_attrs(parts))


def concat_sequences(parts: list[xr.Dataset]) -> xr.Dataset:
    """Concatenate datasets along ``sequence``; other dimensions that differ in length
    between them (``token``, ``block``, ...) are padded at the end: NaN for floats, -1 for
    integers, False for booleans, "" for strings. Variables without a ``sequence``
    dimension must agree between the datasets and are kept once."""
    ragged = {dim for ds in parts for dim in ds.dims if dim != SEQUENCE and len({p.sizes.get(dim) for p in parts}) > 1}
    # Dimensions without a coordinate get a temporary 0..n-1 one, so an outer join pads them.
    unlabeled = {dim for dim in ragged if not any(dim in p.indexes for p in parts)}
    parts = [p.assign_coords({dim: np.arange(p.sizes[dim]) for dim in unlabeled if dim in p.dims}) for p in parts]
    fills = {name: _fill_value(var.dtype) for p in parts for name, var in p.variables.items()}
    parts = xr.align(*parts, join="outer", exclude=[SEQUENCE], fill_value=fills)
    merged = xr.concat(parts, dim=SEQUENCE, data_vars="minimal", coords="minimal", compat="equals", join="outer")
    return merged.drop_vars(unlabeled)


def _fill_value(dtype: np.dtype):
    return {"f": np.nan, "c": np.nan, "i": -1, "u": 0, "b": False}.get(dtype.kind, "")


def _common_attrs(parts: list[xr.Dataset]) -> dict:
    """Attributes every batch agrees on (estimator settings); per-batch ones are dropped."""
    first = parts[0].attrs
    return {k: v for k, v in first.items() if all(_normal(p.attrs.get(k)) == _normal(v) for p in parts[1:])}
