"""Results I/O: NetCDF round trips, provenance attributes, atomic writes."""

import numpy as np
import pytest
import xarray as xr

from colaprob import results
from colaprob.errors import ColaprobError
from colaprob.runner import concat_sequences


def scores(n_sequences=3, n_tokens=4) -> xr.Dataset:
    rng = np.random.default_rng(0)
    return xr.Dataset(
        {
            "log_likelihood": ("sequence", rng.normal(size=n_sequences)),
            "token_log_prob": (("sequence", "token"), rng.normal(size=(n_sequences, n_tokens))),
            "n_tokens": ("sequence", np.arange(n_sequences) + 1),
            "text": ("sequence", np.array([f"text {i}" for i in range(n_sequences)], dtype=object)),
        }
    )


def test_round_trip_keeps_dimensions_values_and_provenance(tmp_path):
    ds = scores()
    settings = {"model": "tiny", "K": 8, "rtol": 1e-5, "split": False, "window": None, "solver": {"method": "dopri5"}}
    ds.attrs = results.provenance(settings)
    path = results.write_dataset(ds, tmp_path / "scores.nc")

    back = results.read_dataset(path)
    xr.testing.assert_identical(back.drop_attrs(), ds.drop_attrs())
    for key in ("colaprob_version", "torch_version", "torchdiffeq_version", "xarray_version", "python_version", "created_utc"):
        assert isinstance(back.attrs[key], str) and back.attrs[key]
    assert results.read_settings(back.attrs, settings) == settings


def test_attributes_are_netcdf_types():
    attrs = results.netcdf_attrs({"flag": True, "none": None, "list": [1, 2], "huge": 2**70, "s": "3", "x": 0.5})
    assert attrs == {"flag": "true", "none": "null", "list": "[1, 2]", "huge": "1180591620717411303424", "s": "3", "x": 0.5}


def test_text_with_nul_and_lone_surrogate_is_stored(tmp_path):
    ds = scores(2).assign(text=("sequence", np.array(["a\x00b", "x"], dtype=object)))
    back = results.read_dataset(results.write_dataset(ds, tmp_path / "s.nc"))
    assert list(back.text.values) == ["a\u2400b", "x"]
    # A lone surrogate (from a JSON escape) cannot even enter a dataset once pandas stores strings
    # with pyarrow, so the conversion is checked on its own.
    assert results.storable_text("\ud800x") == "?x"


@pytest.mark.parametrize("failure", [ValueError("disk trouble"), KeyboardInterrupt()])
def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch, failure):
    target = results.write_dataset(scores(), tmp_path / "scores.nc")
    before = target.read_bytes()

    def write_half_then_fail(self, path=None, **kwargs):
        if path is not None:  # encoding into a file; without a path, into memory
            with open(path, "wb") as f:
                f.write(b"half a file")
        raise failure

    monkeypatch.setattr(xr.Dataset, "to_netcdf", write_half_then_fail)
    with pytest.raises(type(failure)):
        results.write_dataset(scores(5), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.nc"]


def test_unwritable_and_unreadable_paths_are_user_errors(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ColaprobError, match="cannot write results"):
        results.check_writable(tmp_path / "a_file" / "scores.nc")
    with pytest.raises(ColaprobError, match="is a folder"):
        results.check_writable(tmp_path)
    (tmp_path / "junk.nc").write_bytes(b"not netcdf")
    with pytest.raises(ColaprobError, match="not a readable NetCDF"):
        results.read_dataset(tmp_path / "junk.nc")
    assert results.check_writable(tmp_path / "new" / "scores.nc").parent.is_dir()


def test_concat_pads_ragged_dimensions_by_type():
    merged = concat_sequences([scores(2, n_tokens=3), scores(1, n_tokens=5)])
    assert merged.sizes == {"sequence": 3, "token": 5}
    assert np.isnan(merged.token_log_prob.values[:2, 3:]).all()
    assert not np.isnan(merged.token_log_prob.values[2]).any()
    assert merged.n_tokens.dtype.kind == "i"


def test_written_files_follow_the_umask(tmp_path):
    import os
    import stat

    from colaprob.results import default_mode, write_text

    old = os.umask(0o022)
    try:
        path = write_text("x", tmp_path / "a.txt")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 == default_mode(0o666)
    finally:
        os.umask(old)


def heavy_tailed_scores(k_true=0.7, n_sequences=3, n_samples=400) -> xr.Dataset:
    """A score-shaped dataset whose log-weights have a Pareto tail of shape ``k_true``
    (w = U^-k, the generalized Pareto quantile), with colaprob's own k-hat."""
    from colaprob.estimators import statistics

    rng = np.random.default_rng(1)
    log_weight = xr.DataArray(-k_true * np.log(rng.uniform(size=(n_sequences, n_samples))), dims=("sequence", "sample"))
    ds = xr.Dataset(
        {
            "log_weight": log_weight,
            "prior_log_prob": 2 * log_weight,
            "khat": statistics.pareto_khat(log_weight),
            "ess": statistics.ess(log_weight),
            "log_likelihood": statistics.log_mean_exp(log_weight),
            "text": ("sequence", np.array(["a", "b", "c"], dtype=object)),
        },
        attrs={"estimator": "IWAE-400"},
    )
    return ds


def test_inference_data_groups_and_pareto_k_agree_with_arviz(tmp_path):
    az = pytest.importorskip("arviz", reason="ArviZ is the optional extra colaprob[arviz]")
    if not hasattr(az, "psislw"):
        pytest.skip(f"ArviZ {az.__version__} has no psislw (colaprob[arviz] asks for ArviZ 0.x)")
    ds = heavy_tailed_scores()
    idata = results.to_inference_data(ds)
    weights = idata.log_likelihood["log_weight"]
    assert weights.dims == ("chain", "draw", "sequence") and weights.shape == (1, 400, 3)
    np.testing.assert_array_equal(weights.values[0].T, ds["log_weight"].values)
    assert idata.sample_stats["prior_log_prob"].dims == ("chain", "draw", "sequence")
    assert idata.sample_stats["khat"].dims == ("sequence",) and "text" in idata.observed_data
    assert idata.log_likelihood.attrs["estimator"] == "IWAE-400"

    _, arviz_k = az.psislw(weights.stack(__sample__=("chain", "draw")))
    np.testing.assert_allclose(arviz_k.values, ds["khat"].values, rtol=1e-10)
    np.testing.assert_allclose(ds["khat"].values, 0.7, atol=0.25)  # the tail it was drawn from

    # Through a file, as a user would share it: az.from_netcdf gives the group back.
    idata.to_netcdf(str(tmp_path / "idata.nc"))
    back = az.from_netcdf(str(tmp_path / "idata.nc"))
    assert back.log_likelihood["log_weight"].size == 1200


def test_inference_data_refuses_what_is_not_a_score_file():
    with pytest.raises(ValueError, match="log_weight"):
        results.to_inference_data(xr.Dataset({"elbo": ("sequence", np.zeros(2))}))
    with pytest.raises(TypeError, match="ds must be"):
        results.to_inference_data({"log_weight": 1})
