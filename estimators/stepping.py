"""Adaptive Runge-Kutta solvers in which every element of a batch takes its own steps.

A batch of independent ODEs ``dy_e/dt = f_e(t_e, y_e)`` is integrated from ``t = 0`` to
``t = 1``. Each element ``e`` has its own time ``t_e``, step size ``h_e`` and accept / reject
decision, so what one element's solution is does not depend on the others in the batch.
All elements are still evaluated together, in one call ``f(t, y)`` with ``t`` holding every
element's own time; an element that reached ``t = 1`` is frozen (its step is 0) until the
last one arrives.

A method is an embedded explicit Runge-Kutta pair (``Tableau``): stages

    k_1 = f(t, y),   k_i = f(t + c_i h, y + h sum_{j<i} a_ij k_j),

the propagated solution ``y_new = y + h sum_i b_i k_i`` (order ``p``) and the local error
estimate ``err = h sum_i e_i k_i``, ``e = b - b*`` with ``b*`` the embedded weights of order
``p - 1``. A pair whose last stage is the new point itself (``c_s = 1``, ``a_s = b``: first
same as last) reuses it as the next step's ``k_1``; for the others the next ``k_1`` is
evaluated at the accepted point. ``TABLEAUS`` holds torchdiffeq's adaptive methods by their
torchdiffeq names, with its coefficients and its propagated solutions:

* ``dopri5``: Dormand & Prince (1980) 5(4), 7 stages, FSAL;
* ``dopri8``: Prince & Dormand (1981) RK8(7)13M, 14 stages, FSAL;
* ``bosh3``: Bogacki & Shampine (1989) 3(2), 4 stages, FSAL;
* ``fehlberg2``: Fehlberg's 1(2) pair propagating its 2nd-order solution, 3 stages;
* ``adaptive_heun``: Heun's method with Euler's as the embedded one, 2(1), 2 stages.

torchdiffeq takes the last stage as the next ``k_1`` for the last two as well, although
their last stage is not the new point; here they cost one evaluation more per step
(``fehlberg2``'s last stage is the 1st-order point, ``adaptive_heun``'s the Euler point).

Scaled per component by ``atol + rtol max(|y|, |y_new|)`` and reduced per element by the
caller's ``norm`` (an RMS over the element's latents beside the largest log-determinant
ratio, for instance), the error gives the element's error ratio ``r``. The step is accepted
when ``r <= 1``, and the next step is

    h <- h min(10, max(0.2, 0.9 r^(-1/p)))        (no decrease after an accepted step).

The first step follows Hairer, Norsett & Wanner (Solving ODEs I, II.4): ``h0 = 0.01 d0 / d1``
from the norms ``d0`` of ``y0`` and ``d1`` of ``f(0, y0)``, then ``h1 = (0.01 / max(d1, d2))^(1/p)``
with ``d2`` the norm of the change of ``f`` over ``h0``; ``h = min(100 h0, h1)``. Controller
and first step are torchdiffeq's (its ``order`` is ``p``), so step counts are comparable with
it. The last step of every element is cut to end exactly at ``t = 1``.

A step that no longer moves ``t`` in float64, or a non-finite error estimate, raises
``StepUnderflow``; ``colaprob.estimators.cnf`` turns it into its ``SolverFailure``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

State = tuple[Tensor, ...]
SAFETY, MAX_GROWTH, MIN_GROWTH = 0.9, 10.0, 0.2


@dataclass(frozen=True)
class Tableau:
    """An embedded explicit Runge-Kutta pair (module docstring). ``nodes`` ``c_2 .. c_s`` and
    ``stages`` the rows ``a_i`` of stages ``2 .. s`` (stage 1 is at ``t``); ``weights`` ``b``
    and ``error_weights`` ``e``, one per stage; ``order`` ``p`` of the propagated solution."""

    nodes: tuple[float, ...]
    stages: tuple[tuple[float, ...], ...]
    weights: tuple[float, ...]
    error_weights: tuple[float, ...]
    order: int

    @property
    def fsal(self) -> bool:
        """The last stage is the new point: it is the next step's first."""
        return self.nodes[-1] == 1.0 and tuple(self.stages[-1]) + (0.0,) == tuple(self.weights)

    def step(self, f: Callable[[Tensor, State], State], t: Tensor, y: State, h: Tensor, k_first: State, spread) -> tuple[State, State, State]:
        """One trial step of every element from ``t`` [*E] by its own ``h`` [*E]:
        ``(y_new, error, k_last)``, ``k_last`` the next step's ``k_1`` if the step is accepted
        and the pair is FSAL (else ``None``: the caller evaluates it)."""
        ks = [k_first]
        for node, row in zip(self.nodes, self.stages):
            y_stage = _combine(y, h, row, ks, spread)
            ks.append(f(t + node * h, y_stage))
        y_new = y_stage if self.fsal else _combine(y, h, self.weights, ks, spread)
        error = _combine(tuple(torch.zeros_like(v) for v in y), h, self.error_weights, ks, spread)
        return y_new, error, ks[-1] if self.fsal else None


