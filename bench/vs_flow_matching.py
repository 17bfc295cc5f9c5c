"""colaprob's CNF density against what people would otherwise use: facebookresearch's
``flow_matching`` (``ODESolver.compute_likelihood``) and a plain torchdiffeq augmented ODE.

The same analytic field (the exact flow-matching velocity of a Gaussian mixture,
``colaprob.testing.GaussianMixture``), the same solver (torchdiffeq dopri5), the same rtol =
atol, the same dtype and the same batch for all three; error against the analytic
log-density. Needs the optional ``flow-matching`` package (``pip install flow-matching``).

* ``colaprob``: ``cnf.log_prob`` (data at t = 0; exact divergence by batched one-hot VJPs;
  Hutchinson with one Rademacher probe).
* ``flow_matching``: its convention is the opposite (noise at t = 0, data at t = 1), so it is
  given ``u(x, s) = -v(x, 1 - s)`` and integrates ``s`` from 1 to 0
  (``time_grid=[1, 0]``, ``step_size=None``, ``exact_divergence=True/False``).
* ``torchdiffeq``: the augmented ODE ``[z, log-det]`` written the usual way: the exact
  divergence by one autograd call per dimension, Hutchinson by one VJP.

The error norms differ and are part of each tool: colaprob controls the error of every
sample separately (the largest per-sample RMS); flow_matching and the plain loop use
torchdiffeq's default, one RMS over the whole batch. Hence the tolerance sweep as well:
error against time at several tolerances, and the cheapest tolerance of each tool that
reaches a given accuracy. Last, a neural field (a Cola DiT's first-block velocity, 64
dimensions) for time only: the cost of the divergence on a network, where batching VJPs
matters.

    python bench/vs_flow_matching.py
    python bench/vs_flow_matching.py --quick
"""

from __future__ import annotations

import math

import torch
from torchdiffeq import odeint

import common
from colaprob.estimators import cnf

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_logp(x: torch.Tensor) -> torch.Tensor:
    return (-0.5 * x.pow(2) - 0.5 * _LOG_2PI).sum(-1)


class Counted:
    """A velocity that counts its calls."""

    def __init__(self, velocity):
        self.velocity, self.calls = velocity, 0

    def __call__(self, z, t):
        self.calls += 1
        return self.velocity(z, t)


def colaprob_logp(velocity, z0, trace, tol):
    r = cnf.log_prob(velocity, z0, 1, trace, tol, tol, seed=0)
    return r.logp, r.nfe


def flow_matching_logp(velocity, z0, trace, tol):
    from flow_matching.solver import ODESolver

    counted = Counted(velocity)

    def reversed_time(x, t):  # flow_matching: noise at s = 0, data at s = 1
        return -counted(x, 1 - t)

    torch.manual_seed(0)  # its Hutchinson probe comes from the global generator
    solver = ODESolver(velocity_model=reversed_time)
    # Its Hutchinson probe is `(randn_like(x) < 0) * 2.0 - 1.0`, in the DEFAULT dtype: with
    # float64 data that fails (Double vs Float), so the default follows the data here.
    default = torch.get_default_dtype()
    torch.set_default_dtype(z0.dtype)
    try:
        _, logp = solver.compute_likelihood(
            x_1=z0,
            log_p0=standard_normal_logp,
            step_size=None,
            method="dopri5",
            atol=tol,
            rtol=tol,
            time_grid=torch.tensor([1.0, 0.0], dtype=torch.float64),
            exact_divergence=trace == "exact",
        )
    finally:
        torch.set_default_dtype(default)
    return logp.detach(), counted.calls


def torchdiffeq_logp(velocity, z0, trace, tol):
    """The augmented ODE as usually written: exact divergence by a loop over dimensions."""
    counted = Counted(velocity)
    g = torch.Generator().manual_seed(0)
    eps = (torch.randint(0, 2, z0.shape, generator=g) * 2 - 1).to(z0.dtype)

    def dynamics(t, state):
        z = state[0]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            v = counted(z, t)
            if trace == "exact":
                div = torch.zeros(z.shape[0], dtype=z.dtype)
                for i in range(z.shape[1]):
                    div = div + torch.autograd.grad(v[:, i].sum(), z, retain_graph=True)[0][:, i]
            else:
                div = (torch.autograd.grad(v, z, eps)[0] * eps).sum(-1)
        return v.detach(), div.detach()

    grid = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        z, delta = odeint(dynamics, (z0, torch.zeros(z0.shape[0], dtype=z0.dtype)), grid, rtol=tol, atol=tol, method="dopri5")
    return standard_normal_logp(z[-1]) + delta[-1], counted.calls


TOOLS = {"colaprob": colaprob_logp, "flow_matching": flow_matching_logp, "torchdiffeq": torchdiffeq_logp}


def run_tools(velocity, z0, reference, trace, tol, repeats):
    """Each tool on the same field and data: {tool: {s, wall, nfe, max_err, rms_err, logp}};
    errors against ``reference`` (None: against colaprob's values)."""
    variants = {name: (lambda f=f: f(velocity, z0, trace, tol)) for name, f in TOOLS.items()}
    timings = common.interleaved(variants, repeats, warmup=True)
    reference = timings["colaprob"].result[0].double() if reference is None else reference
    row = {}
    for name, t in timings.items():
        logp, nfe = t.result
        e = logp.double() - reference
        row[name] = dict(s=t.median, wall=t.wall_median, nfe=nfe, max_err=e.abs().max().item(), rms_err=e.pow(2).mean().sqrt().item())
    return row


