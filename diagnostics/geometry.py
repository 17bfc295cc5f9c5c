"""What the latent space looks like: 2-D embeddings of latents, and a slice of the prior's
density through a gold latent with the decoder's decision regions.

``embedding``: posterior means of every valid latent position (one point each, labelled by
the gold token of its first token), teacher-forced prior samples of the same positions and
freely generated latents are placed in the same 2-D maps -- PCA (the default) and, with the
extra ``colaprob[umap]`` (umap-learn), UMAP -- fitted on the posterior means only, then
applied to the others, so the maps show where prior mass lands relative to the data.

``density_slice``: for one block ``b`` of one text, the plane ``u(alpha, beta) = u0 + alpha
e1 + beta e2`` through the gold latent ``u0`` (scaled space, block ``b`` only; other blocks stay
at the posterior mean), with ``log p_psi(u^(b) | u0^(<b))`` by the CNF and the decoder's
argmax tokens at every grid point.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
import xarray as xr

from colaprob.diagnostics._latent import (
    decode_gold,
    generated_latents,
    prior_block_log_prob,
    prior_samples,
)
from colaprob.estimators import cnf
from colaprob.estimators.layout import LatentLayout
from colaprob.protocol import LatentModel, TokenBatch, from_prior_space, to_prior_space

KINDS = ("posterior_mean", "prior_sample", "generated")
METHODS = ("pca", "umap")
UMAP_MISSING = "the UMAP embedding needs umap-learn, the optional extra: pip install 'colaprob[umap]'"


def embedding(
    model: LatentModel,
    batch: TokenBatch,
    *,
    n_prior: int = 1,
    n_generated: int = 4,
    methods: tuple[str, ...] = ("pca",),
    umap_options: dict | None = None,
    seed: int = 0,
    sampler: cnf.Solver = cnf.SAMPLER,
) -> xr.Dataset:
    """2-D maps of posterior means, teacher-forced prior samples and generated latents.

    Points (dimension ``point``) are single latent positions (``d`` channels, posterior
    space). ``n_prior`` teacher-forced prior samples per sequence (every block from
    ``p_psi(. | gold history)``); ``n_generated`` freely generated sequences as long as the
    longest text. ``methods``: any of ``"pca"`` (default), ``"umap"`` (the extra ``colaprob[umap]``,
    imported only here; ``umap_options`` go to ``umap.UMAP``). ``sampler``: the solver of the
    prior draws (``cnf.Solver``; default 16 Euler steps as in Cola generation).

    Returns ``kind`` (one of ``KINDS``), ``token_id`` (gold token of the position's first
    token; for generated latents the decoder's argmax), ``decoded_id`` (argmax token the
    decoder reads at the point), ``sequence``, ``position``; ``<method>`` over ``(point,
    component)`` for each method; ``pca_explained_variance_ratio`` over ``component``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty tuple of {METHODS}, got {methods!r}")
    if "umap" in methods and importlib.util.find_spec("umap") is None:
        raise ImportError(UMAP_MISSING)
    with torch.no_grad():
        q = model.posterior(batch)
        mean = q.mean
        valid = LatentLayout.of(model, batch).block_mask().repeat_interleave(model.block_size, -1)
        first_token = batch.ids[:, :: model.patch_size]
        z_prior = prior_samples(model, mean, n_prior, seed=seed, sampler=sampler)
        z_gen = generated_latents(model, n_generated, mean.shape[-2], dtype=mean.dtype, seed=seed, sampler=sampler)
        decoded = [_decoded_first_tokens(model, z, batch) for z in (mean, z_prior)]
        # The decoder reads shapes and lengths from a batch: the longest text's row stands in.
        gen_batch = batch.select([int(torch.argmax(batch.lengths))] * n_generated)
        gen_decoded = _decoded_first_tokens(model, z_gen, gen_batch)

    seq, pos = torch.nonzero(valid, as_tuple=True)
    groups = [("posterior_mean", mean[None], first_token[None], decoded[0][None], seq, pos)]
    groups.append(("prior_sample", z_prior, first_token.expand(n_prior, -1, -1), decoded[1], seq, pos))
    gen_seq, gen_pos = torch.nonzero(torch.ones(z_gen.shape[:2], dtype=torch.bool), as_tuple=True)
    groups.append(("generated", z_gen[None], gen_decoded[None], gen_decoded[None], gen_seq, gen_pos))
    columns = {"kind": [], "token_id": [], "decoded_id": [], "sequence": [], "position": [], "z": []}
    for kind, z, tok, dec, s, p in groups:
        for k in range(z.shape[0]):
            columns["kind"] += [kind] * len(s)
            columns["token_id"].append(tok[k][s, p].numpy())
            columns["decoded_id"].append(dec[k][s, p].numpy())
            columns["sequence"].append(s.numpy())
            columns["position"].append(p.numpy())
            columns["z"].append(z[k][s, p].double().numpy())
    x = np.concatenate(columns.pop("z"))
    fit = np.array(columns["kind"]) == "posterior_mean"
    data = {name: ("point", np.concatenate(v) if name != "kind" else np.array(v)) for name, v in columns.items()}
    for method in methods:
        coords, extra = _embed(method, x, fit, seed, umap_options or {})
        data[method] = (("point", "component"), coords)
        data.update(extra)
    ds = xr.Dataset(data, coords={"point": np.arange(len(x)), "component": [0, 1]})
    ds.attrs.update(
        space="posterior space, one point per latent position",
        fitted_on="posterior means only; prior samples and generated latents are transformed by the same fit",
        prior_samples=f"{n_prior} teacher-forced prior sample(s) per sequence (each block given the gold history)",
        generated=f"{n_generated} freely generated latent sequences of {mean.shape[-2]} positions",
        sampler=sampler.label,
        seed=seed,
    )
    return ds


