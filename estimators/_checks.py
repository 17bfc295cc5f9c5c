"""Argument checks of the public estimator functions: each raises ``TypeError`` (wrong kind)
or ``ValueError`` (wrong value) with one sentence naming the argument, before any torch
computation can fail on it in less helpful words."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def integer(name: str, value, *, minimum: int) -> int:
    """``value`` as an int, at least ``minimum`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def positive_number(name: str, value, *, floor: float = 0.0) -> float:
    """A finite real number above 0 and at least ``floor``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    if value < floor:
        raise ValueError(f"{name} = {value:g} is below {floor:g}, where the solver's steps underflow; use {floor:g} or more")
    return float(value)


def floating_tensor(name: str, value, *, min_dims: int) -> Tensor:
    """A floating-point tensor of at least ``min_dims`` dimensions with finite entries."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch tensor, not {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (latents are real), not {value.dtype}")
    if value.dim() < min_dims:
        raise ValueError(f"{name} must have at least {min_dims} dimensions, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds NaN or infinite entries")
    return value


def integer_tensor(name: str, value, batch_shape: tuple[int, ...], *, minimum: int, maximum: int) -> Tensor:
    """An int or an integer tensor broadcastable to ``batch_shape``, each entry within
    ``[minimum, maximum]``: returned expanded to ``batch_shape``."""
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, not {tensor.dtype}")
    try:
        tensor = tensor.expand(batch_shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not match the batch shape {tuple(batch_shape)}") from None
    if tensor.numel() and (tensor.min() < minimum or tensor.max() > maximum):
        raise ValueError(f"{name} must lie between {minimum} and {maximum}, got values from {int(tensor.min())} to {int(tensor.max())}")
    return tensor