def dit_block_field(model):
    """The first block's velocity of a Cola DiT (no history) as a field on [N, block_size * d]."""
    from colaprob.model import T_SCALE

    bs, d = model.block_size, model.latent_dim

    def velocity(z, t):
        v = model.dit.block_velocity(z.reshape(-1, bs, d), (T_SCALE * t).to(z.dtype).expand(z.shape[0], bs), None)
        return v.reshape(z.shape)

    return velocity, bs * d


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 64], help="dimensions D (default 2 8 32 64)")
    p.add_argument("--batch", type=int, default=64, help="samples per solve (default 64)")
    p.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of the main tables (default 1e-5)")
    p.add_argument("--sweep-tols", type=float, nargs="*", default=[1e-3, 1e-4, 1e-5, 1e-6, 1e-7], help="tolerances of the sweep")
    p.add_argument("--sweep-dim", type=int, default=32, help="dimension of the tolerance sweep (default 32)")
    p.add_argument("--targets", type=float, nargs="*", default=[1e-2, 1e-3, 1e-4], help="max errors for the matched-accuracy summary")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--neural", default="auto", help="Cola model whose DiT block velocity is the neural field (tiny, random, path, auto; 'none' to skip)")
    p.add_argument("--neural-batch", type=int, default=16, help="samples of the neural-field table (default 16)")
    p.add_argument("--neural-tol", type=float, default=1e-3, help="rtol = atol of the neural-field table (default 1e-3: the trained DiT needs ~500 evaluations at 1e-5)")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.batch, args.sweep_tols, args.sweep_dim, args.targets = [2, 4], 8, [1e-3], 4, [1e-2]
        args.neural, args.neural_batch, args.tol, args.neural_tol = "random", 2, 1e-2, 1e-2
    import flow_matching  # noqa: F401  (fail early without the optional package)

    common.start(args, "colaprob vs flow_matching vs plain torchdiffeq: CNF log-density of an analytic field")
    dtype = getattr(torch, args.dtype)
    print(f"dopri5, {args.dtype}, batch {args.batch}, Gaussian mixture (3 components, full covariances), flow_matching {flow_matching.__version__}; median CPU seconds of {args.repeats} interleaved repeats after one warm-up")
    print("errors: against the analytic log p(z0), nats; time ratios: the other tool's CPU time / colaprob's (> 1: colaprob faster)")
    print()

    def data(D):
        flow = common.gaussian_mixture(D)
        z0 = flow.sample(args.batch, torch.Generator().manual_seed(1)).to(dtype)
        return flow.velocity, z0, flow.log_prob(z0)

    others = [n for n in TOOLS if n != "colaprob"]
    for trace in ("exact", "hutchinson"):
        print(f"## {trace} divergence, rtol = atol = {args.tol}")
        print()
        err = "max err" if trace == "exact" else "rms err"
        key = "max_err" if trace == "exact" else "rms_err"
        columns = ["D"] + [f"{n} {c}" for n in TOOLS for c in ("CPU s", "nfe", err)] + [f"{n}/colaprob time" for n in others]
        rows = []
        for D in args.dims:
            r = run_tools(*data(D), trace, args.tol, args.repeats)
            rows.append([D] + [r[n][c] for n in TOOLS for c in ("s", "nfe", key)] + [r[n]["s"] / r["colaprob"]["s"] for n in others])
        common.table(columns, rows)

    if args.sweep_tols:
        print(f"## Tolerance sweep, exact divergence, D = {args.sweep_dim}")
        print()
        velocity, z0, reference = data(args.sweep_dim)
        columns = ["rtol = atol"] + [f"{n} {c}" for n in TOOLS for c in ("CPU s", "nfe", "max err")]
        sweep = {tol: run_tools(velocity, z0, reference, "exact", tol, args.repeats) for tol in args.sweep_tols}
        common.table(columns, [[tol] + [r[n][c] for n in TOOLS for c in ("s", "nfe", "max_err")] for tol, r in sweep.items()])
        print("Matched accuracy: for each tool the cheapest tolerance of the sweep whose max error is at most the target.")
        print()
        rows = []
        for target in args.targets:
            best = {}
            for n in TOOLS:
                ok = [(r[n]["s"], tol) for tol, r in sweep.items() if r[n]["max_err"] <= target]
                best[n] = min(ok) if ok else (math.nan, None)
            rows.append([target] + [x for n in TOOLS for x in (best[n][1], best[n][0])] + [best[n][0] / best["colaprob"][0] for n in others])
        common.table(["max err <="] + [f"{n} {c}" for n in TOOLS for c in ("tol", "CPU s")] + [f"{n}/colaprob time" for n in others], rows)

    if args.neural != "none":
        model, label = common.cola_model(args.neural)
        velocity, D = dit_block_field(model)
        g = torch.Generator().manual_seed(2)
        z0 = torch.randn(args.neural_batch, D, generator=g)
        print(f"## Neural field: the first-block velocity of the DiT ({label}; {common.model_size(model)}), D = {D}, float32, batch {args.neural_batch}, rtol = atol = {args.neural_tol}")
        print()
        print("No analytic density: 'max diff' is against colaprob's values (same probes for torchdiffeq; flow_matching draws its own).")
        print()
        columns = ["trace"] + [f"{n} {c}" for n in TOOLS for c in ("CPU s", "nfe")] + [f"{n} max diff" for n in others] + [f"{n}/colaprob time" for n in others]
        rows = []
        for trace in ("exact", "hutchinson"):
            r = run_tools(velocity, z0, None, trace, args.neural_tol, args.repeats)
            rows.append([trace] + [r[n][c] for n in TOOLS for c in ("s", "nfe")] + [r[n]["max_err"] for n in others] + [r[n]["s"] / r["colaprob"]["s"] for n in others])
        common.table(columns, rows)


if __name__ == "__main__":
    main()
    common.finish()
