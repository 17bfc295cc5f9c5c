"""A block-causal prior with exact conditional densities and the exact 2L velocity."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


class BlockMixturePrior:
    """Block-causal Gaussian-mixture prior on ``u`` [..., L, d], blocks of ``block_size``.

    Block ``b`` given the blocks before it is a mixture of diagonal Gaussians,

        p(u^(b) | u^(<b)) = sum_k pi_k(r_b) prod_{j, c} N(u_jc; m_kjc(r_b), s_kjc^2),
        r_b = tanh( sum_{b' < b} (u^(b') - history_shift) * history_scale )      [block_size, d]
        log pi_k(r) = log_softmax_k(a_k + sum_jc g_kjc r_jc),   m_k(r) = M_k + C_k * r,

    a short last block using the leading positions of the parameters.

    Velocity (the 2L contract): block ``b`` reads its noisy ``u_t`` and ``clean`` of earlier
    blocks only. Each position has its own ``t``; a diagonal component factorises over
    coordinates, so at time ``t_jc`` coordinate ``jc`` of component ``k`` is
    ``N((1 - t) m, (1 - t)^2 s^2 + t^2)`` and the posterior weight of ``k`` multiplies these.
    Positions given at ``t = 0`` (a clean prefix inside a block) thereby enter the weights with
    their data density: the velocity of the other positions is exactly the flow-matching
    velocity of the conditional ``p(rest | clean part, history)``. Per coordinate,

        E[u1 - u0 | u_t, k] = -m + (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2) * (u_t - (1 - t) m).

    Parameters: ``logits`` [K], ``logit_weight`` [K, bs, d], ``means`` [K, bs, d],
    ``mean_weight`` [K, bs, d], ``log_std`` [K, bs, d]; ``history_shift``/``history_scale``
    scalars.
    """

    def __init__(
        self,
        logits: Tensor,
        logit_weight: Tensor,
        means: Tensor,
        mean_weight: Tensor,
        log_std: Tensor,
        history_shift: float = 0.0,
        history_scale: float = 1.0,
    ):
        self.logits = logits.double()
        self.logit_weight = logit_weight.double()
        self.means = means.double()
        self.mean_weight = mean_weight.double()
        self.log_std = log_std.double()
        self.history_shift = float(history_shift)
        self.history_scale = float(history_scale)

    @property
    def block_size(self) -> int:
        return self.means.shape[1]

    @property
    def latent_dim(self) -> int:
        return self.means.shape[2]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def in_z_space(self, scale: float, shift: float) -> "BlockMixturePrior":
        """The same distribution of ``z = u / scale + shift``: each Gaussian moves and scales,
        the history reads ``z`` through the inverse map, so densities differ by exactly
        ``n * d * log|scale|``."""
        return BlockMixturePrior(
            self.logits,
            self.logit_weight,
            self.means / scale + shift,
            self.mean_weight / scale,
            self.log_std - math.log(abs(scale)),
            history_shift=shift + self.history_shift / scale,
            history_scale=scale * self.history_scale,
        )

    def _conditionals(self, clean: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Mixture parameters of every block given the history in ``clean`` [..., L, d]:
        ``log pi`` [..., nb, K], means [..., nb, K, bs, d], std [K, bs, d], and the mask of
        real (not padding) positions [nb, bs]."""
        L = clean.shape[-2]
        bs = self.block_size
        pad = -L % bs
        normalised = (clean - self.history_shift) * self.history_scale
        blocks = torch.nn.functional.pad(normalised, (0, 0, 0, pad)).unflatten(-2, (-1, bs))  # [..., nb, bs, d]
        history = torch.tanh(blocks.cumsum(-3) - blocks)  # sum over strictly earlier blocks
        dtype = clean.dtype
        history = history[..., None, :, :]  # [..., nb, 1, bs, d]
        log_pi = torch.log_softmax(self.logits.to(dtype) + (self.logit_weight.to(dtype) * history).sum((-1, -2)), -1)
        means = self.means.to(dtype) + self.mean_weight.to(dtype) * history
        real = torch.arange(L + pad, device=clean.device).reshape(-1, bs) < L
        return log_pi, means, self.log_std.to(dtype).exp(), real

    def _in_blocks(self, x: Tensor) -> Tensor:
        """[..., L, d] -> [..., nb, 1, bs, d] (component axis for broadcasting)."""
        pad = -x.shape[-2] % self.block_size
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(-2, (-1, self.block_size))[..., None, :, :]

    def velocity(self, u_t: Tensor, t: Tensor, clean: Tensor) -> Tensor:
        """``du/dt``: ``u_t`` [..., L, d], ``t`` broadcastable to [..., L], ``clean`` [..., L, d]."""
        L = u_t.shape[-2]
        log_pi, means, std, real = self._conditionals(clean)
        z = self._in_blocks(u_t)
        time = self._in_blocks(torch.as_tensor(t, dtype=u_t.dtype).expand(u_t.shape[:-1])[..., None])
        mean_t = (1 - time) * means
        var_t = (1 - time) ** 2 * std**2 + time**2
        log_normal = -0.5 * ((z - mean_t) ** 2 / var_t + var_t.log() + _LOG_2PI)
        weights = torch.softmax(log_pi + (log_normal * real[:, None, :, None]).sum((-1, -2)), -1)  # [..., nb, K]
        conditional = -means + (time - (1 - time) * std**2) / var_t * (z - mean_t)
        v = (weights[..., None, None] * conditional).sum(-3)  # [..., nb, bs, d]
        return v.flatten(-3, -2)[..., :L, :]

    def block_log_prob(self, u: Tensor, prefix_len: Tensor | int | None = None) -> Tensor:
        """Exact ``log p(u^(b) | u^(<b))`` of each block's positions ``>= prefix_len`` given
        its positions ``< prefix_len`` and the earlier blocks: [..., L, d] -> [..., nb] float64
        (0 for blocks wholly inside the prefix)."""
        u = u.double()
        log_pi, means, std, real = self._conditionals(u)
        log_normal = -0.5 * (((self._in_blocks(u) - means) / std) ** 2 + 2 * std.log() + _LOG_2PI)
        per_position = log_normal.sum(-1)  # [..., nb, K, bs]
        prefix = torch.as_tensor(0 if prefix_len is None else prefix_len).expand(u.shape[:-2])
        position = torch.arange(real.numel()).reshape(real.shape)
        given = (position < prefix[..., None, None])[..., None, :]  # [..., nb, 1, bs]
        real = real[:, None, :]
        joint = torch.logsumexp(log_pi + (per_position * real).sum(-1), -1)
        clean_part = torch.logsumexp(log_pi + (per_position * (real & given)).sum(-1), -1)
        return joint - clean_part

    def log_prob(self, u: Tensor, prefix_len: Tensor | int | None = None) -> Tensor:
        """Exact ``log p(u)`` (of the positions ``>= prefix_len`` given the rest): [...]."""
        return self.block_log_prob(u, prefix_len).sum(-1)

    def sample(self, clean: Tensor, generator: torch.Generator) -> Tensor:
        """Exact teacher-forced draws of every block given the history in ``clean``
        [..., L, d]: [..., L, d] float64."""
        clean = clean.double()
        log_pi, means, std, _ = self._conditionals(clean)
        k = torch.multinomial(log_pi.exp().reshape(-1, self.n_components), 1, generator=generator)
        k = k.reshape(log_pi.shape[:-1])  # [..., nb]
        index = k[..., None, None, None].expand(*k.shape, 1, *means.shape[-2:])
        mean = means.gather(-3, index)[..., 0, :, :]
        scale = std[k]
        eps = torch.randn(mean.shape, dtype=torch.float64, generator=generator)
        return (mean + scale * eps).flatten(-3, -2)[..., : clean.shape[-2], :]
