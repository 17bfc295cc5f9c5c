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
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

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


def peak_bytes(model, work: Workload) -> int:
    """The estimated peak memory of ``work`` on ``model`` (see the module docstring)."""
    vae, dit = model.vae_config, model.dit_config
    c, B, N = work.chunk, work.batch, work.tokens
    L2 = 2 * -(-N // vae.patch_size)
    weights = sum(p.numel() for p in model.parameters())
    decoder = 2 * c * B * N * vae.vocab_size + c * B * N * (3 * vae.dim + vae.ffn_dim) + c * B * vae.num_heads * N * N
    rows = c * B * (work.probes or 1)
    per_layer = L2 * ((6 + 2 * dit.expand_ratio) * dit.txt_dim + 2 * dit.heads * L2)
    vjps = work.probes if work.probes is not None else dit.block_size * vae.latent_dim
    prior = rows * (dit.num_layers + min(work.vjp_chunk, vjps)) * per_layer
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


def check_fits(model, work: Workload, limit: int | None, device, what: str) -> int:
    """Refuse ``work`` when its estimate exceeds ``limit`` (``--max-memory``) or, without a
    limit, the free memory of ``device``; returns the estimate in bytes."""
    need = peak_bytes(model, work)
    budget = limit if limit is not None else available_bytes(device)
    if budget is not None and need > budget:
        source = "--max-memory" if limit is not None else "the free memory of this machine"
        raise ColaprobError(
            f"{what} would need about {human(need)} at its peak ({work.batch} sequences of {work.tokens} tokens, "
            f"{work.chunk} samples at a time), more than {source} ({human(budget)}); lower --chunk-size or --batch-size, "
            "or shorten the texts (--split), or raise --max-memory if the memory is there."
        )
    return need
