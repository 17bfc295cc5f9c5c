"""Windowing long texts (colaprob.windows): windows fit, are as long as the budget allows,
keep or partition the text as their mode says, and a 1 MB line is cut in linear time."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import colaprob
from colaprob import windows
from colaprob.windows import framed_length_fn
from colaprob.errors import ColaprobError


@pytest.fixture(scope="module")
def tiny():
    return colaprob.load("tiny")  # byte-level tokenizer, max_tokens 64, blocks of 4 tokens


def _bytes_tokenize(text):
    """One token per UTF-8 byte; the bytes of a character share its span."""
    ids, offsets = [], []
    for i, char in enumerate(text):
        for byte in char.encode("utf-8"):
            ids.append(byte)
            offsets.append((i, i + 1))
    return ids, offsets


def _reference(text, budget, mode):
    """The same greedy cut by brute force: grow each window one unit at a time while its own
    tokenization fits (units: words, or whitespace + word in a chain; a unit too long is cut
    into the longest character runs that fit)."""
    units = windows._words(text, mode)
    size = lambda a, b: len(text[a:b].encode("utf-8"))
    pieces = []
    for a, b in units:
        while size(a, b) > budget:
            stop = max(c for c in range(a + 1, b + 1) if size(a, c) <= budget)
            pieces.append((a, stop))
            a = stop
        pieces.append((a, b))
    out, first = [], 0
    while first < len(pieces):
        last = first
        while last + 1 < len(pieces) and size(pieces[first][0], pieces[last + 1][1]) <= budget:
            last += 1
        out.append(text[pieces[first][0] : pieces[last][1]])
        first = last + 1
    return out


texts = st.text(st.sampled_from("ab é日 \n\t"), max_size=80)


@settings(max_examples=60, deadline=None)
@given(text=texts, budget=st.integers(3, 20), mode=st.sampled_from(windows.MODES))
def test_cut_is_the_greedy_cut_and_keeps_the_text(text, budget, mode):
    got = windows.cut(text, _bytes_tokenize, budget, mode)
    assert got == _reference(text, budget, mode)
    assert all(len(w.encode("utf-8")) <= budget for w in got)
    if mode == "chain":
        assert "".join(got) == text  # a partition: nothing dropped, nothing repeated
    else:
        assert "".join("".join(got).split()) == "".join(text.split())  # only whitespace at the cuts is dropped
        assert all(w == w.strip() for w in got) or not text.strip()


def test_independent_windows_fit_the_model_and_chain_windows_fit_in_pairs(tiny):
    text = "The quick brown fox jumps over the lazy dog, " * 12 + "x" * 150
    framed = framed_length_fn(tiny)
    split = windows.cut_for(tiny, text, "independent")
    assert len(split) > 3 and all(framed(w) <= 64 for w in split)
    assert max(framed(a + " " + b) for a, b in zip(split, split[1:])) > 64  # each window is as long as fits
    chain = windows.cut_for(tiny, text, "chain")
    assert "".join(chain) == text
    assert all(len(tiny.tokenizer.encode(a + b)) <= 64 for a, b in zip(chain, chain[1:]))  # no bos in tiny's framing
    assert all(w.startswith(" ") or w[0] == "x" for w in chain[1:])  # the cut's space starts the next window


def test_a_window_that_tokenizes_longer_alone_is_shortened():
    """A tokenizer that spends one more token on a text that starts with a letter (as a BPE
    with a leading-word marker does): the whole text's count underestimates each window."""

    def tokenize(text):
        ids, offsets = _bytes_tokenize(text)
        extra = int(bool(text) and not text[0].isspace())
        return [0] * extra + ids, [(0, 0)] * extra + offsets

    text = "aaa bbb ccc ddd eee fff"
    got = windows.cut(text, tokenize, 8, "independent")
    assert got == ["aaa bbb", "ccc ddd", "eee fff"]  # "aaa bbb" is 7 + 1 tokens alone
    assert all(len(tokenize(w)[0]) <= 8 for w in got)


def test_a_budget_below_one_character_is_refused():
    with pytest.raises(ColaprobError, match="too small to hold even one character"):
        windows.cut("日本", _bytes_tokenize, 2, "chain")  # 3 bytes per character


def test_no_limit_is_one_window(tiny):
    assert windows.cut("anything at all ", windows.model_tokenize(tiny), None, "chain") == ["anything at all "]


def test_a_one_megabyte_line_is_cut_in_well_under_ten_seconds(tiny):
    """``--split`` on one 1 MB line (issue: the old binary search re-tokenized the rest of
    the text for every window and did not finish in 300 s). The chain shares the code."""
    mode = "independent"
    words = ("alpha", "be", "gamma", "delta", "epsilon", "ze", "eta", "theta")
    text = " ".join(words[i % 8] for i in range(200_000))[:999_999] + "x"
    assert len(text) == 1_000_000
    start = time.perf_counter()
    got = windows.cut_for(tiny, text, mode)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed
    assert " ".join(got) == text
    print(f"{len(got)} windows in {elapsed:.2f} s")
