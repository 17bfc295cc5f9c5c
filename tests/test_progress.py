"""Progress bars are ``tqdm.auto`` bars and ``TQDM_DISABLE`` turns every one of them off."""

import numpy as np
import pytest
import tqdm.auto
import xarray as xr

from colaprob import progress, runner


@pytest.mark.parametrize(("value", "off"), [(None, False), ("1", True), ("True", True), ("0", False), ("", False)])
def test_tqdm_disable_is_honoured_even_when_bars_are_asked_for(monkeypatch, value, off):
    if value is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", value)
    with progress.bar(range(3), show=True) as shown, progress.bar(range(3), show=False) as hidden:
        assert isinstance(shown, tqdm.auto.tqdm)
        assert shown.disable is off and hidden.disable is True


def test_the_runner_draws_no_bar_under_tqdm_disable(monkeypatch, tmp_path, capsys):
    plan = runner.Plan({"what": "test"}, n_items=4, batch_size=2)
    score = lambda items: xr.Dataset({"x": ("sequence", np.arange(items.start, items.stop, dtype=float))})  # noqa: E731
    monkeypatch.setenv("TQDM_DISABLE", "1")
    runner.run(plan, score, tmp_path / "a.nc", progress=True)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("TQDM_DISABLE")
    runner.run(plan, score, tmp_path / "b.nc", progress=True)
    assert "scoring" in capsys.readouterr().err
