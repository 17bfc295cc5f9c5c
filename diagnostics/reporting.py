"""One call, one folder: every diagnostic on a model and a corpus, as NetCDF results, PNG
figures, a short markdown summary of the headline numbers and what they mean, and
``index.html``, one self-contained page with the summary, its tables and the figures."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import xarray as xr

from colaprob.diagnostics import geometry, html_page, plots
from colaprob.diagnostics.decomposition import decompose
from colaprob.diagnostics.flow_information import information_curve
from colaprob.diagnostics.token_probes import probes, summarize
from colaprob.protocol import LatentModel, TokenBatch
from colaprob.results import provenance, write_bytes, write_dataset, write_text

DIAGNOSTICS = ("decomposition", "probes", "information_curve", "embedding", "density_slice")


def report(
    model: LatentModel,
    batch: TokenBatch,
    out_dir: str | Path,
    *,
    model_name: str = "",
    token_label: plots.TokenLabel | None = None,
    sequence: int = 0,
    block: int = 0,
    seed: int = 0,
    options: dict[str, dict] | None = None,
    dpi: int = 110,
    progress: bool = True,
) -> dict[str, xr.Dataset]:
    """Run every diagnostic on ``batch`` and write ``out_dir``:

    * ``<name>.nc`` (``h5netcdf``) for ``decomposition``, ``probes``, ``probe_summary``,
      ``information_curve``, ``embedding``, ``density_slice``, each with provenance
      attributes (``model_name``, the diagnostic's options, seed, package versions);
    * ``<name>.png``: the figures (``probes_sequence<k>.png`` for the probed text);
    * ``summary.md``: headline numbers and how to read them;
    * ``index.html``: the summary, its tables and every figure in one self-contained page
      (figures embedded as base64 PNG; open it in any browser, send it as one file).

    ``sequence``, ``block``: the text drawn in the per-token figure and the block of the
    density slice. ``options``: keyword arguments per diagnostic (keys from ``DIAGNOSTICS``),
    for example ``{"probes": {"n_prior": 32}, "embedding": {"methods": ("pca",)}}``.
    ``token_label``: token id -> text for the figures; ``progress``: the diagnostics' progress
    bars. Returns the datasets by name.

    Cost: every prior density is a CNF solve. With the estimators' defaults (exact trace,
    dopri5 at 1e-5) a solve on the embedded model takes about 800 velocity evaluations of
    ``block_size * d = 64`` vector-Jacobian products each -- hours on a CPU for a corpus. For
    a first look pass ``{"solver": cnf.Solver(trace="hutchinson", rtol=1e-3, atol=1e-3)}``
    to ``decomposition``, ``probes`` and ``density_slice`` (unbiased wherever ``log p_psi``
    enters linearly; it adds noise to the density percentiles): 64 held-out texts then took
    40 minutes on one busy CPU core, most of it in the probes.
    """
    unknown = set(options or {}) - set(DIAGNOSTICS)
    if unknown:
        raise ValueError(f"unknown diagnostics in options: {sorted(unknown)}; use {DIAGNOSTICS}")
    options = {name: dict((options or {}).get(name, {})) for name in DIAGNOSTICS}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    results = {
        "decomposition": decompose(model, batch, seed=seed, progress=progress, **options["decomposition"]),
        "probes": probes(model, batch, seed=seed, progress=progress, **options["probes"]),
    }
    results["probe_summary"] = summarize(results["probes"])
    results["information_curve"] = information_curve(model, batch, seed=seed, progress=progress, **options["information_curve"])
    results["embedding"] = geometry.embedding(model, batch, seed=seed, **options["embedding"])
    slice_options = {"sequence": sequence, "block": block} | options["density_slice"]
    results["density_slice"] = geometry.density_slice(model, batch, seed=seed, **slice_options)

    for name, ds in results.items():
        settings = {**ds.attrs, "diagnostic": name, "model": model_name, "options": options.get(name, {})}
        write_dataset(ds.copy().assign_attrs(provenance(settings)), out / f"{name}.nc")

    figures = {
        "decomposition": plots.plot_decomposition(results["decomposition"]),
        f"probes_sequence{sequence}": plots.plot_probes(results["probes"], sequence, token_label=token_label),
        "probe_summary": plots.plot_probe_summary(results["probe_summary"]),
        "information_curve": plots.plot_information_curve(results["information_curve"]),
        "embedding": plots.plot_embedding(results["embedding"], token_label=token_label),
        "density_slice": plots.plot_density_slice(results["density_slice"], token_label=token_label),
    }
    pngs = {}
    for name, fig in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        pngs[name] = buffer.getvalue()
        write_bytes(pngs[name], out / f"{name}.png")

    summary = summary_markdown(results, model_name, list(figures))
    write_text(summary, out / "summary.md")
    title = f"colaprob diagnostics{f' -- {model_name}' if model_name else ''}"
    write_text(html_page.page(summary, pngs, title), out / "index.html")
    return results


def summary_markdown(results: dict[str, xr.Dataset], model_name: str, figures: list[str]) -> str:
    """The headline numbers of ``report``'s results as markdown, each with its reading."""
    dec, pr, sm = results["decomposition"], results["probes"], results["probe_summary"]
    ic, emb, sl = results["information_curve"], results["embedding"], results["density_slice"]
    tokens = float(dec["n_tokens"].sum())
    n_seq = int(dec.attrs["n_sequences"])
    valid = pr["valid"].values
    mean_probe = {name: float(np.mean(pr[name].values[valid])) for name in ("decoder_probe", "posterior_hit", "prior_hit", "generation_prob")}
    count = sm["count"].values
    lines = [
        f"# colaprob diagnostics{f' -- {model_name}' if model_name else ''}",
        "",
        f"{n_seq} sequences, {int(tokens)} counted tokens. Log-likelihoods in nats.",
        "",
        "## Where the bound goes",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| -ELBO | {-float(dec['elbo'].sum()) / tokens:.4f} nats/token |",
        f"| distortion E_q[-log p(x\\|z)] | {float(dec['distortion'].sum()) / tokens:.4f} nats/token |",
        f"| rate KL(q \\|\\| p_psi) | {float(dec['rate'].sum()) / tokens:.4f} nats/token |",
        f"| I_q(X;Z) on the first {dec.attrs['window_blocks']} blocks | {float(dec['mutual_information']):.4f} +- {float(dec['mutual_information_se']):.4f} nats/sequence (cap log N = {math.log(n_seq):.4f}) |",
        f"| KL(q_bar \\|\\| p_psi) on the same window | {float(dec['marginal_kl']):.4f} +- {float(dec['marginal_kl_se']):.4f} nats/sequence |",
        f"| identity residual (window rate - MI - marginal KL) | {float(dec['identity_residual']):.2e} nats |",
        f"| active units | {int(dec['n_active'])} of {dec.sizes['channel']} channels |",
        "",
        _mi_reading(dec),
        "",
        "## Likelihood against generation (per token)",
        "",
        "| probe | mean over tokens |",
        "|---|---|",
        *(f"| {name} | {value:.3f} |" for name, value in mean_probe.items()),
        f"| density percentile of the gold latent (per block) | {float(sm['density_percentile_mean']):.3f} (below 5%: {float(sm['density_percentile_below_5pct']):.1%} of blocks) |",
        "",
        f"Tokens split at the median per-token NLL ({float(sm['nll_threshold']):.3f} nats) and at prior hit >= {float(sm['hit_threshold']):g}:",
        "",
        "| | generated | missed |",
        "|---|---|---|",
        f"| low NLL | {count[0, 0]} | {count[0, 1]} |",
        f"| high NLL | {count[1, 0]} | {count[1, 1]} |",
        "",
        f"{float(sm['high_nll_generated_fraction']):.1%} of the high-NLL tokens are still generated correctly from a "
        f"teacher-forced prior sample, and {float(sm['low_nll_missed_fraction']):.1%} of the low-NLL tokens are not "
        f"(Spearman correlation of NLL and prior hit: {float(sm['spearman_nll_prior_hit']):.2f}). Generation needs prior "
        "mass near the gold latent's decoding region (prior hit); likelihood needs the prior density calibrated at the "
        "gold posterior (density percentile near 0.5, small block KL). The off-diagonal cells count the tokens on which "
        "the two measures disagree.",
        "",
        "## Information along the flow",
        "",
        _flow_reading(ic),
        "",
        "## Geometry",
        "",
        _geometry_reading(emb, sl),
        "",
        "## Files",
        "",
        *(f"- `{name}.png`" for name in figures),
        *(f"- `{name}.nc`" for name in results),
        "- `index.html` (this summary with the figures)",
        "",
    ]
    return "\n".join(lines)


