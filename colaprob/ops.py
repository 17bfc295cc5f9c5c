"""GELU-tanh and softmax with backward passes that batch over many probes at once.

The exact-trace CNF takes hundreds of vector-Jacobian products per evaluation in one batched
backward pass (``torch.autograd.grad(..., is_grads_batched=True)``, torch's legacy vmap). It
has no batching rule for the fused backward kernels ``gelu_backward`` and
``_softmax_backward_data`` (nor for ``masked_fill``): it runs them once per probe and
concatenates. The functions here run the same fused forward kernels and write their backward
(and forward-mode) passes from elementwise ops and sums, which vmap batches, so every probe
goes through one call; values are those of the fused kernels to float rounding.

* GELU-tanh ``y = x/2 (1 + tanh(k (x + 0.044715 x^3)))``, ``k = sqrt(2 / pi)``: with ``T``
  that tanh, ``dy/dx = (1 + T)/2 + x/2 (1 - T^2) k (1 + 3 0.044715 x^2)``, computed once
  per backward call (it depends on ``x`` alone) and multiplied into every probe's gradient;
* softmax ``y``, incoming gradient ``g``: ``dx = y (g - sum(g y))``.

LayerNorm (``native_layer_norm_backward``) stays on torch's per-probe path: written the same
way, its batched backward takes about eight passes over every probe's gradient against the
fused kernel's two, and measured slower at the official widths (bench/scale.py, BENCHMARKS.md).

Both are ``torch.autograd.Function`` in the ``setup_context`` form with ``jvp`` and a
generated vmap rule, so ``torch.func`` (``vmap``, ``vjp``, ``jvp``) runs through them. Where
autograd records nothing (``no_grad``, no input requiring gradients), or the input has fewer
than ``MIN_ELEMENTS`` elements, the fused kernel runs alone: a Python-level function costs
about 0.1-0.2 ms a call with its backward, more than a small op and its per-probe loop (on
the embedded model it made a one-probe Hutchinson evaluation 1.2 times slower).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_K = math.sqrt(2 / math.pi)
_C = 0.044715
MIN_ELEMENTS = 1 << 16


class _GeluTanh(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def _slope(x: Tensor) -> Tensor:
        tanh = torch.tanh(_K * (x + _C * x * x * x))
        return 0.5 * (1 + tanh) + 0.5 * x * (1 - tanh * tanh) * _K * (1 + 3 * _C * x * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * _GeluTanh._slope(x)

    @staticmethod
    def jvp(ctx, dx):
        (x,) = ctx.saved_tensors
        return dx * _GeluTanh._slope(x)


class _Softmax(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.softmax(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))

    @staticmethod
    def jvp(ctx, dx):
        (y,) = ctx.saved_tensors
        return y * (dx - (dx * y).sum(-1, keepdim=True))


def gelu_tanh(x: Tensor) -> Tensor:
    """``F.gelu(x, approximate="tanh")``."""
    return _GeluTanh.apply(x) if _worth_a_function(x) else F.gelu(x, approximate="tanh")


def softmax(x: Tensor) -> Tensor:
    """Softmax over the last dimension."""
    return _Softmax.apply(x) if _worth_a_function(x) else x.softmax(-1)


def _worth_a_function(x: Tensor) -> bool:
    """Whether autograd records a call on ``x`` and ``x`` is large enough to pay for it."""
    return torch.is_grad_enabled() and x.requires_grad and x.numel() >= MIN_ELEMENTS
