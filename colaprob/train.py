"""Training a Cola model on a CPU, in the two stages of the paper.

Stage 1, Text VAE pretraining (reference section 11):

    L_1 = recon + beta * KL(q_phi(z|x) || N(0, I)) + mask_weight * L_mask

Stage 2, joint training of the VAE and the DiT prior:

    L_2 = vae_weight * (recon + beta * E_q[log q_phi(z|x)] + mask_weight * L_mask)
          + fm_weight * L_FM + ref_weight * KL(q_phi || q_ref)

* ``recon``: mean cross-entropy of ``p_theta(x | z)`` over the framed tokens (every position
  a likelihood counts: text, eos, padding to the block), ``z`` a reparameterised posterior
  sample.
* ``L_mask`` (BERT-style): a copy of the batch with ``mask_ratio`` of its framed tokens
  replaced by the extra embedding row ``V`` is encoded, a posterior sample decoded, and the
  cross-entropy taken at the masked positions only: the latents must carry what the context
  implies about a missing token.
* KL terms are summed over the ``d`` channels and averaged over latent positions.
* ``L_FM`` (reference sections 9, 10.2): ``z0 = (z - shift) * scale`` from a posterior
  sample, ``z1 ~ N(0, I)``, ``z_t = (1 - t) z0 + t z1``, target ``z1 - z0``; one
  logit-normal ``t = sigmoid(t_loc + t_scale * n)`` per sequence; the 2L layout ``[clean |
  noisy]`` with the clean half detached (the history is a condition, not a target: no
  gradient reaches the encoder through it); a block size per sequence drawn from the powers
  of two below the DiT block size and the block size itself (``block_size_probs``); the
  prompt-block trick: each block of two or more rows, with probability
  ``prompt_block_prob``, gets its first ``split ~ U{1, .., bs-1}`` noisy rows replaced by
  their clean values at timestep 0 and left out of the loss.
* ``q_ref``: the encoder as stage 1 left it, frozen.

VAE logSNR (the paper's RQ2). The posterior mean is LayerNorm'd over its ``d`` channels, so
its mean square per channel is 1 and the logSNR of a posterior sample is ``-logvar``.
``logsnr_mode``: ``"free"`` (the encoder predicts its log-variance, the plain VAE);
``"fixed"``: the log-variance rows of ``encoder.final_layer`` have zero weights and bias
``-logsnr``, restored after every optimiser step, so every posterior has logSNR ``logsnr``;
``"learned"``: zero weights, the bias is learned from the initial value ``-logsnr``: one
logSNR per channel, the same for every position and text. Both are plain official weights,
so a checkpoint stays loadable by the official code and the likelihood uses exactly the
posterior that was trained.

Determinism and resuming. All randomness of step ``s`` comes from a generator seeded with
``(seed, s)`` and the data order from a permutation per epoch seeded with ``(seed, epoch)``,
so the random state is the step counter itself. A checkpoint (one safetensors file, written
atomically: weights, the reference encoder, the AdamW moments, and JSON metadata with the
step and the settings) therefore resumes to bit-identical weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from colaprob.data import Document
from colaprob.errors import ColaprobError
from colaprob.model import T_SCALE, ColaModel
from colaprob.progress import bar as progress_bar
from colaprob.protocol import TokenBatch

LOGSNR_MODES = ("free", "fixed", "learned")
CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.jsonl"


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a training run; ``colaprob train`` has one option per field."""

    seed: int = _setting(0, "seed of the initial weights, the data order and every random draw")
    batch_size: int = _setting(32, "sequences per step")
    stage1_steps: int = _setting(150, "steps of stage 1 (Text VAE alone)")
    stage2_steps: int = _setting(1050, "steps of stage 2 (VAE and DiT prior jointly)")
    lr: float = _setting(1e-3, "peak learning rate of AdamW")
    min_lr: float = _setting(1e-4, "learning rate at the end of each stage's cosine decay")
    warmup_steps: int = _setting(50, "linear warmup steps at the start of each stage")
    weight_decay: float = _setting(0.01, "AdamW weight decay of the weight matrices")
    grad_clip: float = _setting(1.0, "gradient norm clip")
    beta: float = _setting(1e-3, "weight of KL(q || N(0, I)) in stage 1 and of E_q[log q] in stage 2")
    mask_ratio: float = _setting(0.15, "fraction of tokens replaced by the mask token in the masking loss")
    mask_weight: float = _setting(0.1, "weight of the masking loss")
    logsnr_mode: str = _setting("free", "posterior noise level: free (predicted), fixed (at --logsnr) or learned (from --logsnr)")
    logsnr: float = _setting(4.0, "logSNR = -logvar of the posterior for the fixed and learned modes")
    vae_weight: float = _setting(1.0, "stage 2: weight of the VAE terms")
    fm_weight: float = _setting(1.0, "stage 2: weight of the flow-matching loss")
    ref_weight: float = _setting(0.1, "stage 2: weight of KL(q || q_ref) to the frozen stage-1 encoder")
    t_loc: float = _setting(0.0, "location of the logit-normal time distribution")
    t_scale: float = _setting(1.0, "scale of the logit-normal time distribution")
    block_size_probs: tuple[float, ...] | None = _setting(
        None, "weights of the training block sizes 1, 2, 4, .., DiT block size (default: half on the DiT block size, "
        "the rest equally on the smaller ones)"
    )
    prompt_block_prob: float = _setting(0.1, "probability that a block gets a clean prompt part (prompt-block trick)")
    eval_every: int = _setting(150, "steps between held-out evaluations")
    eval_docs: int = _setting(256, "held-out documents evaluated (the first ones of the split)")
    checkpoint_every: int = _setting(100, "steps between checkpoints")
    log_every: int = _setting(10, "steps between training-log records")

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def validate(self, dit_block_size: int) -> None:
        if self.logsnr_mode not in LOGSNR_MODES:
            raise ColaprobError(f"logsnr mode {self.logsnr_mode!r} is unknown; use one of {', '.join(LOGSNR_MODES)}.")
        if self.batch_size < 1 or self.stage1_steps < 0 or self.stage2_steps < 0 or self.total_steps < 1:
            raise ColaprobError("training needs a batch size of at least 1 and at least one step.")
        if min(self.eval_every, self.checkpoint_every, self.log_every, self.eval_docs) < 1:
            raise ColaprobError("the evaluation, checkpoint and log intervals and the evaluated documents must be at least 1.")
        if not 0 <= self.mask_ratio < 1 or not 0 <= self.prompt_block_prob <= 1:
            raise ColaprobError("the mask ratio must lie in [0, 1) and the prompt-block probability in [0, 1].")
        n = len(block_size_choices(dit_block_size))
        probs = self.block_size_probs
        if probs is not None and (len(probs) != n or min(probs) < 0 or sum(probs) <= 0):
            raise ColaprobError(
                f"block_size_probs needs {n} non-negative weights (for block sizes "
                f"{', '.join(map(str, block_size_choices(dit_block_size)))}), got {list(probs)}."
            )