def _embed(method: str, x: np.ndarray, fit: np.ndarray, seed: int, umap_options: dict):
    """2-D coordinates of all rows of ``x`` from a map fitted on ``x[fit]``."""
    if method == "pca":
        center = x[fit].mean(0)
        _, s, vt = np.linalg.svd(x[fit] - center, full_matrices=False)
        # A one-channel latent has one component; the second is then identically zero.
        coords = np.zeros((len(x), 2))
        ratio = np.zeros(2)
        k = min(2, len(s))
        coords[:, :k] = (x - center) @ vt[:k].T
        ratio[:k] = s[:k] ** 2 / np.sum(s**2)
        return coords, {"pca_explained_variance_ratio": ("component", ratio)}
    # umap: embedding checked that umap-learn is installed before any work
    import umap  # slow to import (numba); only when asked for

    # n_jobs=1: a seeded UMAP is single-threaded anyway (and says so in a warning otherwise).
    options = {"n_neighbors": 15, "min_dist": 0.1, "random_state": seed, "n_jobs": 1} | umap_options
    options["n_neighbors"] = min(options["n_neighbors"], int(fit.sum()) - 1)
    # numba's OpenMP layer resets the process-wide thread count that torch shares; left
    # so, torch later runs up to 100x slower (measured on a busy 2-core machine).
    threads = torch.get_num_threads()
    try:
        reducer = umap.UMAP(n_components=2, **options).fit(x[fit])
        out = np.empty((len(x), 2))
        out[fit] = reducer.embedding_
        if (~fit).any():
            out[~fit] = reducer.transform(x[~fit])
    finally:
        torch.set_num_threads(threads)
    return out, {}


def _decoded_first_tokens(model, z, batch):
    """The decoder's argmax token at the first token of every latent position: [..., B, L]."""
    _, argmax = decode_gold(model, z, batch)
    return argmax[..., :: model.patch_size]


