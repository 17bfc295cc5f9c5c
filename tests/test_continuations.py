"""Continuation scoring: exact answers on a tractable model, the shared-context path against
the independent per-choice joint on the same draws, and the framing."""

from pathlib import Path

import numpy as np
import pytest
import torch

import colaprob
from colaprob.estimators import draws, cnf
from colaprob.estimators.continuations import ContinuationBatch, continuation_log_prob, frame_continuations, score_continuations

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


def test_per_choice_weights_are_the_prefix_marginal_weights_of_thedraws_draws(cola):
    """The independent path is the conditional estimator's weights: the first n tokens'
    decoder terms and the prior / posterior of the blocks covering them."""
    contexts, choices = _cola_items()
    batch = frame_continuations(cola, contexts, choices)
    keys = torch.tensor([7, 3, 0, 12])
    ds = score_continuations(cola, batch, 4, item_ids=keys.tolist(), share_context=False, method="euler", steps=3)
    rows, row_keys = batch.token_batch(), keys[batch.item]
    for n, name in ((batch.total_tokens, "log_weight"), (batch.context_tokens, "log_weight_context")):
        d = draws.draw(cola, rows, 4, seed=0, keys=row_keys, prefix_tokens=n, solver=cnf.Solver(method="euler", steps=3))
        ref = (d.per_sample["decoder_prefix"] + d.per_sample["prior_prefix"] - d.per_sample["posterior_prefix"]).numpy()
        assert np.allclose(ds[name].values[batch.item, batch.choice], ref, rtol=0, atol=1e-4), name


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


def test_heavy_tailed_context_weights_are_flagged_and_named():
    """A context of one token inside a latent position that a sharp decoder's continuation
    token shares: the joint row's posterior is a heavy-tailed proposal for the context term."""
    from test_conditional import _sharp_decoder_model

    model = _sharp_decoder_model()
    batch = ContinuationBatch.from_tokens([[0], [2, 1]], [[[1, 2, 1], [2, 0, 2]], [[0, 1]]], multiple=2)
    with pytest.warns(UserWarning, match=r"context term log p\(context\) of item 0 choice"):
        ds = score_continuations(model, batch, 512, chunk_size=512, **FIXED)
    flagged = ds.context_heavy_tailed.values
    assert flagged.any() and flagged.tolist() == (ds.khat_context > ds.khat_threshold).values.tolist()
    assert not flagged[1].any()  # a context on a block boundary