def _embedded(nodes, stages, weights, lower_weights, order) -> Tableau:
    """A ``Tableau`` from its two weight rows, ``b`` and ``b*``."""
    error = tuple(b - b_low for b, b_low in zip(weights, lower_weights))
    return Tableau(tuple(nodes), tuple(tuple(row) for row in stages), tuple(weights), error, order)


_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DOPRI8_B = (
    14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825, 181606767 / 758867731, 561292985 / 797845732,
    -1041891430 / 1371343529, 760417239 / 1151165299, 118820643 / 751138087, -528747749 / 2220607170, 1 / 4,
)  # fmt: skip
TABLEAUS = {
    "dopri5": _embedded(
        (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        (
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            _DOPRI5_B,
        ),
        _DOPRI5_B + (0.0,),
        (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
        5,
    ),
    "dopri8": _embedded(
        (1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821, 13 / 20, 1201146811 / 1299019798, 1.0, 1.0, 1.0),
        (
            (1 / 18,),
            (1 / 48, 1 / 16),
            (1 / 32, 0.0, 3 / 32),
            (5 / 16, 0.0, -75 / 64, 75 / 64),
            (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
            (29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000, 23124283 / 1800000000),
            (16016141 / 946692911, 0.0, 0.0, 61564180 / 158732637, 22789713 / 633445777, 545815736 / 2771057229, -180193667 / 1043307555),
            (39632708 / 573591083, 0.0, 0.0, -433636366 / 683701615, -421739975 / 2616292301, 100302831 / 723423059, 790204164 / 839813087, 800635310 / 3783071287),
            (246121993 / 1340847787, 0.0, 0.0, -37695042795 / 15268766246, -309121744 / 1061227803, -12992083 / 490766935, 6005943493 / 2108947869, 393006217 / 1396673457,
             123872331 / 1001029789),
            (-1028468189 / 846180014, 0.0, 0.0, 8478235783 / 508512852, 1311729495 / 1432422823, -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
             -45442868181 / 3398467696, 3065993473 / 597172653),
            (185892177 / 718116043, 0.0, 0.0, -3185094517 / 667107341, -477755414 / 1098053517, -703635378 / 230739211, 5731566787 / 1027545527, 5232866602 / 850066563,
             -4093664535 / 808688257, 3962137247 / 1805957418, 65686358 / 487910083),
            (403863854 / 491063109, 0.0, 0.0, -5068492393 / 434740067, -411421997 / 543043805, 652783627 / 914296604, 11173962825 / 925320556, -13158990841 / 6184727034,
             3936647629 / 1978049680, -160528059 / 685178525, 248638103 / 1413531060, 0.0),
            _DOPRI8_B,
        ),
        _DOPRI8_B + (0.0,),
        (13451932 / 455176623, 0.0, 0.0, 0.0, 0.0, -808719846 / 976000145, 1757004468 / 5645159321, 656045339 / 265891186,
         -3867574721 / 1518517206, 465885868 / 322736535, 53011238 / 667516719, 2 / 45, 0.0, 0.0),
        8,
    ),
    "bosh3": _embedded((1 / 2, 3 / 4, 1.0), ((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)), (2 / 9, 1 / 3, 4 / 9, 0.0), (7 / 24, 1 / 4, 1 / 3, 1 / 8), 3),
    "fehlberg2": _embedded((1 / 2, 1.0), ((1 / 2,), (1 / 256, 255 / 256)), (1 / 512, 255 / 256, 1 / 512), (1 / 256, 255 / 256, 0.0), 2),
    "adaptive_heun": _embedded((1.0,), ((1.0,),), (1 / 2, 1 / 2), (1.0, 0.0), 2),
}


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
    method: str = "dopri5",
) -> tuple[State, Tensor]:
    """Integrate every element from ``t = 0`` to ``t = 1`` by the pair ``TABLEAUS[method]``:
    ``(y(1), steps)``.

    ``y0``: a tuple of tensors (float64). ``f(t, y)``: ``t`` [*E] float64, each element's own
    time, -> a tuple shaped like ``y``. ``spread(x)``: an element-shaped ``x`` [*E] as one
    tensor per state component, broadcastable against it (how an element's step reaches its
    entries). ``norm(ratio)``: the per-element error norm [*E] of a state-shaped tuple of
    scaled errors. ``done`` [*E] bool: elements with nothing to integrate (held at ``y0``).
    ``steps`` [*E]: the accepted steps of each element.
    """
    tableau = TABLEAUS[method]
    shape = norm(tuple(torch.zeros_like(y) for y in y0)).shape
    device = y0[0].device
    done = torch.zeros(shape, dtype=torch.bool, device=device) if done is None else done.clone()
    t = torch.where(done, 1.0, 0.0).to(torch.float64)
    steps = torch.zeros(shape, dtype=torch.long, device=device)
    y = y0
    k_first = f(t, y)
    h = _initial_step(f, t, y, k_first, spread, norm, rtol, atol, done, tableau.order)
    while not bool(done.all()):
        h = torch.where(done, 0.0, torch.minimum(h, 1.0 - t))
        last = ~done & (h >= 1.0 - t)
        y_new, error, k_last = tableau.step(f, t, y, h, k_first, spread)
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
        t = torch.where(accept, t_new, t)
        if k_last is None:  # not FSAL: the derivative at each element's point, moved or not
            k_last = f(t, y)
        k_first = tuple(torch.where(a, n, o) for a, n, o in zip(spread(accept), k_last, k_first))
        steps = steps + accept.long()
        done = done | (accept & last)
        h = torch.where(done, h, _next_step(h, ratio, accept, tableau.order))
    return y, steps


def _combine(y: State, h: Tensor, weights, ks: list[State], spread) -> State:
    """``y + h sum_i w_i k_i`` with each element's own ``h``."""
    hs = spread(h)
    out = []
    for j, (y_j, h_j) in enumerate(zip(y, hs)):
        total = sum((w * k[j] for w, k in zip(weights, ks) if w != 0.0), torch.zeros_like(y_j))
        out.append(y_j + h_j * total)
    return tuple(out)


def _next_step(h: Tensor, ratio: Tensor, accept: Tensor, order: int) -> Tensor:
    """The step-size controller (module docstring), per element."""
    growth = SAFETY * ratio.clamp_min(1e-300).pow(-1.0 / order)
    floor = torch.where(accept, 1.0, MIN_GROWTH)
    growth = torch.where(ratio == 0, MAX_GROWTH, torch.clamp(torch.maximum(growth, floor), max=MAX_GROWTH))
    return h * growth


def _initial_step(f, t, y0, f0, spread, norm, rtol, atol, done, order: int) -> Tensor:
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
    h1 = torch.where(largest <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / largest.clamp_min(1e-300)).pow(1.0 / order))
    return torch.minimum(100 * h0, h1)
