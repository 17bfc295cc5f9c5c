"""Flows whose density is known in closed form, for testing ``colaprob.estimators.cnf``.

Conventions as everywhere in colaprob: data at ``t = 0``, noise ``N(0, I)`` at ``t = 1``,
``velocity(z_t, t)`` with ``t`` a 0-dim tensor, events flattened to ``D`` dimensions.
Parameters are float64; velocities run in the dtype of their input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


class LinearFlow:
    """The time-constant linear field ``v(z, t) = A z + b`` and the density it pulls back.

    Its flow is ``z1 = e^A z0 + (integral_0^1 e^{A s} ds) b`` (both blocks of
    ``exp([[A, b], [0, 0]])``) with ``div v = tr A``, so
    ``log p0(z0) = log N(z1; 0, I) + tr A`` exactly: a Gaussian push-forward.
    ``matrix``: [D, D]; ``offset``: [D]; events of ``event_shape`` (default ``(D,)``).
    """

    def __init__(self, matrix: Tensor, offset: Tensor, event_shape: tuple[int, ...] | None = None):
        self.matrix = matrix.double()
        self.offset = offset.double()
        self.event_shape = tuple(event_shape or offset.shape)

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        flat = z.flatten(-len(self.event_shape))
        v = flat @ self.matrix.to(z.dtype).T + self.offset.to(z.dtype)
        return v.reshape(z.shape)

    def log_prob(self, z0: Tensor) -> Tensor:
        """Exact ``log p0(z0)``: [..., *event] -> [...] float64."""
        D = self.offset.shape[0]
        augmented = torch.zeros(D + 1, D + 1, dtype=torch.float64)
        augmented[:D, :D] = self.matrix
        augmented[:D, D] = self.offset
        flow = torch.linalg.matrix_exp(augmented)
        z1 = z0.double().flatten(-len(self.event_shape)) @ flow[:D, :D].T + flow[:D, D]
        return -0.5 * (z1.pow(2) + _LOG_2PI).sum(-1) + torch.trace(self.matrix)


class GaussianMixture:
    """``p0(z) = sum_k pi_k N(z; m_k, S_k)`` and its exact flow-matching velocity.

    Under the linear path ``z_t = (1 - t) z0 + t z1``, component ``k`` is
    ``N(mu_k(t), Sigma_k(t))`` with ``mu_k = (1 - t) m_k`` and
    ``Sigma_k = (1 - t)^2 S_k + t^2 I``. As ``Cov(z1 - z0, z_t | k) = t I - (1 - t) S_k``,

        E[z1 - z0 | z_t = z, k] = -m_k + (t I - (1 - t) S_k) Sigma_k(t)^{-1} (z - mu_k(t)),

    and the marginal velocity ``v(z, t)`` averages these with the posterior weights
    ``w_k proportional to pi_k N(z; mu_k(t), Sigma_k(t))``. Its flow carries ``p0`` to
    ``N(0, I)`` at ``t = 1`` (the marginal path), so the CNF density of ``z0`` is ``p0(z0)``.
    ``logits``: [K]; ``means``: [K, D]; ``covariances``: [K, D, D] positive definite.
    """

    def __init__(self, logits: Tensor, means: Tensor, covariances: Tensor, event_shape: tuple[int, ...] | None = None):
        self.log_weights = torch.log_softmax(logits.double(), -1)
        self.means = means.double()
        self.covariances = covariances.double()
        self.event_shape = tuple(event_shape or means.shape[1:])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _marginal(self, t: float) -> tuple[Tensor, Tensor, Tensor]:
        """``mu_k(t)``, ``Sigma_k(t)^{-1}`` and ``log det Sigma_k(t)``."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        sigma = (1 - t) ** 2 * self.covariances + t**2 * eye
        return (1 - t) * self.means, torch.linalg.inv(sigma), torch.linalg.slogdet(sigma)[1]

    def _log_joint(self, z: Tensor, mean: Tensor, precision: Tensor, logdet: Tensor) -> tuple[Tensor, Tensor]:
        """``log pi_k N(z; mean_k, precision_k^{-1})`` [..., K] and ``precision_k (z - mean_k)``."""
        diff = z[..., None, :] - mean  # [..., K, D]
        solved = torch.einsum("kij,...kj->...ki", precision, diff)
        quad = (diff * solved).sum(-1)
        return self.log_weights.to(z.dtype) - 0.5 * (quad + logdet + self.dim * _LOG_2PI), solved

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        flat = z.flatten(-len(self.event_shape))
        mean, precision, logdet = (x.to(z.dtype) for x in self._marginal(float(t)))
        log_joint, solved = self._log_joint(flat, mean, precision, logdet)
        weights = torch.softmax(log_joint, -1)
        spread = torch.einsum("kij,...kj->...ki", self.covariances.to(z.dtype), solved)
        conditional = -self.means.to(z.dtype) + float(t) * solved - (1 - float(t)) * spread
        return (weights[..., None] * conditional).sum(-2).reshape(z.shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """Exact ``log p0(z)``: [..., *event] -> [...] float64."""
        mean, precision, logdet = self._marginal(0.0)
        log_joint, _ = self._log_joint(z.double().flatten(-len(self.event_shape)), mean, precision, logdet)
        return torch.logsumexp(log_joint, -1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` exact draws: [n, *event] float64."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        chol = torch.linalg.cholesky(self.covariances)
        z = self.means[k] + torch.einsum("nij,nj->ni", chol[k], eps)
        return z.reshape(n, *self.event_shape)
