"""Tractable reference models (``log p(x)`` known exactly) for property-testing estimators.

* ``flows``: ``LinearFlow`` (a Gaussian push-forward) and ``GaussianMixture`` (the exact
  flow-matching velocity of a mixture) for ``cnf.log_prob``;
* ``priors``: ``BlockMixturePrior``, a block-causal prior with exact conditionals and the
  exact 2L velocity, for ``cnf.block_causal_log_prob`` and ``cnf.sample``;
* ``models``: ``QuadratureModel`` and ``LinearGaussianModel``, implementations of
  ``colaprob.protocol.LatentModel`` with ``exact_log_prob``;
* ``strategies`` (import it explicitly; needs hypothesis): strategies that draw all of these.
"""

from colaprob.testing.flows import GaussianMixture, LinearFlow
from colaprob.testing.models import (
    CategoricalDecoder,
    GaussianDecoder,
    LinearGaussianModel,
    QuadratureModel,
    TractableModel,
    make_batch,
)
from colaprob.testing.priors import BlockMixturePrior

__all__ = [
    "BlockMixturePrior",
    "CategoricalDecoder",
    "GaussianDecoder",
    "GaussianMixture",
    "LinearFlow",
    "LinearGaussianModel",
    "QuadratureModel",
    "TractableModel",
    "make_batch",
]
