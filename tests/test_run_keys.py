"""Each command's settings are its run key: after a finished run, a change to ANY field of the
command's settings dataclass (the solver's fields included) makes the run refuse the
existing result instead of reading it back. The fields are enumerated from the dataclasses,
so a field added later is covered without touching this file (and fails it until it has a
changed value below)."""

import dataclasses
import json

import pytest

from colaprob.commands import decompose, demo, eval as eval_command, probe, runs, score
from colaprob.errors import ColaprobError
from colaprob.estimators.cnf import Solver

CHEAP = Solver(method="euler", steps=1)
# A valid, different value for each field of every settings dataclass.
CHANGED = {
    "estimator_name": "iwae",
    "samples": 2,
    "max_samples": 64,
    "chunk_size": 7,
    "batch_size": 3,
    "direct": False,
    "target_error": 0.5,
    "seed": 5,
    "per_line": True,
    "jsonl": True,
    "split": True,
    "window_blocks_requested": 1,
    "posterior_samples": 2,
    "prior_samples": 2,
    "task": "lambada",
    "sequences": 3,
    "max_bytes": 50,
    "elbo_samples": 3,
    "diagnostic_samples": 3,
    "cloze_items": 5,
    "cloze_samples": 2,
}

def solver_changes(solver: Solver) -> dict:
    """A different, valid solver for each field, whatever kind of method ``solver`` is."""
    grid, adaptive = dict(method="rk4", steps=2, rtol=None, atol=None), dict(method="dopri5", steps=None, rtol=1e-3, atol=1e-3)
    return {
        "method": dict(method="midpoint" if solver.method == "euler" else "euler") if solver.fixed_grid else dict(method="bosh3"),
        "steps": dict(steps=solver.steps + 1) if solver.fixed_grid else grid,
        "rtol": adaptive if solver.fixed_grid else dict(rtol=solver.rtol * 10),
        "atol": adaptive if solver.fixed_grid else dict(atol=solver.atol * 10),
        "trace": dict(trace="hutchinson" if solver.trace == "exact" else "exact"),
        "n_probes": dict(n_probes=solver.n_probes + 1),
        "probe": dict(probe="gaussian" if solver.probe == "rademacher" else "rademacher"),
        "vjp_chunk": dict(vjp_chunk=solver.vjp_chunk + 1),
        "solver_error": dict(solver_error=not solver.solver_error),
    }


def variants(settings):
    """``(field name, settings with that one field changed)`` for every field."""
    for f in dataclasses.fields(settings):
        if f.name == "solver":
            changes = solver_changes(settings.solver)
            assert {g.name for g in dataclasses.fields(Solver)} == set(changes), "a Solver field has no changed value here"
            for name, change in changes.items():
                yield f"solver.{name}", dataclasses.replace(settings, solver=settings.solver.replace(**change))
        else:
            assert f.name in CHANGED, f"field {f.name} of {type(settings).__qualname__} has no changed value here"
            yield f.name, dataclasses.replace(settings, **{f.name: CHANGED[f.name]})


def test_every_field_changes_the_record_and_only_its_own_entry():
    for settings in (score.Settings(), eval_command.Settings(), decompose.Settings(), probe.Settings(), demo.Settings()):
        base = runs.run_record(settings)
        json.dumps(base)  # a run key is JSON
        for name, changed in variants(settings):
            record = runs.run_record(changed)
            assert record != base, f"{type(settings).__module__}: {name} does not reach the run key"


@pytest.fixture
def single_process():
    from colaprob import distributed

    return distributed.from_environment("cpu")


@pytest.fixture(autouse=True)
def load_once(monkeypatch):
    """The model is loaded (and its weights hashed) once per test, not once per variant."""
    loaded, real = {}, runs.load_model
    monkeypatch.setattr(runs, "load_model", lambda target, device: loaded.setdefault(target.model, real(target, device)))


