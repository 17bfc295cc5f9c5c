"""``ColaModel``: the Text VAE, the DiT prior and the tokenizer of one checkpoint, behind the
estimator protocol (``colaprob.protocol.LatentModel``).

Spaces. The posterior ``q_phi(z | x)`` and the decoder work on VAE-space latents ``z``; the
DiT prior works on scaled latents ``u = (z - shift) * scale`` (VAE config ``shifting_factor``,
``scaling_factor``).

Every forward pass here runs in the module's dtype (float32, or float64 after ``.double()``),
has no in-place operation on its inputs and no data-dependent Python branch, so it can be
used under ``torch.func`` (``vmap``, ``vjp``, ``jvp``) and ``torch.autograd.grad(...,
is_grads_batched=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from colaprob.attention import KVCache
from colaprob.config import DiTConfig, VAEConfig
from colaprob.dit import DiT
from colaprob.errors import ColaprobError
from colaprob.protocol import DiagonalGaussian, TokenBatch
from colaprob.tokenizer import Counts, Framing, Tokenizer, frame, frame_pairs
from colaprob.vae import LOGVAR_MIN, TextVAE

DECODER_SPACES = ("vae", "dit")
T_SCALE = 1000.0  # the DiT takes timesteps 1000 t


class ColaModel(nn.Module):
    """A Cola DLM checkpoint: ``.vae`` (``TextVAE``), ``.dit`` (``DiT``), ``.tokenizer``,
    ``.framing``; ``colaprob.load`` builds one from a folder.

    ``decoder_space`` says which latents the decoder is given:

    * ``"vae"`` (default): the VAE-space ``z`` itself, the space the VAE is trained in; the
      official VAE fine-tuning (``cola_vae_finetune.py``) feeds the raw posterior mean.
    * ``"dit"``: the scaled latents ``(z - shift) * scale``, which is what the official
      inference (``inference.py``) feeds the decoder.

    The two agree when ``scaling_factor = 1`` and ``shifting_factor = 0``.

    ``cache_clean_history`` (default True): ``prior_velocity`` keeps the clean half's keys and
    values of the last ``clean`` tensor it saw and reuses them while the same tensor object
    comes back (as it does at every evaluation of one ODE solve). Gradients still flow to the
    parameters through the cached history; turn it off for benchmarks of the plain path.
    """

    def __init__(
        self,
        vae_config: VAEConfig,
        dit_config: DiTConfig,
        tokenizer: Tokenizer,
        framing: Framing | None = None,
        decoder_space: str = "vae",
        info: dict | None = None,
    ):
        super().__init__()
        if dit_config.txt_in_channels != vae_config.latent_dim or dit_config.txt_out_channels != vae_config.latent_dim:
            raise ColaprobError(
                f"the DiT takes {dit_config.txt_in_channels} and returns {dit_config.txt_out_channels} channels, "
                f"but the VAE latent_dim is {vae_config.latent_dim}."
            )
        if decoder_space not in DECODER_SPACES:
            raise ColaprobError(f"decoder_space is {decoder_space!r}, but it must be 'vae' or 'dit'.")
        self.vae = TextVAE(vae_config)
        self.dit = DiT(dit_config)
        self.tokenizer = tokenizer
        self.framing = framing if framing is not None else Framing.official(tokenizer)
        self.decoder_space = decoder_space
        self.info = dict(info or {})
        self.cache_clean_history = True
        self._history: tuple | None = None  # (clean tensor, key, KVCache)

    # -- the protocol's attributes ----------------------------------------------------------

    @property
    def vae_config(self) -> VAEConfig:
        return self.vae.config

    @property
    def dit_config(self) -> DiTConfig:
        return self.dit.config

    @property
    def latent_dim(self) -> int:
        return self.vae_config.latent_dim

    @property
    def patch_size(self) -> int:
        return self.vae_config.patch_size

    @property
    def block_size(self) -> int:
        """The DiT block, in latent positions."""
        return self.dit_config.block_size

    @property
    def latent_shift(self) -> float:
        return float(self.vae_config.shifting_factor)

    @property
    def latent_scale(self) -> float:
        return float(self.vae_config.scaling_factor)

    # -- text -> tokens ---------------------------------------------------------------------

    def frame(self, texts: list[str]) -> TokenBatch:
        """``[bos] + tokens + [eos]``, padded to a multiple of ``patch_size * block_size``
        tokens, batched to the longest (``colaprob.tokenizer.frame``)."""
        return frame(self.tokenizer, self.framing, texts, self.patch_size * self.block_size)

    def frame_pairs(self, prompts: list[str], responses: list[str]) -> tuple[TokenBatch, Tensor, Counts]:
        """Prompt-response pairs for ``colaprob.estimators.conditional``: the joint batch,
        the framed prefix length [B] and the response's own counts
        (``colaprob.tokenizer.frame_pairs``)."""
        return frame_pairs(self.tokenizer, self.framing, prompts, responses, self.patch_size * self.block_size)

    # -- the VAE ----------------------------------------------------------------------------

    def _latent_lengths(self, batch: TokenBatch) -> Tensor:
        """[B] valid latent positions of each sequence, on the model's device."""
        n_ids = self.vae.encoder.wte.weight.shape[0]  # the vocabulary and the encoder's mask id
        if batch.ids.numel() and (int(batch.ids.min()) < 0 or int(batch.ids.max()) >= n_ids):
            bad = int(batch.ids.min()) if int(batch.ids.min()) < 0 else int(batch.ids.max())
            raise ValueError(f"batch.ids holds the token id {bad}, outside this model's ids 0..{n_ids - 1}.")
        if batch.ids.shape[-1] % self.patch_size:
            raise ColaprobError(f"the batch is {batch.ids.shape[-1]} tokens wide, not a multiple of the patch size {self.patch_size}.")
        lengths = (batch.lengths + self.patch_size - 1) // self.patch_size
        return lengths.to(self.vae.encoder.wte.weight.device)

    def posterior(self, batch: TokenBatch) -> DiagonalGaussian:
        """``q_phi(z | x)``: mean and log-variance [B, L, d] (VAE space). A deterministic
        encoder (``use_variation = false``) gets the narrowest variance the official clamp
        allows (log-variance -30)."""
        ids = batch.ids.to(self.vae.encoder.wte.weight.device)
        mean, logvar = self.vae.encode(ids, self._latent_lengths(batch))
        return DiagonalGaussian(mean, torch.full_like(mean, LOGVAR_MIN) if logvar is None else logvar)

    def decoder_logits(self, z: Tensor, batch: TokenBatch) -> Tensor:
        """Logits of ``p_theta(. | z)``: ``z`` [..., B, L, d] (VAE space) -> [..., B, L*P, V].
        Leading sample dimensions are folded into the batch."""
        B, L, d = z.shape[-3:]
        flat = z.reshape(-1, L, d)
        if self.decoder_space == "dit":
            flat = (flat - self.latent_shift) * self.latent_scale
        lengths = self._latent_lengths(batch).repeat(flat.shape[0] // B)
        logits = self.vae.decode(flat, lengths)
        return logits.reshape(*z.shape[:-3], B, L * self.patch_size, -1)

    def decoder_log_prob(self, z: Tensor, batch: TokenBatch) -> Tensor:
        """``log p_theta(x_i | z)`` per token: ``z`` [..., B, L, d] -> [..., B, N], in float32
        (float64 for a float64 module): the log-softmax at ``batch.ids``, computed as
        ``logit - logsumexp`` so no second vocabulary-sized tensor is made."""
        logits = self.decoder_logits(z, batch)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ids = batch.ids.to(logits.device).expand(logits.shape[:-1])
        return logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)

    # -- the prior --------------------------------------------------------------------------

    def prior_velocity(self, u_t: Tensor, t: Tensor, clean: Tensor) -> Tensor:
        """Velocity ``du/dt`` of the block-causal prior in the 2L layout (DiT space).

        ``u_t``: [..., L, d] noisy latents; ``t``: time in [0, 1] broadcastable to [..., L]
        (0 on positions that hold clean values inside a block); ``clean``: [..., L, d] (or
        broadcastable) the clean history. Returns [..., L, d]. Block ``b``'s velocity sees
        ``u_t`` of block ``b`` and ``clean`` of blocks ``< b`` (DiT ``block_size``).
        """
        shape = u_t.shape
        L, d = shape[-2:]
        tau = (T_SCALE * torch.as_tensor(t, dtype=u_t.dtype, device=u_t.device)).expand(shape[:-1]).reshape(-1, L)
        history = self._clean_history(clean, shape)
        v = self.dit.velocity_2l(clean.expand(shape).reshape(-1, L, d), u_t.reshape(-1, L, d), tau, self.block_size, history)
        return v.reshape(shape)

    def prior_velocity_window(self, u_t: Tensor, t: Tensor, clean: Tensor, start: int) -> Tensor:
        """``prior_velocity`` of the positions ``start ..`` only (a multiple of the DiT block):
        ``u_t`` [..., W, d] noisy latents at those positions, ``t`` broadcastable to [..., W],
        ``clean`` [..., start + W, d] the clean latents of every position (the history).
        The DiT evaluates W rows over the cached keys and values of ``clean``; the result
        equals ``prior_velocity`` of the full layout at those positions."""
        shape = u_t.shape
        W, d = shape[-2:]
        tau = (T_SCALE * torch.as_tensor(t, dtype=u_t.dtype, device=u_t.device)).expand(shape[:-1]).reshape(-1, W)
        history = self._clean_history(clean, clean.shape)
        if history is None:
            history = self.dit.clean_history(clean.reshape(-1, *clean.shape[-2:]), self.block_size)
        v = self.dit.velocity_window(u_t.reshape(-1, W, d), tau, start, self.block_size, history)
        return v.reshape(shape)

    def _clean_history(self, clean: Tensor, shape: torch.Size) -> KVCache | None:
        """The clean half's keys and values for ``clean``, reused while the same tensor object
        (unchanged, same shape, same weights) comes back; None when caching is off or
        ``clean`` needs gradients."""
        if not self.cache_clean_history or clean.requires_grad:
            return None
        # Parameter versions grow with every in-place update (optimiser steps, loading).
        weights = (self.dit.txt_in.proj.weight.dtype, sum(p._version for p in self.dit.parameters()))
        key = (clean._version, shape, weights)
        if self._history is None or self._history[0] is not clean or self._history[1] != key:
            history = self.dit.clean_history(clean.expand(shape).reshape(-1, *shape[-2:]), self.block_size)
            self._history = (clean, key, history)
        return self._history[2]
