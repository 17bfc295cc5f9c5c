"""Tokenizers and framing: how a text becomes the token sequence whose probability is computed.

``Tokenizer`` wraps a HuggingFace ``tokenizers`` tokenizer (``tokenizer.json``: OLMo 2 BPE for
the official checkpoint). ``byte_level_tokenizer()`` builds the tokenizer of models trained
here: one token per UTF-8 byte (any text round-trips exactly), then ``<|endoftext|>``, then
``<|pad|>`` as the last id, like OLMo 2.

A text is *framed* (see the README, "Units and which tokens count"): ``[bos] + tokens(text) +
[eos]``, right-padded with ``pad`` to a whole number of prior blocks (``patch_size *
dit.block_size`` tokens). Every framed position counts in ``log p``; nats/token divides by the
text's tokens plus one (the eos).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

from colaprob.errors import ColaprobError
from colaprob.protocol import TokenBatch

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
STOP = "\u25a0"  # "■": the padding / stop token of the official training scripts


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the few methods colaprob uses."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend
        self.source = "the tokenizer"
        self._longest_entry: int | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise ColaprobError(f"{path} does not exist; a checkpoint needs its tokenizer.json.")
        try:
            tokenizer = cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as err:  # the Rust library raises a bare Exception
            raise ColaprobError(f"{path} is not a valid tokenizers JSON file ({_first_line(err)}).") from None
        except BaseException as err:
            _reraise_unless_library_failure(err)
            raise ColaprobError(f"{path} crashed the tokenizers library while loading ({_first_line(err)}); the file is not usable.") from None
        tokenizer.source = str(path)
        return tokenizer

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens of ``text``, without tokenizing it: no token stands for
        more characters than the longest entry of the vocabulary (for a byte-level BPE an
        entry's characters are bytes, at least as many as the text's characters). Lets a
        text far over a limit be refused at once instead of after minutes of BPE merges."""
        if self._longest_entry is None:
            self._longest_entry = max((len(t) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)
        return -(-len(text) // self._longest_entry)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token a template might add (framing adds
        its own)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text. Whatever goes wrong inside the tokenizers library (an
        error, a Rust panic such as a regex that backtracks without end, a text that is not
        valid Unicode) is one ``ColaprobError``."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, but item {i} is {type(text).__name__}.")
        try:
            with _native_stderr_silenced():
                return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        except BaseException as err:
            _reraise_unless_library_failure(err)
            bad = next((i for i, t in enumerate(texts) if not _valid_unicode(t)), None)
            if bad is not None:
                raise ColaprobError(f"text {bad} holds a lone surrogate, which is not a character; fix the text.") from None
            raise ColaprobError(f"{self.source} failed to tokenize the text ({_first_line(err)}); the tokenizer cannot be used on it.") from None

    def decode(self, ids) -> str:
        try:
            return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)
        except BaseException as err:
            _reraise_unless_library_failure(err)
            raise ColaprobError(f"{self.source} failed to decode token ids ({_first_line(err)}).") from None


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 sent to /dev/null while the Rust library runs: a panic there prints
    its message and a backtrace straight to the descriptor, which the caller turns into one
    sentence instead."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _reraise_unless_library_failure(err: BaseException) -> None:
    # The library's errors are plain Exceptions and its Rust panics pyo3's PanicException (a
    # BaseException); anything else (Ctrl-C, an alarm) is not the tokenizer's failure.
    if type(err).__name__ != "PanicException" and not (type(err) is Exception or isinstance(err, (TypeError, ValueError))):
        raise err


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def _byte_chars() -> list[str]:
    """The printable character that stands for each byte in byte-level BPE (GPT-2 convention):
    printable Latin-1 bytes stand for themselves, the others for ``chr(256 + n)``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_tokenizer() -> Tokenizer:
    """Ids 0..255 = the bytes of the UTF-8 text, 256 = ``<|endoftext|>``, 257 = ``<|pad|>``."""
    vocab = {char: b for b, char in enumerate(_byte_chars())}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([END_OF_TEXT, PAD])
    return Tokenizer(backend)


@dataclass
class Framing:
    """How texts are framed: ``bos_id`` first (None: nothing), ``eos_id`` last (None:
    nothing), then ``pad_id`` up to a block multiple; a framed text longer than
    ``max_tokens`` (None: no limit) is refused."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int
    max_tokens: int | None = None

    @classmethod
    def official(cls, tokenizer: Tokenizer) -> "Framing":
        """The framing of the official training: ``<|endoftext|>`` before and after every
        document, padding with the STOP token "■" (or ``<|pad|>`` where "■" is not one token)."""
        eos = tokenizer.token_to_id(END_OF_TEXT)
        if eos is None:
            raise ColaprobError(f"the tokenizer has no {END_OF_TEXT} token, so the checkpoint needs a colaprob.json with its framing.")
        stop = tokenizer.encode(STOP)
        pad = stop[0] if len(stop) == 1 else tokenizer.token_to_id(PAD)
        if pad is None:
            raise ColaprobError(f"the tokenizer has neither a single-token {STOP!r} nor {PAD}, so the checkpoint needs a colaprob.json with its framing.")
        return cls(bos_id=eos, eos_id=eos, pad_id=pad)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "Framing":
        try:
            framing = cls(**d)
        except TypeError:
            raise ColaprobError(f"{source} has a framing entry that is not {{bos_id, eos_id, pad_id, max_tokens}}.") from None
        for name, value in asdict(framing).items():
            if not (value is None and name != "pad_id") and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ColaprobError(f"{source} sets framing {name} to {value!r}, which is not a token id or count.")
        return framing

    def to_dict(self) -> dict:
        return asdict(self)


