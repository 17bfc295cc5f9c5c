"""The pre-flight memory estimate: it scales with the settings, it is of the order of the
measured peak, and a run over the limit is refused with the figure; the plan that lowers the
settings until the estimate fits; the retry with half the chunk after a failed allocation."""

import subprocess
import sys

import pytest
import torch
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


@pytest.mark.parametrize("text, size", [("8G", 8 << 30), ("512M", 512 << 20), ("1.5k", 1536), ("100000", 100000), ("2GiB", 2 << 30)])
def test_sizes(text, size):
    assert memory.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1G", "0", "lots", "1e9", "8X"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        memory.parse_size(text)


# -- the plan ----------------------------------------------------------------------------------


def test_the_plan_keeps_a_request_that_fits_and_caps_it_at_what_a_run_can_use(fixture_dirs):
    model = colaprob.load(fixture_dirs[0])
    vjps = model.block_size * model.latent_dim
    request = memory.Request(batch=4, tokens=64, samples=8, chunk=32, vjp_chunk=10 * vjps)
    chosen = memory.plan(model, request, 1 << 50)
    assert (chosen.batch, chosen.chunk, chosen.vjp_chunk) == (4, 8, vjps)  # K samples, VJPs per evaluation
    assert chosen.peak_bytes == memory.peak_bytes(model, memory.Workload(4, 64, 8, None, vjps))


@pytest.mark.parametrize("trace_probes", [None, 8], ids=["exact", "hutchinson"])
def test_the_plan_lowers_vjps_then_samples_then_batch_until_it_fits(fixture_dirs, trace_probes):
    model = colaprob.load(fixture_dirs[0])
    request = memory.Request(batch=8, tokens=256, samples=16, chunk=16, probes=trace_probes, vjp_chunk=64)
    full = memory.plan(model, request, 1 << 50)
    smallest = memory.peak_bytes(model, memory.Workload(1, 256, 1, trace_probes, 1))
    for fraction in (0.5, 0.1, 0.01, 0.001, 0):
        budget = int(smallest + fraction * (full.peak_bytes - smallest))
        chosen = memory.plan(model, request, budget)
        assert chosen.peak_bytes <= budget and chosen.budget_bytes == budget
        assert chosen.peak_bytes == memory.peak_bytes(model, memory.Workload(chosen.batch, 256, chosen.chunk, trace_probes, chosen.vjp_chunk))
        # Later settings shrink only once the earlier ones are down to 1.
        if chosen.chunk < full.chunk:
            assert chosen.vjp_chunk == 1
        if chosen.batch < full.batch:
            assert chosen.chunk == 1
        # Maximal: the last setting lowered, doubled back, would not fit.
        for name, value in (("batch", chosen.batch), ("chunk", chosen.chunk), ("vjp_chunk", chosen.vjp_chunk)):
            if value < getattr(full, name):
                work = memory.Workload(chosen.batch, 256, chosen.chunk, trace_probes, chosen.vjp_chunk)
                assert memory.peak_bytes(model, memory.replace(work, **{name: 2 * value})) > budget
                break
    assert (chosen.batch, chosen.chunk, chosen.vjp_chunk) == (1, 1, 1)  # at the smallest budget


def test_the_plan_refuses_when_one_sequence_one_sample_one_vjp_cannot_fit(fixture_dirs):
    model = colaprob.load(fixture_dirs[0])
    smallest = memory.peak_bytes(model, memory.Workload(1, 2048, 1, None, 1))
    request = memory.Request(batch=8, tokens=2048, samples=32, chunk=32)
    with pytest.raises(ColaprobError, match=r"^one sequence of 2048 tokens with one sample and one vector-Jacobian product at a time would need about [\d.]+ [KMGT]?B at its peak \(the float32 weights alone [\d.]+ [KMGT]?B\), more than the memory there is \([\d.]+ [KMGT]?B\); [^.]*\.$"):
        memory.plan(model, request, smallest - 1)
    assert memory.plan(model, request, smallest).peak_bytes == smallest


@pytest.mark.parametrize("field", ["batch", "tokens", "samples", "chunk", "vjp_chunk", "probes"])
def test_a_request_names_a_bad_setting(field):
    settings = dict(batch=1, tokens=8, samples=1, chunk=1, vjp_chunk=1, probes=1)
    with pytest.raises(ValueError, match=field):
        memory.Request(**{**settings, field: 0})


# -- the retry ---------------------------------------------------------------------------------


def test_a_step_that_fails_to_allocate_is_retried_with_half_the_chunk():
    """The exact Jacobian diagonal of a small network, its VJPs taken ``size`` at a time by a
    step that fails to allocate above 2: the retry ends at 2 with the full result."""
    from colaprob.estimators.cnf import _jacobian_diagonal

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
    z = torch.randn(3, 6, requires_grad=True)
    v = net(z)
    colours = torch.arange(6)
    expected = torch.stack([torch.autograd.functional.jacobian(net, row).diagonal() for row in z.detach()])
    sizes = []

    def step(size):
        sizes.append(size)
        if size > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} GiB")
        return _jacobian_diagonal(v, z, colours, 6, size)

    chunk = memory.AdaptiveChunk(8, "the exact trace")
    torch.testing.assert_close(chunk.run(step), expected)
    assert sizes == [8, 4, 2] and chunk.size == 2 and chunk.retries == 2
    sizes.clear()
    chunk.run(step)  # the next step starts from the size that worked
    assert sizes == [2]


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")],
    ids=["MemoryError", "cpu-allocator"],
)
def test_every_kind_of_allocation_failure_is_retried(error):
    def step(size):
        if size > 1:
            raise error
        return size

    assert memory.AdaptiveChunk(5).run(step) == 1


def test_a_failure_at_chunk_one_is_one_sentence_and_other_errors_pass_through():
    def no_memory(size):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(ColaprobError, match=r"^the exact trace ran out of memory even one at a time; [^.]*\.$") as caught:
        memory.AdaptiveChunk(4, "the exact trace").run(no_memory)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__

    def broken(size):
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes do not match"):
        memory.AdaptiveChunk(4).run(broken)
    with pytest.raises(ValueError, match="size"):
        memory.AdaptiveChunk(0)


def test_the_budget_is_the_limit_or_the_free_memory():
    assert memory.budget(5 << 30, "cpu") == 5 << 30
    free = memory.budget(None, "cpu")
    assert free is None or 0 < free <= memory.available_bytes("cpu") * 2  # MemAvailable moves between the two reads
