"""Text generation the way the official inference does it (reference section 12).

For each prompt:

1. Tokens ``[bos] + prompt`` are right-padded with ``pad`` to a whole number of DiT blocks
   and encoded; the posterior means, moved to DiT space, are the prompt latents. ``k`` latent
   positions hold a prompt token.
2. The first ``start = floor(k / bs) * bs`` latents are the clean prefix, cached once in the
   DiT (timestep 0) and in the VAE decoder. A prompt that ends inside a block leaves its last
   ``k - start`` latents as pinned rows of the first generated block: they keep their encoded
   values and timestep 0 at every step.
3. Every block starts from ``N(0, I)`` noise and takes Euler steps over
   ``tau = linspace(1000, 0, steps + 1)``: ``v = v_u + s (v_c - v_u)`` with ``v_c`` the
   velocity given the cached prefix and ``v_u`` the block alone (classifier-free guidance; with
   nothing cached the two coincide, which is the official "guidance 1 for a first block
   without prefix"), then ``u <- u - v (tau - tau') / 1000``.
4. The finished block is decoded through the decoder's cache into ``bs * P`` tokens (greedy,
   or sampled with temperature, top-k and top-p), and committed to the DiT cache.
5. Generation stops at the end-of-text token or after ``max_new_tokens`` tokens; the text
   before the end-of-text token is returned, without padding tokens.

All noise and sampling draws come from a generator seeded by ``seed`` and the prompt's
index, so a call is reproducible and a prompt's output does not depend on the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from colaprob.attention import KVCache
from colaprob.errors import ColaprobError
from colaprob.model import T_SCALE, ColaModel
from colaprob.protocol import from_prior_space, to_prior_space


MAX_STEPS = 100_000
SEED_LIMIT = 2**63
"""Seeds are integers in [0, 2**63); a prompt's generator is seeded from the seed and its index."""