def frame(tokenizer: Tokenizer, framing: Framing, texts: list[str], multiple: int, prompts: list[str] | None = None) -> TokenBatch:
    """Frame ``texts`` (see the module docstring) into a right-padded ``TokenBatch``;
    ``multiple``: the framed length is a multiple of it (``patch_size * dit.block_size``).

    With ``prompts``, sequence ``i`` is prompt ``i`` and text ``i`` each tokenized on its own
    (as generation conditions on a prompt), then framed as one text; the counts cover both.
    """
    # An empty text still frames to [bos, eos]; only with neither would it be an empty sequence.
    _check_texts(texts, "texts", allow_empty=framing.bos_id is not None or framing.eos_id is not None)
    if prompts is not None:
        _check_texts(prompts, "prompts", allow_empty=True)
        if len(prompts) != len(texts):
            raise ValueError(f"prompts and texts must be as many, got {len(prompts)} and {len(texts)}.")
    token_lists = tokenizer.encode_batch(texts)
    if prompts is not None:
        token_lists = [p + t for p, t in zip(tokenizer.encode_batch(prompts), token_lists)]
        texts = [p + t for p, t in zip(prompts, texts)]
    rows, n_tokens = [], []
    for i, tokens in enumerate(token_lists):
        ids = ([framing.bos_id] if framing.bos_id is not None else []) + tokens
        ids += [framing.eos_id] if framing.eos_id is not None else []
        ids += [framing.pad_id] * (-len(ids) % multiple)
        if framing.max_tokens is not None and len(ids) > framing.max_tokens:
            raise ColaprobError(
                f"text {i} is {len(ids)} tokens long once framed, more than this model's limit of "
                f"{framing.max_tokens}; the CLI can split long documents into pieces that fit."
            )
        rows.append(ids)
        n_tokens.append(len(tokens) + (framing.eos_id is not None))
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), framing.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return TokenBatch(
        ids=ids,
        lengths=torch.tensor([len(r) for r in rows], dtype=torch.long),
        n_tokens=torch.tensor(n_tokens, dtype=torch.long),
        n_bytes=torch.tensor([len(t.encode("utf-8")) for t in texts], dtype=torch.long),
        n_words=torch.tensor([len(t.split()) for t in texts], dtype=torch.long),
        texts=list(texts),
    )


def _check_texts(texts, name: str, allow_empty: bool = False) -> None:
    """A non-empty list of strings (each non-empty unless ``allow_empty``): a sequence of no
    tokens has no log-likelihood to report, so it is refused rather than scored as a silent 0."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a list of strings, not {type(texts).__name__}.")
    if not texts:
        raise ValueError(f"{name} is an empty list; give at least one text.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] is {type(text).__name__}, not a string.")
        if not text and not allow_empty:
            raise ValueError(f"{name}[{i}] is empty, and this framing adds no bos or eos: it would be a sequence of no tokens.")


class Counts(NamedTuple):
    """The unit denominators of part of a text: [B] tokens (with the eos), bytes, words."""

    n_tokens: torch.Tensor
    n_bytes: torch.Tensor
    n_words: torch.Tensor


def frame_pairs(
    tokenizer: Tokenizer, framing: Framing, prompts: list[str], responses: list[str], multiple: int
) -> tuple[TokenBatch, torch.Tensor, Counts]:
    """Prompt-response pairs framed for prefix-response scoring: the joint sequences (see
    ``frame``), the framed length of each prefix (bos and prompt tokens) [B], and the
    response's own counts (its tokens plus the eos, bytes, words) for the conditional's units."""
    _check_texts(prompts, "prompts", allow_empty=True)
    batch = frame(tokenizer, framing, responses, multiple, prompts=prompts)
    prompt_tokens = torch.tensor([len(ids) for ids in tokenizer.encode_batch(prompts)], dtype=torch.long)
    response = Counts(
        n_tokens=batch.n_tokens - prompt_tokens,
        n_bytes=torch.tensor([len(r.encode("utf-8")) for r in responses], dtype=torch.long),
        n_words=torch.tensor([len(r.split()) for r in responses], dtype=torch.long),
    )
    return batch, prompt_tokens + (framing.bos_id is not None), response
