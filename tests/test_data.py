"""The embedded corpus split and the file readers (colaprob.data)."""

import json

import pytest
from pydoc_data.topics import topics

from colaprob.data import Document, chunk_paragraph, embedded_corpus, embedded_topics, read_documents, topic_split
from colaprob.errors import ColaprobError


def test_split_is_a_deterministic_disjoint_partition_of_the_topics():
    train, heldout = embedded_topics("train"), embedded_topics("heldout")
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(topics)
    # The rule is a pure function of the name: these are held out on every Python.
    assert [topic_split(name) for name in ("dict", "raise", "return", "if", "for")] == [
        "heldout", "heldout", "heldout", "train", "train"]
    assert 0.05 < len(heldout) / len(topics) < 0.2


def test_corpus_is_reproducible_bounded_and_keeps_held_out_text_out_of_training():
    train = embedded_corpus("train", max_bytes=64)
    heldout = embedded_corpus("heldout", max_bytes=64)
    assert train == embedded_corpus("train", max_bytes=64)
    assert all(0 < len(d.text.encode("utf-8")) <= 64 and d.text.strip() and d.prompt is None for d in train + heldout)
    # Held-out pieces come from held-out topics, and (paragraphs repeated in training topics
    # being dropped) hardly any occurs in the training text: only stock phrases do.
    heldout_text = "\n".join(topics[name] for name in embedded_topics("heldout"))
    train_text = "\n".join(topics[name] for name in embedded_topics("train"))
    long_pieces = [d.text for d in heldout if len(d.text) > 40]
    assert all(d.text in heldout_text for d in heldout)
    assert sum(piece in train_text for piece in long_pieces) < 0.02 * len(long_pieces)


@pytest.mark.parametrize("max_bytes", [4, 7, 30])
def test_chunks_respect_the_bound_and_keep_every_word(max_bytes):
    paragraph = "Short words, then averyveryverylongword and ünïcödé  text\n   indented line"
    pieces = chunk_paragraph(paragraph, max_bytes)
    assert all(0 < len(p.encode("utf-8")) <= max_bytes for p in pieces)
    assert "".join("".join(p.split()) for p in pieces) == "".join(paragraph.split())
    assert chunk_paragraph(paragraph, 1000) == [paragraph]
    assert chunk_paragraph("\n  \n", 10) == []


def test_readers_lines_file_and_jsonl(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("\ufefffirst line\n\n  \nsecond line\r\nthird\n", encoding="utf-8")
    assert read_documents(plain) == [Document("first line"), Document("second line"), Document("third")]
    assert read_documents(plain, mode="file") == [Document("first line\n\n  \nsecond line\r\nthird")]

    records = tmp_path / "b.jsonl"
    records.write_text(
        json.dumps({"text": "plain"}) + "\n\n"
        + json.dumps({"prompt": "Q: ", "ground_truth": "A"}) + "\n"
        + json.dumps({"prompt": "Q2", "response": "B"}) + "\n",
        encoding="utf-8",
    )
    assert read_documents(records) == [Document("plain"), Document("A", "Q: "), Document("B", "Q2")]


@pytest.mark.parametrize(
    "content, mode, message",
    [
        (b"", "lines", "empty or holds only blank lines"),
        (b"\n  \n\t\n", "file", "empty or holds only blank lines"),
        (b"ok\nbad \xff byte\n", "lines", "byte 0xff at byte offset 7"),
        (b'{"text": "a"}\n{"text": \n', "jsonl", "line 2 of"),
        (b'["text"]\n', "jsonl", "not a JSON object"),
        (b'{"prompt": "a"}\n', "jsonl", "no \"ground_truth\""),
        (b'{"body": "a"}\n', "jsonl", "neither \"text\""),
        (b'{"text": 3}\n', "jsonl", "must be a string"),
        (b'{"text": ""}\n', "jsonl", "is empty"),
    ],
)
def test_reader_errors_name_the_file_and_place(tmp_path, content, mode, message):
    path = tmp_path / "input.jsonl"
    path.write_bytes(content)
    with pytest.raises(ColaprobError, match="input.jsonl") as err:
        read_documents(path, mode=mode)
    assert message in str(err.value)


def test_reader_errors_for_missing_paths_and_bad_modes(tmp_path):
    with pytest.raises(ColaprobError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")
    with pytest.raises(ColaprobError, match="is a directory"):
        read_documents(tmp_path)
    with pytest.raises(ColaprobError, match="unknown reading mode"):
        read_documents(tmp_path / "x.txt", mode="csv")
    with pytest.raises(ColaprobError, match="unknown split"):
        embedded_corpus("test", 64)
