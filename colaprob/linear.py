"""A linear layer whose result for a row does not depend on the other rows of the call.

Both networks use it for every product with their weights. Adaptive step control turns a
last-bit difference of the prior's velocity, or of the posterior's latents it starts from,
into a different step sequence (0.014 nats at ``rtol = 1e-5`` on the embedded model), so a
document's score must not change in its last bits with what else is in its batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

MIN_ROWS = 16


class Linear(nn.Linear):
    """``nn.Linear`` whose result for a row does not depend on how many rows share the call.

    A matrix product of fewer than 16 rows takes other kernels than a larger one, whose
    rounding differs, so a row's last bits would change with its batch-mates; smaller calls
    are zero-padded to 16 rows. Measured bit for bit on CPU (torch 2.13, MKL) for 16 to 2048
    rows at any place in the call, on one thread, and on two at the embedded model's widths;
    on several threads MKL splits products of the official widths (2048 x 8192) with 500 rows
    or more by their size, and the rows' rounding depends on the call again.
    """

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` with calls of fewer than ``MIN_ROWS`` rows zero-padded to it (``Linear``)."""
    n = x[..., 0].numel()
    if n >= MIN_ROWS or n == 0:
        return F.linear(x, weight, bias)
    rows = F.pad(x.reshape(n, x.shape[-1]), (0, 0, 0, MIN_ROWS - n))
    return F.linear(rows, weight, bias)[:n].view(*x.shape[:-1], weight.shape[0])
