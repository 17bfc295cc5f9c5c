"""The pre-flight memory estimate: it scales with the settings, it is of the order of the
measured peak, and a run over the limit is refused with the figure."""

import subprocess
import sys

import pytest
from cli_support import subprocess_env

import colaprob
from colaprob import memory
from colaprob.errors import ColaprobError

MEASURE = r"""
import sys, torch
torch.set_num_threads(1)
import colaprob
from colaprob import estimators
from colaprob.memory import Workload, peak_bytes

def status(field):  # kB figures of /proc/self/status
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

K, B, words, trace = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = colaprob.load(sys.argv[5]).eval()
batch = model.frame(["word " * words] * B)
options = dict(method="euler", steps=1, trace=trace, seed=0) | ({} if trace == "exact" else {"n_probes": 1})
estimators.elbo(model, batch, 1, chunk_size=1, **options)  # everything but the peak itself
open("/proc/self/clear_refs", "w").write("5")  # the peak resident size starts again from now
before = status("VmRSS")
estimators.elbo(model, batch, K, chunk_size=K, **options)
grown = status("VmHWM") - before
print(peak_bytes(model, Workload(B, batch.ids.shape[1], K, None if trace == "exact" else 1)) / grown)
"""

@pytest.mark.parametrize(
    "settings",
    [("16", "4", "40", "hutchinson"), pytest.param(("4", "2", "40", "exact"), marks=pytest.mark.slow)],  # one trace is enough by default
    ids=["hutchinson", "exact"],
)
def test_estimate_is_of_the_order_of_the_measured_peak(settings, fixture_dirs):
    """Estimate over the growth of the peak resident memory during one ELBO call (a few
    hundred MB here, so the process's own noise is small): measured 0.99 to 1.7 (Linux:
    the peak is reset through /proc/self/clear_refs)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, *settings, str(fixture_dirs[0])], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-2000:]
    ratio = float(done.stdout.split()[-1])
    assert 0.7 < ratio < 3, ratio


def test_estimate_scales_with_the_settings(fixture_dirs):
    model = colaprob.load(fixture_dirs[0])
    weights = 4 * sum(p.numel() for p in model.parameters())
    base = memory.peak_bytes(model, memory.Workload(batch=2, tokens=64, chunk=4)) - weights
    assert memory.peak_bytes(model, memory.Workload(batch=4, tokens=64, chunk=4)) - weights == 2 * base  # rows double
    assert memory.peak_bytes(model, memory.Workload(batch=2, tokens=64, chunk=8)) - weights == 2 * base
    assert memory.peak_bytes(model, memory.Workload(batch=2, tokens=128, chunk=4)) - weights > 2 * base  # attention grows faster


def test_a_run_over_the_limit_is_refused_with_the_figure(fixture_dirs):
    model = colaprob.load(fixture_dirs[0])
    work = memory.Workload(batch=8, tokens=2048, chunk=32)
    with pytest.raises(ColaprobError, match=r"would need about [\d.]+ (GB|TB) at its peak .* more than --max-memory \(1\.0 GB\); lower --chunk-size"):
        memory.check_fits(model, work, memory.parse_size("1G"), "cpu", "scoring")
    assert memory.check_fits(model, memory.Workload(1, 16, 1), memory.parse_size("1G"), "cpu", "scoring") < 1 << 30


@pytest.mark.parametrize("text, size", [("8G", 8 << 30), ("512M", 512 << 20), ("1.5k", 1536), ("100000", 100000), ("2GiB", 2 << 30)])
def test_sizes(text, size):
    assert memory.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1G", "0", "lots", "1e9", "8X"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        memory.parse_size(text)
