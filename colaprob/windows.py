"""Cutting a long text into windows that fit the model, in time linear in the text's length.

Two ways to cut, for two different quantities:

* ``"independent"`` (``colaprob score --split``): consecutive windows cut at whitespace, the
  whitespace at a cut dropped, each window framed and scored as a document of its own, so
  the windows' sum is ``sum_j log p(w_j)``, not ``log p(document)``.
* ``"chain"`` (``colaprob score --rolling``, ``loglikelihood_rolling``): the windows partition
  the text exactly (``"".join(windows) == text``; the whitespace at a cut starts the next
  window, the word-boundary convention of a continuation), and each window must fit in one
  row together with the window before it, because the chain scores
  ``log p(w_1) + sum_{j>1} log p(w_j | w_{j-1})``.

A window holds as many whole words as fit (a word with the whitespace before it, in a chain);
a word too long to fit alone is cut between tokens. "Fits" is decided by a token budget for
the window's text alone (``token_budget``).

Linear time: the text is tokenized once; the token offsets give, for any span, an estimate
of its token count (the tokens that start inside it), and a pointer walks the words forward
once. Each chosen window is then tokenized on its own, as it will be framed; a tokenizer that
merges across the cut can make that count exceed the estimate by a few tokens, and the window
is then shortened by the overflow and checked again. Every character is tokenized a bounded
number of times, so a 1 MB line is cut in seconds (tests/test_windows.py measures it).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence

from colaprob.errors import ColaprobError

MODES = ("independent", "chain")
INDEPENDENT_NOTE = "documents longer than max_tokens were cut at whitespace into windows, each scored as an independent document"
CHAIN_NOTE = (
    "documents longer than max_tokens were cut into windows scored as a chain log p(w_1) + sum_j log p(w_j | w_(j-1)), "
    "one log p(document) per document"
)


class Row:
    """One scored sequence: document ``index`` of the corpus, or its window ``window``."""

    def __init__(self, document, index: int, window: int, source: str):
        self.document, self.index, self.window, self.source = document, index, window, source


def cut_rows(model, documents, mode: str | None) -> list[Row]:
    """A row per ``(document, source)``; with ``mode`` ``"independent"``, a plain text that
    exceeds the model's ``max_tokens`` becomes a row per window (``window`` 0, 1, ...).
    Prompt-response pairs are never cut."""
    from colaprob.data import Document

    budget = None if mode is None else token_budget(model, mode)
    tokenize = model_tokenize(model)
    rows = []
    for i, (doc, source) in enumerate(documents):
        pieces = [doc.text] if budget is None or doc.prompt is not None else cut(doc.text, tokenize, budget, mode)
        if len(pieces) == 1:
            rows.append(Row(doc, i, 0, source))
        else:
            rows += [Row(Document(piece), i, w, source) for w, piece in enumerate(pieces)]
    return rows


def model_tokenize(model) -> Callable[[str], tuple[list[int], list[tuple[int, int]]]]:
    """``text -> (ids, character offsets)`` with the model's tokenizer (no special tokens)."""
    backend = model.tokenizer.backend

    def tokenize(text: str):
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    return tokenize


def token_budget(model, mode: str) -> int | None:
    """The most tokens a window's text may have (None: no limit) under ``model.framing``.

    A framed row is padded to a multiple ``m = patch_size * block_size`` of tokens, so it fits
    ``max_tokens`` when its unpadded length is at most ``floor(max_tokens / m) * m``.
    Independent: the window with the beginning- and end-of-text tokens. Chain: two windows
    side by side after the beginning-of-text token (a continuation's row has no end-of-text,
    ``colaprob.estimators.continuations``), so each gets half."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    framing = model.framing
    if framing.max_tokens is None:
        return None
    multiple = model.patch_size * model.block_size
    room = framing.max_tokens // multiple * multiple - (framing.bos_id is not None)
    if mode == "independent":
        return room - (framing.eos_id is not None)
    return room // 2


def cut(text: str, tokenize: Callable[[str], tuple[list[int], list[tuple[int, int]]]], budget: int | None, mode: str) -> list[str]:
    """``text`` cut into windows of at most ``budget`` tokens each (module docstring).

    ``tokenize(text) -> (ids, offsets)``: the token ids and each token's character span
    ``(start, end)`` in ``text`` (a character split into several tokens gives them the same
    span). ``budget`` None: the whole text is one window."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if budget is None:
        return [text]
    if budget < 1:
        raise ColaprobError("the model's max_tokens is too small to hold even one token of text once framed.")
    ids, offsets = tokenize(text)
    starts = [start for start, _ in offsets]
    count = lambda a, b: bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)  # tokens starting in [a, b)
    measure = lambda a, b: len(tokenize(text[a:b])[0])
    pieces = []
    for start, end in _words(text, mode):
        pieces += _cut_word(start, end, starts, count, measure, budget)
    windows, first = [], 0
    while first < len(pieces):
        last, allowance = first, budget
        while True:
            last = _furthest(pieces, first, last, count, allowance)
            a, b = pieces[first][0], pieces[last][1]
            overflow = measure(a, b) - budget
            if overflow <= 0:
                break
            if last == first:  # a piece that fit alone when it was made
                raise ColaprobError(f"the text around character {a} cannot be cut into windows of {budget} tokens.")
            allowance -= overflow  # the window alone tokenizes longer than its span did: shorten it
            last = first
        windows.append(text[pieces[first][0] : pieces[last][1]])
        first = last + 1
    return windows


def _words(text: str, mode: str) -> list[tuple[int, int]]:
    """Character spans of the units a window holds whole: the words, and in a chain the
    whitespace before each word (the text's trailing whitespace joins the last word), so the
    spans partition the text. A text with no word is one unit."""
    if not text.strip():
        return [(0, len(text))]
    if mode == "independent":
        return [m.span() for m in re.finditer(r"\S+", text)]
    spans = [m.span() for m in re.finditer(r"\s*\S+", text)]
    spans[-1] = (spans[-1][0], len(text))
    return spans


def _cut_word(start: int, end: int, starts: list[int], count, measure, budget: int) -> list[tuple[int, int]]:
    """``[start, end)`` as spans that each fit ``budget`` tokens on their own: the word
    itself, or, if it is too long, runs of its tokens cut where a token starts (never inside
    a character). A word well inside the budget by the whole text's count is not tokenized
    again here (the window that holds it is)."""
    if count(start, end) <= budget // 2 or measure(start, end) <= budget:
        return [(start, end)]
    spans, a = [], start
    while a < end:
        allowance = budget
        while True:
            k = bisect.bisect_left(starts, a) + allowance  # the first token left out
            stop = min(end, starts[k]) if k < len(starts) else end
            if stop <= a:
                raise ColaprobError(f"the model's max_tokens is too small to hold even one character (at {a}) once framed.")
            overflow = measure(a, stop) - budget
            if overflow <= 0:
                break
            allowance -= overflow
            if allowance < 1:
                raise ColaprobError(f"the model's max_tokens is too small to hold even one character (at {a}) once framed.")
        spans.append((a, stop))
        a = stop
    return spans


def _furthest(pieces: Sequence[tuple[int, int]], first: int, last: int, count, allowance: int) -> int:
    """The last piece index ``>= last`` such that pieces ``first..`` it hold at most
    ``allowance`` tokens by the whole text's tokenization (at least ``first``)."""
    a = pieces[first][0]
    while last + 1 < len(pieces) and count(a, pieces[last + 1][1]) <= allowance:
        last += 1
    return last
