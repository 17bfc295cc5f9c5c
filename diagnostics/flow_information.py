"""How much token identity survives along the flow path: the information curve.

On the prior's path ``u_t = (1 - t) u0 + t eps`` (data at ``t = 0``, noise at ``t = 1``) the
velocity network's one-step estimate of the data is ``u_hat0 = u_t - t * v(u_t, t)`` (exact
for the true marginal velocity, since ``v = E[eps - u0 | u_t]`` and ``u_t - t * v =
E[u0 | u_t]``). Starting from the gold posterior means ``u0 = (m - shift) * scale`` and
decoding ``z_hat0 = u_hat0 / scale + shift`` on a grid of ``t`` shows at which noise level the
prior still knows which token it is denoising -- the signal-to-noise ratio ``logSNR(t) = 2
log((1 - t) / t)`` is the natural axis. Every block is noised at the same ``t`` and sees the
clean gold history of the blocks before it (teacher forcing, as in training).

Beside the curve: the density of ``t`` the prior was trained with, the logit-normal
``p(t) = N(logit t; loc, scale^2) / (t (1 - t))`` -- where the training puts its effort
against where token identity is decided.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr
from colaprob.progress import bar

from colaprob.diagnostics._latent import chunks, decode_gold, standard_normal
from colaprob.estimators.layout import LatentLayout
from colaprob.estimators import streams
from colaprob.protocol import LatentModel, TokenBatch, from_prior_space, to_prior_space


def information_curve(
    model: LatentModel,
    batch: TokenBatch,
    *,
    logsnr: np.ndarray | None = None,
    n_noise: int = 2,
    loc: float = 0.0,
    scale: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> xr.Dataset:
    """Token accuracy and cross-entropy of the one-step denoised estimate along the path.

    ``logsnr``: the grid (default 25 points from +12 to -12, i.e. ``t`` from about 0.0025 to
    0.9975); ``n_noise``: noise draws per sequence, shared by all ``t`` (common random numbers
    make the curve smooth); ``loc``, ``scale``: the logit-normal training density of ``t``;
    ``progress``: progress bars.

    Returns an ``xarray.Dataset`` over ``t`` (coordinate ``logsnr`` beside it): ``accuracy``
    (argmax of ``p_theta(. | z_hat0)`` equals the gold token, over valid tokens),
    ``cross_entropy`` (mean ``-log p_theta(x_i | z_hat0)``, nats/token), ``train_density`` (per
    unit ``t``) and ``train_density_logsnr`` (the same law per unit logSNR);
    scalars ``accuracy_at_mean`` and ``cross_entropy_at_mean`` (decoding the posterior mean
    itself, the ``t -> 0`` limit) and ``midpoint_logsnr`` (see ``midpoint_logsnr``).
    """
    logsnr = np.linspace(12.0, -12.0, 25) if logsnr is None else np.asarray(logsnr, dtype=float)
    t_grid = 1.0 / (1.0 + np.exp(logsnr / 2.0))
    n_seq = len(batch)
    eps = standard_normal(model, batch, n_noise, seed, stream=streams.FLOW_NOISE)
    hits = np.zeros(len(t_grid))
    nll = np.zeros(len(t_grid))
    hits_mean = nll_mean = 0.0
    n_valid = int(LatentLayout.of(model, batch).token_mask().sum())
    with torch.no_grad():
        for rows in chunks(n_seq, batch_size, "information curve (sequences)", progress):
            sub = batch.select(rows)
            mean = model.posterior(sub).mean
            valid = LatentLayout.of(model, sub).token_mask()
            u0 = to_prior_space(model, mean)
            noise = eps[:, rows, : mean.shape[-2]].to(mean.dtype)
            clean = u0.expand(noise.shape)
            h, c = _decode_scores(model, mean, sub, valid)
            hits_mean, nll_mean = hits_mean + h, nll_mean + c
            for i, t in enumerate(bar(t_grid, desc="information curve (t)", leave=False, show=progress)):
                u_t = (1 - t) * u0 + t * noise
                tt = torch.full(u_t.shape[:-1], float(t), dtype=u_t.dtype)
                u_hat = u_t - t * model.prior_velocity(u_t, tt, clean)
                h, c = _decode_scores(model, from_prior_space(model, u_hat), sub, valid)
                hits[i] += h / n_noise
                nll[i] += c / n_noise
    accuracy = hits / n_valid
    ds = xr.Dataset(
        {
            "accuracy": ("t", accuracy),
            "cross_entropy": ("t", nll / n_valid),
            "train_density": ("t", logit_normal_pdf(t_grid, loc, scale)),
            # logSNR = -2 logit(t) is normal under the logit-normal: N(-2 loc, (2 scale)^2).
            "train_density_logsnr": ("t", np.exp(-0.5 * ((logsnr + 2 * loc) / (2 * scale)) ** 2) / (2 * scale * math.sqrt(2 * math.pi))),
            "accuracy_at_mean": hits_mean / n_valid,
            "cross_entropy_at_mean": nll_mean / n_valid,
            "midpoint_logsnr": midpoint_logsnr(logsnr, accuracy),
        },
        coords={"t": t_grid, "logsnr": ("t", logsnr)},
    )
    ds.attrs.update(
        units="cross_entropy in nats per token; accuracy in [0, 1]; train_density per unit t, train_density_logsnr per unit logSNR",
        estimate="z_hat0 = from_prior_space(u_t - t * v(u_t, t)), u_t = (1 - t) u0 + t eps, u0 = scaled posterior mean",
        history="every block at the same t, clean gold history (teacher forcing)",
        logsnr_definition="logSNR(t) = 2 log((1 - t) / t)",
        train_t_distribution=f"logit-normal(loc={loc}, scale={scale})",
        train_loc=loc,
        train_scale=scale,
        n_noise=n_noise,
        n_tokens=n_valid,
        seed=seed,
    )
    return ds


def midpoint_logsnr(logsnr: np.ndarray, accuracy: np.ndarray) -> float:
    """The logSNR at which the accuracy has fallen halfway from its cleanest to its noisiest
    grid value (linear interpolation between grid points, scanning from clean to noisy; NaN
    if it never falls). A one-number summary of where token identity is decided."""
    order = np.argsort(-np.asarray(logsnr))
    snr, acc = np.asarray(logsnr)[order], np.asarray(accuracy)[order]
    half = 0.5 * (acc[0] + acc[-1])
    below = np.nonzero(acc <= half)[0]
    if acc[0] <= acc[-1] or len(below) == 0 or below[0] == 0:
        return float("nan")
    i = below[0]
    return float(np.interp(half, [acc[i], acc[i - 1]], [snr[i], snr[i - 1]]))


def logit_normal_pdf(t: np.ndarray, loc: float, scale: float) -> np.ndarray:
    """``p(t) = N(logit t; loc, scale^2) / (t (1 - t))`` on ``0 < t < 1``."""
    t = np.asarray(t, dtype=float)
    x = np.log(t) - np.log1p(-t)
    return np.exp(-0.5 * ((x - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi) * t * (1 - t))


def _decode_scores(model, z, batch, valid) -> tuple[float, float]:
    """Correct argmax tokens and summed gold NLL over the valid tokens (all leading samples)."""
    logp, argmax = decode_gold(model, z, batch)
    mask = valid.expand(argmax.shape)
    return float(((argmax == batch.ids) & mask).sum()), float(-logp[mask].sum())
