"""The block-causal DiT: its four ways of running agree (2L, 2L with the clean-history cache,
KV-cached generation, the unconditional pass), per-sample block sizes, the block structure of
its Jacobian, and ``ColaModel.prior_velocity`` under ``torch.func`` and batched gradients, and
the AdaLN modulations computed once per distinct timestep."""

from __future__ import annotations

import copy

import pytest
import torch

from colaprob.config import DiTConfig, VAEConfig
from colaprob.dit import DiT, mask_2l
from colaprob.model import ColaModel
from colaprob.tokenizer import byte_level_tokenizer

C = 4  # latent channels
BASE = dict(txt_in_channels=C, txt_out_channels=C, txt_dim=32, emb_dim=32, heads=2, head_dim=16, expand_ratio=2, num_layers=2, rope_dim=12, block_size=4)
CONFIGS = {
    "fixture-like": {},
    "qk-bias-full-rope-narrow-attention": dict(qk_bias=True, heads=3, head_dim=8, rope_dim=8, expand_ratio=3, block_size=2),
    "no-rope-block-1": dict(rope_dim=0, block_size=1, num_layers=1),
}


def jitter(module):
    """Move every weight off its default so that affine norms, biases and AdaLN matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def dit(request):
    torch.manual_seed(0)
    return jitter(DiT(DiTConfig(**{**BASE, **CONFIGS[request.param]})))


def inputs(B=3, L=11, seed=1):
    """Clean and noisy latents, timesteps (0..1000) with a few clean rows inside blocks."""
    g = torch.Generator().manual_seed(seed)
    clean, noisy = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g)
    tau = 1000 * torch.rand(B, 1, generator=g).expand(B, L).clone()
    tau[0, 5:6] = 0
    noisy[0, 5:6] = clean[0, 5:6]
    return clean, noisy, tau


def test_2l_history_kvcache_and_sequential_commit_agree(dit):
    bs = dit.config.block_size
    clean, noisy, tau = inputs()
    v2l = dit.velocity_2l(clean, noisy, tau, bs)
    history = dit.clean_history(clean, bs)
    torch.testing.assert_close(dit.velocity_2l(clean, noisy, tau, bs, history=history), v2l, atol=1e-5, rtol=1e-5)
    L = clean.shape[1]
    starts = range(0, L, bs)
    prefilled = torch.cat([dit.block_velocity(noisy[:, s : s + bs], tau[:, s : s + bs], dit.prefill(clean[:, :s])) for s in starts], 1)
    torch.testing.assert_close(prefilled, v2l, atol=1e-5, rtol=1e-5)
    cache, pieces = None, []
    for s in starts:  # generation order: query the block, then commit its clean values
        pieces.append(dit.block_velocity(noisy[:, s : s + bs], tau[:, s : s + bs], cache))
        cache = dit.commit(clean[:, s : s + bs], cache)
    torch.testing.assert_close(torch.cat(pieces, 1), v2l, atol=1e-5, rtol=1e-5)


def test_unconditional_pass_is_the_block_alone(dit):
    bs = dit.config.block_size
    clean, noisy, tau = inputs()
    for s in range(0, clean.shape[1] - bs + 1, bs):
        block, t = noisy[:, s : s + bs], tau[:, s : s + bs]
        alone = dit.velocity_2l(torch.zeros_like(block), block, t, bs)  # block 0 sees no clean key
        torch.testing.assert_close(dit.block_velocity(block, t), alone, atol=1e-5, rtol=1e-5)


def test_prefill_with_per_sample_prefix_lengths(dit):
    bs = dit.config.block_size
    clean, noisy, tau = inputs(B=2)
    cache = dit.prefill(clean[:, : 2 * bs], torch.tensor([2 * bs, bs]))
    v = dit.block_velocity(noisy[:, :bs], tau[:, :bs], cache)
    for i, n in enumerate([2 * bs, bs]):
        alone = dit.block_velocity(noisy[i : i + 1, :bs], tau[i : i + 1, :bs], dit.prefill(clean[i : i + 1, :n]))
        torch.testing.assert_close(v[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_per_sample_block_sizes(dit):
    clean, noisy, tau = inputs(L=8)
    sizes = torch.tensor([1, 2, 4])
    v = dit.velocity_2l(clean, noisy, tau, sizes)
    history = dit.clean_history(clean, sizes)
    torch.testing.assert_close(dit.velocity_2l(clean, noisy, tau, sizes, history=history), v, atol=1e-5, rtol=1e-5)
    for i, bs in enumerate(sizes.tolist()):
        torch.testing.assert_close(v[i : i + 1], dit.velocity_2l(clean[i : i + 1], noisy[i : i + 1], tau[i : i + 1], bs), atol=1e-5, rtol=1e-5)
    # The mask itself: the rule of the 2L layout, row by row.
    m = mask_2l(8, sizes)
    for i, bs in enumerate(sizes.tolist()):
        for q in range(16):
            for k in range(16):
                bq, bk = (q % 8) // bs, (k % 8) // bs
                rule = (bk <= bq) if (q < 8 and k < 8) else (bk < bq) if (q >= 8 and k < 8) else (bk == bq) if q >= 8 else False
                assert bool(m[i, q, k]) == rule


def test_block_structure(dit):
    """Block b's velocity depends on its own noisy rows and on clean rows of earlier blocks only."""
    bs = dit.config.block_size
    clean, noisy, tau = inputs(L=3 * bs)
    v = dit.velocity_2l(clean, noisy, tau, bs)
    for j in range(3):
        rows = slice(j * bs, (j + 1) * bs)
        n2, c2 = noisy.clone(), clean.clone()
        n2[:, rows] += 1
        c2[:, rows] += 1
        vn, vc = dit.velocity_2l(clean, n2, tau, bs), dit.velocity_2l(c2, noisy, tau, bs)
        for b in range(3):
            block = slice(b * bs, (b + 1) * bs)
            assert torch.equal(vn[:, block], v[:, block]) == (b != j)
            assert torch.equal(vc[:, block], v[:, block]) == (b <= j)


