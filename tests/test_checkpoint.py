"""Checkpoints: save/load round trips (single file, sharded, bf16), atomic saving, one clear
sentence naming the file for every broken checkpoint, and ``colaprob inspect``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import colaprob
from colaprob import checkpoint
from colaprob.cli import main as cli
from colaprob.config import DiTConfig, VAEConfig
from colaprob.errors import ColaprobError
from colaprob.model import ColaModel
from colaprob.tokenizer import Framing, byte_level_tokenizer


def small_model(d: int = 4) -> ColaModel:
    torch.manual_seed(0)
    vae = VAEConfig(vocab_size=258, encoder_num_blocks=1, decoder_num_blocks=1, dim=16, ffn_dim=32, latent_dim=d,
                    num_heads=2, scaling_factor=1.5, shifting_factor=0.1)
    dit = DiTConfig(txt_in_channels=d, txt_out_channels=d, txt_dim=16, emb_dim=16, heads=2, head_dim=8, num_layers=1,
                    rope_dim=4, block_size=2)
    tokenizer = byte_level_tokenizer()
    framing = Framing(bos_id=None, eos_id=256, pad_id=257, max_tokens=64)
    return ColaModel(vae, dit, tokenizer, framing, decoder_space="dit", info={"trained_on": "test"})


@pytest.fixture()
def saved(tmp_path):
    model = small_model()
    return model, colaprob.save(model, tmp_path / "ckpt")


def assert_same(a: ColaModel, b: ColaModel):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_then_load_is_bit_identical(saved):
    model, path = saved
    assert (path / "cola_dlm" / "cola_vae" / "model.safetensors").is_file()
    assert (path / "cola_dlm" / "cola_dit" / "config.json").is_file() and (path / "tokenizer.json").is_file()
    from colaprob.results import default_mode

    assert path.stat().st_mode & 0o777 == default_mode(0o777)  # an ordinary folder, not mkdtemp's 0700
    loaded = colaprob.load(path)
    assert_same(model, loaded)
    assert loaded.vae_config == model.vae_config and loaded.dit_config == model.dit_config
    assert loaded.framing == model.framing and loaded.decoder_space == "dit" and loaded.info == {"trained_on": "test"}
    assert colaprob.load(path, decoder_space="vae").decoder_space == "vae"
    config = json.loads((path / "cola_dlm" / "cola_vae" / "config.json").read_text())
    assert config["model_type"] == "cola_text_vae" and config["architectures"] == ["ColaTextVAEModel"]
    from safetensors import safe_open

    with safe_open(str(path / "cola_dlm" / "cola_dit" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "blocks.0.msa.rope.rope.freqs" in f.keys()
    colaprob.save(loaded, path)  # replacing an existing checkpoint
    assert_same(model, colaprob.load(path))


def test_sharded_bf16_and_flat_layouts(saved, tmp_path):
    model, path = saved
    flat = tmp_path / "flat"  # cola_vae/ and cola_dit/ directly under the root, dit sharded in bf16
    shutil.copytree(path / "cola_dlm", flat)
    shutil.copy(path / "tokenizer.json", flat / "tokenizer.json")
    dit_dir = flat / "cola_dit"
    tensors = load_file(str(dit_dir / "model.safetensors"))
    (dit_dir / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k].to(torch.bfloat16) for k in part}, str(dit_dir / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (dit_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = colaprob.load(flat)
    for k, v in model.dit.state_dict().items():
        assert loaded.dit.state_dict()[k].dtype == torch.float32
        assert torch.equal(loaded.dit.state_dict()[k], v.to(torch.bfloat16).float()), k
    # no colaprob.json: the official framing, with the official training context
    assert loaded.framing == Framing(bos_id=256, eos_id=256, pad_id=257, max_tokens=checkpoint.OFFICIAL_CONTEXT)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = small_model()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError):
        colaprob.save(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    monkeypatch.undo()
    with pytest.raises(ColaprobError, match="notes"):
        colaprob.save(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "x"


def corrupt(root, case):
    """Break a saved checkpoint in one way; return the file the error must name."""
    vae, dit = root / "cola_dlm" / "cola_vae", root / "cola_dlm" / "cola_dit"
    weights = vae / "model.safetensors"
    if case == "missing folder":
        shutil.rmtree(dit)
        return "cola_dit"
    if case == "missing config":
        (vae / "config.json").unlink()
        return "config.json"
    if case == "pickle instead of safetensors":
        weights.unlink()
        (vae / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
        return "pytorch_model.bin"
    if case == "corrupt safetensors":
        weights.write_bytes(weights.read_bytes()[:100])
        return "model.safetensors"
    if case == "unknown model_type":
        config = json.loads((dit / "config.json").read_text())
        (dit / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
        return "config.json"
    if case == "latent_dim differs from the DiT channels":
        other = colaprob.save(small_model(d=5), root.parent / "other")
        shutil.rmtree(vae)
        shutil.copytree(other / "cola_dlm" / "cola_vae", vae)
        return "cola_dit/config.json"
    if case == "tokenizer larger than vocabulary":
        tokenizer = byte_level_tokenizer()
        tokenizer.backend.add_tokens(["<a>", "<b>"])
        tokenizer.save(root / "tokenizer.json")
        return "tokenizer.json"
    if case == "missing tokenizer":
        (root / "tokenizer.json").unlink()
        return "tokenizer.json"
    tensors = load_file(str(weights))
    if case == "missing tensor":
        del tensors["decoder.final_layer.bias"]
    elif case == "unexpected tensor":
        tensors["decoder.extra"] = torch.zeros(2)
    elif case == "wrong shape":
        tensors["decoder.final_layer.bias"] = torch.zeros(3)
    elif case == "nan weight":
        tensors["decoder.final_layer.bias"][0] = float("nan")
    elif case == "integer weight":
        tensors["decoder.final_layer.bias"] = tensors["decoder.final_layer.bias"].long()
    save_file(tensors, str(weights))
    return "model.safetensors"


CASES = [
    "missing folder", "missing config", "pickle instead of safetensors", "corrupt safetensors", "unknown model_type",
    "latent_dim differs from the DiT channels", "tokenizer larger than vocabulary", "missing tokenizer", "missing tensor",
    "unexpected tensor", "wrong shape", "nan weight", "integer weight",
]


@pytest.mark.parametrize("case", CASES)
def test_broken_checkpoints_name_the_file(saved, case):
    _, path = saved
    name = corrupt(path, case)
    with pytest.raises(ColaprobError) as err:
        colaprob.load(path)
    message = str(err.value)
    assert name in message and message.count(". ") == 0 and "\n" not in message


def test_missing_paths_and_the_embedded_model(tmp_path, monkeypatch):
    with pytest.raises(ColaprobError, match="does not exist"):
        colaprob.load(tmp_path / "nowhere")
    with pytest.raises(ColaprobError, match="not a Cola DLM checkpoint"):
        colaprob.load(tmp_path)
    monkeypatch.setattr(checkpoint, "TINY", tmp_path / "tiny")
    with pytest.raises(ColaprobError, match="embedded model is not built"):
        colaprob.load("tiny")


def test_inspect_reports_inconsistencies_without_failing(saved, capsys):
    _, path = saved
    assert cli(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "no inconsistencies found" in text and "encoder" in text and "dit" in text
    corrupt(path, "wrong shape")
    corrupt(path, "tokenizer larger than vocabulary")
    assert cli(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    warnings = " ".join(report["warnings"])
    assert "decoder.final_layer.bias" in warnings and "260 tokens" in warnings
    assert set(report["parameters"]) == {"encoder", "decoder", "dit"}
