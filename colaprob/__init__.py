"""colaprob: likelihoods and diagnostics for hierarchical continuous-latent diffusion language
models (Cola DLM first). See the README for the tour and ``colaprob.protocol`` for the
interface the estimators work on.

The names below are imported on first use, so that ``import colaprob.estimators`` (which works
on the protocol alone) loads no network, checkpoint reader or tokenizer.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"load": "colaprob.checkpoint", "save": "colaprob.checkpoint", "ColaModel": "colaprob.model"}

__all__ = ["ColaModel", "load", "save", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'colaprob' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