def density_slice(
    model: LatentModel,
    batch: TokenBatch,
    *,
    sequence: int = 0,
    block: int = 0,
    directions: str | torch.Tensor = "decoder",
    extent: float = 3.0,
    resolution: int = 25,
    n_prior: int = 32,
    seed: int = 0,
    solver: cnf.Solver | None = None,
    sampler: cnf.Solver = cnf.SAMPLER,
    **solver_keywords,
) -> xr.Dataset:
    """The prior's log-density and the decoder's decision regions on a plane through a gold
    latent (module docstring).

    The plane lives in the scaled space of block ``block`` (``block_size * d`` dimensions).
    ``directions``: ``"decoder"`` -- ``e1`` along the gradient of the block's gold-token
    log-likelihood at the gold latent (the direction in which decoding changes fastest),
    ``e2`` a seeded random direction orthogonal to it; ``"random"`` -- two seeded orthonormal
    random directions; or a tensor [2, block_size, d] (orthonormalised here). ``alpha`` and
    ``beta`` run over ``[-extent, extent]`` in scaled units (the prior's noise has unit
    variance) on a ``resolution`` x ``resolution`` grid. ``n_prior`` teacher-forced prior
    samples of the block are projected onto the plane as well. ``solver``: how the prior's
    CNF is solved (``cnf.Solver``, or its fields as keywords); ``sampler``: the solver of the
    prior samples.

    Returns over ``(alpha, beta)``: ``log_prob`` (``log p_psi(z^(b) | gold history)``,
    posterior space), ``gold_log_prob`` (sum of the block's gold-token decoder
    log-probabilities), ``n_correct`` (block tokens decoded to gold); over ``(alpha, beta,
    block_token)``: ``argmax_token``; ``gold_token`` over ``block_token``; ``prior_projection``
    over ``(prior_sample, axis)``; ``direction`` over ``(axis, position, channel)``;
    ``gold_point_log_prob``.
    """
    solver = cnf.Solver.build(solver, **solver_keywords)
    one = batch.select([sequence])
    bs, per = model.block_size, model.block_size * model.patch_size
    with torch.no_grad():
        mean = model.posterior(one).mean  # [1, L, d]
    if not 0 <= block < mean.shape[-2] // bs:
        raise ValueError(f"block must be in [0, {mean.shape[-2] // bs}), got {block}")
    if bs * model.latent_dim < 2:
        raise ValueError("a plane needs a block latent space of at least 2 dimensions (block_size * latent_dim)")
    in_block = slice(block * bs, (block + 1) * bs)
    tokens = slice(block * per, (block + 1) * per)
    gen = torch.Generator().manual_seed(seed)
    u0 = to_prior_space(model, mean)
    e = _plane(model, one, u0, in_block, tokens, directions, gen)  # [2, bs, d]

    grid = torch.linspace(-extent, extent, resolution, dtype=u0.dtype)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    offset = a[..., None, None] * e[0] + b[..., None, None] * e[1]  # [G, G, bs, d]
    u = u0.expand(resolution, resolution, *u0.shape).clone()
    u[..., 0, in_block, :] += offset
    z = from_prior_space(model, u)
    # The block-causal prior's block b needs nothing after it: solve on blocks <= b only. The
    # gold latent itself rides along as one more point of the same solve.
    keep = slice(0, (block + 1) * bs)
    points = torch.cat([z[..., keep, :].reshape(-1, *mean[:, keep].shape), mean[None, :, keep]])
    block_log_prob = prior_block_log_prob(model, points, history=mean[:, keep], seed=seed, solver=solver)[:, 0, block]
    log_prob, gold_point_log_prob = block_log_prob[:-1].reshape(resolution, resolution), block_log_prob[-1]
    with torch.no_grad():
        logp, argmax = decode_gold(model, z, one)
        z_prior = prior_samples(model, mean, n_prior, seed=seed, sampler=sampler)
    gold = one.ids[0, tokens]
    argmax = argmax[..., 0, tokens]
    projection = torch.einsum("spd,apd->sa", to_prior_space(model, z_prior)[:, 0, in_block] - u0[0, in_block], e)
    ds = xr.Dataset(
        {
            "log_prob": (("alpha", "beta"), log_prob.numpy()),
            "gold_log_prob": (("alpha", "beta"), logp[..., 0, tokens].sum(-1).numpy()),
            "n_correct": (("alpha", "beta"), (argmax == gold).sum(-1).numpy()),
            "argmax_token": (("alpha", "beta", "block_token"), argmax.numpy()),
            "gold_token": ("block_token", gold.numpy()),
            "prior_projection": (("prior_sample", "axis"), projection.double().numpy()),
            "direction": (("axis", "position", "channel"), e.double().numpy()),
            "gold_point_log_prob": float(gold_point_log_prob),
        },
        coords={"alpha": grid.numpy(), "beta": grid.numpy(), "axis": ["e1", "e2"]},
    )
    ds.attrs.update(
        sequence=sequence,
        block=block,
        directions=directions if isinstance(directions, str) else "given",
        extent=extent,
        units="log_prob in nats on the posterior's space; alpha, beta in scaled (prior-space) units",
        **solver.to_attrs(),
        sampler=sampler.label,
        seed=seed,
    )
    return ds


def _plane(model, one, u0, in_block, tokens, directions, gen) -> torch.Tensor:
    """Two orthonormal directions [2, block_size, d] in the block's scaled latent space."""
    shape = u0[0, in_block].shape
    if isinstance(directions, torch.Tensor):
        raw = directions.reshape(2, -1).to(u0.dtype)
    elif directions == "random":
        raw = torch.randn(2, shape.numel(), generator=gen, dtype=u0.dtype)
    elif directions == "decoder":
        u = u0.clone().requires_grad_(True)
        with torch.enable_grad():
            logp, _ = decode_gold(model, from_prior_space(model, u), one)
            (grad,) = torch.autograd.grad(logp[0, tokens].sum(), u)
        raw = torch.stack([grad[0, in_block].reshape(-1), torch.randn(shape.numel(), generator=gen, dtype=u0.dtype)])
    else:
        raise ValueError(f"directions must be 'decoder', 'random' or a tensor [2, block_size, d], got {directions!r}")
    q, _ = torch.linalg.qr(raw.T.double())  # Gram-Schmidt: e1 keeps raw[0]'s direction
    q = q * torch.sign(torch.diagonal(q.T @ raw.T.double()))  # QR may flip signs
    return q.T.reshape(2, *shape).to(u0.dtype)
