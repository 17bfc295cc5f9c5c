"""Batch independence: a document's prior density alone and among batch-mates of other lengths.

The embedded DiT (``colaprob.load("tiny")``) on the posterior means of 16 held-out documents
of 1 to 4 prior blocks, solved by a per-block adaptive method (``--method``, default dopri5)
together (padded to the longest, ``lengths`` given) and each of the first ``--alone``
documents alone at its own length, on the same probes. "moved" is the largest change of such a document's
log-density between the two (nats). Per-block step control gives each block its own steps,
so the batch could only move a document through the velocity's float rounding: whether a
row's result depends, in its last bits, on the rows, keys and timesteps beside it.

``--reference PATH`` runs the DiT of another checkout (its ``colaprob/dit.py`` with its
``colaprob/attention.py``, on the same weights) beside this one, so the before and after are
measured in one run.

    python bench/batch_independence.py
    python bench/batch_independence.py --reference /path/to/older/checkout --exact
    python bench/batch_independence.py --method bosh3 dopri8 --tolerances 1e-5
    python bench/batch_independence.py --quick
"""

from __future__ import annotations

import copy
from pathlib import Path

import common
import torch

from colaprob.estimators import cnf
from colaprob.estimators.solver import ADAPTIVE_METHODS
from colaprob.protocol import to_prior_space

BLOCKS = [4, 1, 2, 3, 1, 4, 2, 1, 3, 2, 1, 4, 1, 2, 3, 1]  # prior blocks of the 16 documents


def documents(model, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, lengths)``: [16, L, d] posterior means on the prior's space, padded, and each
    document's latent positions [16]."""
    blocks = BLOCKS[:4] if quick else BLOCKS
    tokens = [b * model.block_size * model.patch_size for b in blocks]
    texts = [common.texts_of_length(model, n, i + 1)[i] for i, n in enumerate(tokens)]
    batch = model.frame(texts)
    with torch.no_grad():
        u = to_prior_space(model, model.posterior(batch).mean)
    return u, -(-batch.lengths // model.patch_size)


def with_dit(model, dit_class):
    """A copy of ``model`` whose DiT is an instance of ``dit_class`` with the same weights."""
    other = copy.deepcopy(model)
    other.dit = dit_class(model.dit.config).eval()
    other.dit.load_state_dict(model.dit.state_dict())
    return other


def measure(model, u, lengths, trace, probes, method, tol, alone: int) -> list:
    solve = lambda x, n, p: cnf.block_causal_log_prob(model.prior_velocity, x, model.block_size, trace, lengths=n, probes=p, method=method, rtol=tol, atol=tol)
    cpu, _, together = common.timed(lambda: solve(u, lengths, probes))
    moved, alone_nfe, alone_cpu = 0.0, 0, 0.0
    for i in range(alone):
        n = int(lengths[i])
        seconds, _, r = common.timed(lambda: solve(u[i : i + 1, :n], None, None if probes is None else probes[:, i : i + 1, :n]))
        moved = max(moved, abs(float(r.logp[0] - together.logp[i])))
        alone_nfe, alone_cpu = alone_nfe + r.nfe, alone_cpu + seconds
    return [together.nfe, f"{cpu:.1f}", alone_nfe, f"{alone_cpu:.1f}", moved]


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--reference", default=None, help="a checkout whose DiT runs beside this one's")
    p.add_argument("--exact", action="store_true", help="the exact trace (64 VJPs per step) instead of one Rademacher probe")
    p.add_argument("--alone", type=int, default=4, help="how many of the documents are also solved alone (default 4)")
    p.add_argument("--tolerances", type=float, nargs="+", default=[1e-5, 1e-7], help="rtol = atol values (default 1e-5 1e-7)")
    p.add_argument("--method", nargs="+", default=["dopri5"], choices=ADAPTIVE_METHODS, help="adaptive methods (default dopri5)")
    args = p.parse_args(argv)
    common.start(args, "Batch independence of the per-block adaptive solvers on the embedded DiT")
    model, name = common.cola_model("random" if args.quick else "tiny")
    u, lengths = documents(model, args.quick)
    trace = "exact" if args.exact else "hutchinson"
    probes = None if args.exact else (torch.randint(0, 2, (1, *u.shape), generator=torch.Generator().manual_seed(0)) * 2 - 1).float()
    models = {"this checkout": model}
    if args.reference:
        models[f"reference ({common.relative(args.reference)})"] = with_dit(model, common.reference_dit(Path(args.reference)))
    tolerances = [1e-3] if args.quick else args.tolerances
    alone = min(args.alone, 2 if args.quick else args.alone, len(lengths))
    print(f"{name}; {len(lengths)} documents of {int(lengths.min())} to {int(lengths.max())} latent positions, {trace} trace; the first {alone} also alone.")
    print()
    rows = [[dit, method, f"{tol:g}", *measure(m, u, lengths, trace, probes, method, tol, alone)] for method in args.method for tol in tolerances for dit, m in models.items()]
    common.table(["DiT", "method", "rtol = atol", "batch nfe", "batch CPU s", "alone nfe (sum)", "alone CPU s (sum)", "moved (nats)"], rows)
    common.finish()


if __name__ == "__main__":
    main()