def test_score_refuses_its_result_when_any_setting_changes(tmp_path, single_process, monkeypatch):
    (tmp_path / "in.txt").write_text("The value.\nA list.\n")
    target = runs.Target(inputs=(tmp_path / "in.txt",), output=tmp_path / "s.nc", progress=False)
    base = score.Settings(estimator_name="elbo", samples=1, chunk_size=1, batch_size=2, solver=CHEAP, per_line=True)
    execute = lambda s, t: score.execute(s, t, single_process)
    first = execute(base, target)
    monkeypatch.setattr(score.Job, "estimate", lambda *a: pytest.fail("a changed setting was computed instead of refused"))
    assert float(execute(base, target)["log_likelihood"].sum()) == float(first["log_likelihood"].sum())  # read back
    for name, changed in variants(base):
        if name == "per_line":  # the only reading that keeps these inputs; --jsonl would refuse them as JSON
            changed = dataclasses.replace(base, per_line=False)
        if name == "max_samples":
            changed = dataclasses.replace(base, estimator_name="iwae", max_samples=2)
        if name == "jsonl":
            continue  # plain text is not JSON: refused on reading, before any key (tested in test_bad_input)
        if name == "target_error":
            changed = dataclasses.replace(base, target_error=0.5, solver=CHEAP.replace(solver_error=True))
        with pytest.raises(ColaprobError, match="different run|other settings"):
            execute(changed, target)


def test_eval_refuses_its_result_when_any_setting_changes(tmp_path, single_process, monkeypatch):
    line = {"id": 0, "prompt": "The value of", "ground_truth": "x", "choices": ["x", "y"]}
    (tmp_path / "cloze.jsonl").write_text(json.dumps(line) + "\n")
    target = runs.Target(inputs=(tmp_path / "cloze.jsonl",), output=tmp_path / "e.nc", progress=False)
    base = eval_command.Settings(samples=1, chunk_size=1, batch_size=1, solver=CHEAP)
    execute = lambda s, t: eval_command.execute(s, t, single_process)
    execute(base, target)
    monkeypatch.setattr(eval_command.Job, "score_batch", lambda *a: pytest.fail("a changed setting was computed instead of refused"))
    for name, changed in variants(base):
        if name == "target_error":  # needs the estimate, which CHEAP does not make
            changed = dataclasses.replace(base, target_error=0.5, solver=CHEAP.replace(solver_error=True))
        with pytest.raises(ColaprobError, match="different run|other settings"):
            execute(changed, target)


@pytest.mark.parametrize("command", [decompose, probe], ids=["decompose", "probe"])
def test_corpus_diagnostics_refuse_their_result_when_any_setting_changes(command, tmp_path, monkeypatch):
    (tmp_path / "in.txt").write_text("The value of x.\nA list is a sequence.\n")
    target = runs.Target(inputs=(tmp_path / "in.txt",), output=tmp_path / "d.nc", progress=False)
    small = dict(samples=1) if command is decompose else dict(posterior_samples=1, prior_samples=1)
    base = command.Settings(**small, batch_size=2, solver=CHEAP, per_line=True)
    command.execute(base, target, "cpu")
    diagnostic = "decompose" if command is decompose else "probes"
    monkeypatch.setattr(f"colaprob.diagnostics.{diagnostic}", lambda *a, **k: pytest.fail("a changed setting was computed instead of refused"))
    for name, changed in variants(base):
        if name in ("jsonl", "per_line"):
            continue  # another reading of a text file: refused when read, or one document too few
        with pytest.raises(ColaprobError, match="different run|other settings"):
            command.execute(changed, target, "cpu")


def test_demo_folder_refuses_other_settings(tmp_path):
    record = runs.run_record(demo.Settings())
    demo.claim_folder(tmp_path, record, overwrite=False)
    demo.claim_folder(tmp_path, record, overwrite=False)  # the same settings resume
    for name, changed in variants(demo.Settings()):
        with pytest.raises(ColaprobError, match="different run|other settings"):
            demo.claim_folder(tmp_path, runs.run_record(changed), overwrite=False)
