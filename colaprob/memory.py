"""The pre-flight estimate of a run's peak memory, from the model's shapes and the settings.

A run that cannot fit is refused before any work, with the figure and the option that brings
it down, instead of dying in the allocator after minutes (or asking for terabytes). The
estimate adds the largest tensors alive at once, in bytes of float32 (4 each):

* the weights: ``n_params * 4``;
* the decoder stage of one chunk of ``c`` posterior samples (``c = min(chunk, K)``) for a
  batch of ``B`` sequences framed to ``N`` tokens, vocabulary ``V``, VAE width ``D`` and MLP
  width ``F``, ``h`` heads: the logits and their log-sum-exp, ``2 c B N V``, one layer's
  activations ``c B N (3 D + F)`` and its attention scores ``c B h N^2``;
* the prior stage, the CNF over ``R = c B`` rows (Hutchinson: ``R`` times the probes) of the
  2L layout, ``2 L`` positions (``L = N / patch_size``), DiT width ``W``, MLP ratio ``e``,
  ``H`` heads, ``n`` layers: the activations kept for the backward pass, per layer ``A = 2 L
  ((6 + 2 e) W + 2 H 2 L)`` per row, and the batched backward pass of ``v`` vector-Jacobian
  products at once (``v = min(vjp_chunk, VJPs per evaluation)``: ``block_size * d`` for the
  exact trace, the probes for Hutchinson), which holds ``v`` copies of one layer's ``A``:
  ``R (n + v) A``.

The total is an estimate of the order of the peak, not a bound: allocator slack, the
autograd graph's bookkeeping and the framework itself come on top (a few hundred MB), and
tensors freed early can make it smaller. It scales with the settings the way the real peak
does, which is what deciding "fits or not" needs. On the fixture it came to 0.99-1.7 times
the measured growth of the peak resident memory (`tests/test_memory.py`).

``plan`` turns the estimate into settings: from what a run asks for (``Request``) it lowers,
in this order, the vector-Jacobian products per backward pass (no effect on the numbers),
the samples solved together (``--chunk-size``) and the sequences per batch
(``--batch-size``), halving each down to 1, until the estimate fits the budget, and refuses
when one sequence, one sample and one product at a time do not. ``AdaptiveChunk`` is the
net under the estimate: a step that still fails to allocate runs again with half the chunk.
"""

from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

from colaprob.errors import ColaprobError

FLOAT = 4
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Workload:
    """What one model call of a run processes: ``batch`` sequences framed to ``tokens``
    tokens, ``chunk`` posterior samples at a time, ``probes`` Hutchinson probes per solve
    (None: the exact trace), ``vjp_chunk`` vector-Jacobian products per backward pass."""

    batch: int
    tokens: int
    chunk: int
    probes: int | None = None
    vjp_chunk: int = 32


def vjps_per_evaluation(model, probes: int | None) -> int:
    """Vector-Jacobian products of one divergence evaluation: the probes for Hutchinson,
    ``block_size * d`` for the exact trace (None)."""
    return probes if probes is not None else model.dit_config.block_size * model.vae_config.latent_dim


