"""Figures of the diagnostics: each function takes the ``xarray.Dataset`` a diagnostic
returned and draws it -- nothing here estimates anything.

Figures are ``matplotlib.figure.Figure`` objects built without ``pyplot`` (no global state,
no GUI backend: ``fig.savefig("x.png")`` renders with Agg). Every function draws into a new
figure, or into the caller's: ``fig=`` a Figure or SubFigure (one panel of a paper's figure,
``figure.subfigures(1, 2)[0]``), and for single-map figures ``ax=`` an Axes; it returns the
(top-level) figure it drew on. ``token_label`` turns a token id into the text shown on axes
and legends (default: the id).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.axes import Axes
from matplotlib.figure import Figure, FigureBase

TokenLabel = Callable[[int], str]

PROBE_STYLE = {
    "decoder_probe": ("decoder probe (mean decodes)", "#4c72b0", "s"),
    "posterior_hit": ("posterior hit", "#55a868", "o"),
    "prior_hit": ("prior hit (greedy generation)", "#c44e52", "^"),
    "generation_prob": ("P(generate gold)", "#8172b2", "v"),
}
KIND_STYLE = {
    "prior_sample": dict(marker="x", s=14, c="black", alpha=0.55, linewidths=0.8, label="prior samples (teacher-forced)"),
    "generated": dict(marker="^", s=12, facecolors="none", edgecolors="#d62728", alpha=0.7, linewidths=0.8, label="generated latents"),
}


VISIBLE_WHITESPACE = str.maketrans({" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"})


def _canvas(fig: FigureBase | None, figsize: tuple[float, float]) -> FigureBase:
    """``fig`` (a caller's Figure or SubFigure), or a new constrained-layout Figure."""
    return Figure(figsize=figsize, layout="constrained") if fig is None else fig


def _root(drawn_on) -> Figure:
    """The top-level Figure of an Axes, SubFigure or Figure (what ``savefig`` is called on)."""
    fig = drawn_on.figure
    while not isinstance(fig, Figure):
        fig = fig.figure
    return fig


def _label(token_label: TokenLabel | None, token: int) -> str:
    """The text shown for a token, whitespace made visible (a space would be a blank tick)."""
    return str(int(token)) if token_label is None else token_label(int(token)).translate(VISIBLE_WHITESPACE)


def plot_decomposition(ds: xr.Dataset, *, fig: FigureBase | None = None) -> Figure:
    """Three panels from ``decompose``: where the bound goes (nats per token), the MI and
    marginal-KL estimates on nested subsets against the ``log n`` cap, and the posterior-mean
    variance per channel against the active-unit threshold."""
    fig = _canvas(fig, (14, 4.4))
    ax_bar, ax_mi, ax_au = fig.subplots(1, 3, width_ratios=[1.1, 1.2, 1.2])
    tokens = float(ds["n_tokens"].sum())
    per_seq = len(ds["sequence"])
    # Corpus totals per token: the window terms are means over sequences, hence * per_seq.
    parts = {
        "distortion\nE[-log p(x|z)]": float(ds["distortion"].sum()) / tokens,
        "mutual information\nI_q(X;Z) (window)": float(ds["mutual_information"]) * per_seq / tokens,
        "prior mismatch\nKL(q_bar||p) (window)": float(ds["marginal_kl"]) * per_seq / tokens,
        "rate beyond\nthe window": float((ds["rate"] - ds["window_rate"]).sum()) / tokens,
    }
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8c8c8c"]
    total = sum(max(v, 0.0) for v in parts.values()) or 1.0
    bottom, label_y = 0.0, -np.inf
    for (name, value), color in zip(parts.items(), colors):
        ax_bar.bar(0, value, bottom=bottom, color=color, width=0.6)
        # Labels stay apart even when a segment is thin: each at least 12% of the bar above
        # the previous one, joined to its segment by a line.
        label_y = max(bottom + value / 2, label_y + 0.12 * total)
        ax_bar.annotate(
            f"{name}: {value:.3f}", (0.3, bottom + value / 2), xytext=(0.5, label_y),
            va="center", fontsize=8, arrowprops=dict(arrowstyle="-", color=color, lw=1),
        )
        bottom += value
    ax_bar.set_xlim(-0.4, 1.9)
    ax_bar.set_ylim(min(0.0, bottom), max(bottom, label_y + 0.05 * total))
    ax_bar.set_xticks([])
    ax_bar.spines[["top", "right", "bottom"]].set_visible(False)
    ax_bar.set_ylabel("nats per token")
    ax_bar.set_title(f"-ELBO = {-float(ds['elbo'].sum()) / tokens:.3f} nats/token")

    # MI lives below log n while the marginal KL can be orders larger: two axes.
    n = ds["subset"].values
    ax_mi.plot(n, ds["log_n_nested"], "k--", lw=1, label="log n (cap on the MI estimate)")
    ax_mi.plot(n, ds["mutual_information_nested"], "o-", color=colors[1], label="I_q(X;Z) estimate")
    ax_mi.set_xscale("log", base=2)
    ax_mi.set_xlabel("sequences in the aggregate posterior (n, nested subsets)")
    ax_mi.set_ylabel("I_q(X;Z), nats per sequence", color=colors[1])
    ax_mi.set_ylim(bottom=0)
    ax_mi.grid(alpha=0.3)
    ax_kl = ax_mi.twinx()
    ax_kl.plot(n, ds["marginal_kl_nested"], "s-", color=colors[2], label="KL(q_bar || p_psi)")
    ax_kl.set_ylabel("KL(q_bar || p_psi), nats per sequence", color=colors[2])
    ax_kl.set_ylim(bottom=0)
    ax_mi.set_title(f"Convergence in n (the first {ds.attrs.get('window_blocks', '?')} blocks of every text)")
    handles = ax_mi.get_legend_handles_labels()[0] + ax_kl.get_legend_handles_labels()[0]
    ax_mi.legend(handles=handles, fontsize=8, loc="lower right", frameon=True)

    var = ds["posterior_mean_variance"].values
    active = ds["active"].values.astype(bool)
    ch = ds["channel"].values
    for sel, color, name in ((active, "#4c72b0", "active"), (~active, "#bbbbbb", "inactive")):
        if sel.any():
            ax_au.bar(ch[sel], var[sel], color=color, label=name)
    ax_au.set_xticks(ch)
    ax_au.axhline(ds.attrs.get("active_threshold", 0.01), color="k", ls="--", lw=1, label="threshold")
    ax_au.set_yscale("log")
    ax_au.set_xlabel("latent channel")
    ax_au.set_ylabel("Var_x E_q[z_c | x]")
    ax_au.set_title(f"Active units: {int(ds['n_active'])} of {len(ch)}")
    ax_au.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    return _root(fig)


def plot_probes(
    ds: xr.Dataset, sequence: int = 0, *, token_label: TokenLabel | None = None, max_tokens: int = 64, fig: FigureBase | None = None
) -> Figure:
    """One text from ``probes``: the four hit probes per token, the token's likelihood cost
    ``-token_elbo`` split into decoder and prior parts, and each block's density percentile."""
    one = ds.sel(sequence=sequence)
    n = min(int(one["valid"].sum()), max_tokens)
    x = np.arange(n)
    labels = [_label(token_label, t) for t in one["token_id"].values[:n]]
    fig = _canvas(fig, (max(10.0, 0.28 * n + 4.0), 7.5))
    ax_hit, ax_nll, ax_pct = fig.subplots(3, 1, sharex=True, height_ratios=[1.3, 1, 0.8])
    for name, (text, color, marker) in PROBE_STYLE.items():
        ax_hit.plot(x, one[name].values[:n], marker=marker, color=color, lw=0.8, ms=4, label=text)
    ax_hit.set_ylim(-0.05, 1.05)
    ax_hit.set_ylabel("probability")
    ax_hit.set_title(f"Sequence {sequence}: does the gold token come out?")
    ax_hit.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)

    decoder = -one["token_log_prob"].values[:n]
    prior = one["block_kl_share"].values[:n]
    ax_nll.bar(x, decoder, color="#4c72b0", label="decoder: -E_q[log p(x_i|z)]")
    ax_nll.bar(x, prior, bottom=np.maximum(decoder, 0), color="#dd8452", label="block KL share")
    ax_nll.set_ylabel("nats")
    ax_nll.set_title("Likelihood cost per token (-token_elbo)")
    ax_nll.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)

    per = int(ds.attrs.get("tokens_per_block", 1))
    pct = one["density_percentile"].values
    for b in range(-(-n // per)):
        ax_pct.plot([b * per - 0.4, min((b + 1) * per, n) - 0.6], [pct[b]] * 2, color="#8172b2", lw=3)
        ax_pct.axvline(b * per - 0.5, color="#dddddd", lw=0.6)
    ax_pct.axhline(0.5, color="k", ls=":", lw=0.8)
    ax_pct.set_ylim(-0.05, 1.05)
    ax_pct.set_ylabel("percentile")
    ax_pct.set_title("Density alignment per block: percentile of the gold latent's log p_psi among prior samples")
    ax_pct.set_xticks(x)
    ax_pct.set_xticklabels(labels, fontsize=8, rotation=90 if max(map(len, labels), default=1) > 2 else 0)
    ax_pct.set_xlim(-0.7, n - 0.3)
    return _root(fig)


def plot_probe_summary(summary: xr.Dataset, *, fig: FigureBase | None = None) -> Figure:
    """From ``token_probes.summarize``: the likelihood-by-generation 2x2 table, and the
    probes' mean per equal-count bin of per-token NLL."""
    fig = _canvas(fig, (12, 4.4))
    ax_tab, ax_bin = fig.subplots(1, 2, width_ratios=[0.8, 1.4])
    count = summary["count"].values
    ax_tab.imshow(count, cmap="Blues", vmin=0)
    for i in range(2):
        for j in range(2):
            frac = count[i, j] / max(1, count[i].sum())
            color = "white" if count[i, j] > 0.6 * count.max() else "black"
            ax_tab.text(j, i, f"{count[i, j]}\n({frac:.0%} of row)", ha="center", va="center", color=color, fontsize=11)
    thr = float(summary["nll_threshold"])
    ax_tab.set_yticks([0, 1], [f"low NLL\n(<= {thr:.2f})", f"high NLL\n(> {thr:.2f})"])
    ax_tab.set_xticks([0, 1], [f"generated\n(prior hit >= {float(summary['hit_threshold']):g})", "missed"])
    ax_tab.set_title(f"Tokens: likelihood vs generation\nhigh-NLL tokens still generated: {float(summary['high_nll_generated_fraction']):.0%}")

    x = summary["nll_center"].values
    for name, (text, color, marker) in PROBE_STYLE.items():
        ax_bin.plot(x, summary[f"{name}_by_nll"].values, marker=marker, color=color, label=text)
    ax_bin.axvline(thr, color="k", ls=":", lw=0.8)
    ax_bin.set_ylim(-0.05, 1.05)
    ax_bin.set_xlabel("per-token NLL, -token_elbo (nats; bin medians, equal-count bins)")
    ax_bin.set_ylabel("mean over tokens in the bin")
    rho = float(summary["spearman_nll_prior_hit"])
    ax_bin.set_title(f"Probes against likelihood (Spearman NLL vs prior hit: {rho:.2f})")
    ax_bin.legend(fontsize=8, frameon=False)
    ax_bin.grid(alpha=0.3)
    return _root(fig)


def plot_information_curve(ds: xr.Dataset, *, fig: FigureBase | None = None, ax: Axes | None = None) -> Figure:
    """From ``information_curve``: token accuracy and cross-entropy of the one-step denoised
    latent against logSNR (clean on the left), with the training density of logSNR."""
    if ax is None:
        ax = _canvas(fig, (9, 4.6)).subplots()
    snr = ds["logsnr"].values
    ax.plot(snr, ds["accuracy"], "o-", color="#4c72b0", ms=4, label="token accuracy of z_hat0")
    ax.axhline(float(ds["accuracy_at_mean"]), color="#4c72b0", ls=":", lw=1, label="accuracy at the posterior mean")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("logSNR(t) = 2 log((1 - t) / t)      (clean  <-  ->  noise)")
    ax.set_ylabel("token accuracy", color="#4c72b0")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ce = ax.twinx()
    ce.plot(snr, ds["cross_entropy"], "s-", color="#c44e52", ms=3, label="cross-entropy (nats/token)")
    ce.set_ylabel("cross-entropy, nats/token", color="#c44e52")
    dens = ax.twinx()
    dens.spines["right"].set_position(("axes", 1.13))
    dens.fill_between(snr, ds["train_density_logsnr"], color="#999999", alpha=0.25, label="training density of logSNR")
    dens.set_ylim(0, 1.1 * float(ds["train_density_logsnr"].max()))
    dens.set_ylabel("training density (per unit logSNR)", color="#666666")
    handles = [h for a in (ax, ce, dens) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8, loc="center left", frameon=True)
    ax.set_title(f"Information curve ({ds.attrs.get('train_t_distribution', '')} training t)")
    return _root(ax)


def plot_embedding(
    ds: xr.Dataset,
    *,
    token_label: TokenLabel | None = None,
    top_k: int = 10,
    max_overlay: int = 1500,
    fig: FigureBase | None = None,
    ax: Axes | None = None,
) -> Figure:
    """From ``geometry.embedding``: one panel per fitted map; posterior means coloured by
    their gold token (the ``top_k`` most frequent; the rest grey) drawn over the prior
    samples and generated latents (at most ``max_overlay`` of each kind, a fixed random
    subset, so they do not bury the data)."""
    methods = [m for m in ("pca", "umap") if m in ds]
    if ax is not None and len(methods) != 1:
        raise ValueError(f"ax holds one map, but the dataset has {len(methods)} ({methods}); pass fig instead")
    axes = [ax] if ax is not None else np.atleast_1d(_canvas(fig, (6.2 * len(methods) + 1.8, 5.6)).subplots(1, len(methods)))
    kind, tok = ds["kind"].values, ds["token_id"].values
    data = kind == "posterior_mean"
    tokens, counts = np.unique(tok[data], return_counts=True)
    top = tokens[np.argsort(-counts)][:top_k]
    palette = [tuple(c) for c in colormaps["tab10"](np.arange(10))]
    rng = np.random.default_rng(0)
    overlay = {}
    for name in KIND_STYLE:
        where = np.flatnonzero(kind == name)
        overlay[name] = rng.choice(where, max_overlay, replace=False) if len(where) > max_overlay else where
    for ax, method in zip(axes, methods):
        xy = ds[method].values
        for name, style in KIND_STYLE.items():
            if len(overlay[name]):
                ax.scatter(*xy[overlay[name]].T, zorder=1, **style)
        other = data & ~np.isin(tok, top)
        ax.scatter(*xy[other].T, s=10, c="#b0b0b0", edgecolors="white", linewidths=0.3, zorder=2, label="other tokens")
        for k, t in enumerate(top):
            sel = data & (tok == t)
            ax.scatter(*xy[sel].T, s=16, color=palette[k % 10], edgecolors="white", linewidths=0.3, zorder=3, label=_label(token_label, t))
        title = method.upper()
        if method == "pca" and "pca_explained_variance_ratio" in ds:
            r = ds["pca_explained_variance_ratio"].values
            title += f" (explained variance {r[0]:.0%}, {r[1]:.0%})"
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="posterior means by token", markerscale=1.5)
    return _root(axes[-1])


def plot_density_slice(ds: xr.Dataset, *, token_label: TokenLabel | None = None, fig: FigureBase | None = None) -> Figure:
    """From ``geometry.density_slice``: the prior log-density on the plane with the region
    where the whole block decodes to gold outlined, and how many of the block's tokens the
    decoder gets right at each point, with each token's gold region outlined."""
    a, b = ds["alpha"].values, ds["beta"].values
    fig = _canvas(fig, (13, 5.2))
    ax_d, ax_r = fig.subplots(1, 2)
    logp = ds["log_prob"].values.T  # rows = beta (y), columns = alpha (x)
    levels = np.linspace(np.nanpercentile(logp, 2), np.nanmax(logp), 14)
    filled = ax_d.contourf(a, b, logp, levels=levels, cmap="viridis", extend="min")
    fig.colorbar(filled, ax=ax_d, label="log p_psi(z^(b) | gold history), nats")
    n_tok = ds.sizes["block_token"]
    ok = ds["n_correct"].values.T
    if ok.min() < n_tok <= ok.max():
        ax_d.contour(a, b, (ok == n_tok).astype(float), levels=[0.5], colors="white", linewidths=1.8)
    proj = ds["prior_projection"].values
    ax_d.scatter(*proj.T, s=10, c="white", edgecolors="black", linewidths=0.4, label="prior samples (projected)")
    for ax in (ax_d, ax_r):
        ax.plot(0, 0, marker="*", ms=15, color="#ff3b30", mec="black", ls="none", label="gold latent")
        ax.set_xlabel("alpha (e1" + (": decoder gradient)" if ds.attrs.get("directions") == "decoder" else ")"))
        ax.set_ylabel("beta (e2)")
        ax.set_xlim(a[0], a[-1])
        ax.set_ylim(b[0], b[-1])
    ax_d.set_title(f"Prior density, sequence {ds.attrs.get('sequence')} block {ds.attrs.get('block')}\n(white line: whole block decodes to gold)")
    ax_d.legend(fontsize=8, loc="lower left")

    cmap = ListedColormap(colormaps["RdYlGn"](np.linspace(0.1, 0.9, n_tok + 1)))
    mesh = ax_r.pcolormesh(a, b, ok, cmap=cmap, norm=BoundaryNorm(np.arange(n_tok + 2) - 0.5, n_tok + 1), shading="nearest")
    fig.colorbar(mesh, ax=ax_r, ticks=np.arange(n_tok + 1), label=f"tokens of the block decoded to gold (of {n_tok})")
    argmax, gold = ds["argmax_token"].values, ds["gold_token"].values
    for j in range(n_tok):
        hit = (argmax[..., j] == gold[j]).T
        if hit.any() and not hit.all():
            ax_r.contour(a, b, hit.astype(float), levels=[0.5], colors="black", linewidths=0.8)
    text = "".join(_label(token_label, t) for t in gold)
    ax_r.set_title(f"Decoder on the same plane: block {text!r}\n(black lines: where each token stops decoding to gold)")
    return _root(fig)


TASK_STYLE = {
    "acc": ("acc (likelihood)", "#4c72b0"),
    "acc_norm": ("acc_norm (likelihood per byte)", "#8fa8d6"),
    "gen_acc": ("acc (generation, official match)", "#c44e52"),
    "disagree": ("likelihood and generation disagree", "#8172b2"),
    "prefers_generation": ("log p prefers own generation", "#55a868"),
}


def plot_task_accuracy(summary: xr.Dataset, ax=None) -> Figure:
    """Per task, accuracy by likelihood beside accuracy by generation (``colaprob.tasks.
    summarise`` of a ``colaprob eval`` result): one bar per quantity with its standard error
    over items; a quantity a task does not define (no choices, no generations) is left out.
    ``ax``: draw into this axes (its figure is returned) instead of a new figure."""
    names = [str(t) for t in summary["task"].values]
    fig = Figure(figsize=(max(5.0, 1.6 * len(names) + 2), 3.6), layout="constrained") if ax is None else ax.figure
    ax = fig.add_subplot() if ax is None else ax
    width = 0.8 / len(TASK_STYLE)
    for j, (key, (label, colour)) in enumerate(TASK_STYLE.items()):
        x = np.arange(len(names)) + (j - (len(TASK_STYLE) - 1) / 2) * width
        mean, se, n = (summary[k].values.astype(float) for k in (key, f"{key}_se", f"{key}_items"))
        shown = n > 0
        ax.bar(x[shown], mean[shown], width, yerr=np.nan_to_num(se[shown]), color=colour, label=label, capsize=2)
    ax.set_xticks(np.arange(len(names)), [f"{t}\n({int(i)} items)" for t, i in zip(names, summary["items"].values)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of items")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("likelihood against generation, per task (± SE over items)", fontsize=9)
    return fig