def _mi_reading(dec: xr.Dataset) -> str:
    nested = dec["mutual_information_nested"].values
    cap = dec["log_n_nested"].values
    saturated = nested[-1] > 0.9 * cap[-1]
    return (
        "The MI estimate is capped at log N: "
        + (
            "it sits near the cap, so the posteriors barely overlap and the true I_q(X;Z) may be larger than any corpus "
            "of this size can show."
            if saturated
            else "it stays below the cap, and its values on nested subsets (see the figure) show how far it has converged."
        )
        + " The marginal KL is the part of the rate the prior could still remove by matching the aggregate posterior."
    )


def _flow_reading(ic: xr.Dataset) -> str:
    midpoint = float(ic["midpoint_logsnr"])
    where = (
        f"the one-step denoised estimate has lost half of its accuracy (from the cleanest to the noisiest grid point) "
        f"at logSNR = {midpoint:.2f}"
        if np.isfinite(midpoint)
        else "the one-step denoised estimate does not lose accuracy along the grid"
    )
    return (
        f"Decoding the posterior mean gives token accuracy {float(ic['accuracy_at_mean']):.3f}; {where}. Training draws t "
        f"from {ic.attrs['train_t_distribution']}, whose logSNR median is {-2 * float(ic.attrs['train_loc']) + 0.0:.2f}: "
        "a midpoint far from it means the prior trains mostly where token identity is already decided or already lost."
    )


def _geometry_reading(emb: xr.Dataset, sl: xr.Dataset) -> str:
    parts = []
    if "pca_explained_variance_ratio" in emb:
        r = emb["pca_explained_variance_ratio"].values
        parts.append(f"The first two principal directions of the posterior means explain {r[0]:.0%} and {r[1]:.0%} of their variance.")
    n_tok = sl.sizes["block_token"]
    share = float((sl["n_correct"] == n_tok).mean())
    parts.append(
        f"On the density slice through sequence {sl.attrs['sequence']}, block {sl.attrs['block']}, {share:.0%} of the "
        f"plane decodes the whole block to gold; the gold latent's log-density there is "
        f"{float(sl['gold_point_log_prob']):.2f} against a maximum of {float(sl['log_prob'].max()):.2f} on the slice."
    )
    return " ".join(parts)
