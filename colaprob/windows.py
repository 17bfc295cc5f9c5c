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
of its token count (the tokens that start inside it), and each window's last word is found by
a binary search over the words' cumulative counts. The chosen windows are then tokenized on
their own, as they will be framed, in batches; a tokenizer that merges across the cut can make
that count exceed the estimate by a few tokens, and the window is then shortened by the
overflow and checked again. Every character is tokenized a bounded
number of times, so a 1 MB line is cut in seconds (tests/test_windows.py measures it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from colaprob.errors import ColaprobError

MODES = ("independent", "chain")
ROUND = 256  # windows tokenized together in one batch
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

    rows = []
    for i, (doc, source) in enumerate(documents):
        pieces = [doc.text] if mode is None or doc.prompt is not None else cut_for(model, doc.text, mode)
        if len(pieces) == 1:
            rows.append(Row(doc, i, 0, source))
        else:
            rows += [Row(Document(piece), i, w, source) for w, piece in enumerate(pieces)]
    return rows


def cut_for(model, text: str, mode: str) -> list[str]:
    """``cut`` with ``model``'s tokenizer and the budget of ``mode`` under its framing."""
    return cut(text, model_tokenize(model), token_budget(model, mode), mode, model_lengths(model))


def model_tokenize(model) -> Callable[[str], tuple[list[int], list[tuple[int, int]]]]:
    """``text -> (ids, character offsets)`` with the model's tokenizer (no special tokens)."""
    backend = model.tokenizer.backend

    def tokenize(text: str):
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    return tokenize


def model_lengths(model) -> Callable[[list[str]], list[int]]:
    """``texts -> token counts`` with the model's tokenizer, in one batch call."""
    return lambda texts: [len(ids) for ids in model.tokenizer.encode_batch(texts)]


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


def cut(
    text: str,
    tokenize: Callable[[str], tuple[list[int], list[tuple[int, int]]]],
    budget: int | None,
    mode: str,
    lengths: Callable[[list[str]], list[int]] | None = None,
) -> list[str]:
    """``text`` cut into windows of at most ``budget`` tokens each (module docstring).

    ``tokenize(text) -> (ids, offsets)``: the token ids and each token's character span
    ``(start, end)`` in ``text`` (a character split into several tokens gives them the same
    span); ``lengths(texts)``: the number of tokens of each text (default: by ``tokenize``;
    a tokenizer's batch call is faster). ``budget`` None: the whole text is one window."""
    lengths = lengths or (lambda texts: [len(tokenize(t)[0]) for t in texts])
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if budget is None:
        return [text]
    if budget < 1:
        raise ColaprobError("the model's max_tokens is too small to hold even one token of text once framed.")
    _, offsets = tokenize(text)
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    first_token = lambda positions: np.searchsorted(starts, positions)  # the first token starting at or after each position
    count = lambda a, b: int(first_token(b) - first_token(a))  # tokens starting in [a, b)
    measure = lambda a, b: len(tokenize(text[a:b])[0])
    words = np.array(_words(text, mode), dtype=np.int64).reshape(-1, 2)
    # Only a word long by the whole text's count can need cutting (``_cut_word``).
    long = np.nonzero(first_token(words[:, 1]) - first_token(words[:, 0]) > budget // 2)[0]
    cuts = {int(i): _cut_word(int(words[i, 0]), int(words[i, 1]), starts, count, measure, budget) for i in long}
    pieces = np.array([p for i, w in enumerate(words.tolist()) for p in cuts.get(i, [w])], dtype=np.int64).reshape(-1, 2) if cuts else words
    lo, hi = first_token(pieces[:, 0]), first_token(pieces[:, 1])  # pieces first..last hold hi[last] - lo[first] tokens
    windows, first = [], 0
    while first < len(pieces):
        # Up to ROUND windows by the whole text's count, then each tokenized on its own in one
        # batch; the first that tokenizes longer is shortened, and the next round starts after it.
        run, f = [], first
        while f < len(pieces) and len(run) < ROUND:
            last = max(f, int(np.searchsorted(hi, lo[f] + budget, side="right")) - 1)
            run.append((f, last))
            f = last + 1
        sizes = lengths([text[pieces[f, 0] : pieces[last, 1]] for f, last in run])
        fitting = next((k for k, n in enumerate(sizes) if n > budget), len(run))
        windows += [text[pieces[f, 0] : pieces[last, 1]] for f, last in run[:fitting]]
        if fitting == len(run):
            first = run[-1][1] + 1
            continue
        f, last = run[fitting]
        allowance = budget - (sizes[fitting] - budget)
        while True:
            if last == f:  # a piece that fit alone when it was made
                raise ColaprobError(f"the text around character {int(pieces[f, 0])} cannot be cut into windows of {budget} tokens.")
            last = max(f, int(np.searchsorted(hi, lo[f] + allowance, side="right")) - 1)
            overflow = measure(int(pieces[f, 0]), int(pieces[last, 1])) - budget
            if overflow <= 0:
                break
            allowance -= overflow  # the window alone tokenizes longer than its span did: shorten it
        windows.append(text[pieces[f, 0] : pieces[last, 1]])
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


def _cut_word(start: int, end: int, starts: np.ndarray, count, measure, budget: int) -> list[tuple[int, int]]:
    """``[start, end)`` as spans that each fit ``budget`` tokens on their own: the word
    itself, or, if it is too long, runs of its tokens cut where a token starts (never inside
    a character)."""
    if measure(start, end) <= budget:
        return [(start, end)]
    spans, a = [], start
    while a < end:
        allowance = budget
        while True:
            k = int(np.searchsorted(starts, a)) + allowance  # the first token left out
            stop = min(end, int(starts[k])) if k < len(starts) else end
            if stop <= a:
                raise ColaprobError(f"the model's max_tokens is too small to hold even one character (character {a} of the text) once framed.")
            overflow = measure(a, stop) - budget
            if overflow <= 0:
                break
            allowance -= overflow
            if allowance < 1:
                raise ColaprobError(f"the model's max_tokens is too small to hold even one character (character {a} of the text) once framed.")
        spans.append((a, stop))
        a = stop
    return spans


def framed_length_fn(model) -> Callable[..., int]:
    """``(text, prompt=None) -> framed length in tokens`` for ``model``: bos, the prompt's
    tokens, the text's tokens, eos, padding to whole blocks (as ``model.frame`` counts). For a
    text that cannot fit the context, a lower bound (still over the context) instead."""
    framing = model.framing
    multiple = model.patch_size * model.block_size
    extra = (framing.bos_id is not None) + (framing.eos_id is not None)

    def framed_length(text: str, prompt: str | None = None) -> int:
        # A text surely over the context is not tokenized: its lower bound is over already.
        n = model.tokenizer.fewest_tokens(text) + model.tokenizer.fewest_tokens(prompt or "") + extra
        if framing.max_tokens is None or n <= framing.max_tokens:
            n = len(model.tokenizer.encode(text)) + len(model.tokenizer.encode(prompt or "")) + extra
        return n + (-n % multiple)

    return framed_length


def check_lengths(documents: Sequence, framed_length: Callable[..., int], max_tokens: int | None) -> None:
    """Refuse, before any work, the first document (prompt included) whose framed length
    exceeds ``max_tokens``."""
    if max_tokens is None:
        return
    for i, doc in enumerate(documents):
        n = framed_length(doc.text, doc.prompt)
        if n > max_tokens:
            advice = "shorten the pair" if doc.prompt is not None else "shorten it or pass --split to score it in windows"
            raise ColaprobError(f"document {i} is at least {n} tokens long once framed, more than the model's limit of {max_tokens}; {advice}.")



def rows_to_score(model, documents, split: bool) -> list[Row]:
    """The sequences to score: every ``(document, source)``, and with ``split`` the windows
    of texts that exceed the model's ``max_tokens``, each scored as an independent document
    (``cut_rows``). Without ``split``, or for a prompt-response pair, a text too
    long is refused before any work."""
    rows = cut_rows(model, documents, "independent" if split else None)
    check_lengths([row.document for row in rows], framed_length_fn(model), model.framing.max_tokens)
    return rows



def windows_note(rows: Sequence[Row]) -> str:
    """The attribute that says whether (and how) long documents were windowed."""
    return INDEPENDENT_NOTE if any(row.window > 0 for row in rows) else "none"
