"""colaprob: likelihoods and diagnostics for hierarchical continuous-latent diffusion language
models (Cola DLM first). See the README for the tour and ``colaprob.protocol`` for the
interface the estimators work on."""

__version__ = "0.1.0"
