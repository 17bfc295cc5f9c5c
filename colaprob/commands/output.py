"""What the commands print: the headline numbers of a result (``summary``, one for every kind
of result file), aligned tables, ``value ± se`` cells, strict JSON, and the refusal to
summarise a result that holds a non-finite log-likelihood."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import xarray as xr

from colaprob.errors import ColaprobError
from colaprob.estimators.statistics import KHAT_MIN_SAMPLES, khat_computable

UNITS = ("nats_per_token", "bits_per_byte", "token_perplexity", "word_perplexity")
PROBES = ("decoder_probe", "posterior_hit", "prior_hit", "generation_prob")


def summary(ds: xr.Dataset) -> dict:
    """The headline numbers of any colaprob result, as the commands print them and as
    ``--json``: a task evaluation (per task), a decomposition, the probes, or scores."""
    if "choice" in ds.dims:
        return task_summary(ds)
    if "marginal_kl" in ds:
        return decomposition_summary(ds)
    if "prior_hit" in ds:
        return probes_summary(ds)
    return score_summary(ds)


def score_summary(ds: xr.Dataset) -> dict:
    """The corpus-level numbers of a score result."""
    row = {
        "estimator": ds.attrs.get("estimator", ""),
        "sequences": int(ds.sizes["sequence"]),
        "documents": int(np.unique(ds["document"].values).size),
        "tokens": int(ds["n_tokens"].sum()),
        "log_likelihood": float(ds["log_likelihood"].sum()),
        "log_likelihood_se": float(np.sqrt((ds["log_likelihood_se"] ** 2).sum())),
    }
    if "log_likelihood_solver_error" in ds:
        # Solver errors are systematic, not independent: they add, unlike standard errors.
        row["log_likelihood_solver_error"] = float(ds["log_likelihood_solver_error"].sum())
        row["nats_per_token_solver_error"] = row["log_likelihood_solver_error"] / max(row["tokens"], 1)
    for name in UNITS:
        row[name] = float(ds[f"corpus_{name}"])
        row[f"{name}_se"] = float(ds[f"corpus_{name}_se"])
    if "reliable" in ds:
        # Rows whose k-hat is not computable (K < 21) are no verdict: left out of the share.
        computable = np.asarray(khat_computable(ds["n_samples"].values))
        row["khat_not_computable"] = int((~computable).sum())
        row["reliable_fraction"] = float(ds["reliable"].values[computable].mean()) if computable.any() else None
    if "direct_log_likelihood" in ds:
        applies = ds["direct_applies"].values.astype(bool)
        row["direct_nats_per_token"] = -float(ds["direct_log_likelihood"].values[applies].sum()) / max(int(ds["n_tokens"].values[applies].sum()), 1)
    return row


def short_name(ds: xr.Dataset) -> str:
    """``ELBO K=16``, ``IWAE-16`` or ``conditional IWAE-16`` (the full name is in the attrs)."""
    K = ds.attrs.get("K")
    names = {"elbo": f"ELBO K={K}", "iwae": f"IWAE-{K}", "conditional": f"conditional IWAE-{K}", "rolling": f"rolling chain IWAE-{K}"}
    return names[ds.attrs["estimator_name"]]


def khat_cell(row: dict) -> str:
    """The share of reliable rows, ``n/a (K < 21)`` when no row's k-hat is computable, and the
    count of rows left out when only some are."""
    if row["reliable_fraction"] is None:
        return f"n/a (K < {KHAT_MIN_SAMPLES})"
    share = f"{row['reliable_fraction']:.4f}"
    return share if not row["khat_not_computable"] else f"{share} ({row['khat_not_computable']} n/a)"


def decomposition_summary(ds: xr.Dataset) -> dict:
    """Headline numbers: per-token terms of the bound, the corpus split of the rate."""
    tokens = float(ds["n_tokens"].sum())
    return {
        "sequences": int(ds.sizes["sequence"]),
        "tokens": int(tokens),
        "neg_elbo_nats_per_token": -float(ds["elbo"].sum()) / tokens,
        "distortion_nats_per_token": float(ds["distortion"].sum()) / tokens,
        "rate_nats_per_token": float(ds["rate"].sum()) / tokens,
        "mutual_information": float(ds["mutual_information"]),
        "mutual_information_se": float(ds["mutual_information_se"]),
        "marginal_kl": float(ds["marginal_kl"]),
        "marginal_kl_se": float(ds["marginal_kl_se"]),
        "window_blocks": int(ds.attrs["window_blocks"]),
        "active_units": int(ds["n_active"]),
        "channels": int(ds.sizes["channel"]),
    }


def probes_summary(ds: xr.Dataset) -> dict:
    """Mean probes over the counted tokens and the corpus summary's headline numbers."""
    valid = ds["valid"].values.astype(bool)
    row = {name: float(np.mean(ds[name].values[valid])) for name in PROBES}
    row.update(
        sequences=int(ds.sizes["sequence"]),
        tokens=int(valid.sum()),
        density_percentile_mean=float(ds["density_percentile_mean"]),
        high_nll_generated_fraction=float(ds["high_nll_generated_fraction"]),
        low_nll_missed_fraction=float(ds["low_nll_missed_fraction"]),
        spearman_nll_prior_hit=float(ds["spearman_nll_prior_hit"]),
    )
    return row


def task_summary(ds: xr.Dataset) -> dict:
    """``colaprob.tasks.summarise`` as a dict: task -> {items, acc, acc_se, acc_items, ...}."""
    from colaprob import tasks

    table = tasks.summarise(ds)
    return {
        str(task): {"items": int(table["items"].sel(task=task)), **{name: table[name].sel(task=task).item() for name in table.data_vars if name != "items"}}
        for task in table["task"].values
    }




def print_table(rows: list[dict], columns: list[tuple[str, str]], file=None) -> None:
    """A plain aligned table: ``columns`` are (key, heading) pairs; floats get 4 digits."""
    file = file or sys.stdout
    cells = [[heading for _, heading in columns]]
    cells += [[format_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))), file=file)


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def plus_minus(value: float, se: float) -> str:
    """``value ± se`` with 4 decimals, or 4 significant digits for large numbers."""
    if abs(value) < 1e4:
        return f"{value:.4f} ± {se:.4f}"
    return f"{value:.4g} ± {se:.2g}"


def refuse_non_finite(ds, output) -> None:
    """Refuse to summarise a result with a non-finite log-likelihood: name its rows and the
    likely causes (the file stays, so the rows can be inspected)."""
    values = np.asarray(ds["log_likelihood"].values, dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:10]) + (f" and {bad.size - 10} more" if bad.size > 10 else "")
        raise ColaprobError(
            f"{output} holds a non-finite log-likelihood (NaN or infinite) in row(s) {shown}, so no corpus figure is "
            "printed; likely causes are weights or a configuration that give NaN (check colaprob inspect) or an ODE "
            "solve that diverged (try --method rk4 --steps 32)."
        )


def print_json(summary: dict) -> None:
    """``summary`` as strict JSON on stdout: NaN and infinities become null."""
    print(json.dumps(_finite(summary), indent=2, sort_keys=True, allow_nan=False))


def _finite(value):
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