def peak_bytes(model, work: Workload) -> int:
    """The estimated peak memory of ``work`` on ``model`` (see the module docstring)."""
    vae, dit = model.vae_config, model.dit_config
    c, B, N = work.chunk, work.batch, work.tokens
    L2 = 2 * -(-N // vae.patch_size)
    weights = sum(p.numel() for p in model.parameters())
    decoder = 2 * c * B * N * vae.vocab_size + c * B * N * (3 * vae.dim + vae.ffn_dim) + c * B * vae.num_heads * N * N
    rows = c * B * (work.probes or 1)
    per_layer = L2 * ((6 + 2 * dit.expand_ratio) * dit.txt_dim + 2 * dit.heads * L2)
    prior = rows * (dit.num_layers + min(work.vjp_chunk, vjps_per_evaluation(model, work.probes))) * per_layer
    return FLOAT * (weights + max(decoder, prior))


def available_bytes(device) -> int | None:
    """Free memory of ``device``: the GPU's free memory, or the system's MemAvailable (None
    where it cannot be read)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parse_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5T"``, ``"100000"`` (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size such as 8G, 512M or 1000000")
    value = float(match.group(1)) * UNITS[match.group(2).upper()]
    if not 0 < value < 1 << 62:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


@dataclass(frozen=True)
class Request:
    """What a run asks for: ``batch`` sequences per batch (``--batch-size``) framed to at most
    ``tokens`` tokens, ``samples`` posterior samples per sequence (K), at most ``chunk`` of
    them solved together (``--chunk-size``), ``probes`` Hutchinson probes (None: the exact
    trace) and at most ``vjp_chunk`` vector-Jacobian products per backward pass (the
    estimators' ``vjp_chunk``, ``--vjp-chunk``)."""

    batch: int
    tokens: int
    samples: int
    chunk: int
    probes: int | None = None
    vjp_chunk: int = 32

    def __post_init__(self):
        for name in ("batch", "tokens", "samples", "chunk", "vjp_chunk") + (("probes",) if self.probes is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class MemoryPlan:
    """Settings that fit: ``batch`` sequences per batch, ``chunk`` samples solved together,
    ``vjp_chunk`` products per backward pass, and the estimated ``peak_bytes`` with them
    (an estimate of the order of the peak, see the module docstring) under ``budget_bytes``."""

    batch: int
    chunk: int
    vjp_chunk: int
    peak_bytes: int
    budget_bytes: int


def plan(model, request: Request, budget_bytes: int, source: str = "the memory there is") -> MemoryPlan:
    """The largest settings up to ``request`` whose estimated peak fits ``budget_bytes``:
    the VJP chunk is halved first (it changes only how many backward passes an evaluation
    takes), then the sample chunk, then the batch. Raises ``ColaprobError`` when even one
    sequence with one sample and one product at a time would not fit; ``source`` names the
    budget in that sentence (``--max-memory``, the free memory)."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes must be a positive integer, not {budget_bytes!r}")
    vjps = vjps_per_evaluation(model, request.probes)
    work = Workload(request.batch, request.tokens, min(request.chunk, request.samples), request.probes, min(request.vjp_chunk, vjps))
    need = peak_bytes(model, work)
    for field in ("vjp_chunk", "chunk", "batch"):
        while need > budget_bytes and getattr(work, field) > 1:
            work = replace(work, **{field: getattr(work, field) // 2})
            need = peak_bytes(model, work)
    if need > budget_bytes:
        weights = FLOAT * sum(p.numel() for p in model.parameters())
        raise ColaprobError(
            f"one sequence of {request.tokens} tokens with one sample and one vector-Jacobian product at a time would need "
            f"about {human(need)} at its peak (the float32 weights alone {human(weights)}), more than {source} ({human(budget_bytes)}); "
            "shorten the texts (--split), raise --max-memory if the memory is there, or use a machine with more memory."
        )
    return MemoryPlan(batch=work.batch, chunk=work.chunk, vjp_chunk=work.vjp_chunk, peak_bytes=need, budget_bytes=budget_bytes)


def budget(limit: int | None, device) -> int | None:
    """The memory a run may use: ``limit`` (``--max-memory``) when given, else the free
    memory of ``device`` (None where it cannot be read)."""
    return limit if limit is not None else available_bytes(device)


def is_allocation_failure(error: BaseException) -> bool:
    """Whether ``error`` says an allocation failed: ``torch.OutOfMemoryError``, ``MemoryError``
    or a ``RuntimeError`` of the CPU allocator ("can't allocate memory", "not enough memory")."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(s in text for s in ("can't allocate memory", "not enough memory", "out of memory", "could not allocate"))


T = TypeVar("T")


@dataclass
class AdaptiveChunk:
    """A chunk size that halves when a step fails to allocate, and stays halved.

    ``run(step)`` calls ``step(size)``; on an allocation failure (``is_allocation_failure``)
    the memory is released, ``size`` halved and the step run again; when it fails at size 1,
    ``ColaprobError`` says so in one sentence. ``step`` must be safe to run again (it redoes
    the whole chunk: a solve of its samples, or a batch of VJPs). ``what`` names the step in
    that sentence; ``retries`` counts the halvings."""

    size: int
    what: str = "the step"
    retries: int = 0

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive integer, not {self.size!r}")

    def run(self, step: Callable[[int], T]) -> T:
        while True:
            try:
                return step(self.size)
            except (RuntimeError, MemoryError) as error:
                if not is_allocation_failure(error):
                    raise
                if self.size == 1:
                    raise ColaprobError(
                        f"{self.what} ran out of memory even one at a time; shorten the texts, set --max-memory to what is "
                        "really free, or use a machine with more memory."
                    ) from None
            # Outside the except block: the failed attempt's frames and tensors are gone.
            self.size //= 2
            self.retries += 1
            _release_memory()


def _release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
