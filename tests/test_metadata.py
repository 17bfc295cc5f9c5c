"""Every file colaprob writes describes itself to CF tools: ``long_name``, ``units`` and a
``description`` on each variable, ``Conventions``/``title``/``source``/``history`` on the file;
netCDF-C (netCDF4) reads what h5netcdf wrote."""

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from cli_support import FAST, run_cli
import test_plots_report  # the report of a tractable model, with cheap settings
from colaprob import metadata, results

CHEAP_CNF = ["--trace", "hutchinson", "--method", "euler", "--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def written(tmp_path_factory, fixture_dirs) -> list[Path]:
    """One file of every kind colaprob writes: score (elbo, iwae, conditional), decompose,
    probe, and the six files of a report folder."""
    out = tmp_path_factory.mktemp("kinds")
    (out / "a.txt").write_text("The quick brown fox.\nA second line of text.\nThird line.\nFour.\n")
    (out / "p.jsonl").write_text('{"prompt": "Hello", "ground_truth": " world"}\n{"prompt": "Say", "ground_truth": " yes"}\n')
    model = ["--model", fixture_dirs[0]]
    commands = {
        "elbo": ["score", out / "a.txt", "--per-line", *model, "--estimator", "elbo", *FAST],
        "iwae": ["score", out / "a.txt", "--per-line", *model, "--estimator", "iwae", *FAST],
        "conditional": ["score", out / "p.jsonl", *model, *FAST],
        "decompose": ["decompose", out / "a.txt", "--per-line", *model, "-K", "2", *CHEAP_CNF],
        "probe": ["probe", out / "a.txt", "--per-line", *model, "--posterior-samples", "2", "--prior-samples", "2", *CHEAP_CNF],
    }
    paths = []
    for name, args in commands.items():
        outcome = run_cli(*args, "-o", out / f"{name}.nc")
        assert outcome.code == 0, outcome
        paths.append(out / f"{name}.nc")
    report_folder, _ = test_plots_report.small_report(tmp_path_factory)
    return paths + sorted(report_folder.glob("*.nc"))


def test_every_variable_of_every_kind_of_file_is_described(written):
    cf_units = pytest.importorskip("cf_units", reason="cf-units (colaprob[test]) checks the unit strings")
    assert len(written) == 11
    for path in written:
        ds = xr.open_dataset(path, engine="h5netcdf")
        assert ds.attrs["Conventions"] == "CF-1.10" and ds.attrs["title"].startswith("colaprob")
        assert "colaprob" in ds.attrs["source"] and "written by colaprob" in ds.attrs["history"]
        for name, variable in ds.variables.items():
            where = f"{path.name}:{name}"
            assert variable.attrs.get("long_name") and variable.attrs.get("description"), where
            assert "not described" not in variable.attrs["description"], f"{where} is missing from metadata.VARIABLES"
            if variable.dtype.kind in "iuf":
                cf_units.Unit(variable.attrs["units"])  # raises on a string UDUNITS does not know
            if name in ds.dims and variable.dtype.kind == "f":
                assert "_FillValue" not in variable.encoding, f"{where}: CF forbids a fill value on a coordinate"


def test_netcdf_c_reads_what_h5netcdf_wrote(written):
    netCDF4 = pytest.importorskip("netCDF4", reason="netCDF4 (colaprob[test]) is the netCDF-C reader")
    for path in written:
        by_h5 = xr.load_dataset(path, engine="h5netcdf")
        by_c = xr.load_dataset(path, engine="netcdf4")
        xr.testing.assert_identical(by_h5, by_c)
        with netCDF4.Dataset(path) as raw:
            assert raw.getncattr("Conventions") == "CF-1.10"
            for name, variable in raw.variables.items():
                assert variable.getncattr("long_name") == by_h5[name].attrs["long_name"], name


def _cf_check(path: Path, report: Path) -> dict:
    runner = pytest.importorskip("compliance_checker.runner", reason="compliance-checker (colaprob[test]) is the CF checker")
    runner.CheckSuite.load_all_available_checkers()
    runner.ComplianceChecker.run_checker(str(path), ["cf:1.10"], 0, "lenient", output_filename=str(report), output_format="json")
    return json.loads(report.read_text())["cf:1.10"]


def test_cf_checker_passes_a_score_file(written, tmp_path):
    result = _cf_check(written[1], tmp_path / "cf.json")
    assert result["high_count"] == result["medium_count"] == result["low_count"] == 0, result
    assert result["scored_points"] == result["possible_points"]


@pytest.mark.slow  # ~5 s a file; the description test above checks the same attributes on every file
def test_cf_checker_passes_every_kind_of_file(written, tmp_path):
    for path in written:
        result = _cf_check(path, tmp_path / f"{path.stem}.json")
        assert result["high_count"] == result["medium_count"] == result["low_count"] == 0, (path.name, result)


def test_unknown_variables_get_an_honest_generic_description():
    ds = xr.Dataset(
        {
            "log_likelihood_flux_capacity": ("sequence", np.zeros(2)),
            "nats_per_token_se": ("sequence", np.zeros(2)),
            "corpus_bits_per_byte": 0.5,
            "choice_accuracy": (("item", "choice"), np.zeros((2, 3)), {"units": "1", "long_name": "mine"}),
        }
    )
    described = metadata.describe(ds)
    unknown = described["log_likelihood_flux_capacity"].attrs
    assert unknown["long_name"] == "log likelihood flux capacity" and "not described" in unknown["description"]
    assert "units" not in unknown  # no guessed units
    assert described["nats_per_token_se"].attrs["units"] == "nat"
    assert described["nats_per_token_se"].attrs["long_name"].startswith("standard error of")
    assert described["corpus_bits_per_byte"].attrs["units"] == "bit/byte"
    assert described["choice_accuracy"].attrs["long_name"] == "mine"  # a writer's own attributes win
    assert ds["nats_per_token_se"].attrs == {}  # the input is not changed


def test_history_gains_a_line_per_write(tmp_path):
    path = results.write_dataset(xr.Dataset({"ess": ("sequence", np.ones(2))}, attrs={"estimator_name": "iwae"}), tmp_path / "a.nc")
    again = results.write_dataset(results.read_dataset(path), tmp_path / "b.nc")
    back = results.read_dataset(again)
    assert back.attrs["title"] == "colaprob iwae"
    assert len(back.attrs["history"].splitlines()) == 2


def test_table_entries_are_one_line_and_units_are_udunits():
    cf_units = pytest.importorskip("cf_units", reason="cf-units (colaprob[test]) checks the unit strings")
    for name, entry in metadata.VARIABLES.items():
        assert "\n" not in entry.description and entry.long_name, name
        if entry.units is not None:
            cf_units.Unit(entry.units)
