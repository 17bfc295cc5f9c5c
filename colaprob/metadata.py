"""What every variable in a colaprob file means, in the attributes the field's tools read.

``describe(ds)`` gives each variable of a dataset the CF attributes ``long_name`` and
``units`` and a one-line ``description``, and the dataset the CF-1.10 global attributes
``Conventions``, ``title``, ``source`` and ``history``. ``colaprob.results.write_dataset``
applies it (``apply``, in place) to every dataset it writes, so score, decompose, probe and report files (and the
shards of a run) all describe themselves.

The meanings live in one table, ``VARIABLES``: a name maps to ``Meaning(long_name, units,
description)``. Families are derived, not listed: ``<name>_se`` is the standard error of
``<name>`` and ``corpus_<name>`` the same quantity over the whole corpus. A variable the
table does not know (added by a newer command) still gets a ``long_name`` and a
``description`` that say so plainly, and no ``units`` -- guessing them would be worse than
leaving them out. Attributes a variable already carries are kept.

Units are UDUNITS-2 strings, as CF asks: ``nat`` (natural unit of information; every
log-likelihood and log-density), ``bit/byte``, ``1`` (dimensionless: probabilities,
fractions, perplexities, counts of things, indices). A quantity per token or per sequence
keeps the unit of its numerator (``nat``); the ``long_name`` says what it is per.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import xarray as xr

CONVENTIONS = "CF-1.10"


@dataclass(frozen=True)
class Meaning:
    long_name: str
    units: str | None
    description: str


NAT, BPB, ONE = "nat", "bit/byte", "1"

# One entry per variable name colaprob writes, grouped by what writes it. Keep the
# description to one line; say whether a number is a bound, an estimate or exact.
VARIABLES: dict[str, Meaning] = {
    # --- coordinates and what each row is (score, decompose, probe)
    "sequence": Meaning("sequence index", ONE, "index of the scored sequence (a document, or one window of a split document)"),
    "sample": Meaning("posterior sample index", ONE, "index k of the importance sample z_k ~ q(z|x)"),
    "token": Meaning("token position", ONE, "position of the token in the framed sequence"),
    "block": Meaning("prior block index", ONE, "index b of the block of latent positions of the block-causal prior"),
    "document": Meaning("document index", ONE, "index of the input document this sequence comes from"),
    "window": Meaning("window index", ONE, "index of the window within its document: of a split document (0 unless split), or j of the rolling chain"),
    "source": Meaning("input file name", None, "name of the input file the document was read from"),
    "text": Meaning("scored text", None, "the text that was scored (the response of a prompt-response pair)"),
    "prompt": Meaning("prompt text", None, "the prompt that conditions the response of a prompt-response pair"),
    "batch_nfe": Meaning("velocity evaluations of the batch", ONE, "number of prior velocity evaluations the ODE solves of this sequence's batch took"),
    # --- importance weights (score: elbo, iwae, conditional)
    "log_weight": Meaning("log importance weight", NAT, "log p(x|z_k) + log p_psi(z_k) - log q(z_k|x) of posterior sample k"),
    "decoder_log_prob": Meaning("decoder log-likelihood", NAT, "log p_theta(x|z_k) over the counted tokens"),
    "prior_log_prob": Meaning("prior log-density", NAT, "log p_psi(z_k) of the counted latents by the CNF change of variables"),
    "posterior_log_prob": Meaning("posterior log-density", NAT, "log q_phi(z_k|x) of the counted latents"),
    "token_decoder_log_prob": Meaning("decoder log-likelihood per token", NAT, "mean over samples of log p_theta(x_i|z_k); NaN for tokens that are not counted"),
    "block_prior_log_prob": Meaning("prior log-density per block", NAT, "log p_psi(z^(b) | z^(<b)) (mean over samples in score files; at the gold latent in probe files); NaN where not integrated"),
    "n_samples": Meaning("posterior samples", ONE, "number of importance samples K drawn for the sequence"),
    "prior_probe_se": Meaning("Hutchinson standard error of the prior log-density", NAT, "standard error of log p_psi(z_k) over the Hutchinson probes (0 for the exact trace)"),
    "ess": Meaning("effective sample size", ONE, "(sum w)^2 / sum w^2 of the importance weights (Kong 1992); an estimate"),
    "khat": Meaning("Pareto k-hat of the importance weights", ONE, "shape of a generalized Pareto fit to the largest weights (PSIS); below khat_threshold the IWAE estimate is reliable"),
    "khat_threshold": Meaning("Pareto k-hat reliability threshold", ONE, "min(1 - 1/log10(K), 0.7) for the sequence's K; NaN below K = 21, where no k-hat exists"),
    "khat_computable": Meaning("Pareto k-hat computable", None, "true where K >= 21, the fewest samples for which PSIS has the 5 tail weights it needs; where false khat is NaN, no verdict"),
    "reliable": Meaning("importance weights reliable", None, "true where khat < khat_threshold"),
    "log_likelihood": Meaning("log-likelihood estimate", NAT, "the estimator's log p(x) (or log p(response|prompt)); the attribute estimator says whether it is a bound"),
    "n_tokens": Meaning("counted tokens", ONE, "number of tokens counted in the per-token units (of the bin, in probe summaries)"),
    "n_bytes": Meaning("UTF-8 bytes", ONE, "number of UTF-8 bytes of the scored text"),
    "n_words": Meaning("whitespace words", ONE, "number of whitespace-separated words of the scored text"),
    "nats_per_token": Meaning("negative log-likelihood per counted token", NAT, "-log_likelihood / n_tokens"),
    "bits_per_byte": Meaning("negative log-likelihood per UTF-8 byte", BPB, "-log_likelihood / (n_bytes ln 2)"),
    "token_perplexity": Meaning("token perplexity", ONE, "exp(nats_per_token)"),
    "word_perplexity": Meaning("word perplexity", ONE, "exp(-log_likelihood / n_words), the lm-evaluation-harness convention"),
    # --- prefix-response scoring (score --estimator conditional)
    "log_weight_prefix": Meaning("log importance weight of the prefix", NAT, "the prefix's weight on the same draw z_k: its tokens and the prior blocks covering it"),
    "prefix_tokens": Meaning("prefix tokens", ONE, "number of framed tokens of the prompt (beginning-of-text token included)"),
    "log_joint": Meaning("log-likelihood of the whole scored text", NAT, "IWAE-K log p of prompt and response (score), or of context and continuation marginal over later tokens (eval); a lower bound in expectation"),
    "log_prefix": Meaning("log-likelihood of the prompt", NAT, "IWAE-K log p(x_pre) on the same draws"),
    "prefix_proposal": Meaning("prefix-only proposal used", None, "true where the prefix ends inside a prior block and its term drew the covering block from a proposal that sees the prefix alone"),
    "prefix_heavy_tailed": Meaning("prefix weights heavy-tailed", None, "true where khat_prefix is computable and above khat_threshold: the prefix term and its standard error may be far off"),
    "khat_prefix": Meaning("Pareto k-hat of the prefix weights", ONE, "as khat, for log_weight_prefix"),
    "ess_prefix": Meaning("effective sample size of the prefix weights", ONE, "as ess, for log_weight_prefix"),
    "independent_se": Meaning("standard error with independent draws", NAT, "the standard error log_likelihood would have if joint and prefix used independent draws"),
    "variance_reduction": Meaning("variance reduction of common random numbers", ONE, "independent_se^2 / log_likelihood_se^2"),
    "log_weight_direct": Meaning("log importance weight of the direct estimate", NAT, "weight of the response latents given prefix latents fixed at the posterior mean"),
    "direct_log_likelihood": Meaning("plug-in conditional log-likelihood", NAT, "IWAE-K log p(x_res | z_pre = posterior mean), a lower bound in expectation on the plug-in conditional"),
    "khat_direct": Meaning("Pareto k-hat of the direct weights", ONE, "as khat, for log_weight_direct"),
    "direct_applies": Meaning("direct estimate defined", None, "true where the prompt ends on a latent-position boundary (else the direct estimate is NaN)"),
    # --- solver error in nats (score), kept apart from the Monte Carlo standard errors
    "log_likelihood_solver_error": Meaning("solver error of the log-likelihood", NAT, "estimated ODE solver error of log_likelihood, from a finer companion solve on the same probes (for the ELBO the mean over the samples whose error was estimated, every 8th; weight-averaged for IWAE); an estimate, not a bound"),
    "prior_solver_error": Meaning("solver error of the prior log-density", NAT, "estimated ODE solver error of log p_psi(z_k) per sample, from a finer companion solve; NaN where it was not estimated: a plain average (the ELBO, the decomposition) estimates samples 0, 8, 16, ... only, an importance-weighted one (IWAE, conditional) skips the samples holding less than 1% / K of the weight"),
    "block_prior_solver_error": Meaning("solver error of each prior block", NAT, "estimated ODE solver error of each block's conditional log-density, mean over the samples whose error was estimated"),
    "prior_prefix_solver_error": Meaning("solver error of the prefix's prior terms", NAT, "as prior_solver_error, for the blocks covering the prefix"),
    "log_joint_solver_error": Meaning("solver error of the joint log-likelihood", NAT, "as log_likelihood_solver_error, for log_joint"),
    "log_prefix_solver_error": Meaning("solver error of the prefix log-likelihood", NAT, "as log_likelihood_solver_error, for log_prefix"),
    "log_context_solver_error": Meaning("solver error of the context log-likelihood", NAT, "as log_likelihood_solver_error, for log_context"),
    "window_log_likelihood_solver_error": Meaning("solver error of a window's score", NAT, "as log_likelihood_solver_error, for window_log_likelihood; the chain's is their sum"),
    "direct_log_likelihood_solver_error": Meaning("solver error of the direct estimate", NAT, "as log_likelihood_solver_error, for direct_log_likelihood"),
    "solver_setting": Meaning("solver settings used", None, "the ODE method and tolerances or steps the row was finally solved with (tighter than asked where --target-error needed it)"),
    "samples_solved_together": Meaning("posterior samples solved together", ONE, "samples of the row solved in one ODE solve, as the memory plan (and any retry after a failed allocation) chose; bounds memory, not the numbers"),
    "vjps_per_pass": Meaning("vector-Jacobian products per backward pass", ONE, "divergence products batched in one backward pass, as the memory plan chose; bounds memory, not the numbers"),
    "solver_error_target_met": Meaning("solver-error target met", None, "true where log_likelihood_solver_error (eval: every choice's and the generation's) is below --target-error"),
    # --- rolling log-likelihood (score --rolling): a document as a chain of windows
    "window_log_likelihood": Meaning("log-likelihood of a window given the one before", NAT, "log p(w_j | w_(j-1)) (log p(w_1) for the first), a continuation score on common random numbers; consistent, not a bound"),
    "window_n_tokens": Meaning("tokens of the window", ONE, "tokens of the window counted in its score"),
    "window_khat": Meaning("Pareto k-hat of the window's weights", ONE, "as khat, for the window's continuation score"),
    "window_valid": Meaning("window exists", None, "true for the windows the document has (the grid is padded to the longest document)"),
    "n_windows": Meaning("windows of the document", ONE, "number of windows in the document's rolling chain"),
    "khat_max": Meaning("largest Pareto k-hat over the windows", ONE, "max over the document's windows of window_khat"),
    # --- task evaluation (eval): items and their choices
    "item": Meaning("item index", ONE, "index of the task item (a context with its continuations)"),
    "choice": Meaning("choice index", ONE, "index of a continuation of an item"),
    "choice_valid": Meaning("choice exists", None, "true for the continuations an item has (the grid is padded to the most choices)"),
    "log_context": Meaning("log-likelihood of the context", NAT, "IWAE-K log p(x_<n_c) on the same draws as log_joint"),
    "context_heavy_tailed": Meaning("context weights heavy-tailed", None, "true where khat_context is computable and above khat_threshold: the context term and its standard error may be far off"),
    "joint_heavy_tailed": Meaning("joint weights heavy-tailed", None, "true where khat is computable and above khat_threshold: the joint term and its standard error may be far off"),
    "khat_context": Meaning("Pareto k-hat of the context weights", ONE, "as khat, for the context's weights"),
    "context_tokens": Meaning("tokens of the context", ONE, "framed tokens of the context, beginning-of-text token included"),
    "chosen": Meaning("choice of highest likelihood", ONE, "argmax over choices of log_likelihood (acc)"),
    "chosen_norm": Meaning("choice of highest likelihood per byte", ONE, "argmax over choices of log_likelihood / n_bytes (acc_norm)"),
    "correct": Meaning("likelihood picks the answer", None, "chosen is the gold choice"),
    "correct_norm": Meaning("likelihood per byte picks the answer", None, "chosen_norm is the gold choice"),
    "gold": Meaning("gold choice", ONE, "index of the answer among the choices"),
    "generation_correct": Meaning("generation is correct", None, "the model's own generation matches the answer by the official string match"),
    "generate_is_gold": Meaning("generation equals the answer", None, "the generation is the answer itself (left out of prefers_generation)"),
    "has_generate": Meaning("item has a generation", None, "the input line carries the model's generation"),
    "multiple_choice": Meaning("item has choices", None, "true for multiple-choice items, false for open ones"),
    "disagree": Meaning("likelihood and generation disagree", None, "correct differs from generation_correct"),
    "choice_margin": Meaning("lead of the likelihood choice", NAT, "log_likelihood of the chosen choice minus the runner-up's (its _se: paired Monte Carlo SE, the choices share their draws)"),
    "within_monte_carlo_error": Meaning("choice within the Monte Carlo error", None, "the chosen choice leads the runner-up by at most 2 choice_margin_se: more samples could change it"),
    "within_solver_error": Meaning("choice within the solver error", None, "the chosen choice leads the runner-up by at most the sum of their log_likelihood_solver_error: a more accurate solve could change it"),
    "generate_log_likelihood_solver_error": Meaning("solver error of the generation's score", NAT, "as log_likelihood_solver_error, for generate_log_likelihood"),
    "prefers_generation": Meaning("likelihood prefers the generation", None, "log p(generation | context) > log p(answer | context)"),
    "task": Meaning("task name", None, "the task of the item (its file name, or --task)"),
    "item_id": Meaning("item id", None, "the id field of the input line"),
    "batch_dit_rows": Meaning("DiT rows of the batch", ONE, "latent positions the prior network was evaluated at, summed over evaluations, for the row's batch"),
    # --- decompose (and a report's decomposition)
    "distortion": Meaning("distortion", NAT, "E_q[-log p_theta(x|z)] per sequence, Monte Carlo over posterior samples"),
    "rate": Meaning("rate", NAT, "E_q[log q(z|x) - log p_psi(z)] per sequence (KL(q || p_psi)), Monte Carlo"),
    "elbo": Meaning("evidence lower bound", NAT, "-distortion - rate per sequence, a lower bound on log p(x)"),
    "n_blocks": Meaning("prior blocks", ONE, "number of counted prior blocks of the sequence"),
    "window_rate": Meaning("rate on the window", NAT, "the rate restricted to the first window_blocks blocks"),
    "mi_term": Meaning("mutual-information term", NAT, "the sequence's term of the mutual-information estimate on the window"),
    "marginal_kl_term": Meaning("marginal-KL term", NAT, "the sequence's term of the KL(q_bar || p_psi) estimate on the window"),
    "window_rate_mean": Meaning("mean rate on the window", NAT, "mean over sequences of window_rate"),
    "mutual_information": Meaning("mutual information I_q(X;Z)", NAT, "per sequence on the window, an estimate capped at log N"),
    "marginal_kl": Meaning("prior mismatch KL(q_bar || p_psi)", NAT, "per sequence on the window, Monte Carlo estimate"),
    "identity_residual": Meaning("identity residual", NAT, "window_rate_mean - mutual_information - marginal_kl (0 up to rounding on the same samples)"),
    "log_n": Meaning("log N", NAT, "log of the number of sequences, the cap on the mutual-information estimate"),
    "subset": Meaning("nested subset size", ONE, "number of sequences n in the nested random subset"),
    "mutual_information_nested": Meaning("mutual information on nested subsets", NAT, "I_q(X;Z) estimated on the first n sequences of a random order"),
    "marginal_kl_nested": Meaning("prior mismatch on nested subsets", NAT, "KL(q_bar || p_psi) estimated on the first n sequences of a random order"),
    "log_n_nested": Meaning("log n of the nested subsets", NAT, "the cap on each nested mutual-information estimate"),
    "channel": Meaning("latent channel", ONE, "index of the latent dimension"),
    "posterior_mean_variance": Meaning("variance of the posterior mean", ONE, "Var_x E_q[z_c|x] over the corpus's valid latent positions (posterior space)"),
    "active": Meaning("active unit", None, "true where posterior_mean_variance is at least the active_threshold attribute"),
    "n_active": Meaning("active units", ONE, "number of active latent channels"),
    # --- probe (and a report's probes and probe_summary)
    "decoder_probe": Meaning("decoder probe", ONE, "probability that decoding the posterior mean gives the gold token"),
    "posterior_hit": Meaning("posterior hit", ONE, "fraction of posterior samples that decode to the gold token"),
    "prior_hit": Meaning("prior hit", ONE, "fraction of teacher-forced prior samples whose greedy decoding is the gold token"),
    "generation_prob": Meaning("probability of generating the gold token", ONE, "mean decoder probability of the gold token under teacher-forced prior samples"),
    "token_log_prob": Meaning("decoder log-likelihood of the gold token", NAT, "E_q[log p_theta(x_i|z)]"),
    "block_kl_share": Meaning("block KL share of the token", NAT, "the token's equal share of its block's KL"),
    "block_kl": Meaning("block KL", NAT, "E_q[log q(z^(b)|x) - log p_psi(z^(b) | z^(<b))], Monte Carlo"),
    "gold_log_prob": Meaning("gold-token log-likelihood", NAT, "sum of the gold tokens' decoder log-probabilities (of the block; at each point of a density slice)"),
    "density_percentile": Meaning("density percentile of the gold latent", ONE, "fraction of prior samples with log p_psi at or below the gold latent's"),
    "prior_sample": Meaning("prior sample index", ONE, "index of the teacher-forced prior sample"),
    "prior_sample_log_prob": Meaning("prior log-density of the prior samples", NAT, "log p_psi of each teacher-forced prior sample of the block"),
    "token_id": Meaning("token id", ONE, "id of the gold token (embedding: of the position's first token; generated latents: the decoder's argmax)"),
    "valid": Meaning("token counted", None, "true for tokens of the text (not padding)"),
    "block_valid": Meaning("block counted", None, "true for blocks that hold text"),
    "token_elbo": Meaning("ELBO per token", NAT, "token_log_prob - block_kl_share"),
    "token_block": Meaning("block of the token", ONE, "index of the prior block holding the token"),
    "likelihood": Meaning("likelihood class", None, "tokens at or below (low) and above (high) the median per-token NLL"),
    "generation": Meaning("generation class", None, "tokens generated (prior hit at or above hit_threshold) or missed"),
    "count": Meaning("token count", ONE, "tokens in each likelihood-by-generation cell"),
    "high_nll_generated_fraction": Meaning("high-NLL tokens generated", ONE, "fraction of high-NLL tokens still generated correctly"),
    "low_nll_missed_fraction": Meaning("low-NLL tokens missed", ONE, "fraction of low-NLL tokens not generated"),
    "nll_bin": Meaning("NLL bin index", ONE, "index of the equal-count bin of per-token NLL"),
    "nll_center": Meaning("median NLL of the bin", NAT, "median -token_elbo of the tokens in the bin"),
    "nll_edge_low": Meaning("lower NLL edge of the bin", NAT, "smallest -token_elbo in the bin"),
    "nll_edge_high": Meaning("upper NLL edge of the bin", NAT, "largest -token_elbo in the bin"),
    "prior_hit_by_nll": Meaning("prior hit by NLL bin", ONE, "mean prior_hit of the tokens in the bin"),
    "posterior_hit_by_nll": Meaning("posterior hit by NLL bin", ONE, "mean posterior_hit of the tokens in the bin"),
    "decoder_probe_by_nll": Meaning("decoder probe by NLL bin", ONE, "mean decoder_probe of the tokens in the bin"),
    "generation_prob_by_nll": Meaning("generation probability by NLL bin", ONE, "mean generation_prob of the tokens in the bin"),
    "spearman_nll_prior_hit": Meaning("Spearman correlation of NLL and prior hit", ONE, "rank correlation over counted tokens; NaN when either is constant"),
    "density_percentile_mean": Meaning("mean density percentile", ONE, "mean density_percentile over counted blocks"),
    "density_percentile_below_5pct": Meaning("blocks below the 5% density percentile", ONE, "fraction of counted blocks whose gold latent is below 5% of prior samples"),
    "nll_threshold": Meaning("NLL threshold", NAT, "median per-token NLL that splits low from high"),
    "hit_threshold": Meaning("prior-hit threshold", ONE, "prior hit at or above which a token counts as generated"),
    # --- report: information curve
    "t": Meaning("flow time", ONE, "t of the path z_t = (1 - t) z0 + t z1 (data at 0, noise at 1)"),
    "logsnr": Meaning("log signal-to-noise ratio", ONE, "2 log((1 - t) / t)"),
    "accuracy": Meaning("token accuracy of the denoised latent", ONE, "fraction of tokens decoded to gold from the one-step denoised estimate at t"),
    "cross_entropy": Meaning("cross-entropy of the denoised latent", NAT, "mean -log p_theta(x_i | z_hat0) per token"),
    "train_density": Meaning("training density of t", ONE, "density of the training distribution of t"),
    "train_density_logsnr": Meaning("training density of logSNR", ONE, "density of logSNR under the training distribution of t"),
    "accuracy_at_mean": Meaning("token accuracy at the posterior mean", ONE, "fraction of tokens decoded to gold from the posterior mean"),
    "cross_entropy_at_mean": Meaning("cross-entropy at the posterior mean", NAT, "mean -log p_theta(x_i | posterior mean) per token"),
    "midpoint_logsnr": Meaning("logSNR at half accuracy", ONE, "where the accuracy has lost half its range along the grid; NaN if it does not"),
    # --- report: embedding
    "point": Meaning("point index", ONE, "index of the embedded latent position"),
    "component": Meaning("embedding component", ONE, "axis of the 2-D map"),
    "kind": Meaning("kind of latent", None, "posterior_mean, prior_sample or generated"),
    "decoded_id": Meaning("decoded token id", ONE, "argmax token the decoder reads at the point"),
    "position": Meaning("latent position", ONE, "index of the latent position in its sequence"),
    "pca": Meaning("PCA coordinates", ONE, "the point on the first two principal directions of the posterior means"),
    "umap": Meaning("UMAP coordinates", ONE, "the point on a UMAP map fitted to the posterior means"),
    "pca_explained_variance_ratio": Meaning("explained variance ratio", ONE, "share of the posterior means' variance along each principal direction"),
    # --- report: density slice
    "alpha": Meaning("offset along e1", ONE, "coordinate along e1 in scaled (prior-space) units"),
    "beta": Meaning("offset along e2", ONE, "coordinate along e2 in scaled (prior-space) units"),
    "axis": Meaning("plane direction", None, "e1 or e2"),
    "block_token": Meaning("token within the block", ONE, "index of the token within the sliced block"),
    "log_prob": Meaning("prior log-density on the plane", NAT, "log p_psi(z^(b) | gold history) at each point by the CNF (posterior space)"),
    "n_correct": Meaning("tokens decoded to gold", ONE, "tokens of the block the decoder gets right at the point"),
    "argmax_token": Meaning("decoded token", ONE, "the decoder's argmax token at the point"),
    "gold_token": Meaning("gold token", ONE, "the block's gold token ids"),
    "prior_projection": Meaning("projected prior samples", ONE, "teacher-forced prior samples of the block projected on (e1, e2)"),
    "direction": Meaning("plane directions", ONE, "the orthonormal directions e1, e2 in the block's scaled latent space"),
    "gold_point_log_prob": Meaning("prior log-density of the gold latent", NAT, "log p_psi at the gold latent itself"),
}


def meaning(name: str) -> Meaning:
    """The table's entry for ``name``, derived for ``<x>_se`` and ``corpus_<x>``, or a generic
    entry that says the variable is not described here."""
    if name in VARIABLES:
        return VARIABLES[name]
    if name.endswith("_se") and name[:-3]:
        base = meaning(name[:-3])
        if base.units is not None:
            return Meaning(f"standard error of {base.long_name}", base.units, f"estimated standard error of {name[:-3]} ({base.description})")
    if name.startswith("corpus_") and name[7:]:
        base = meaning(name[7:])
        if base.units is not None:
            return Meaning(f"{base.long_name}, whole corpus", base.units, f"{base.description}, over all sequences together")
    return Meaning(
        name.replace("_", " "),
        None,
        f"{name}: not described in colaprob.metadata; see the documentation of the command that wrote this file",
    )


def describe(ds: xr.Dataset) -> xr.Dataset:
    """A shallow copy of ``ds`` (the data is not copied) with the metadata of ``apply``."""
    return apply(ds.copy())


def apply(ds: xr.Dataset) -> xr.Dataset:
    """Give ``ds`` itself ``long_name``, ``units`` (where known) and ``description`` on every
    variable and the CF global attributes (module docstring); returns ``ds``. Attributes
    already present are kept; ``history`` gains one line."""
    for name, variable in ds.variables.items():
        entry = meaning(str(name))
        attrs = {"long_name": entry.long_name, "description": entry.description}
        if entry.units is not None and variable.dtype.kind in "iuf":
            attrs["units"] = entry.units
        variable.attrs = {**attrs, **variable.attrs}
        if name in ds.dims and variable.dtype.kind == "f":
            # CF forbids a fill value on a coordinate variable; xarray adds NaN to floats.
            variable.encoding["_FillValue"] = None
    ds.attrs = {**ds.attrs, **global_attributes(ds.attrs)}
    return ds


def global_attributes(attrs) -> dict:
    """``Conventions``, ``title``, ``source`` and ``history`` for a file with ``attrs``."""
    from colaprob import __version__

    what = attrs.get("diagnostic") or attrs.get("estimator_name") or attrs.get("estimator")
    title = f"colaprob {what}" if what else "colaprob results"
    model = attrs.get("model")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    line = f"{now} written by colaprob {__version__}"
    history = f"{attrs['history']}\n{line}" if attrs.get("history") else line
    return {
        "Conventions": CONVENTIONS,
        "title": attrs.get("title", title),
        "source": attrs.get("source", f"colaprob {__version__}" + (f", model {model}" if model else "")),
        "history": history,
    }
