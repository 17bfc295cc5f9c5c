"""Block-wise generation (colaprob.generate): the cached step is the 2L velocity, and a seed
fixes the output."""

import json

import pytest
import torch

import colaprob
from colaprob.cli import main
from colaprob.config import DiTConfig, VAEConfig
from colaprob.generate import Sampling, choose_tokens, denoise_block, generate, guided_velocity, prompt_latents
from colaprob.model import T_SCALE, ColaModel
from colaprob.tokenizer import END_OF_TEXT, PAD, Framing, byte_level_tokenizer


def random_model(decoder_space: str = "vae", seed: int = 0) -> ColaModel:
    """A small untrained byte-level model with a non-trivial latent scale and shift (PyTorch's
    default initialisation, so the DiT's velocity is not zero)."""
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    vae = VAEConfig(
        vocab_size=tokenizer.vocab_size, encoder_num_blocks=1, decoder_num_blocks=1, dim=32, ffn_dim=64,
        latent_dim=4, num_heads=2, block_size=4, scaling_factor=1.3, shifting_factor=-0.2,
    )
    dit = DiTConfig(txt_in_channels=4, txt_out_channels=4, txt_dim=32, emb_dim=32, heads=2, head_dim=16,
                    expand_ratio=2, num_layers=2, rope_dim=8, block_size=4)
    framing = Framing(None, tokenizer.token_to_id(END_OF_TEXT), tokenizer.token_to_id(PAD), 64)
    return ColaModel(vae, dit, tokenizer, framing, decoder_space=decoder_space).eval()


@torch.no_grad()
def test_cached_block_velocity_equals_the_2l_velocity():
    model = random_model()
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(1, 12, 4, generator=g)
    block = torch.randn(1, 4, 4, generator=g)
    tau = torch.tensor([[0.0, 730.0, 730.0, 730.0]])  # first row pinned at timestep 0

    # Block 2 given the cached prefix (blocks 0 and 1), as one generation step computes it ...
    cache = model.dit.prefill(clean[:, :8])
    cached = guided_velocity(model, block, tau, cache, guidance=1.0)
    # ... equals the 2L velocity of the same block with the same clean history.
    noisy = torch.cat([clean[:, :8], block], 1)
    t = torch.cat([torch.zeros(1, 8), tau / T_SCALE], 1)
    full = model.prior_velocity(noisy, t, clean)
    torch.testing.assert_close(cached, full[:, 8:], atol=1e-5, rtol=1e-5)

    # Committing block by block builds the same cache as prefilling the whole prefix.
    committed = model.dit.commit(clean[:, 4:8], model.dit.prefill(clean[:, :4]))
    torch.testing.assert_close(model.dit.block_velocity(block, tau, committed), cached, atol=1e-5, rtol=1e-5)

    # The unconditional pass is the 2L velocity of the block as a sequence of its own, and
    # guidance s gives v_u + s (v_c - v_u).
    alone = model.prior_velocity(block, tau / T_SCALE, block)
    torch.testing.assert_close(model.dit.block_velocity(block, tau), alone, atol=1e-5, rtol=1e-5)
    guided = guided_velocity(model, block, tau, cache, guidance=3.0)
    torch.testing.assert_close(guided, alone + 3.0 * (cached - alone), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_prompt_ending_inside_a_block_is_pinned():
    model = random_model()
    ids = model.tokenizer.encode("abcdef")  # 6 latents: one full block, then 2 pinned rows
    latents, k = prompt_latents(model, ids)
    assert (k, latents.shape) == (6, (1, 8, 4))
    pinned = latents[:, 4:6]
    u = denoise_block(model, torch.randn(1, 4, 4), pinned, model.dit.prefill(latents[:, :4]), Sampling(steps=3))
    assert torch.equal(u[:, :2], pinned) and not torch.equal(u[:, 2:], latents[:, 6:8])


@pytest.mark.parametrize("decoder_space", ["vae", "dit"])
def test_generation_is_reproducible_for_a_seed(decoder_space):
    model = random_model(decoder_space)
    prompts = ["The if statement", "", "x = 1"]
    sampling = Sampling(max_new_tokens=10, steps=4, guidance=2.0, temperature=1.0, top_k=50, top_p=0.9)
    first = generate(model, prompts, sampling, seed=7)
    assert first == generate(model, prompts, sampling, seed=7)
    assert first != generate(model, prompts, sampling, seed=8)
    # A prompt's continuation does not depend on the prompts after it.
    assert generate(model, prompts[:2], sampling, seed=7) == first[:2]
    greedy = Sampling(max_new_tokens=10, steps=4)
    assert generate(model, prompts, greedy, seed=1) == generate(model, prompts, greedy, seed=1)


def test_token_choice_top_k_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert choose_tokens(logits, Sampling(), g) == [1]
    assert choose_tokens(logits, Sampling(temperature=1.0, top_k=1), g) == [1]
    assert choose_tokens(logits, Sampling(temperature=1.0, top_p=0.5), g) == [1]  # p(1) = 0.64 > 0.5
    draws = {choose_tokens(logits, Sampling(temperature=1.0, top_k=2), g)[0] for _ in range(50)}
    assert draws == {1, 3}
    draws = {choose_tokens(logits, Sampling(temperature=1.0, top_p=0.9), g)[0] for _ in range(50)}
    assert draws == {1, 2, 3}  # p = 0.64, 0.24, 0.09 reach 0.9 only with the third


def test_generate_command(tmp_path, capsys):
    colaprob.save(random_model(), tmp_path / "m")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc", "ground_truth": "ignored"}\n', encoding="utf-8")
    argv = ["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--prompts", str(prompts),
            "--max-new-tokens", "4", "--steps", "2", "--jsonl", "--threads", "1"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["Hello", "abc"]
    assert main(argv) == 0 and [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines
    assert main(["generate", "--model", str(tmp_path / "m")]) == 2
    assert "at least one --prompt" in capsys.readouterr().err
