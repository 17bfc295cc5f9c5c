"""Diagnostics built on the estimators: where the bound goes, and why likelihood and
generation quality disagree.

* ``decompose(model, batch)``: distortion, rate, ``I_q(X;Z)``, ``KL(q_bar || p_psi)``,
  active units (``colaprob.diagnostics.decomposition``);
* ``probes(model, batch)``: decoder-probe, posterior-hit, prior-hit, generation probability
  and density alignment per token and block, next to each token's share of the ELBO;
  ``summarize_probes`` for the corpus view (``colaprob.diagnostics.token_probes``);
* ``information_curve(model, batch)``: token identity of the one-step denoised latent
  along the flow (``colaprob.diagnostics.flow_information``);
* ``geometry``: ``embedding`` (PCA / UMAP) and ``density_slice``;
* ``plots``: one figure function per diagnostic, drawing returned data only;
* ``report(model, batch, out_dir)``: all of it into a folder (NetCDF, PNG, markdown).

Every computation returns an ``xarray.Dataset`` with its settings and units in ``attrs``.
"""

from colaprob.diagnostics import geometry, plots
from colaprob.diagnostics.decomposition import active_units, decompose
from colaprob.diagnostics.flow_information import information_curve
from colaprob.diagnostics.reporting import report
from colaprob.diagnostics.token_probes import probes
from colaprob.diagnostics.token_probes import summarize as summarize_probes

__all__ = [
    "active_units",
    "decompose",
    "geometry",
    "information_curve",
    "plots",
    "probes",
    "report",
    "summarize_probes",
]
