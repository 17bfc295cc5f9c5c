"""How a CNF density is solved, as one value: ``Solver``.

Every layer that integrates the prior's flow (the estimators, the diagnostics, the commands)
takes one ``Solver``; the CLI's options are generated from its fields (``colaprob.commands.
options``) and every result records it through ``Solver.to_attrs()``. It is frozen and
checked when made, so a setting that cannot run is refused where it is written, not nine
calls later inside ``torchdiffeq.odeint``.

The methods are torchdiffeq's, by its names, in two kinds:

* adaptive (``dopri5``, ``dopri8``, ``bosh3``, ``fehlberg2``, ``adaptive_heun``): the steps
  are chosen so that the local error stays below ``atol + rtol * |state|``, every
  independent element (a prior block of a draw) its own (``colaprob.estimators.stepping``,
  torchdiffeq's coefficients and step control);
* fixed grid (``euler``, ``midpoint``, ``rk4``, ``heun2``, ``heun3``, and the Adams methods
  on the grid): ``steps`` equal steps from ``t = 0`` to ``1``, by ``torchdiffeq.odeint``.

``scipy_solver`` is refused: it integrates NumPy copies outside torch and cannot take the
per-sample error norm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from colaprob.estimators import _checks

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# Orders of the fixed-grid methods: halving the step divides their error by 2^order.
FIXED_GRID_ORDERS = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4, "explicit_adams": 4, "implicit_adams": 4, "fixed_adams": 4}
FIXED_GRID_METHODS = frozenset(FIXED_GRID_ORDERS)
METHODS = (*ADAPTIVE_METHODS, *sorted(FIXED_GRID_METHODS))
REFUSED_METHODS = {"scipy_solver": "it integrates NumPy copies outside torch and cannot take the per-sample error norm"}
# Below this an adaptive step that meets the tolerance is too small to move t in float64.
TOLERANCE_FLOOR = 1e-12
DEFAULT_TOLERANCE = 1e-5
TRACE_NOTES = {
    "exact": "exact",
    "hutchinson": "hutchinson (unbiased log-det, biased inside log-sum-exp)",
}
PROBE_KINDS = ("rademacher", "gaussian")

# The companion solve that estimates the error: an adaptive method at the tolerances divided
# by this, a fixed grid on twice the steps. Its error is a fraction of the main solve's, so
# their difference is nearly the main solve's error (a looser companion would be cheaper,
# but its error relates to the main one's only through tolerance proportionality, which held
# in too few cases on bench/solver_error.py).
COMPANION_TIGHTENING = 10.0
# Assumed ratio of the main solve's error to the companion's (tolerance proportionality for
# adaptive methods, 2^order for a grid twice as fine), and the safety factor on the estimate:
# 3 is the smallest that bounded >= 95% of sequences and of blocks for dopri5 on both the
# analytic harness and the embedded DiT (bench/solver_error.py's coverage-against-safety
# table; 2 bounded 92-93% on the embedded DiT); larger factors over-report more often.
ADAPTIVE_ERROR_RATIO, SAFETY = 10.0, 3.0
# --target-error tightens a fixed grid no further than this.
MAX_TIGHTENED_STEPS = 4096


def _option(help: str, **cli) -> dict:
    """Field metadata from which ``colaprob.commands.options`` builds the field's CLI option."""
    return {"help": help, **cli}


