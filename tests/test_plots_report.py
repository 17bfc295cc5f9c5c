"""``report`` writes a complete folder, and every figure can be drawn again from the files
alone -- the plots take data, they do not compute."""

import io
import math

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from cli_support import run_cli
from colaprob.diagnostics import plots, report, summarize_probes
from colaprob.results import read_dataset
from colaprob.testing import BlockMixturePrior, CategoricalDecoder, QuadratureModel, make_batch

CHEAP = {
    "decomposition": {"n_samples": 2},
    "probes": {"n_posterior": 4, "n_prior": 4},
    "information_curve": {"logsnr": np.linspace(6, -6, 7), "n_noise": 2},
    "embedding": {"methods": ("pca",), "n_generated": 2},
    "density_slice": {"resolution": 9, "n_prior": 8},
}


def small_model() -> QuadratureModel:
    """One channel, blocks of two positions, four tokens: a one-channel PCA and a slice plane
    that is the whole block space."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 2, 1)
    prior = BlockMixturePrior(
        torch.zeros(2), torch.zeros(shape), torch.randn(shape, generator=g), 0.5 * torch.randn(shape, generator=g), torch.full(shape, math.log(0.8))
    )
    decoder = CategoricalDecoder(2 * torch.randn(1, 4, 1, generator=g), torch.randn(1, 4, generator=g))
    return QuadratureModel(prior, decoder, patch_size=1, latent_scale=1.2, latent_shift=0.1)


def five_texts():
    return make_batch([torch.tensor(s) for s in ([0, 1], [2, 3], [1, 1], [3, 0], [2, 2])])


_REPORT = {}


def small_report(tmp_path_factory):
    """``(folder, results)`` of one report of ``small_model`` on five texts, made once per test
    session (a report takes tens of seconds on a busy CPU) and shared by the test modules
    that read a report folder."""
    if not _REPORT:
        out = tmp_path_factory.mktemp("report")
        results = report(small_model(), five_texts(), out, model_name="small", token_label="wxyz".__getitem__, sequence=1, options=CHEAP, progress=False)
        _REPORT["written"] = out, results
    return _REPORT["written"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return small_report(tmp_path_factory)


def test_report_writes_results_figures_and_summary(written):
    out, results = written
    names = {"decomposition", "probes", "probe_summary", "information_curve", "embedding", "density_slice"}
    assert set(results) == names
    for name in names:
        ds = read_dataset(out / f"{name}.nc")
        assert ds.attrs["diagnostic"] == name and ds.attrs["model"] == "small" and "torch_version" in ds.attrs
        assert set(ds.data_vars) == set(results[name].data_vars)
    figures = ["decomposition", "probes_sequence1", "probe_summary", "information_curve", "embedding", "density_slice"]
    for name in figures:
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.shape[0] > 300 and image.shape[1] > 500, name
        assert image[..., :3].std() > 0.05, f"{name}.png is nearly blank"
    summary = (out / "summary.md").read_text()
    elbo = -float(results["decomposition"].elbo.sum()) / float(results["decomposition"].n_tokens.sum())
    assert f"| -ELBO | {elbo:.4f} nats/token |" in summary
    assert "high-NLL tokens are still generated" in summary
    for name in figures:
        assert f"`{name}.png`" in summary


def test_figures_draw_from_the_files_alone(written):
    out, _ = written
    load = lambda name: read_dataset(out / f"{name}.nc")  # noqa: E731
    probes = load("probes")
    figures = [
        plots.plot_decomposition(load("decomposition")),
        plots.plot_probes(probes, 3),
        plots.plot_probe_summary(summarize_probes(probes)),
        plots.plot_information_curve(load("information_curve")),
        plots.plot_embedding(load("embedding")),
        plots.plot_density_slice(load("density_slice"), token_label=str),
    ]
    for fig in figures:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=40)
        assert buffer.getvalue().startswith(b"\x89PNG")


def test_report_rejects_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="unknown diagnostics"):
        report(small_model(), make_batch([torch.tensor([0, 1])]), tmp_path, options={"probe": {}})


def test_every_plot_draws_into_a_callers_figure_and_returns_it(written):
    out, _ = written
    load = lambda name: read_dataset(out / f"{name}.nc")  # noqa: E731
    draw = {
        "decomposition": lambda **where: plots.plot_decomposition(load("decomposition"), **where),
        "probes": lambda **where: plots.plot_probes(load("probes"), 1, **where),
        "probe_summary": lambda **where: plots.plot_probe_summary(load("probe_summary"), **where),
        "information_curve": lambda **where: plots.plot_information_curve(load("information_curve"), **where),
        "embedding": lambda **where: plots.plot_embedding(load("embedding"), **where),
        "density_slice": lambda **where: plots.plot_density_slice(load("density_slice"), **where),
    }
    paper = Figure(figsize=(20, 14), layout="constrained")
    panels = paper.subfigures(2, 3).ravel()
    for panel, (name, plot) in zip(panels, draw.items()):
        assert plot(fig=panel) is paper, name
        assert panel.axes, f"{name} drew nothing into its panel"
    assert sum(len(panel.axes) for panel in panels) == len(paper.get_axes())
    buffer = io.BytesIO()
    paper.savefig(buffer, format="png", dpi=20)
    assert buffer.getvalue().startswith(b"\x89PNG")

    # Single-map figures also draw into one Axes.
    for name in ("information_curve", "embedding"):
        own = Figure()
        ax = own.subplots()
        assert draw[name](ax=ax) is own and ax.has_data(), name
    assert draw["information_curve"]() is not draw["information_curve"]()  # no target: a new figure each time


@pytest.mark.parametrize(("option", "name", "magic"), [(["--format", "svg"], "decomposition.svg", b"<?xml"), (["-o", "{out}/fig.pdf"], "fig.pdf", b"%PDF")])
def test_viz_writes_png_pdf_or_svg(written, option, name, magic):
    out, _ = written
    option = [o.format(out=out) for o in option]
    outcome = run_cli("viz", out / "decomposition.nc", "--no-labels", *option)
    assert outcome.code == 0, outcome
    assert (out / name).read_bytes().startswith(magic)
    if name.endswith(".svg"):
        assert b"<svg" in (out / name).read_bytes()
