"""The Text VAE on every configuration path the official code runs (the golden fixture covers
one of them exactly): batching, padding and block-causality properties, the decoder cache,
float64 agreement, and the model-level protocol methods under ``torch.func``."""

from __future__ import annotations

import copy

import pytest
import torch

from colaprob.config import DiTConfig, VAEConfig
from colaprob.model import ColaModel
from colaprob.tokenizer import byte_level_tokenizer

V = 258  # byte-level tokenizer
BASE = dict(vocab_size=V, encoder_num_blocks=2, decoder_num_blocks=2, dim=32, ffn_dim=48, latent_dim=4, num_heads=4, block_size=2)
CONFIGS = {
    "official-default": {},
    "patch2-mqa-prenorm-clip-biases-silu": dict(
        patch_size=2, shared_heads_kv=4, post_norm=False, clip_qkv=0.5, qk_bias=True, bias=False,
        layer_norm_affine=False, qk_norm_affine=False, act="silu",
    ),
    "patch3-gelu-deterministic-no-qknorm-unmasked": dict(
        patch_size=3, act="gelu", use_variation=False, qk_norm=False, block_causal=False, rope_full_precision=False,
    ),
    "no-last-ln-block3": dict(encoder_last_ln=False, block_size=3, scaling_factor=0.7, shifting_factor=0.2),
}


def make_model(**overrides) -> ColaModel:
    torch.manual_seed(0)
    vae = VAEConfig(**{**BASE, **overrides})
    model = ColaModel(vae, DiTConfig(txt_in_channels=4, txt_out_channels=4, txt_dim=16, emb_dim=16, heads=2, head_dim=8,
                                     expand_ratio=2, num_layers=1, rope_dim=4, block_size=2), byte_level_tokenizer())
    with torch.no_grad():  # move every weight off its default so affine norms and biases matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return make_model(**CONFIGS[request.param])


TEXTS = ["Hello, world! A longer sentence here.", "short", "médium-length text ✓"]