def block_size_choices(block_size: int) -> list[int]:
    """The block sizes stage 2 trains with: powers of two below the DiT block size, and it."""
    return [2**k for k in range(block_size.bit_length()) if 2**k < block_size] + [block_size]


def _generator(*keys: int) -> torch.Generator:
    """A generator seeded by a hash of ``keys`` (e.g. seed and step)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]))


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr``, restarted at the start of stage 2
    (whose DiT starts from scratch)."""
    stage_steps = config.stage1_steps if step < config.stage1_steps else config.stage2_steps
    s = step if step < config.stage1_steps else step - config.stage1_steps
    if s < config.warmup_steps:
        return config.lr * (s + 1) / config.warmup_steps
    progress = (s - config.warmup_steps) / max(1, stage_steps - 1 - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# Initialisation and the logSNR constraint


def init_weights(model: ColaModel, seed: int) -> None:
    """Fresh weights: the VAE as its config says (truncated normal ``init_std``, cut at
    ``init_cutoff_factor`` standard deviations; zero biases), the DiT as DiT's adaLN-Zero
    (normal 0.02, the AdaLN projections and the output layer zero, so every block starts as
    the identity and the first velocity is 0)."""
    g = torch.Generator().manual_seed(seed)
    c = model.vae_config
    for module in model.vae.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
            cut = c.init_cutoff_factor * c.init_std
            nn.init.trunc_normal_(module.weight, std=c.init_std, a=-cut, b=cut, generator=g)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for name, module in model.dit.named_modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02, generator=g)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if ".ada." in f".{name}." or "txt_out" in name:
                nn.init.zeros_(module.weight)


