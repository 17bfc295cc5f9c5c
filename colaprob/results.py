"""Results on disk: NetCDF files (xarray, ``h5netcdf`` engine) with provenance, written atomically.

Every file colaprob writes is an ``xarray.Dataset`` with named dimensions (``sequence``,
``token``, ``block``, ``sample``, ...) and attributes that say where its numbers come from:
the model and its configuration hash, the estimator and solver settings, the seed, the
versions of colaprob, torch, torchdiffeq, xarray and Python, and the UTC time of writing.

NetCDF attributes can only be strings, numbers or arrays of numbers. ``netcdf_attrs`` states
the one rule used everywhere: integers and floats are stored as they are, strings as they
are, and anything else (booleans, ``None``, lists, nested settings) as its JSON text, so
``read_settings`` can turn the attributes back into the settings they came from.

A write never leaves half a file behind: the dataset goes to a temporary file in the same
folder, is flushed to disk, and replaces the target in one ``os.replace``; an error or
Ctrl-C on the way removes the temporary file.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import platform
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import xarray as xr

from colaprob import metadata as cf_metadata
from colaprob.errors import ColaprobError

ENGINE = "h5netcdf"
TEMP_MARK = ".tmp-"
"""Temporary files are named ``.<target name>.tmp-<random>``; a run may delete stale ones."""

VERSIONED_PACKAGES = ("colaprob", "torch", "torchdiffeq", "xarray")
INT64 = np.iinfo(np.int64)


# ---------------------------------------------------------------------------------------------
# Attributes


def netcdf_attrs(settings: Mapping) -> dict:
    """Settings as NetCDF attributes: numbers and strings as they are, anything else as JSON."""
    return {str(key): _attr_value(value) for key, value in settings.items()}


def _attr_value(value):
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, np.integer)) and INT64.min <= value <= INT64.max:
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return storable_text(value)
    return storable_text(json.dumps(value, sort_keys=True, default=str))


def read_settings(attrs: Mapping, keys) -> dict:
    """The inverse of ``netcdf_attrs`` for the given keys (missing keys are left out)."""
    settings = {}
    for key in keys:
        if key not in attrs:
            continue
        value = attrs[key]
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str):
            try:
                decoded = json.loads(value)
            except ValueError:
                decoded = value
            # Only containers, booleans and null were JSON-encoded; a string such as "3"
            # stays a string.
            value = decoded if isinstance(decoded, (bool, list, dict)) or decoded is None else value
        settings[key] = value
    return settings


def storable_text(text: str) -> str:
    """``text`` as HDF5 can store it: NUL characters (which HDF5 strings cannot hold) shown
    as U+2400 '␀', lone surrogates (from JSON escapes) as '?'."""
    return text.replace("\x00", "\u2400").encode("utf-8", "replace").decode("utf-8")


def package_versions() -> dict:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[f"{name}_version"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[f"{name}_version"] = "not installed"
    versions["python_version"] = platform.python_version()
    return versions


def provenance(settings: Mapping) -> dict:
    """The attributes every colaprob file carries: ``settings`` (model, config hash,
    estimator and solver settings, seed, ...) plus package versions, torch's CPU thread
    count (float32 sums can round differently with another count) and the UTC time."""
    import torch

    return {
        **netcdf_attrs(settings),
        **package_versions(),
        "torch_threads": torch.get_num_threads(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# Files


def reports_write_failures(write):
    """Decorate ``write(content, path)`` so a failed write (disk full, read-only file
    system, no permission, ...) is one ``ColaprobError``; the writers remove their temporary
    file on the way out, so an existing ``path`` is untouched and nothing half-written stays."""

    @functools.wraps(write)
    def checked(content, path, *args, **kwargs):
        try:
            return write(content, path, *args, **kwargs)
        except OSError as err:
            raise ColaprobError(write_failure(path, err)) from None
    return checked


def write_failure(path, err: OSError) -> str:
    """The sentence for an ``OSError`` met while writing ``path``."""
    reasons = {
        errno.ENOSPC: "no space is left on the device",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission is denied",
        errno.EPERM: "the operation is not permitted",
    }
    reason = reasons.get(err.errno) or _first_line(err)
    return (
        f"cannot write {path}: {reason}; free space or fix the permissions (or choose another output), "
        "then rerun: files already finished are kept."
    )


@reports_write_failures
def write_dataset(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to ``path`` atomically (temporary file, fsync, ``os.replace``). The file
    is encoded in memory first, so the file system only sees one plain write: a disk that
    fills up is a clean ``OSError`` there, never an HDF5 library left half-flushed (which
    can crash the process). Every variable is described for CF readers:
    ``colaprob.metadata.apply`` adds the attributes to ``ds`` itself, so the dataset in memory
    is the one a reader gets back."""
    path = Path(path)
    ds = _with_storable_strings(cf_metadata.apply(ds))
    return write_bytes(ds.to_netcdf(engine=ENGINE), path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file (a manifest, a summary) atomically."""
    return write_bytes(text.encode("utf-8"), path)


@reports_write_failures
def write_bytes(data: bytes | memoryview, path: str | os.PathLike) -> Path:
    """Write ``data`` (a figure, a text) to ``path`` atomically."""
    path = Path(path)
    fd, temp = _temp_file_next_to(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def read_dataset(path: str | os.PathLike) -> xr.Dataset:
    """Load a colaprob NetCDF file fully into memory (the file is closed on return)."""
    from colaprob.data import check_regular_file

    path = Path(path)
    if path.exists() or path.is_symlink():  # a FIFO or device would block or never end
        check_regular_file(path)
    try:
        return xr.load_dataset(path, engine=ENGINE)
    except FileNotFoundError:
        raise ColaprobError(f"no results file at {path}.") from None
    except (OSError, ValueError) as err:
        raise ColaprobError(f"{path} is not a readable NetCDF file ({_first_line(err)}).") from None


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, if a file cannot be created at ``path``: the folder is
    created if needed and a temporary file is made there and removed again."""
    path = Path(path)
    if path.is_dir():
        raise ColaprobError(f"cannot write results to {path}: it is a folder; give a file name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = _temp_file_next_to(path)
        os.close(fd)
        os.unlink(temp)
    except OSError as err:
        raise ColaprobError(f"cannot write results to {path}: {err.strerror or err}.") from None
    if path.exists() and not path.is_file():
        raise ColaprobError(f"cannot write results to {path}: it is not a regular file; give a file name.")
    return path


def remove_stale_temp_files(folder: Path) -> None:
    """Delete temporary files a killed process left in ``folder`` (only ours, by name)."""
    for leftover in folder.glob(f".*{TEMP_MARK}*"):
        leftover.unlink(missing_ok=True)


def _temp_file_next_to(path: Path) -> tuple[int, str]:
    # Same folder as the target, so os.replace is a rename within one file system.
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    os.fchmod(fd, default_mode(0o666))  # mkstemp makes 0600; a result is an ordinary file
    return fd, temp


def default_mode(base: int) -> int:
    """The permissions ``open``/``mkdir`` would give: ``base`` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _with_storable_strings(ds: xr.Dataset) -> xr.Dataset:
    """String variables made storable (see ``storable_text``); other variables untouched."""
    fixed = {}
    for name, var in ds.variables.items():
        if var.dtype.kind in "OU" and var.size:
            fixed[name] = var.copy(data=np.vectorize(storable_text, otypes=[object])(var.values))
            # A fixed-width dtype read from an earlier file would truncate longer strings
            # (the merge of shards keeps the first shard's encoding).
            fixed[name].encoding = {k: v for k, v in var.encoding.items() if k != "dtype"}
    return ds.assign(fixed) if fixed else ds


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


# ---------------------------------------------------------------------------------------------
# ArviZ

ROW_VARIABLES = ("document", "window", "source", "text", "prompt", "n_tokens", "n_bytes", "n_words")
"""What each scored sequence is; ``to_inference_data`` puts these in ``observed_data``."""


def to_inference_data(ds: xr.Dataset):
    """A score dataset (``colaprob score``, ``elbo``, ``iwae``, ``conditional``) as an
    ``arviz.InferenceData`` (needs the extra ``colaprob[arviz]``, ArviZ 0.x).

    The importance samples become ArviZ's draws of one chain (``sample`` -> ``draw``,
    ``chain`` of length 1), so ArviZ's PSIS tools read the importance weights directly:

    * ``log_likelihood``: ``log_weight`` [chain, draw, sequence], ``log w_k = log p(x, z_k) -
      log q(z_k|x)``; ``az.psislw(idata.log_likelihood.log_weight)`` fits the same Pareto
      tail as colaprob's ``khat``;
    * ``sample_stats``: every other variable -- the weight terms per draw
      (``decoder_log_prob``, ``prior_log_prob``, ...) and the diagnostics and estimates per
      sequence (``khat``, ``ess``, ``log_likelihood``, ...);
    * ``observed_data``: what each sequence is (``ROW_VARIABLES`` present in ``ds``).

    Every group keeps ``ds.attrs`` (provenance). Missing samples (rows with fewer draws)
    stay NaN.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    if "log_weight" not in ds or set(ds["log_weight"].dims) != {"sequence", "sample"}:
        raise ValueError("ds must be a score dataset with log_weight over (sequence, sample), as colaprob score writes")
    try:
        import arviz
    except ImportError:
        raise ImportError("to_inference_data needs ArviZ: pip install 'colaprob[arviz]'") from None

    draws = ds.rename({"sample": "draw"}).expand_dims(chain=[0])
    draws = draws.transpose("chain", "draw", ...)
    rows = [name for name in ROW_VARIABLES if name in ds]
    per_sequence = [name for name in ds.data_vars if "sample" not in ds[name].dims]
    stats = draws.drop_vars(["log_weight", *rows])
    # Variables without a sample dimension must not gain a chain dimension.
    stats = stats.drop_vars(per_sequence, errors="ignore").assign({name: ds[name] for name in per_sequence if name not in rows})
    groups = {
        "log_likelihood": draws[["log_weight"]],
        "sample_stats": stats,
        "observed_data": ds[rows],
    }
    return arviz.InferenceData(**{name: group.assign_attrs(ds.attrs) for name, group in groups.items()})
