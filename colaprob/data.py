"""Text for training and scoring: the embedded corpus and readers for the user's files.

A ``Document`` is one text to model, optionally with a prompt it is conditioned on
(prefix-response scoring and prompted generation). Two sources produce them:

* ``embedded_corpus(split, max_bytes)``: the English documentation every CPython ships in
  ``pydoc_data.topics`` (a dict: topic name -> text), cut into paragraph-level documents of
  at most ``max_bytes`` UTF-8 bytes. The split is by topic, so no paragraph of a held-out
  topic is ever seen in training: a topic is held out iff the SHA-256 of its UTF-8 name,
  read as a big-endian integer, is divisible by 10; held-out paragraphs that also occur
  verbatim in a training topic are dropped. On CPython 3.11.7 that holds out 10 of 79
  topics; at ``max_bytes=63`` (the embedded model) the train split has 7,944 documents
  (403,768 bytes) and the held-out split 715 (35,378 bytes). The text differs a little
  between Python versions; the rule does not.
* ``read_documents(path, mode)``: a plain text file (one document per line, or the whole
  file as one document) or JSONL (``{"text": ...}`` or ``{"prompt": ..., "ground_truth":
  ...}`` / ``{"prompt": ..., "response": ...}``). Every mistake in the file is a
  ``ColaprobError`` naming the file and the place.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from colaprob.errors import ColaprobError

SPLITS = ("train", "heldout")
MODES = ("auto", "lines", "file", "jsonl")
RESPONSE_KEYS = ("ground_truth", "response")


@dataclass(frozen=True)
class Document:
    """``text`` is what is modelled (scored, reconstructed, generated); ``prompt``, when
    given, is the prefix it is conditioned on and is not itself scored."""

    text: str
    prompt: str | None = None


# ---------------------------------------------------------------------------------------------
# The embedded corpus


def topic_split(topic: str) -> str:
    """``"heldout"`` iff sha256(topic) is divisible by 10, else ``"train"`` (see the module
    docstring). A pure function of the name, so the split never depends on the Python build."""
    return "heldout" if int(hashlib.sha256(topic.encode("utf-8")).hexdigest(), 16) % 10 == 0 else "train"


def embedded_topics(split: str) -> list[str]:
    """The sorted topic names of one split of ``pydoc_data.topics``."""
    if split not in SPLITS:
        raise ColaprobError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    from pydoc_data.topics import topics

    return sorted(name for name in topics if topic_split(name) == split)


def embedded_corpus(split: str, max_bytes: int) -> list[Document]:
    """The documents of one split, in a fixed order: topics sorted by name, each topic's
    paragraphs (blank-line separated) in order, every paragraph longer than ``max_bytes``
    cut into pieces of at most ``max_bytes`` UTF-8 bytes (see ``chunk_paragraph``).

    Some topics repeat whole sections of others (``sequence-types`` is part of
    ``specialnames``), so a held-out paragraph that occurs verbatim in a training topic is
    left out of the held-out split: held-out figures measure text the model never saw."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip("\n") for name in embedded_topics(split) for p in topics[name].split("\n\n")]
    if split == "heldout":
        seen = "\n".join(topics[name] for name in embedded_topics("train"))
        paragraphs = [p for p in paragraphs if p not in seen]
    return [Document(piece) for p in paragraphs for piece in chunk_paragraph(p, max_bytes)]


def chunk_paragraph(paragraph: str, max_bytes: int) -> list[str]:
    """Cut a paragraph into pieces of at most ``max_bytes`` UTF-8 bytes: words (with the
    whitespace before them, so line breaks and indentation survive inside a piece) are packed
    greedily; the whitespace at a cut is dropped; a word longer than a piece is cut between
    characters. A blank paragraph gives nothing."""
    if max_bytes < 4:
        raise ColaprobError(f"max_bytes must be at least 4 (one UTF-8 character), got {max_bytes}.")
    pieces: list[str] = []
    current = ""
    for word in re.findall(r"\s*\S+", paragraph.strip("\n")):
        if _nbytes(current + word) <= max_bytes:
            current += word
            continue
        if current:
            pieces.append(current)
        current = ""
        for char in word.lstrip():
            if _nbytes(current + char) > max_bytes:
                pieces.append(current)
                current = ""
            current += char
    if current:
        pieces.append(current)
    return pieces


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Readers for the user's files


def read_documents(path: str | Path, mode: str = "auto") -> list[Document]:
    """The documents of a text or JSONL file.

    ``mode``: ``"lines"``: one document per non-blank line (the line break is not part of
    it); ``"file"``: the whole file is one document (surrounding blank lines and trailing
    whitespace removed); ``"jsonl"``: one JSON object per non-blank line, either
    ``{"text": ...}`` or ``{"prompt": ..., "ground_truth": ...}`` (``"response"`` is
    accepted for ``"ground_truth"``), giving ``Document(response, prompt)``; ``"auto"``:
    ``"jsonl"`` for a ``.jsonl`` file, else ``"lines"``.
    """
    path = Path(path)
    if mode not in MODES:
        raise ColaprobError(f"unknown reading mode {mode!r}; use one of {', '.join(MODES)}.")
    if mode == "auto":
        mode = "jsonl" if path.suffix.lower() == ".jsonl" else "lines"
    text = _read_utf8(path)
    if not text.strip():
        raise ColaprobError(f"{path} is empty or holds only blank lines; give it at least one document.")
    if mode == "file":
        return [Document(text.strip("\n").rstrip())]
    lines = text.splitlines()
    if mode == "lines":
        return [Document(line) for line in lines if line.strip()]
    return [_jsonl_document(line, path, number) for number, line in enumerate(lines, 1) if line.strip()]


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ColaprobError(f"{path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise ColaprobError(f"{path} is a directory; give a text or JSONL file.") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise ColaprobError(
            f"{path} is not UTF-8 text: the byte 0x{raw[err.start]:02x} at byte offset {err.start} "
            "cannot be decoded; convert the file to UTF-8."
        ) from None


def _jsonl_document(line: str, path: Path, number: int) -> Document:
    where = f"line {number} of {path}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ColaprobError(f"{where} is not valid JSON ({err.msg} at column {err.colno}).") from None
    if not isinstance(record, dict):
        raise ColaprobError(f"{where} is not a JSON object; write {{\"text\": ...}} or {{\"prompt\": ..., \"ground_truth\": ...}}.")
    response_key = next((key for key in RESPONSE_KEYS if key in record), None)
    if "prompt" in record:
        if response_key is None:
            raise ColaprobError(f"{where} has a \"prompt\" but no \"ground_truth\" or \"response\" to score after it.")
        prompt, text = record["prompt"], record[response_key]
        if not isinstance(prompt, str):
            raise ColaprobError(f"{where}: \"prompt\" must be a string.")
    elif "text" in record:
        prompt, text, response_key = None, record["text"], "text"
    else:
        raise ColaprobError(f"{where} has neither \"text\" nor \"prompt\" with \"ground_truth\"; one of them is required.")
    if not isinstance(text, str):
        raise ColaprobError(f"{where}: \"{response_key}\" must be a string.")
    if not text:
        raise ColaprobError(f"{where}: \"{response_key}\" is empty; every document needs some text.")
    return Document(text, prompt)