def test_shapes_and_mask_row(model):
    batch = model.frame(TEXTS)
    P, d = model.patch_size, model.latent_dim
    q = model.posterior(batch)
    assert q.mean.shape == q.logvar.shape == (3, batch.ids.shape[1] // P, d)
    assert model.decoder_logits(q.mean, batch).shape == (*batch.ids.shape, V)
    assert model.vae.encoder.wte.weight.shape[0] == V + 1 and model.vae.mask_token_id == V
    masked = batch.ids.clone()
    masked[:, 1] = model.vae.mask_token_id  # the trainer's masking loss feeds the extra row
    assert torch.isfinite(model.vae.encode(masked, batch.lengths // P)[0]).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_document_does_not_depend_on_its_batch_mates_bit_for_bit(model, threads):
    """A document's posterior and decoder log-likelihood do not depend on its batch-mates, to
    the last bit, on one thread and on two (a last bit of the posterior is a different
    start for the prior's adaptive solve: ``colaprob.linear``). Before the patch embedding
    was a ``linear`` product, its convolution rounded with the batch's shape on two threads,
    and products of fewer than 16 rows took other kernels."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = model.frame(TEXTS)
        q = model.posterior(batch)
        logp = model.decoder_log_prob(q.mean, batch)
        for i in range(len(TEXTS)):
            single = model.frame([TEXTS[i]])
            n, L = int(single.lengths[0]), int(single.lengths[0]) // model.patch_size
            qi = model.posterior(single)
            assert torch.equal(q.mean[i, :L], qi.mean[0]) and torch.equal(q.logvar[i, :L], qi.logvar[0]), i
            assert torch.equal(logp[i, :n], model.decoder_log_prob(qi.mean, single)[0]), i
    finally:
        torch.set_num_threads(saved)


def test_padding_is_ignored(model):
    """Whatever fills the batch padding never reaches valid rows."""
    batch = model.frame(TEXTS)
    q = model.posterior(batch)
    noisy = batch.ids.clone()
    beyond = torch.arange(noisy.shape[1]) >= batch.lengths[:, None]
    noisy[beyond] = torch.randint(0, V, (int(beyond.sum()),))
    L = batch.lengths // model.patch_size
    mean2 = model.vae.encode(noisy, L)[0]
    for i in range(len(TEXTS)):
        torch.testing.assert_close(mean2[i, : L[i]], q.mean[i, : L[i]], atol=0, rtol=0)


def test_block_causality(model):
    """Changing a later VAE block never changes an earlier one (with ``block_causal = false``
    the whole sample is visible instead)."""
    c = model.vae_config
    batch = model.frame(["0123456789abcdefghijklmnopqrstuvwxyz"])
    cut = c.block_size * c.patch_size  # first VAE block, in tokens
    changed = batch.ids.clone()
    changed[:, cut:] = torch.randint(0, V, changed[:, cut:].shape)
    L = batch.lengths // c.patch_size
    before, after = model.vae.encode(batch.ids, L)[0], model.vae.encode(changed, L)[0]
    if not c.block_causal:
        assert not torch.allclose(before[:, : c.block_size], after[:, : c.block_size])
        return
    assert torch.equal(before[:, : c.block_size], after[:, : c.block_size])
    assert not torch.allclose(before[:, c.block_size :], after[:, c.block_size :])
    z = torch.randn(1, int(L[0]), c.latent_dim)
    z2 = z.clone()
    z2[:, c.block_size :] += 1
    assert torch.equal(model.vae.decode(z)[:, :cut], model.vae.decode(z2)[:, :cut])


def test_decoder_cache_equals_full_decode(model):
    """Decode a prefix, then one VAE block per call, through the cache (the splits fall on block
    boundaries: a cached row never needs a later row)."""
    c = model.vae_config
    if not c.block_causal:
        pytest.skip("without the block-causal mask every row sees the rows after it")
    torch.manual_seed(1)
    bs, P = c.block_size, c.patch_size
    n = 4 * bs + 1
    z = torch.randn(2, n, c.latent_dim)
    full = model.vae.decode(z, torch.tensor([n, n]))
    logits, cache = model.vae.decoder(z[:, :bs])
    assert torch.equal(cache.lengths, torch.tensor([bs, bs]))
    pieces = [logits]
    for s in range(bs, n, bs):
        logits, cache = model.vae.decoder(z[:, s : s + bs], cache=cache)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    # A sample whose cached prefix is padded continues right after its own last valid row.
    _, cache = model.vae.decoder(z[:, : 2 * bs], torch.tensor([2 * bs, bs]))
    following, _ = model.vae.decoder(z[:, 2 * bs : 3 * bs], cache=cache)
    reference = model.vae.decode(torch.cat([z[1:, :bs], z[1:, 2 * bs : 3 * bs]], 1))
    torch.testing.assert_close(following[1], reference[0, bs * P :], atol=1e-5, rtol=1e-5)


def test_float64_agrees_with_float32(model):
    batch = model.frame(TEXTS)
    q32 = model.posterior(batch)
    logits32 = model.decoder_logits(q32.mean, batch)
    m64 = copy.deepcopy(model).double()
    q64 = m64.posterior(batch)
    assert q64.mean.dtype == torch.float64
    torch.testing.assert_close(q64.mean, q32.mean.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m64.decoder_logits(q32.mean.double(), batch), logits32.double(), atol=1e-4, rtol=1e-4)
    assert m64.decoder_log_prob(q64.mean, batch).dtype == torch.float64


def test_decoder_spaces_and_torch_func():
    model = make_model(**CONFIGS["no-last-ln-block3"])
    batch = model.frame(TEXTS[:2])
    q = model.posterior(batch)
    zs = q.sample(torch.randn(3, *q.mean.shape))  # [K, B, L, d]
    direct = model.decoder_log_prob(zs, batch)
    assert direct.shape == (3, *batch.ids.shape) and direct.dtype == torch.float32
    looped = torch.stack([model.decoder_log_prob(z, batch) for z in zs])
    torch.testing.assert_close(direct, looped, atol=1e-5, rtol=1e-5)
    vmapped = torch.func.vmap(lambda z: model.decoder_log_prob(z, batch))(zs)
    torch.testing.assert_close(vmapped, direct, atol=1e-5, rtol=1e-5)
    # The gradient of the total log-probability through vjp equals autograd's.
    f = lambda z: model.decoder_log_prob(z, batch).sum()
    (g_vjp,) = torch.func.vjp(f, q.mean)[1](torch.tensor(1.0))
    z = q.mean.detach().requires_grad_()
    (g,) = torch.autograd.grad(f(z), z)
    torch.testing.assert_close(g_vjp, g)
    # "dit" feeds the decoder (z - shift) * scale.
    model.decoder_space = "dit"
    u = (q.mean - model.latent_shift) * model.latent_scale
    expected = model.vae.decode(u, batch.lengths // model.patch_size)
    torch.testing.assert_close(model.decoder_logits(q.mean, batch), expected)
