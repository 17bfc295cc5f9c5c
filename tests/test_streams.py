"""The per-sequence random streams: a sequence's numbers depend on (seed, stream, key,
sample) alone -- not on its batch, its neighbours' lengths, or its own length."""

import pytest
import torch

from colaprob.estimators import streams


def draw(keys, lengths, indices=range(3), stream=streams.POSTERIOR, seed=0, **kw):
    return streams.draws(seed, stream, torch.tensor(keys), indices, torch.tensor(lengths), 5, **kw)


def test_a_sequence_gets_its_numbers_in_any_batch_and_order():
    alone = draw([7], [4])[:, 0]
    batched = draw([3, 7, 1], [6, 4, 2])[:, 1, :4]
    reordered = draw([7, 3], [4, 6])[:, 0, :4]
    torch.testing.assert_close(batched, alone, rtol=0, atol=0)
    torch.testing.assert_close(reordered, alone, rtol=0, atol=0)


def test_a_prefix_gets_the_first_positions_of_the_whole():
    whole, prefix = draw([2], [8]), draw([2], [3])
    torch.testing.assert_close(prefix[:, 0, :3], whole[:, 0, :3], rtol=0, atol=0)
    assert (draw([2, 5], [3, 8])[:, 0, 3:] == 0).all()  # padded past its length


def test_samples_streams_seeds_and_keys_differ_and_a_sample_does_not_depend_on_the_others():
    base = draw([0], [4])
    assert not torch.equal(base[0], base[1])
    for other in (draw([0], [4], stream=streams.PROBE), draw([0], [4], seed=1), draw([1], [4])):
        assert not torch.equal(base, other)
    torch.testing.assert_close(draw([0], [4], indices=range(2, 3))[0], base[2], rtol=0, atol=0)


def test_rademacher_probes_are_signs_and_leading_probes_are_distinct():
    probes = draw([0], [4], kind="rademacher", leading=(2,))
    assert probes.shape == (2, 3, 1, 4, 5) and set(probes.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(probes[0], probes[1])
    with pytest.raises(ValueError, match="rademacher"):
        draw([0], [4], kind="uniform")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        draw([0], [4], seed=-1)