@dataclass
class Sampling:
    """How latents become text: Euler ``steps`` per block, CFG ``guidance``, and the token
    choice (``temperature`` 0 is greedy; ``top_k`` / ``top_p`` restrict a sampled choice)."""

    max_new_tokens: int = 64
    steps: int = 16
    guidance: float = 7.0  # the official default
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> None:
        for name in ("max_new_tokens", "steps", "top_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ColaprobError(f"{name} must be an integer, got {value!r}.")
        for name in ("guidance", "temperature", "top_p"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ColaprobError(f"{name} must be a finite number, got {value!r}.")
        if self.max_new_tokens < 1 or self.steps < 1:
            raise ColaprobError("generation needs at least one new token and one Euler step.")
        if self.steps > MAX_STEPS:
            raise ColaprobError(f"{self.steps} Euler steps per block is more than the {MAX_STEPS} allowed; the official default is 16.")
        if self.temperature < 0 or (self.top_k is not None and self.top_k < 1):
            raise ColaprobError("the temperature must be >= 0 and top-k at least 1.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ColaprobError("top-p must lie in (0, 1].")


@torch.no_grad()
def generate(model: ColaModel, prompts: list[str], sampling: Sampling | None = None, seed: int = 0) -> list[str]:
    """The continuation of each prompt (see the module docstring). ``max_new_tokens`` is
    capped by the model's context (``model.framing.max_tokens``, the prompt included)."""
    sampling = sampling or Sampling()
    sampling.validate()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ColaprobError(f"the seed must be an integer in [0, 2**63), got {seed!r}.")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings.")
    limit = model.framing.max_tokens
    if limit is not None and sampling.max_new_tokens > limit:
        raise ColaprobError(f"max_new_tokens {sampling.max_new_tokens} is more than the model's context of {limit} tokens; ask for fewer.")
    # Reduced mod 2**63 so every seed below SEED_LIMIT gives a valid generator seed.
    return [
        continue_prompt(model, p, sampling, torch.Generator().manual_seed((seed * 1_000_003 + i) % SEED_LIMIT)) for i, p in enumerate(prompts)
    ]


def continue_prompt(model: ColaModel, prompt: str, sampling: Sampling, g: torch.Generator) -> str:
    bs, P, d = model.block_size, model.patch_size, model.latent_dim
    framing = model.framing
    prompt_ids = ([framing.bos_id] if framing.bos_id is not None else []) + model.tokenizer.encode(prompt)
    latents, k = prompt_latents(model, prompt_ids)  # [1, K, d] DiT space, K a multiple of bs
    start = k // bs * bs
    dit_cache = model.dit.prefill(latents[:, :start]) if start else None
    decoder_cache = model.vae.decoder(decoder_input(model, latents[:, :start]))[1] if start else None
    pinned = latents[:, start:k]

    new_tokens: list[int] = []
    skip = max(0, len(prompt_ids) - start * P)  # leading tokens of the first block that are the prompt's
    while len(new_tokens) < sampling.max_new_tokens:
        u = denoise_block(model, torch.randn(1, bs, d, generator=g), pinned, dit_cache, sampling)
        logits, decoder_cache = model.vae.decoder(decoder_input(model, u), cache=decoder_cache)
        new_tokens += choose_tokens(logits[0], sampling, g)[skip:]
        if framing.eos_id in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(framing.eos_id)]
            break
        dit_cache = model.dit.prefill(u) if dit_cache is None else model.dit.commit(u, dit_cache)
        pinned, skip = latents[:, :0], 0
    return model.tokenizer.decode(t for t in new_tokens[: sampling.max_new_tokens] if t != framing.pad_id)


def prompt_latents(model: ColaModel, prompt_ids: list[int]) -> tuple[Tensor, int]:
    """Posterior means (DiT space) of the prompt padded to whole blocks, [1, K, d], and ``k``,
    the number of latent positions that hold a prompt token (reference 12.2)."""
    P, width = model.patch_size, model.patch_size * model.block_size
    k = -(-len(prompt_ids) // P)
    if k == 0:
        return torch.zeros(1, 0, model.latent_dim), 0
    ids = prompt_ids + [model.framing.pad_id] * (-len(prompt_ids) % width)
    ids = torch.tensor([ids])
    mean, _ = model.vae.encode(ids, torch.tensor([ids.shape[1] // P]))
    return to_prior_space(model, mean), k


def decoder_input(model: ColaModel, u: Tensor) -> Tensor:
    """DiT-space latents as the decoder reads them (``model.decoder_space``)."""
    return u if model.decoder_space == "dit" else from_prior_space(model, u)


def guided_velocity(model: ColaModel, u: Tensor, tau: Tensor, cache: KVCache | None, guidance: float) -> Tensor:
    """``v_u + s (v_c - v_u)`` for block ``u`` [B, bs, d] at per-row timesteps ``tau``
    [B, bs]: ``v_c`` given the cached prefix, ``v_u`` the block alone. Without a cache both
    are the same pass, so guidance has no effect."""
    conditional = model.dit.block_velocity(u, tau, cache)
    if cache is None or guidance == 1.0:
        return conditional
    unconditional = model.dit.block_velocity(u, tau)
    return unconditional + guidance * (conditional - unconditional)


def denoise_block(model: ColaModel, noise: Tensor, pinned: Tensor, cache: KVCache | None, sampling: Sampling) -> Tensor:
    """Euler steps from ``noise`` [1, bs, d] at tau 1000 to tau 0, the first rows pinned to
    ``pinned`` [1, n, d] (timestep 0 throughout)."""
    n = pinned.shape[1]
    u = torch.cat([pinned, noise[:, n:]], 1)
    taus = torch.linspace(T_SCALE, 0, sampling.steps + 1)
    for tau, tau_next in zip(taus[:-1], taus[1:]):
        tau_rows = torch.full(u.shape[:2], float(tau))
        tau_rows[:, :n] = 0
        v = guided_velocity(model, u, tau_rows, cache, sampling.guidance)
        u = u - v * (tau - tau_next) / T_SCALE
        u = torch.cat([pinned, u[:, n:]], 1)
    return u


def choose_tokens(logits: Tensor, sampling: Sampling, g: torch.Generator) -> list[int]:
    """One token per row of ``logits`` [n, V]: the argmax at temperature 0, else a draw from
    the softmax at that temperature, restricted to the ``top_k`` most likely tokens and to the
    smallest set whose probability reaches ``top_p``."""
    if sampling.temperature == 0:
        return logits.argmax(-1).tolist()
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop_sorted = probs.cumsum(-1) - probs >= sampling.top_p  # the more likely tokens already reach top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=g)[:, 0].tolist()