def apply_logsnr(model: ColaModel, config: TrainConfig) -> None:
    """Impose ``logsnr_mode`` on the log-variance rows of ``encoder.final_layer`` (see the
    module docstring); ``"free"`` leaves them alone."""
    if config.logsnr_mode == "free":
        return
    layer, d = model.vae.encoder.final_layer, model.latent_dim
    with torch.no_grad():
        layer.weight[d:] = 0
        if config.logsnr_mode == "fixed":
            layer.bias[d:] = -config.logsnr


# ---------------------------------------------------------------------------------------------
# Losses


def gaussian_kl(mean: Tensor, logvar: Tensor, ref_mean: Tensor, ref_logvar: Tensor) -> Tensor:
    """``KL(N(mean, e^logvar) || N(ref_mean, e^ref_logvar))`` summed over channels: [B, L]."""
    return 0.5 * ((logvar - ref_logvar).exp() + (mean - ref_mean) ** 2 / ref_logvar.exp() - 1 + ref_logvar - logvar).sum(-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def latent_mask(model: ColaModel, batch: TokenBatch, width: int) -> Tensor:
    """[B, width] True on the latent positions of the framed sequences (the ones that count)."""
    return torch.arange(width) < (batch.lengths // model.patch_size)[:, None]


def vae_terms(model: ColaModel, batch: TokenBatch, config: TrainConfig, g: torch.Generator):
    """One encoder and decoder pass over the batch and its masked copy. Returns the posterior
    of the batch (mean, logvar [B, L, d]) and a sample ``z`` of it, the latent positions that
    count [B, L], the reconstruction loss and the masking loss."""
    B, N = batch.ids.shape
    counted = torch.arange(N) < batch.lengths[:, None]  # [B, N]
    masked = counted & (torch.rand(B, N, generator=g) < config.mask_ratio)
    ids = torch.cat([batch.ids, batch.ids.masked_fill(masked, model.vae.mask_token_id)])
    both = TokenBatch(ids, *(x.repeat(2) for x in (batch.lengths, batch.n_tokens, batch.n_bytes, batch.n_words)))
    posterior = model.posterior(both)
    z = posterior.sample(torch.randn(posterior.mean.shape, generator=g))
    logits = model.decoder_logits(z, both)  # [2B, N, V]
    ce = F.cross_entropy(logits.flatten(0, 1), batch.ids.repeat(2, 1).flatten(), reduction="none").view(2, B, N)
    recon, mask_loss = masked_mean(ce[0], counted), masked_mean(ce[1], masked)
    return posterior.mean[:B], posterior.logvar[:B], z[:B], latent_mask(model, batch, z.shape[1]), recon, mask_loss


def stage1_loss(model: ColaModel, batch: TokenBatch, config: TrainConfig, g: torch.Generator):
    mean, logvar, _, counted, recon, mask_loss = vae_terms(model, batch, config, g)
    kl = masked_mean(gaussian_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar)), counted)
    loss = recon + config.beta * kl + config.mask_weight * mask_loss
    return loss, {"recon": recon, "mask": mask_loss, "kl": kl, "logsnr": masked_mean(-logvar.mean(-1), counted)}


