"""Per-sequence random streams: the numbers an estimate draws for a sequence depend only on
``(seed, stream, sequence key, sample index)``.

So a sequence gets the same posterior draws and probes whatever batch, shard, chunk size or
resumed run it is in, and two computations that use the same stream use the very same draws:
the ELBO decomposition of ``colaprob.diagnostics`` takes the posterior stream of
``colaprob.estimators.elbo``, so it decomposes that ELBO sample for sample.

Streams in use (one number each, so that no two uses collide):
``POSTERIOR`` (``eps`` of ``z = mean + std * eps``), ``PROBE`` (Hutchinson probes),
``PRIOR_SAMPLE`` (the prior sampler's starting noise), ``FLOW_NOISE`` (the information
curve's noise).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from colaprob.protocol import TokenBatch

POSTERIOR, PROBE, PRIOR_SAMPLE, FLOW_NOISE = 0, 1, 2, 3


def sequence_keys(batch: TokenBatch, sequence_ids=None) -> Tensor:
    """[B] non-negative integer keys of the random streams (default: the row index)."""
    keys = torch.arange(len(batch)) if sequence_ids is None else torch.as_tensor(sequence_ids, dtype=torch.long).reshape(-1)
    if len(keys) != len(batch) or (keys < 0).any():
        raise ValueError("sequence_ids must be one non-negative integer per sequence")
    return keys


def draws(seed: int, stream: int, keys: Tensor, indices: range, lengths: Tensor, width: int, kind: str = "gaussian", leading: tuple[int, ...] = ()) -> Tensor:
    """Draws for samples ``indices`` of every sequence: [*leading, len(indices), B, max length,
    width] float64, sequence ``b`` filled for its first ``lengths[b]`` positions (zero after).

    Position-major, so a sequence's draws at its first positions do not depend on its length
    (a prefix-only batch gets the prefix's numbers). ``kind``: ``"gaussian"`` or
    ``"rademacher"``."""
    if kind not in ("gaussian", "rademacher"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', not {kind!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed}")
    out = torch.zeros(*leading, len(indices), len(keys), int(lengths.max()), width, dtype=torch.float64)
    for b, (key, n) in enumerate(zip(keys.tolist(), lengths.tolist())):
        for j, k in enumerate(indices):
            rng = np.random.default_rng([seed, stream, key, k])
            shape = (n, *leading, width)
            x = rng.standard_normal(shape) if kind == "gaussian" else np.where(rng.random(shape) < 0.5, -1.0, 1.0)
            out[..., j, b, :n, :] = torch.from_numpy(np.moveaxis(x, 0, -2))
    return out
