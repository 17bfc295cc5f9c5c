"""colaprob: likelihoods and diagnostics for hierarchical continuous-latent diffusion language
models (Cola DLM first). See the README for the tour and ``colaprob.protocol`` for the
interface the estimators work on."""

__version__ = "0.1.0"

from colaprob.checkpoint import load, save  # noqa: E402
from colaprob.model import ColaModel  # noqa: E402

__all__ = ["ColaModel", "load", "save", "__version__"]
