"""LayerNorm, GELU-tanh and softmax with backward passes that batch over many probes at once.

The exact-trace CNF takes hundreds of vector-Jacobian products per evaluation in one batched
backward pass (``torch.autograd.grad(..., is_grads_batched=True)``, torch's vmap). torch has
no batching rule there for the fused backward kernels ``native_layer_norm_backward``,
``gelu_backward`` and ``_softmax_backward_data``: it runs them once per probe and
concatenates, which cost a quarter of the exact trace of an official-width DiT. The functions
here run the same fused forward kernels and write their backward (and forward-mode) passes
from elementwise ops and reductions, which vmap batches, so every probe goes through one call.
Values are those of the fused kernels to float rounding.

Formulas, with ``g`` the incoming gradient and reductions over the last dimension (width n):

* LayerNorm ``y = x_hat w + b``, ``x_hat = (x - mean x) r``, ``r = 1 / sqrt(var x + eps)``:
  ``dx = r (gw - mean(gw) - x_hat mean(gw x_hat))``, ``dw = sum(g x_hat)``, ``db = sum(g)``;
* GELU-tanh ``y = x/2 (1 + tanh(k (x + 0.044715 x^3)))``, ``k = sqrt(2 / pi)``: with ``T``
  that tanh, ``dy/dx = (1 + T)/2 + x/2 (1 - T^2) k (1 + 3 0.044715 x^2)``;
* softmax ``y``: ``dx = y (g - sum(g y))``.

All three are ``torch.autograd.Function`` in the ``setup_context`` form with ``jvp`` and a
generated vmap rule, so ``torch.func`` (``vmap``, ``vjp``, ``jvp``) runs through them. Where
autograd records nothing (``no_grad``, no input requiring gradients) the fused kernel runs
alone: a Python-level function costs more than the op itself on a small model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_K = math.sqrt(2 / math.pi)
_C = 0.044715


class _LayerNorm(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        # The fused kernel also returns the mean and 1 / std, which the backward pass reuses.
        return torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        _, mean, r = output
        ctx.mark_non_differentiable(mean, r)
        ctx.save_for_backward(x, weight, mean, r)
        ctx.save_for_forward(x, weight, mean, r)
        ctx.eps = eps

    @staticmethod
    def _normalised(ctx, reuse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x_hat, r, weight)``, from the forward pass's statistics when ``reuse``, else
        recomputed from ``x`` differentiably (a backward pass that builds a graph needs their
        dependence on ``x`` for second derivatives). Once per backward call, not per probe."""
        x, weight, mean, r = ctx.saved_tensors
        if not reuse:
            mean, r = x.mean(-1, keepdim=True), torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + ctx.eps)
        return (x - mean) * r, r, weight

    @staticmethod
    def backward(ctx, g, _, __):
        x_hat, r, weight = _LayerNorm._normalised(ctx, reuse=not torch.is_grad_enabled())
        gw = g if weight is None else g * weight
        dx = (gw - _mean(gw) - x_hat * _mean(gw * x_hat)) * r
        dw = (g * x_hat).sum(_leading(g)) if ctx.needs_input_grad[1] else None
        db = g.sum(_leading(g)) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _):
        x_hat, r, weight = _LayerNorm._normalised(ctx, reuse=False)
        dy = r * (dx - _mean(dx) - x_hat * _mean(dx * x_hat))
        if weight is not None:
            dy = dy * weight
        if dweight is not None:
            dy = dy + x_hat * dweight
        if dbias is not None:
            dy = dy + dbias
        return dy, None, None


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


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dimension of ``x`` [..., n] (``weight``, ``bias``: [n] or None)."""
    if not _recorded(x, weight, bias):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps)[0]


def gelu_tanh(x: Tensor) -> Tensor:
    """``F.gelu(x, approximate="tanh")``."""
    return _GeluTanh.apply(x) if _recorded(x) else F.gelu(x, approximate="tanh")


def softmax(x: Tensor) -> Tensor:
    """Softmax over the last dimension."""
    return _Softmax.apply(x) if _recorded(x) else x.softmax(-1)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension (same parameters and state-dict keys) through
    ``layer_norm``."""

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


def _leading(x: Tensor) -> tuple[int, ...]:
    """All dimensions but the last (a parameter's gradient sums over them)."""
    return tuple(range(x.dim() - 1))


def _mean(x: Tensor) -> Tensor:
    """Mean over the last dimension as a sum (vmap has a batching rule for sum, not mean)."""
    return x.sum(-1, keepdim=True) / x.shape[-1]



def _recorded(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
