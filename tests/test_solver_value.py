"""``cnf.Solver``: one checked value from the command line to ``odeint``."""

import dataclasses
from pathlib import Path

import pytest
import torch

from colaprob.cli import main
from colaprob.estimators import cnf, stepping
from colaprob.estimators.solver import ADAPTIVE_METHODS, FIXED_GRID_METHODS, TOLERANCE_FLOOR

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny-a"


def test_settings_that_cannot_run_are_refused_where_the_value_is_made():
    with pytest.raises(ValueError, match="fixed-grid method and needs steps"):
        cnf.Solver(method="fixed_adams")
    with pytest.raises(ValueError, match="not a torchdiffeq method"):
        cnf.Solver(method="rk45")
    with pytest.raises(ValueError, match="scipy_solver"):
        cnf.Solver(method="scipy_solver")
    with pytest.raises(ValueError, match="rtol is for adaptive methods"):
        cnf.Solver(method="rk4", steps=4, rtol=1e-3)
    with pytest.raises(ValueError, match="steps is for fixed-grid methods"):
        cnf.Solver(steps=4)
    with pytest.raises(ValueError, match="atol"):
        cnf.Solver(atol=TOLERANCE_FLOOR / 2)
    with pytest.raises(ValueError, match="trace"):
        cnf.Solver(trace="diagonal")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cnf.Solver().rtol = 1.0
    assert cnf.Solver().rtol == cnf.Solver().atol == 1e-5  # the library default
    assert cnf.Solver(method="rk4", steps=4).rtol is None  # a grid has no tolerance


def test_keyword_conveniences_build_the_same_value_and_refuse_both_forms():
    solver = cnf.Solver(trace="hutchinson", n_probes=3, method="rk4", steps=4)
    assert cnf.Solver.build(None, trace="hutchinson", n_probes=3, method="rk4", steps=4) == solver
    assert cnf.Solver.build(solver) is solver
    with pytest.raises(TypeError, match="either as solver= or as keywords"):
        cnf.Solver.build(solver, rtol=1e-3)
    with pytest.raises(TypeError, match="unknown solver option 'tolerance'"):
        cnf.Solver.build(None, tolerance=1e-3)


def test_companion_and_tightening_follow_the_method():
    adaptive, grid = cnf.Solver(rtol=1e-4, atol=1e-6), cnf.Solver(method="rk4", steps=8)
    assert (adaptive.companion().rtol, adaptive.companion().atol) == pytest.approx((1e-5, 1e-7))
    assert grid.companion().steps == 16 and grid.tighter().steps == 16
    assert cnf.Solver(rtol=TOLERANCE_FLOOR, atol=TOLERANCE_FLOOR).tighter() is None
    assert set(cnf.Solver(trace="hutchinson").to_attrs()) == {"trace", "solver", "rtol", "atol", "n_probes", "probe"}
    assert set(grid.to_attrs()) == {"trace", "solver", "steps"}


def test_every_registered_method_runs_with_the_settings_it_records():
    velocity = lambda z, t: -z
    z0 = torch.ones(1, 2, dtype=torch.float64)
    for method in ADAPTIVE_METHODS:
        r = cnf.log_prob(velocity, z0, solver=cnf.Solver(method=method, rtol=1e-6, atol=1e-6))
        assert r.settings["solver"] == method and r.settings["rtol"] == 1e-6
    for method in sorted(FIXED_GRID_METHODS):
        r = cnf.log_prob(velocity, z0, solver=cnf.Solver(method=method, steps=16))
        assert r.settings["steps"] == 16 and "rtol" not in r.settings


def test_the_command_line_tolerance_reaches_the_stepper_unchanged(tmp_path, monkeypatch):
    """--rtol / --atol / --method travel as one Solver from the parser to the per-element
    stepper: the main solve at the given tolerances, the error estimate's companion at a
    tenth of them."""
    seen = []
    real = stepping.solve

    def recording(f, y0, **kw):
        seen.append((kw["rtol"], kw["atol"], kw["method"]))
        return real(f, y0, **kw)

    monkeypatch.setattr(stepping, "solve", recording)
    text = tmp_path / "a.txt"
    text.write_text("A list.\n")
    options = ["-K", "1", "--model", str(FIXTURE), "--trace", "hutchinson", "--quiet"]
    code = main(["score", str(text), *options, "--rtol", "3e-3", "--atol", "2e-3", "--method", "bosh3", "-o", str(tmp_path / "s.nc")])
    assert code == 0
    assert {(round(r, 12), round(a, 12), m) for r, a, m in seen} == {(3e-3, 2e-3, "bosh3"), (3e-4, 2e-4, "bosh3")}
    assert main(["score", str(text), "-K", "1", "--method", "rk4", "--steps", "2", "--rtol", "1e-3", "-o", str(tmp_path / "t.nc")]) == 2
