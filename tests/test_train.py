"""Training (colaprob.train, ``colaprob train``): resuming gives bit-identical weights, and
the settings are checked."""

import json

import pytest
import torch
from safetensors import safe_open

import colaprob
from colaprob import train as train_module
from colaprob.cli import main
from colaprob.data import embedded_corpus
from colaprob.errors import ColaprobError
from colaprob.train import block_size_choices, lr_at, TrainConfig

TINY_NET = [
    "--latent-dim", "4", "--vae-dim", "16", "--vae-heads", "2", "--vae-ffn-dim", "32", "--vae-blocks", "1",
    "--dit-width", "16", "--dit-heads", "2", "--dit-head-dim", "8", "--dit-rope-dim", "4", "--dit-layers", "1",
    "--max-tokens", "16",
]
SCHEDULE = [
    "--batch-size", "4", "--stage1-steps", "3", "--stage2-steps", "3", "--warmup-steps", "2",
    "--checkpoint-every", "2", "--eval-every", "3", "--eval-docs", "4", "--log-every", "1",
]


@pytest.fixture
def corpus(tmp_path):
    train, heldout = tmp_path / "train.txt", tmp_path / "heldout.txt"
    train.write_text("\n".join(d.text for d in embedded_corpus("train", 15)[:24]), encoding="utf-8")
    heldout.write_text("\n".join(d.text for d in embedded_corpus("heldout", 15)[:4]), encoding="utf-8")
    return ["--train", str(train), "--heldout", str(heldout), "--threads", "1", "--mode", "lines"]


def run_train(out, *extra):
    return main(["train", "--out", str(out), *TINY_NET, *SCHEDULE, *extra])


def interrupt_stage2(monkeypatch, call: int) -> None:
    """Make the ``call``-th stage-2 step raise KeyboardInterrupt, as Ctrl-C would."""
    real, calls = train_module.stage2_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "stage2_loss", interrupted)


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, corpus, monkeypatch):
    assert run_train(tmp_path / "straight", *corpus) == 0

    # Interrupt in stage 2, after the checkpoint of step 4 (the reference encoder, the AdamW
    # moments and the step must all come back), then rerun the same command.
    interrupt_stage2(monkeypatch, 3)
    assert run_train(tmp_path / "resumed", *corpus) == 130
    work = tmp_path / "resumed.work"
    with safe_open(str(work / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["colaprob_train"])["step"] == 4
    monkeypatch.undo()
    assert run_train(tmp_path / "resumed", *corpus) == 0
    assert not work.exists()

    a, b = colaprob.load(tmp_path / "straight"), colaprob.load(tmp_path / "resumed")
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), key
    assert a.info["heldout"] == b.info["heldout"]
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]
    assert strip(tmp_path / "straight" / "train_log.jsonl") == strip(tmp_path / "resumed" / "train_log.jsonl")
    assert a.info["command"].startswith("colaprob train --out") and a.info["heldout"]["docs"] == 4


def test_resume_refuses_other_settings_and_finished_folders(tmp_path, corpus, monkeypatch, capsys):
    interrupt_stage2(monkeypatch, 1)
    assert run_train(tmp_path / "m", *corpus) == 130
    monkeypatch.undo()
    assert run_train(tmp_path / "m", *corpus, "--beta", "0.5") == 2
    assert "other settings (beta)" in capsys.readouterr().err
    assert run_train(tmp_path / "m", *corpus) == 0
    assert run_train(tmp_path / "m", *corpus) == 2
    assert "already holds a trained model" in capsys.readouterr().err


def test_a_context_too_short_for_any_document_is_a_one_line_error(tmp_path, corpus, capsys):
    assert run_train(tmp_path / "m", *corpus, "--max-tokens", "4") == 2
    err = capsys.readouterr().err
    assert "--max-tokens 4 leaves no room" in err and err.count("\n") == 1
    assert not list(tmp_path.glob("m*"))  # neither the model folder nor its work folder


@pytest.mark.parametrize("mode", ["fixed", "learned"])
def test_logsnr_modes_give_position_independent_posterior_noise(tmp_path, corpus, mode):
    assert run_train(tmp_path / mode, *corpus, "--logsnr-mode", mode, "--logsnr", "3.0") == 0
    model = colaprob.load(tmp_path / mode)
    logvar = model.posterior(model.frame(["some text", "a word"])).logvar
    assert torch.allclose(logvar, logvar[:1, :1].expand_as(logvar))  # one value per channel
    if mode == "fixed":
        assert torch.allclose(logvar, torch.full_like(logvar, -3.0))
    else:
        assert not torch.allclose(logvar, torch.full_like(logvar, -3.0))


def test_schedule_and_block_sizes():
    config = TrainConfig(stage1_steps=10, stage2_steps=20, warmup_steps=5, lr=1.0, min_lr=0.1)
    assert lr_at(0, config) == pytest.approx(0.2) and lr_at(4, config) == pytest.approx(1.0)
    assert lr_at(9, config) == pytest.approx(0.1) and lr_at(10, config) == pytest.approx(0.2)
    assert block_size_choices(4) == [1, 2, 4] and block_size_choices(6) == [1, 2, 4, 6] and block_size_choices(1) == [1]
    with pytest.raises(ColaprobError, match="3 non-negative weights"):
        TrainConfig(block_size_probs=(1.0, 1.0)).validate(4)