@dataclass(frozen=True, kw_only=True)
class Solver:
    """The ODE method and the divergence estimator of a CNF solve.

    ``method``: a torchdiffeq method (module docstring). ``rtol`` / ``atol``: the tolerances
    of an adaptive method (default ``1e-5``; not taken by a fixed grid). ``steps``: the steps
    of a fixed-grid method (needed there, refused for an adaptive one). ``trace``: ``"exact"``
    (one-hot probes, ``block_size * d`` VJPs per evaluation) or ``"hutchinson"`` (``n_probes``
    probes of kind ``probe``). ``vjp_chunk``: VJPs per batched backward pass (bounds memory,
    not the numbers). ``solver_error``: also estimate the solver error in nats by a second,
    finer solve on the same probes (``companion``).
    """

    method: str = field(default="dopri5", metadata=_option("ODE solver: adaptive (dopri5, bosh3, ...; --rtol/--atol) or a fixed grid (euler, midpoint, rk4, fixed_adams, ...; needs --steps)", choices=METHODS))
    rtol: float | None = field(default=None, metadata=_option("ODE relative tolerance of an adaptive method", kind="tolerance"))
    atol: float | None = field(default=None, metadata=_option("ODE absolute tolerance of an adaptive method", kind="tolerance"))
    steps: int | None = field(default=None, metadata=_option("steps of a fixed-grid method", kind="positive"))
    trace: str = field(default="exact", metadata=_option("divergence along the flow: exact (block_size*d VJPs per step) or Hutchinson probes", choices=tuple(TRACE_NOTES)))
    n_probes: int = field(default=1, metadata=_option("Hutchinson probes per solve, at most block_size * latent_dim (the exact trace's cost)", kind="positive", flag="--probes"))
    probe: str = field(default="rademacher", metadata=_option("distribution of the Hutchinson probes", choices=PROBE_KINDS))
    vjp_chunk: int = field(default=32, metadata=_option("vector-Jacobian products per batched backward pass; bounds memory, not the numbers", kind="positive"))
    solver_error: bool = field(default=False, metadata={"cli": False})

    def __post_init__(self):
        if self.method in REFUSED_METHODS:
            raise ValueError(f"method {self.method!r} is not supported: {REFUSED_METHODS[self.method]}; use dopri5 or dopri8")
        if self.method not in METHODS:
            raise ValueError(
                f"method {self.method!r} is not a torchdiffeq method colaprob runs; use an adaptive one ({', '.join(ADAPTIVE_METHODS)}) "
                f"with rtol / atol or a fixed grid ({', '.join(sorted(FIXED_GRID_METHODS))}) with steps"
            )
        for name in ("rtol", "atol"):
            if getattr(self, name) is not None:
                _checks.positive_number(name, getattr(self, name), floor=TOLERANCE_FLOOR)
        if self.fixed_grid:
            if self.steps is None:
                raise ValueError(f"method {self.method!r} is a fixed-grid method and needs steps, the number of steps from t = 0 to 1")
            _checks.integer("steps", self.steps, minimum=1)
            for name in ("rtol", "atol"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is for adaptive methods; method {self.method!r} runs on a grid of steps and takes no tolerance")
        else:
            if self.steps is not None:
                raise ValueError(f"steps is for fixed-grid methods; method {self.method!r} is adaptive and takes rtol and atol instead")
            for name in ("rtol", "atol"):
                value = DEFAULT_TOLERANCE if getattr(self, name) is None else getattr(self, name)
                object.__setattr__(self, name, _checks.positive_number(name, value, floor=TOLERANCE_FLOOR))
        if self.trace not in TRACE_NOTES:
            raise ValueError(f"trace must be 'exact' or 'hutchinson', not {self.trace!r}")
        _checks.integer("n_probes", self.n_probes, minimum=1)
        if self.probe not in PROBE_KINDS:
            raise ValueError(f"probe must be 'rademacher' or 'gaussian', not {self.probe!r}")
        _checks.integer("vjp_chunk", self.vjp_chunk, minimum=1)
        if not isinstance(self.solver_error, bool):
            raise TypeError(f"solver_error must be True or False, not {self.solver_error!r}")

    @classmethod
    def build(cls, solver: "Solver | None" = None, **keywords) -> "Solver":
        """``solver``, or one made from the keyword conveniences of the public functions
        (``trace=``, ``method=``, ``rtol=``, ...); both at once, or an unknown keyword, is
        refused. A keyword given as None counts as not given."""
        keywords = {k: v for k, v in keywords.items() if v is not None}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - names)
        if unknown:
            raise TypeError(f"unknown solver option {unknown[0]!r}; the options are {', '.join(sorted(names))}")
        if solver is not None:
            if not isinstance(solver, Solver):
                raise TypeError(f"solver must be a colaprob.estimators.cnf.Solver, not {type(solver).__name__}")
            if keywords:
                raise TypeError(f"give the solver settings either as solver= or as keywords, not both ({', '.join(sorted(keywords))})")
            return solver
        return cls(**keywords)

    def replace(self, **changes) -> "Solver":
        return dataclasses.replace(self, **changes)

    @property
    def fixed_grid(self) -> bool:
        return self.method in FIXED_GRID_METHODS

    @property
    def hutchinson(self) -> bool:
        return self.trace == "hutchinson"

    def companion(self) -> "Solver":
        """The second, finer solve whose difference from this one estimates its error."""
        if self.fixed_grid:
            return self.replace(steps=2 * self.steps, solver_error=False)
        return self.replace(rtol=self.rtol / COMPANION_TIGHTENING, atol=self.atol / COMPANION_TIGHTENING, solver_error=False)

    def tighter(self) -> "Solver | None":
        """The next settings toward a target error: tolerances / 10 (None below the floor,
        where the steps underflow), or twice the steps (None past ``MAX_TIGHTENED_STEPS``)."""
        if self.fixed_grid:
            return self.replace(steps=2 * self.steps) if self.steps < MAX_TIGHTENED_STEPS else None
        rtol, atol = self.rtol / 10, self.atol / 10
        return self.replace(rtol=rtol, atol=atol) if min(rtol, atol) >= TOLERANCE_FLOOR else None

    @property
    def label(self) -> str:
        """``dopri5 rtol 1e-05 atol 1e-05`` or ``rk4 steps 8``."""
        return f"{self.method} steps {self.steps}" if self.fixed_grid else f"{self.method} rtol {self.rtol:g} atol {self.atol:g}"

    def error_ratio(self) -> float:
        """Assumed ratio of this solve's error to its companion's."""
        return 2.0 ** FIXED_GRID_ORDERS[self.method] if self.fixed_grid else ADAPTIVE_ERROR_RATIO

    def describe_error(self) -> str:
        if self.fixed_grid:
            return f"{SAFETY:g} x Richardson estimate from a solve on twice the steps (order {FIXED_GRID_ORDERS[self.method]})"
        return f"{SAFETY:g} x |logp - logp at the tolerances / {COMPANION_TIGHTENING:g}| x {ADAPTIVE_ERROR_RATIO:g} / {ADAPTIVE_ERROR_RATIO - 1:g}"

    def to_attrs(self) -> dict:
        """The settings as a result's attributes (netCDF-safe strings and numbers): ``trace``,
        ``solver`` (the method), ``steps`` or ``rtol`` / ``atol``, ``n_probes`` and ``probe``
        for Hutchinson, and ``solver_error`` (how it was estimated) when it was; not
        ``vjp_chunk``, which groups the same products and changes no number."""
        attrs = {"trace": TRACE_NOTES[self.trace], "solver": self.method}
        attrs |= {"steps": self.steps} if self.fixed_grid else {"rtol": self.rtol, "atol": self.atol}
        if self.hutchinson:
            attrs |= {"n_probes": self.n_probes, "probe": self.probe}
        if self.solver_error:
            attrs["solver_error"] = self.describe_error()
        return attrs

    def to_record(self) -> dict:
        """Every field, for a run key (``colaprob.runner``); ``solver_error`` as
        ``solver_error_estimated``, apart from ``to_attrs()``'s description of the estimate."""
        record = dataclasses.asdict(self)
        record["solver_error_estimated"] = record.pop("solver_error")
        return record