def stage2_loss(model: ColaModel, ref_vae: nn.Module, batch: TokenBatch, config: TrainConfig, g: torch.Generator):
    mean, logvar, z, counted, recon, mask_loss = vae_terms(model, batch, config, g)
    neg_entropy = masked_mean(-0.5 * (1 + math.log(2 * math.pi) + logvar).sum(-1), counted)
    with torch.no_grad():
        ref_mean, ref_logvar = ref_vae.encode(batch.ids, batch.lengths // model.patch_size)
    ref_kl = masked_mean(gaussian_kl(mean, logvar, ref_mean, ref_logvar), counted)
    fm = flow_matching_loss(model, z, counted, config, g)
    vae = recon + config.beta * neg_entropy + config.mask_weight * mask_loss
    loss = config.vae_weight * vae + config.fm_weight * fm + config.ref_weight * ref_kl
    stats = {"recon": recon, "mask": mask_loss, "neg_entropy": neg_entropy, "ref_kl": ref_kl, "fm": fm}
    return loss, stats | {"logsnr": masked_mean(-logvar.mean(-1), counted)}


def flow_matching_loss(model: ColaModel, z: Tensor, counted: Tensor, config: TrainConfig, g: torch.Generator) -> Tensor:
    """``L_FM`` on posterior samples ``z`` [B, L, d] (VAE space); see the module docstring."""
    B, L, d = z.shape
    z0 = (z - model.latent_shift) * model.latent_scale
    t = torch.sigmoid(config.t_loc + config.t_scale * torch.randn(B, generator=g))
    z1 = torch.randn(B, L, d, generator=g)
    choices = torch.tensor(block_size_choices(model.block_size))
    probs = torch.tensor(config.block_size_probs or [0.5 / max(1, len(choices) - 1)] * (len(choices) - 1) + [0.5])
    bs = choices[torch.multinomial(probs, B, replacement=True, generator=g)]  # [B]
    # Prompt-block trick: per block (indexed by its first row) a coin and a split point.
    rows = torch.arange(L)
    block_start = rows // bs[:, None] * bs[:, None]  # [B, L]
    coin = torch.rand(B, L, generator=g) < config.prompt_block_prob
    split = 1 + (torch.rand(B, L, generator=g) * (bs[:, None] - 1)).long()
    pinned = (bs[:, None] >= 2) & coin.gather(1, block_start) & (rows - block_start < split.gather(1, block_start))

    t_rows = torch.where(pinned, 0.0, t[:, None])  # [B, L]
    z_t = torch.where(pinned[..., None], z0, (1 - t_rows[..., None]) * z0 + t_rows[..., None] * z1)
    v = model.dit.velocity_2l(z0.detach(), z_t, T_SCALE * t_rows, bs)
    per_row = ((v - (z1 - z0)) ** 2).mean(-1)
    return masked_mean(per_row, counted & ~pinned)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation


@torch.no_grad()
def heldout_figures(model: ColaModel, docs: list[Document], seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """The held-out figures of a model on ``docs``:

    * ``recon_acc``: token accuracy of the argmax of ``p_theta(x | mean of q_phi(z|x))`` over
      the text and eos tokens (padding left out);
    * ``fm_loss``: the flow-matching loss of the DiT on posterior samples, at the DiT block
      size, with ``t ~ U(0, 1)`` (the range a likelihood integrates over) and noise fixed by
      ``seed``, no prompt blocks;
    * ``fm_zero_baseline``: the same loss for the zero velocity, ``E|z1 - z0|^2`` per channel.
    """
    totals = {"correct": 0.0, "tokens": 0.0, "fm": 0.0, "zero": 0.0, "rows": 0.0}
    g = torch.Generator().manual_seed(seed)
    pad = model.framing.pad_id
    for start in range(0, len(docs), batch_size):
        batch = model.frame([d.text for d in docs[start : start + batch_size]])
        posterior = model.posterior(batch)
        pred = model.decoder_logits(posterior.mean, batch).argmax(-1)
        text = (torch.arange(batch.ids.shape[1]) < batch.lengths[:, None]) & (batch.ids != pad)
        totals["correct"] += float(((pred == batch.ids) & text).sum())
        totals["tokens"] += float(text.sum())

        B, L, d = posterior.mean.shape
        z0 = (posterior.sample(torch.randn(B, L, d, generator=g)) - model.latent_shift) * model.latent_scale
        z1 = torch.randn(B, L, d, generator=g)
        t = torch.rand(B, 1, generator=g).expand(B, L)
        z_t = (1 - t[..., None]) * z0 + t[..., None] * z1
        v = model.dit.velocity_2l(z0, z_t, T_SCALE * t, model.block_size)
        rows = latent_mask(model, batch, L)
        totals["fm"] += float((((v - (z1 - z0)) ** 2).mean(-1) * rows).sum())
        totals["zero"] += float((((z1 - z0) ** 2).mean(-1) * rows).sum())
        totals["rows"] += float(rows.sum())
    return {
        "recon_acc": totals["correct"] / totals["tokens"],
        "fm_loss": totals["fm"] / totals["rows"],
        "fm_zero_baseline": totals["zero"] / totals["rows"],
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    path: Path, model: ColaModel, ref_vae: nn.Module | None, optimizer, step: int, seconds: float, config: TrainConfig
) -> None:
    """Everything a resume needs, in one safetensors file written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ref_vae is not None:
        tensors |= {f"ref.{k}": v for k, v in ref_vae.state_dict().items()}
    state = optimizer.state_dict()
    for i, param_state in state["state"].items():
        tensors |= {f"optim.{i}.{name}": value for name, value in param_state.items()}
    meta = {"step": step, "seconds": seconds, "config": dataclasses.asdict(config), "param_groups": state["param_groups"]}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata={"colaprob_train": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: ColaModel, optimizer, config: TrainConfig) -> tuple[int, float, nn.Module | None]:
    """Restore a ``save_checkpoint`` file into ``model`` and ``optimizer``; returns the step to
    continue from, the training seconds so far and the frozen stage-1 VAE (None before
    stage 2)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["colaprob_train"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, like the file
    if meta["config"] != saved:
        changed = sorted(k for k in saved if meta["config"].get(k) != saved[k])
        raise ColaprobError(
            f"{path} was written with other settings ({', '.join(changed)}); rerun with the same settings "
            "to resume, or use a new output folder."
        )
    part = lambda prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    model.load_state_dict(part("model."))
    ref_vae = None
    if any(k.startswith("ref.") for k in tensors):
        ref_vae = frozen_copy(model.vae)
        ref_vae.load_state_dict(part("ref."))
    state: dict = {}
    for key, value in part("optim.").items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["seconds"], ref_vae


def frozen_copy(module: nn.Module) -> nn.Module:
    ref = copy.deepcopy(module)
    ref.requires_grad_(False)
    return ref


def make_optimizer(model: ColaModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the VAE and the DiT; matrices decay, biases, norms and embeddings do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p is not model.vae.encoder.wte.weight]
    rest = [p for p in params if all(p is not q for q in decay)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


# ---------------------------------------------------------------------------------------------
# The loop


def check_writable_folder(folder: Path) -> None:
    """Fail before training, not after it: ``folder`` is created if needed and must take a file."""
    from colaprob.results import check_writable, write_failure

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ColaprobError(write_failure(folder, err)) from None
    check_writable(folder / "probe")


def train(
    model: ColaModel,
    config: TrainConfig,
    out_dir: str | Path,
    train_docs: list[Document],
    heldout_docs: list[Document],
    work_dir: str | Path | None = None,
    info: dict | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place (stage 1, then stage 2), save it to ``out_dir`` with
    ``colaprob.save`` and put the JSONL log next to it; return the final held-out figures.

    ``model`` holds freshly initialised weights (``init_weights``) or weights to continue
    from. While training, ``work_dir`` (default: ``out_dir`` with ``.work`` appended) holds the
    log and the checkpoint; a rerun with the same settings resumes from it, and it is removed
    once the model is saved. ``info`` goes into the saved model's ``info`` next to the settings
    and the held-out figures."""
    from colaprob.checkpoint import save

    config.validate(model.block_size)
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    if (out_dir / "colaprob.json").exists():
        raise ColaprobError(f"{out_dir} already holds a trained model; choose another output folder or delete it.")
    check_writable_folder(out_dir.parent)
    check_writable_folder(work_dir)
    checkpoint, log_path = work_dir / CHECKPOINT, work_dir / LOG
    data = model.frame([d.text for d in train_docs])
    if len(data) < config.batch_size:
        raise ColaprobError(f"there are {len(data)} training documents, fewer than the batch size {config.batch_size}.")
    heldout = heldout_docs[: config.eval_docs]

    optimizer = make_optimizer(model, config)
    step, seconds, ref_vae = 0, 0.0, None
    if checkpoint.exists():
        step, seconds, ref_vae = load_checkpoint(checkpoint, model, optimizer, config)
        _truncate_log(log_path, step)
    apply_logsnr(model, config)

    bar = progress_bar(range(step, config.total_steps), initial=step, total=config.total_steps, show=progress, mininterval=2)
    started = time.time() - seconds  # training time so far, over all resumed sessions
    for step in bar:
        stage = 1 if step < config.stage1_steps else 2
        if stage == 2 and ref_vae is None:
            ref_vae = frozen_copy(model.vae)
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr

        g = _generator(config.seed, step)
        batch = data.select(batch_indices(len(data), config.batch_size, config.seed, step))
        if stage == 1:
            loss, stats = stage1_loss(model, batch, config, g)
        else:
            loss, stats = stage2_loss(model, ref_vae, batch, config, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        apply_logsnr(model, config)

        done = step + 1
        stats = {"loss": loss} | stats
        stats = {k: round(v.item(), 5) for k, v in stats.items()}
        bar.set_postfix({"stage": stage} | {k: f"{v:.4g}" for k, v in stats.items()}, refresh=False)
        if done % config.log_every == 0 or done == config.total_steps:
            _log(log_path, {"step": done, "stage": stage, "lr": lr} | stats | {"seconds": round(time.time() - started, 1)})
        if done % config.eval_every == 0 or done == config.total_steps:
            figures = heldout_figures(model, heldout, seed=config.seed)
            _log(log_path, {"step": done, "stage": stage, "heldout": figures})
        if done % config.checkpoint_every == 0 and done < config.total_steps:
            save_checkpoint(checkpoint, model, ref_vae, optimizer, done, time.time() - started, config)

    model.info = dict(model.info) | (info or {}) | {
        "train_config": dataclasses.asdict(config),
        "train_seconds": round(time.time() - started),
        "heldout": figures | {"docs": len(heldout)},
    }
    save(model, out_dir)
    shutil.copyfile(log_path, out_dir / LOG)
    shutil.rmtree(work_dir)
    return figures


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """The documents of ``step``: epochs of ``n // batch_size`` batches, each epoch a fresh
    permutation seeded by ``(seed, epoch)`` (the last ``n % batch_size`` documents of a
    permutation wait for the next epoch)."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=_generator(seed, 1 << 40, epoch))
    return order[i * batch_size : (i + 1) * batch_size]


def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step`` (a resumed run writes them again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
