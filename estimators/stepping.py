"""An adaptive Runge-Kutta solver in which every element of a batch takes its own steps.

A batch of independent ODEs ``dy_e/dt = f_e(t_e, y_e)`` is integrated from ``t = 0`` to
``t = 1``. Each element ``e`` has its own time ``t_e``, step size ``h_e`` and accept / reject
decision, so what one element's solution is does not depend on the others in the batch.
All elements are still evaluated together, in one call ``f(t, y)`` with ``t`` holding every
element's own time; an element that reached ``t = 1`` is frozen (its step is 0) until the
last one arrives.

The method is Dormand-Prince 5(4) (``dopri5``; Dormand & Prince 1980), seven stages, the
last evaluated at the new point (first same as last):

    c  = 0, 1/5, 3/10, 4/5, 8/9, 1, 1
    a2 = 1/5
    a3 = 3/40, 9/40
    a4 = 44/45, -56/15, 32/9
    a5 = 19372/6561, -25360/2187, 64448/6561, -212/729
    a6 = 9017/3168, -355/33, 46732/5247, 49/176, -5103/18656
    a7 = 35/384, 0, 500/1113, 125/192, -2187/6784, 11/84            (= b, the 5th order weights)
    b* = 5179/57600, 0, 7571/16695, 393/640, -92097/339200, 187/2100, 1/40   (4th order)

The local error estimate is ``err = h sum_i (b_i - b*_i) k_i``; scaled per component by
``atol + rtol max(|y|, |y_new|)`` and reduced per element by the caller's ``norm`` (an RMS
over the element's latents beside the largest log-determinant ratio, for instance) it gives
the element's error ratio ``r``. The step is accepted when ``r <= 1``, and the next step is

    h <- h min(10, max(0.2, 0.9 r^(-1/5)))        (no decrease after an accepted step).

The first step follows Hairer, Norsett & Wanner (Solving ODEs I, II.4): ``h0 = 0.01 d0 / d1``
from the norms ``d0`` of ``y0`` and ``d1`` of ``f(0, y0)``, then ``h1 = (0.01 / max(d1, d2))^(1/5)``
with ``d2`` the norm of the change of ``f`` over ``h0``; ``h = min(100 h0, h1)``. The exponent
1/5 is one over the error estimate's order plus one (as SciPy's ``RK45``; ``torchdiffeq``'s
``dopri5`` takes 1/6, so its first trial step differs); the controller is ``torchdiffeq``'s,
so step counts are comparable with it. The last step of every element is cut to end exactly
at ``t = 1``.

A step that no longer moves ``t`` in float64, or a non-finite error estimate, raises
``StepUnderflow``; ``colaprob.estimators.cnf`` turns it into its ``SolverFailure``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

State = tuple[Tensor, ...]

NODES = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
STAGES = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
WEIGHTS = STAGES[-1] + (0.0,)
LOWER_WEIGHTS = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
ERROR_WEIGHTS = tuple(b - b_low for b, b_low in zip(WEIGHTS, LOWER_WEIGHTS))
ORDER = 5
SAFETY, MAX_GROWTH, MIN_GROWTH = 0.9, 10.0, 0.2


class StepUnderflow(ArithmeticError):
    """Some element's step size became too small to move its time, or its error estimate was
    not finite (``finite`` False: the field returned inf or NaN)."""

    def __init__(self, time: float, finite: bool):
        super().__init__(f"step size underflow at t = {time:.6g}" if finite else f"non-finite error estimate at t = {time:.6g}")
        self.time, self.finite = time, finite


def solve(
    f: Callable[[Tensor, State], State],
    y0: State,
    *,
    spread: Callable[[Tensor], State],
    norm: Callable[[State], Tensor],
    rtol: float,
    atol: float,
    done: Tensor | None = None,
) -> tuple[State, Tensor]:
    """Integrate every element from ``t = 0`` to ``t = 1``: ``(y(1), steps)``.

    ``y0``: a tuple of tensors (float64). ``f(t, y)``: ``t`` [*E] float64, each element's own
    time, -> a tuple shaped like ``y``. ``spread(x)``: an element-shaped ``x`` [*E] as one
    tensor per state component, broadcastable against it (how an element's step reaches its
    entries). ``norm(ratio)``: the per-element error norm [*E] of a state-shaped tuple of
    scaled errors. ``done`` [*E] bool: elements with nothing to integrate (held at ``y0``).
    ``steps`` [*E]: the accepted steps of each element.
    """
    shape = norm(tuple(torch.zeros_like(y) for y in y0)).shape
    device = y0[0].device
    done = torch.zeros(shape, dtype=torch.bool, device=device) if done is None else done.clone()
    t = torch.where(done, 1.0, 0.0).to(torch.float64)
    steps = torch.zeros(shape, dtype=torch.long, device=device)
    y = y0
    k_first = f(t, y)
    h = _initial_step(f, t, y, k_first, spread, norm, rtol, atol, done)
    while not bool(done.all()):
        h = torch.where(done, 0.0, torch.minimum(h, 1.0 - t))
        last = ~done & (h >= 1.0 - t)
        ks = [k_first]
        for node, row in zip(NODES[1:], STAGES[1:]):
            y_stage = _combine(y, h, row, ks, spread)
            ks.append(f(t + node * h, y_stage))
        # The last stage is the new point itself: y_stage of row 7 is y_new (its weight is 0).
        y_new = y_stage
        error = _combine(tuple(torch.zeros_like(v) for v in y), h, ERROR_WEIGHTS, ks, spread)
        scale = tuple(atol + rtol * torch.maximum(a.abs(), b.abs()) for a, b in zip(y, y_new))
        ratio = norm(tuple(e / s for e, s in zip(error, scale)))
        accept = ~done & (ratio <= 1)
        t_new = torch.where(last, 1.0, t + h)
        broken = ~done & ~torch.isfinite(ratio)
        if bool(broken.any()):
            raise StepUnderflow(float(t[broken].min()), finite=False)
        stuck = ~done & (t_new <= t)
        if bool(stuck.any()):
            raise StepUnderflow(float(t[stuck].min()), finite=True)
        y = tuple(torch.where(a, n, o) for a, n, o in zip(spread(accept), y_new, y))
        k_first = tuple(torch.where(a, n, o) for a, n, o in zip(spread(accept), ks[-1], k_first))
        t = torch.where(accept, t_new, t)
        steps = steps + accept.long()
        done = done | (accept & last)
        h = torch.where(done, h, _next_step(h, ratio, accept))
    return y, steps


def _combine(y: State, h: Tensor, weights, ks: list[State], spread) -> State:
    """``y + h sum_i w_i k_i`` with each element's own ``h``."""
    hs = spread(h)
    out = []
    for j, (y_j, h_j) in enumerate(zip(y, hs)):
        total = sum((w * k[j] for w, k in zip(weights, ks) if w != 0.0), torch.zeros_like(y_j))
        out.append(y_j + h_j * total)
    return tuple(out)


