"""Every diagnostic end to end on a real Cola checkpoint: the embedded model when it is
built, else the official-format fixture (random weights). Cheap solver settings: this checks
that everything runs and draws, not the numbers (the tractable-model tests do that)."""

import matplotlib.image
import numpy as np
import pytest

import colaprob
from colaprob.diagnostics import report
from colaprob.errors import ColaprobError
from colaprob.estimators import cnf

# One Hutchinson probe and four RK4 steps per density, four Euler steps per sample.
FAST = {"solver": cnf.Solver(trace="hutchinson", method="rk4", steps=4)}
FAST_SAMPLER = cnf.Solver(method="euler", steps=4)
OPTIONS = {
    "decomposition": {"n_samples": 2, **FAST},
    "probes": {"n_posterior": 4, "n_prior": 4, "sampler": FAST_SAMPLER, **FAST},
    "information_curve": {"logsnr": np.linspace(8, -8, 9), "n_noise": 1},
    "embedding": {"methods": ("pca",), "n_prior": 1, "n_generated": 2, "sampler": FAST_SAMPLER},
    "density_slice": {"resolution": 9, "n_prior": 8, "sampler": FAST_SAMPLER, **FAST},
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the value of x.",
    "A list is a mutable sequence.",
    "Numbers and words.",
]


@pytest.fixture(scope="module")
def named_model(fixture_dirs):
    try:
        return "tiny", colaprob.load("tiny")
    except ColaprobError:  # the embedded model is not built yet
        return "official-tiny-a", colaprob.load(fixture_dirs[0])


def test_every_diagnostic_runs_and_draws(named_model, tmp_path):
    name, model = named_model
    results = report(
        model,
        model.frame(TEXTS),
        tmp_path,
        model_name=name,
        token_label=lambda i: model.tokenizer.decode([i]),
        block=1,
        options=OPTIONS,
    )

    dec = results["decomposition"]
    assert abs(float(dec.identity_residual)) < 1e-6 * max(1.0, abs(float(dec.window_rate_mean)))
    assert float(dec.mutual_information) <= np.log(len(TEXTS)) + 1e-9
    assert np.isfinite(dec.elbo).all()
    probes = results["probes"]
    for var in ("decoder_probe", "posterior_hit", "prior_hit", "generation_prob", "density_percentile"):
        values = probes[var].values[~np.isnan(probes[var].values)]
        assert values.size and ((values >= 0) & (values <= 1)).all(), var
    assert np.isfinite(results["density_slice"].log_prob).all()
    assert np.isfinite(results["embedding"].pca).all()
    for png in sorted(tmp_path.glob("*.png")):
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 300 and image[..., :3].std() > 0.05, png.name
    assert len(list(tmp_path.glob("*.png"))) == 6



def test_umap_embeds_the_posterior_means_of_a_cola_checkpoint(named_model):
    pytest.importorskip("umap", reason="UMAP is the optional extra colaprob[umap]")
    from colaprob.diagnostics import geometry

    _, model = named_model
    ds = geometry.embedding(model, model.frame(TEXTS), methods=("umap",), n_prior=1, n_generated=2, sampler=FAST_SAMPLER)
    assert np.isfinite(ds.umap).all() and ds.umap.shape[-1] == 2
