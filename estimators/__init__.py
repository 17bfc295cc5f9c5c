"""Likelihood estimators on the ``colaprob.protocol.LatentModel`` interface."""