def _next_step(h: Tensor, ratio: Tensor, accept: Tensor) -> Tensor:
    """The step-size controller (module docstring), per element."""
    growth = SAFETY * ratio.clamp_min(1e-300).pow(-1.0 / ORDER)
    floor = torch.where(accept, 1.0, MIN_GROWTH)
    growth = torch.where(ratio == 0, MAX_GROWTH, torch.clamp(torch.maximum(growth, floor), max=MAX_GROWTH))
    return h * growth


def _initial_step(f, t, y0, f0, spread, norm, rtol, atol, done) -> Tensor:
    """Hairer's first step (module docstring), per element; one evaluation of ``f`` (frozen
    elements are evaluated where they are)."""
    scale = tuple(atol + v.abs() * rtol for v in y0)
    d0 = norm(tuple(v / s for v, s in zip(y0, scale)))
    d1 = norm(tuple(v / s for v, s in zip(f0, scale)))
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    probe = torch.where(done, 0.0, h0)
    y1 = tuple(v + hj * k for v, hj, k in zip(y0, spread(probe), f0))
    f1 = f(t + probe, y1)
    d2 = norm(tuple((a - b) / s for a, b, s in zip(f1, f0, scale))) / h0
    largest = torch.maximum(d1, d2)
    h1 = torch.where(largest <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / largest.clamp_min(1e-300)).pow(1.0 / ORDER))
    return torch.minimum(100 * h0, h1)
