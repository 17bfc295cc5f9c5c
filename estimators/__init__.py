"""Likelihood estimators on the ``colaprob.protocol.LatentModel`` interface.

``cnf`` (a module: ``cnf.log_prob``, ``cnf.block_causal_log_prob``, ``cnf.sample``) and the
estimators ``elbo``, ``iwae``, ``conditional`` (functions, each returning an
``xarray.Dataset``); ``statistics`` and ``units`` summarise their output; ``streams`` holds
the per-sequence random streams they draw from. ``draws`` is the engine they share
(posterior draws and every term of their weights, per sequence and block), ``layout`` the
arithmetic of tokens, latent positions and prior blocks.
"""

from colaprob.estimators import cnf, statistics, streams, units
from colaprob.estimators.conditional import conditional
from colaprob.estimators.elbo import elbo
from colaprob.estimators.iwae import iwae

__all__ = ["cnf", "conditional", "elbo", "iwae", "statistics", "streams", "units"]
