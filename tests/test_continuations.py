"""Continuation scoring: exact answers on a tractable model, the shared-context path against
the independent per-choice joint on the same draws, and the framing."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import colaprob
from colaprob.estimators import draws, cnf
from colaprob.estimators.continuations import ContinuationBatch, continuation_log_prob, frame_continuations, score_continuations
from colaprob.protocol import TokenBatch

from test_elbo_iwae import FIXED, _quadrature_model

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny-a"


@pytest.fixture(scope="module")
def cola():
    return colaprob.load(str(FIXTURE))


def _exact(model, batch: ContinuationBatch) -> np.ndarray:
    rows = batch.token_batch()
    context = torch.stack([model.exact_log_prob(rows.select([r]), n) if n else torch.zeros(1, dtype=torch.float64) for r, n in enumerate(batch.context_tokens.tolist())])
    return (model.exact_log_prob(rows, batch.total_tokens) - context[:, 0]).numpy()


def test_matches_the_exact_conditional_of_a_tractable_model():
    """Patch 2, block 1: contexts ending on and inside a latent position, an empty context,
    choices of one and two tokens; log p(y | c) by quadrature."""
    model = _quadrature_model()
    contexts = [[0, 1], [2], []]
    choices = [[[2], [1, 0], [0]], [[1, 2, 0], [0]], [[1, 1], [2]]]
    batch = ContinuationBatch.from_tokens(contexts, choices, multiple=2)
    ds = score_continuations(model, batch, 2000, chunk_size=1000, **FIXED)
    got = ds.log_likelihood.values[batch.item, batch.choice]
    se = ds.log_likelihood_se.values[batch.item, batch.choice]
    assert (np.abs(got - _exact(model, batch)) < 4 * se + 0.005).all(), (got, _exact(model, batch), se)
    assert np.all(ds.log_weight_context.values[2, :2] == 0)  # empty context, no bos: log p(c) = 0
    assert ds.choice_valid.values.tolist() == [[True] * 3, [True, True, False], [True, True, False]]
    assert ds.n_tokens.values.tolist() == [[1, 2, 1], [3, 1, 0], [2, 1, 0]]


def _cola_items():
    """On the fixture (4-token blocks), framed contexts of 10 tokens (inside a block), 8 (on
    a block boundary), 1 (the bos alone) and 23; choices of different lengths, some crossing
    block boundaries."""
    return (
        ["The cat sat on the", "Question", "", "One two three four five six seven"],
        [[" mat", " hat", " dog barked loudly", " a"], [" yes", " no"], [" hello"], [" eight", " nine", " ten", " eleven"]],
    )


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_shared_context_equals_the_independent_per_choice_joint_on_the_same_draws(cola, trace):
    contexts, choices = _cola_items()
    options = dict(seed=3, trace=trace, method="euler", steps=3, chunk_size=3)
    shared = continuation_log_prob(cola, contexts, choices, 5, **options)
    assert frame_continuations(cola, contexts, choices).context_tokens.unique().tolist() == [1, 8, 10, 23]
    alone = continuation_log_prob(cola, contexts, choices, 5, share_context=False, **options)
    valid = shared.choice_valid.values
    for name in ("log_weight", "log_weight_context"):
        a, b = shared[name].values[valid], alone[name].values[valid]
        assert np.allclose(a, b, rtol=0, atol=2e-5), (name, np.abs(a - b).max())  # float32 rounding of weights ~500 nats
    assert shared.attrs["dit_rows"] < alone.attrs["dit_rows"]
    assert shared.attrs["share_context"] == 1 and alone.attrs["share_context"] == 0


def test_weights_are_the_draw_engines_prefix_marginal_weights(cola):
    """The independent path's joint weights are the draw engine's prefix-marginal weights of
    the joint rows (the first n tokens' decoder terms, the prior and posterior of the blocks
    covering them); the context's are those of each item's context alone, drawn from the
    prefix-only proposal: the same for every choice of an item."""
    contexts, choices = _cola_items()
    batch = frame_continuations(cola, contexts, choices)
    keys = torch.tensor([7, 3, 0, 12])
    solver = cnf.Solver(method="euler", steps=3)
    ds = score_continuations(cola, batch, 4, item_ids=keys.tolist(), share_context=False, solver=solver)
    weights = lambda d: (d.per_sample["decoder_prefix"] + d.per_sample["prior_prefix"] - d.per_sample["posterior_prefix"]).numpy()
    rows = batch.token_batch()
    joint = draws.draw(cola, rows, 4, seed=0, keys=keys[batch.item], prefix_tokens=batch.total_tokens, solver=solver)
    assert np.allclose(ds.log_weight.values[batch.item, batch.choice], weights(joint), rtol=0, atol=1e-4)
    first = [batch.item.tolist().index(i) for i in range(batch.n_items)]
    n = batch.context_tokens[first]
    block_tokens = cola.patch_size * cola.block_size
    covering = -(-n // block_tokens) * block_tokens
    alone = TokenBatch(ids=batch.ids[first, : int(covering.max())], lengths=covering, n_tokens=n, n_bytes=n, n_words=n)
    proposal = draws.prefix_only_proposal(cola, alone, n)
    context = draws.draw(cola, alone, 4, seed=0, keys=keys, prefix_tokens=n, proposal=proposal, solver=solver)
    assert np.allclose(ds.log_weight_context.values[batch.item, batch.choice], weights(context)[batch.item], rtol=0, atol=1e-4)


def test_an_item_scores_the_same_whatever_else_is_in_the_batch(cola):
    contexts, choices = _cola_items()
    options = dict(method="euler", steps=3, seed=1)
    together = continuation_log_prob(cola, contexts, choices, 3, item_ids=[0, 1, 2, 3], **options)
    alone = continuation_log_prob(cola, contexts[1:2], choices[1:2], 3, item_ids=[1], **options)
    assert np.allclose(together.log_weight.sel(item=1).values[:2], alone.log_weight.sel(item=1).values, atol=1e-4)


def test_framing_bos_context_continuation_no_end_of_text_no_padding_counted(cola):
    tok, framing = cola.tokenizer, cola.framing
    batch = frame_continuations(cola, ["Answer: "], [["4", " 42"]])
    context = [framing.bos_id] + tok.encode("Answer:")
    assert batch.context_tokens.tolist() == [len(context)] * 2
    first = batch.ids[0, : int(batch.total_tokens[0])].tolist()
    assert first == context + tok.encode(" 4")  # the context's trailing space moved to the continuation
    assert batch.ids[1, len(context) : int(batch.total_tokens[1])].tolist() == tok.encode("  42")
    assert (batch.lengths % (cola.patch_size * cola.block_size) == 0).all()
    # After the counted tokens: the end-of-text token (seen by the encoder, never scored), then padding.
    after = batch.ids[0, int(batch.total_tokens[0]) : int(batch.lengths[0])].tolist()
    assert after[0] == framing.eos_id and set(after[1:]) <= {framing.pad_id}
    assert framing.eos_id not in batch.ids[0, len(context) :].tolist()[: int(batch.total_tokens[0]) - len(context)]
    ds = continuation_log_prob(cola, ["Answer: "], [["4", " 42"]], 2, method="euler", steps=2)
    assert ds.n_tokens.values.tolist() == [[len(tok.encode(" 4")), len(tok.encode("  42"))]]
    assert ds.n_bytes.values.tolist() == [[2, 4]]


@pytest.mark.parametrize(
    "contexts, continuations, error",
    [
        ("a", [["b"]], TypeError),
        (["a"], [["b"], ["c"]], ValueError),
        (["a"], [[]], ValueError),
        (["a"], [[""]], ValueError),
        (["a"], ["b"], ValueError),
    ],
)
def test_bad_arguments_name_themselves(cola, contexts, continuations, error):
    with pytest.raises(error, match="contexts|continuations"):
        continuation_log_prob(cola, contexts, continuations, 2)


def test_bad_settings_name_themselves(cola):
    with pytest.raises(ValueError, match="n_samples"):
        continuation_log_prob(cola, ["a"], [[" b"]], 0)
    with pytest.raises(ValueError, match="item_ids"):
        continuation_log_prob(cola, ["a"], [[" b"]], 2, item_ids=[-1])


def test_a_context_ending_inside_a_block_draws_from_a_context_only_proposal():
    """Patch 2, block 1, a sharp decoder: contexts of one token inside a latent position and
    of two ending on it. With the joint row's posterior as proposal (it has seen the
    continuation) the context term was up to 1.45 nats (12 SE) off at K = 4096 and differed
    from choice to choice; from the context-only proposal it is one number per item, within
    3 SE of the exact one, and so is the conditional."""
    from test_conditional import _sharp_decoder_model

    model = _sharp_decoder_model()
    # Every joint ends on a block boundary (the next test has joints that do not).
    batch = ContinuationBatch.from_tokens([[0], [2, 1], [1]], [[[1, 2, 1], [2, 0, 2], [0]], [[0, 1]], [[2], [1, 1, 0]]], multiple=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-hat is the subject of the next test
        ds = score_continuations(model, batch, 4096, chunk_size=4096, **FIXED)
    rows = batch.token_batch()
    exact_context = torch.cat([model.exact_log_prob(rows.select([r]), batch.context_tokens[r : r + 1]) for r in range(len(rows.ids))]).numpy()
    at = (batch.item, batch.choice)
    got, se = ds.log_context.values[at], ds.log_context_se.values[at]
    assert (np.abs(got - exact_context) < 3 * se).all(), (got - exact_context, se)
    assert (ds.log_context.values[batch.item, batch.choice] == ds.log_context.values[batch.item, 0]).all()
    conditional, conditional_se = ds.log_likelihood.values[at], ds.log_likelihood_se.values[at]
    assert (np.abs(conditional - _exact(model, batch)) < 3 * conditional_se + 0.01).all(), (conditional - _exact(model, batch), conditional_se)


def test_a_joint_ending_inside_a_block_draws_from_a_joint_only_proposal():
    """Patch 2, block 1, a sharp decoder: joints of three tokens end inside a latent
    position, whose padding the row's posterior has seen (token 0 here). Drawing that
    position from the row's posterior left the joint term up to 2.1 nats (11 SE) off at
    K = 4096; from the joint-only proposal every joint is within 3 SE of the exact one, and
    so is the conditional. A joint ending on a boundary (the last) keeps its posterior."""
    from test_conditional import _sharp_decoder_model

    model = _sharp_decoder_model()
    batch = ContinuationBatch.from_tokens([[0], [2, 1], [1]], [[[1, 2], [2, 0], [0, 1]], [[0]], [[2, 1], [1, 1], [2]]], multiple=2)
    assert (batch.total_tokens % 2).tolist() == [1] * 6 + [0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some k-hats are high: the sharp decoder
        ds = score_continuations(model, batch, 4096, chunk_size=4096, **FIXED)
    rows, at = batch.token_batch(), (batch.item, batch.choice)
    exact_joint = model.exact_log_prob(rows, batch.total_tokens).numpy()
    got, se = ds.log_joint.values[at], ds.log_joint_se.values[at]
    assert (np.abs(got - exact_joint) < 3 * se).all(), (got - exact_joint, se)
    conditional, conditional_se = ds.log_likelihood.values[at], ds.log_likelihood_se.values[at]
    assert (np.abs(conditional - _exact(model, batch)) < 3 * conditional_se + 0.01).all(), (conditional - _exact(model, batch), conditional_se)


def test_heavy_tailed_context_weights_are_flagged_and_named():
    """A context of one token inside a latent position under a sharp decoder: the fitted
    Gaussian posterior of the context alone is still a heavy-tailed proposal there (k-hat
    0.87 at K = 512), flagged for every choice of the item and the item named; below 21
    samples k-hat is not computable and nothing is claimed."""
    from test_conditional import _sharp_decoder_model

    model = _sharp_decoder_model()
    batch = ContinuationBatch.from_tokens([[0], [2, 1]], [[[1, 2, 1], [2, 0, 2]], [[0, 1]]], multiple=2)
    with pytest.warns(UserWarning, match=r"context term log p\(context\) of item\(s\) 0 has heavy-tailed"):
        ds = score_continuations(model, batch, 512, chunk_size=512, **FIXED)
    flagged = ds.context_heavy_tailed.values
    assert flagged.tolist() == (ds.khat_context > ds.khat_threshold).values.tolist()
    assert flagged[0].all() and not flagged[1].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few = score_continuations(model, batch, 8, **FIXED)
    assert not few.context_heavy_tailed.any() and np.isnan(few.khat_context).all()


def test_heavy_tailed_joint_weights_are_flagged_and_named():
    """A proposal narrower than the posterior (a quadrature model's encoder at 0.3 of its
    width) gives heavy-tailed joint weights: exactly the choices whose k-hat is above the
    threshold are flagged (some, not all) and their items named; below 21 samples nothing."""
    from test_solver_error import _quadrature_model

    model = _quadrature_model(posterior_widening=0.3)
    batch = ContinuationBatch.from_tokens([[0, 1], [2]], [[[2], [1, 0]], [[1, 2, 0], [0]]], multiple=2)
    with pytest.warns(UserWarning, match=r"joint term log p\(context \+ continuation\) of item\(s\) 0, 1 has heavy-tailed"):
        ds = score_continuations(model, batch, 256, chunk_size=256, method="rk4", steps=4)
    flagged = ds.joint_heavy_tailed.values
    assert flagged.tolist() == (ds.khat > ds.khat_threshold).values.tolist()
    assert flagged.any() and not flagged.all()
    few = score_continuations(model, batch, 8, method="rk4", steps=4)
    assert not few.joint_heavy_tailed.any() and np.isnan(few.khat).all()
