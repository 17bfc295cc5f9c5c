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

Before a byte is read, an input must be a regular file (or ``-``, standard input): a FIFO,
socket or device could block or never end, so it is refused, as are paths that cannot be
opened (a symlink loop, a component that is a file, a name too long). At most
``MAX_INPUT_BYTES`` are read. Lines end at ``\n`` or ``\r\n`` only: U+2028, U+0085 and
the other characters ``str.splitlines`` treats as line ends stay inside the line. JSON is
parsed with limits (``MAX_INT_DIGITS`` digits in an integer, nesting as deep as the parser
allows) and every text must be valid Unicode, without lone surrogates from ``\ud800``-style
escapes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from colaprob.errors import ColaprobError

SPLITS = ("train", "heldout")
MODES = ("auto", "lines", "file", "jsonl")
RESPONSE_KEYS = ("ground_truth", "response")
STDIN = "-"
MAX_INPUT_BYTES = 1 << 30
"""Largest input read (1 GiB): far more text than a run can score, small enough to hold."""
MAX_INT_DIGITS = 64
"""Integers in a JSONL record may have this many digits (none is needed to hold text)."""
LINE_BREAK = re.compile(r"\r?\n")
SURROGATE = re.compile("[\ud800-\udfff]")


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
    if not isinstance(mode, str) or mode not in MODES:
        raise ColaprobError(f"unknown reading mode {mode!r}; use one of {', '.join(MODES)}.")
    if mode == "auto":
        mode = "jsonl" if path.suffix.lower() == ".jsonl" else "lines"
    text = _read_utf8(path)
    if not text.strip():
        raise ColaprobError(f"{path} is empty or holds only blank lines; give it at least one document.")
    if mode == "file":
        return [Document(text.strip("\n").rstrip())]
    lines = split_lines(text)
    if mode == "lines":
        return [Document(line) for line in lines if line.strip()]
    return [_jsonl_document(record, f"line {number} of {path}") for number, record in _records(lines, path)]


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of a JSONL file, read as every input
    is: a regular file of bounded size, UTF-8, lines broken at ``\n`` / ``\r\n`` only, JSON
    with bounded integers and depth, every line an object."""
    path = Path(path)
    text = _read_utf8(path)
    if not text.strip():
        raise ColaprobError(f"{path} is empty or holds only blank lines; give it at least one record.")
    return list(_records(split_lines(text), path))


def _records(lines: list[str], path: Path):
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield number, _json_object(line, f"line {number} of {path}")


def check_no_surrogate(value: str, key: str, where: str) -> None:
    """Refuse a lone surrogate (half of a UTF-16 pair from a JSON escape) in a text field."""
    surrogate = SURROGATE.search(value or "")
    if surrogate:
        raise ColaprobError(
            f"{where}: \"{key}\" holds the lone surrogate \\u{ord(surrogate.group()):04x} at character {surrogate.start()}, "
            "half of a UTF-16 pair and not a character; fix the escape in the file."
        )


def split_lines(text: str) -> list[str]:
    """The lines of ``text``, broken at ``\n`` and ``\r\n`` only (a final line break ends
    the last line rather than starting an empty one)."""
    lines = LINE_BREAK.split(text)
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_input_bytes(path: Path, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of a regular file, or of standard input for ``-`` (the way to read a pipe),
    at most ``limit`` of them; anything else is refused before it is opened (see the module
    docstring)."""
    if str(path) == STDIN:
        return _bounded(sys.stdin.buffer, limit, "standard input")
    info = check_regular_file(path)
    if info.st_size > limit:
        raise ColaprobError(f"{path} holds {info.st_size:,} bytes, more than the {limit:,} colaprob reads; split it into smaller files.")
    try:
        with open(path, "rb") as handle:
            return _bounded(handle, limit, str(path))
    except OSError as err:
        raise ColaprobError(_open_problem(path, err)) from None


def check_regular_file(path: Path) -> os.stat_result:
    """``os.stat(path)`` of a regular file; a folder, FIFO, socket, device or a path that
    cannot be opened is one ``ColaprobError`` (before anything opens it and blocks)."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise ColaprobError(_open_problem(path, err)) from None
    if stat.S_ISDIR(info.st_mode):
        raise ColaprobError(f"{path} is a directory; give a text or JSONL file.")
    if not stat.S_ISREG(info.st_mode):
        raise ColaprobError(
            f"{path} is a {_kind(info.st_mode)}, not a regular file; save its contents to a regular file first."
        )
    return info


def _bounded(handle, limit: int, name: str) -> bytes:
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise ColaprobError(f"{name} holds more than the {limit:,} bytes colaprob reads; split it into smaller files.")
    return data


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")]
    return next((name for test, name in kinds if test(mode)), "special file")


def _open_problem(path: Path, err: OSError) -> str:
    reasons = {
        errno.ENOENT: "does not exist; check the path",
        errno.ELOOP: "is a symbolic link that loops back on itself; point it at a real file",
        errno.ENOTDIR: "cannot exist, because a folder on its path is a file; check the path",
        errno.ENAMETOOLONG: "is a name too long for the file system; check the path",
        errno.EACCES: "cannot be read (permission denied); check its permissions",
    }
    return f"{path} {reasons.get(err.errno, f'cannot be read ({err.strerror or err})')}."


def _read_utf8(path: Path) -> str:
    raw = read_input_bytes(path)
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise ColaprobError(
            f"{path} is not UTF-8 text: the byte 0x{raw[err.start]:02x} at byte offset {err.start} "
            "cannot be decoded; convert the file to UTF-8."
        ) from None


def _json_object(line: str, where: str) -> dict:
    try:
        record = json.loads(line, parse_int=lambda digits: _bounded_int(digits, where), parse_constant=lambda name: _no_constant(name, where))
    except json.JSONDecodeError as err:
        raise ColaprobError(f"{where} is not a JSON object: not valid JSON ({err.msg} at column {err.colno}).") from None
    except RecursionError:
        raise ColaprobError(f"{where} nests arrays or objects deeper than the JSON reader allows; a record is one flat object.") from None
    if not isinstance(record, dict):
        raise ColaprobError(f"{where} is not a JSON object; each line must be one record, e.g. {{\"text\": ...}}.")
    return record


def _jsonl_document(record: dict, where: str) -> Document:
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
    for key, value in ((response_key, text), ("prompt", prompt)):
        check_no_surrogate(value, key, where)
    return Document(text, prompt)


def _bounded_int(digits: str, where: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ColaprobError(f"{where} holds an integer of {len(digits.lstrip('-')):,} digits, more than the {MAX_INT_DIGITS} a record may have.")
    return int(digits)


def _no_constant(name: str, where: str):
    raise ColaprobError(f"{where} holds {name}, which is not JSON; write a number or a string.")


def read_inputs(paths: Sequence[Path], *, per_line: bool, jsonl: bool) -> list[tuple]:
    """``(document, file name)`` for every document of every input file, in order
    (``colaprob.data.read_documents``)."""
    documents = []
    for path in paths:
        if jsonl or path.suffix.lower() == ".jsonl":
            mode = "jsonl"
        else:
            mode = "lines" if per_line else "file"
        documents += [(doc, path.name) for doc in read_documents(path, mode)]
    return documents


def fingerprint(documents: Sequence) -> str:
    """A short hash of the documents' texts and prompts: a resumed run must score the same."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(json.dumps([doc.prompt, doc.text]).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]