def test_float64_agrees_with_float32(dit):
    clean, noisy, tau = inputs()
    v32 = dit.velocity_2l(clean, noisy, tau, dit.config.block_size)
    v64 = copy.deepcopy(dit).double().velocity_2l(clean.double(), noisy.double(), tau.double(), dit.config.block_size)
    assert v64.dtype == torch.float64
    torch.testing.assert_close(v64, v32.double(), atol=1e-4, rtol=1e-4)


def test_rope_frequencies_are_stored_buffers(dit):
    keys = [k for k in dit.state_dict() if k.endswith("msa.rope.rope.freqs")]
    assert len(keys) == dit.config.num_layers
    assert dit.state_dict()[keys[0]].shape == (dit.config.rope_dim // 2,)


# -- ColaModel.prior_velocity -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vae = VAEConfig(vocab_size=258, encoder_num_blocks=1, decoder_num_blocks=1, dim=16, ffn_dim=32, latent_dim=C, num_heads=2)
    return jitter(ColaModel(vae, DiTConfig(**BASE), byte_level_tokenizer()))


def test_prior_velocity_layout_and_clean_history_cache(model, monkeypatch):
    clean, noisy, tau = inputs(B=2, L=8)
    t = tau / 1000
    K = 3
    u = noisy + 0.1 * torch.randn(K, *noisy.shape)  # [K, B, L, d]
    model.cache_clean_history = False
    plain = model.prior_velocity(u, t, clean)
    expected = model.dit.velocity_2l(clean.expand_as(u).reshape(-1, 8, C), u.reshape(-1, 8, C), 1000 * t.expand(K, 2, 8).reshape(-1, 8), 4)
    torch.testing.assert_close(plain, expected.reshape(u.shape))
    model.cache_clean_history = True
    calls = []
    original = model.dit.clean_history
    monkeypatch.setattr(model.dit, "clean_history", lambda *a: calls.append(1) or original(*a))
    clean_k = clean.expand_as(u).clone()
    for _ in range(3):  # one ODE solve: the same clean object every time
        torch.testing.assert_close(model.prior_velocity(u, t, clean_k), plain, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    clean_k.add_(1.0)  # changed in place: the cache must notice
    model.prior_velocity(u, t, clean_k)
    assert len(calls) == 2
    model.prior_velocity(u, t, clean_k.clone().requires_grad_())  # needs gradients: never cached
    assert len(calls) == 2


@pytest.mark.parametrize("cached", [True, False])
def test_prior_velocity_under_torch_func(model, cached):
    model.cache_clean_history = cached
    clean, noisy, tau = inputs(B=2, L=8)
    t = tau / 1000
    f = lambda u: model.prior_velocity(u, t, clean)
    us = noisy + 0.1 * torch.randn(3, *noisy.shape)
    torch.testing.assert_close(torch.func.vmap(f)(us), torch.stack([f(u) for u in us]), atol=1e-5, rtol=1e-5)
    a, b = torch.randn_like(noisy), torch.randn_like(noisy)
    _, jb = torch.func.jvp(f, (noisy,), (b,))
    _, pullback = torch.func.vjp(f, noisy)
    (ja,) = pullback(a)
    torch.testing.assert_close((a * jb).sum(), (ja * b).sum(), atol=1e-4, rtol=1e-4)
    # Batched vector-Jacobian products, as the exact-trace CNF estimator takes them.
    u = noisy.clone().requires_grad_()
    v = f(u)
    probes = torch.randn(4, *noisy.shape)
    (batched,) = torch.autograd.grad(v, u, probes, is_grads_batched=True)
    torch.testing.assert_close(batched, torch.stack([pullback(e)[0] for e in probes]), atol=1e-5, rtol=1e-5)


# -- the per-timestep AdaLN ---------------------------------------------------------------------


def test_parameter_gradients_count_each_row_once(dit):
    """The modulations are computed once per distinct timestep and gathered to their rows: the
    gradient of a batch's loss with respect to every weight is the sum of the samples' own
    (each sample alone has fewer distinct timesteps than the batch)."""
    clean, noisy, tau = inputs()
    bs = dit.config.block_size
    weights = [p for p in dit.parameters() if p.requires_grad]
    together = torch.autograd.grad(dit.velocity_2l(clean, noisy, tau, bs).square().sum(), weights, allow_unused=True)
    apart = [torch.autograd.grad(dit.velocity_2l(clean[i : i + 1], noisy[i : i + 1], tau[i : i + 1], bs).square().sum(), weights, allow_unused=True) for i in range(len(clean))]
    for p, a, parts in zip(weights, together, zip(*apart)):
        if a is None:
            continue
        torch.testing.assert_close(a, sum(parts), atol=1e-4, rtol=1e-4)
    assert sum(a is not None for a in together) > len(weights) // 2


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shared_time", [False, True], ids=["time-per-block", "one-time"])
def test_a_row_does_not_depend_on_its_batch_mates_bit_for_bit(shared_time, threads):
    """The embedded model's velocity over a cached clean history, and its vector-Jacobian
    products, as an ODE solve evaluates them: a document alone (at its own length) and in a
    batch of 7 longer ones (padded to 10 blocks) agree bit for bit, rows, keys and timesteps
    differing, on one thread and on two. Without the 16-row floor of ``linear.Linear`` and the
    block-interleaved keys of ``dit.join_keys`` every one of them differed in the last bits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_batch_independence(shared_time)
    finally:
        torch.set_num_threads(saved)


def _check_batch_independence(shared_time: bool) -> None:
    import colaprob

    dit = colaprob.load("tiny").dit
    bs, d = dit.config.block_size, dit.config.txt_in_channels
    g = torch.Generator().manual_seed(0)
    B, n_blocks = 8, torch.tensor([3, 10, 7, 1, 10, 5, 2, 9])
    L = int(n_blocks.max()) * bs
    clean, noisy = torch.randn(B, L, d, generator=g), torch.randn(B, L, d, generator=g)
    tau = torch.full((B, L), 400.0) if shared_time else (1000 * torch.rand(B, L // bs, generator=g)).repeat_interleave(bs, 1)
    probes = torch.randn(4, B, L, d, generator=g)

    def evaluate(rows: slice, length: int):
        x = noisy[rows, :length].clone().requires_grad_(True)
        history = dit.clean_history(clean[rows, :length], bs)
        v = dit.velocity_2l(clean[rows, :length], x, tau[rows, :length], bs, history)
        (vjp,) = torch.autograd.grad(v, x, probes[:, rows, :length], is_grads_batched=True)
        return v.detach(), vjp

    v_all, vjp_all = evaluate(slice(None), L)
    for i in range(B):
        length = int(n_blocks[i]) * bs
        v, vjp = evaluate(slice(i, i + 1), length)
        assert torch.equal(v[0], v_all[i, :length]), i
        assert torch.equal(vjp[:, 0], vjp_all[:, i, :length]), i
