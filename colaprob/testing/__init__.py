"""Tractable reference models (``log p(x)`` known exactly) and hypothesis strategies."""
