"""The embedded model (``colaprob.load("tiny")``): it loads with no network, meets its two
held-out targets, and ships with its training log and the command that made it."""

import json
import socket

import pytest
import torch

import colaprob
from colaprob.checkpoint import TINY
from colaprob.data import embedded_corpus
from colaprob.train import LOG, heldout_figures


@pytest.fixture(scope="module")
def tiny():
    return colaprob.load("tiny")


def test_loads_with_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("colaprob.load('tiny') tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = colaprob.load("tiny")
    assert (model.latent_dim, model.patch_size, model.vae_config.block_size) == (16, 1, 4)
    assert model.block_size >= 4 and model.tokenizer.vocab_size == 258
    assert model.framing.bos_id is None and model.framing.eos_id == 256 and model.framing.pad_id == 257


@torch.no_grad()
def test_meets_the_heldout_targets(tiny):
    # The first 96 held-out documents (a quarter of the split), with the evaluation of training.
    docs = embedded_corpus("heldout", tiny.framing.max_tokens - 1)[:96]
    figures = heldout_figures(tiny, docs, seed=1)
    assert figures["recon_acc"] >= 0.98
    assert figures["fm_loss"] < 0.75 * figures["fm_zero_baseline"]


def test_ships_its_log_and_reproduction_command(tiny):
    info = tiny.info
    log = [json.loads(line) for line in (TINY / LOG).read_text().splitlines()]
    final = [r for r in log if "heldout" in r][-1]
    assert final["step"] == info["train_config"]["stage1_steps"] + info["train_config"]["stage2_steps"]
    assert final["heldout"] == {k: v for k, v in info["heldout"].items() if k != "docs"}
    assert info["command"] in (TINY / "REPRODUCE.md").read_text()
    assert "embedded pydoc_data.topics" in info["data"]["train"]["source"]
    assert sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file()) <= 10 * 2**20
