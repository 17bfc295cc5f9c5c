"""Tokenizers and framing: the byte-level tokenizer round-trips any text, framing follows the
README's rule, and the official defaults are picked from the tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from colaprob.errors import ColaprobError
from colaprob.tokenizer import Framing, Tokenizer, byte_level_tokenizer, frame, frame_pairs

BYTES = byte_level_tokenizer()


@given(st.text())
def test_byte_level_round_trips_any_text(text):
    ids = BYTES.encode(text)
    assert BYTES.decode(ids) == text
    if "<|" not in text:  # special-token strings inside a text become their single id
        assert ids == list(text.encode("utf-8"))


def test_byte_level_layout_and_file(tmp_path):
    assert BYTES.vocab_size == 258
    assert BYTES.token_to_id("<|endoftext|>") == 256 and BYTES.token_to_id("<|pad|>") == 257
    BYTES.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.encode("héllo ✓\n") == BYTES.encode("héllo ✓\n") and again.vocab_size == 258
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ColaprobError, match="bad.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_framing_rule():
    framing = Framing(bos_id=256, eos_id=256, pad_id=257)
    texts = ["héllo world", "", "a b  c"]
    batch = frame(BYTES, framing, texts, multiple=4)
    assert batch.lengths.tolist() == [16, 4, 8]  # 1 + 12 bytes + 1 -> 16; 1 + 0 + 1 -> 4; 1 + 6 + 1 -> 8
    assert batch.ids.shape == (3, 16)
    assert batch.ids[0, :14].tolist() == [256, *"héllo world".encode(), 256]
    assert batch.ids[0, 14:].tolist() == [257, 257] and batch.ids[1, 2:].tolist() == [257] * 14
    assert batch.n_tokens.tolist() == [13, 1, 7]  # text tokens + the eos
    assert batch.n_bytes.tolist() == [12, 0, 6] and batch.n_words.tolist() == [2, 0, 3]
    assert batch.texts == texts
    bare = frame(BYTES, Framing(bos_id=None, eos_id=None, pad_id=257), ["abc"], multiple=2)
    assert bare.ids.tolist() == [[97, 98, 99, 257]] and bare.n_tokens.tolist() == [3]


def test_too_long_text_is_refused():
    framing = Framing(bos_id=256, eos_id=256, pad_id=257, max_tokens=8)
    with pytest.raises(ColaprobError, match=r"text 1 is 16 tokens long.*limit of 8.*split"):
        frame(BYTES, framing, ["ok", "far too long"], multiple=4)


def test_official_framing_defaults():
    assert Framing.official(BYTES) == Framing(bos_id=256, eos_id=256, pad_id=257)  # "■" is 3 bytes: <|pad|>
    with_stop = byte_level_tokenizer()
    with_stop.backend.add_tokens(["\u25a0"])  # the official STOP token is one BPE token
    assert Framing.official(with_stop).pad_id == 258
    with pytest.raises(ColaprobError, match="framing"):
        Framing.from_dict({"bos_id": 1, "pad_id": 2}, "colaprob.json")
    assert Framing.from_dict(Framing(None, 3, 4, 100).to_dict(), "colaprob.json") == Framing(None, 3, 4, 100)


def test_prompt_response_framing_tokenizes_each_part_alone():
    tok = byte_level_tokenizer()
    framing = Framing(bos_id=None, eos_id=256, pad_id=257)
    batch, prefix_tokens, response = frame_pairs(tok, framing, ["Q: é?", "hi"], [" A.", " there you go"], 4)
    joint = frame(tok, framing, ["Q: é? A.", "hi there you go"], 4)
    # Byte-level: tokenizing the parts alone equals tokenizing the whole.
    assert batch.ids.tolist() == joint.ids.tolist() and batch.n_tokens.tolist() == joint.n_tokens.tolist()
    assert batch.n_bytes.tolist() == joint.n_bytes.tolist() and batch.texts == joint.texts
    assert prefix_tokens.tolist() == [len("Q: é?".encode()), 2]
    assert response.n_tokens.tolist() == [len(b" A.") + 1, len(b" there you go") + 1]
    assert response.n_bytes.tolist() == [3, 13] and response.n_words.tolist() == [1, 3]
