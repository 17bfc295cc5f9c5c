"""Reproduce the official code's outputs stored in every fixture folder (``golden.npz``).

All inputs come from the folder (texts, raw token ids, pad id, times, prompt-block positions,
noise), so another fixture of the same layout is checked with no code change. Arrays are
compared in the official flat "NA" order (sample after sample; 2L arrays: per sample the L
clean rows, then the L noisy rows). An array this test does not know fails the test.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import colaprob
from colaprob.dit import mask_2l, timestep_features
from colaprob.protocol import TokenBatch

ATOL = RTOL = 1e-4  # float32 against the official float32 run
ATOL64 = RTOL64 = 5e-6  # float64 against the official float64 run (which keeps float32 RoPE)

INPUTS = {"vae_eps", "dit_z1", "dit_temb_t"}  # noise and probe inputs: read, not recomputed
PER_TOKEN = re.compile(r"input_ids|vae_dec_(logits|logprob)_from_\w+")


def load_fixture(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    with np.load(folder / "golden.npz") as npz:
        golden = {k: npz[k] for k in npz.files}
    return manifest, golden


def na(x: torch.Tensor, lens) -> np.ndarray:
    """[B, Lmax, ...] right-padded -> the rows of every sample, concatenated."""
    return torch.cat([x[i, :n] for i, n in enumerate(lens)]).detach().numpy()


def na_2l(x: torch.Tensor, lens) -> np.ndarray:
    """[B, 2 Lmax, ...] ([clean | noisy], each padded to Lmax) -> per sample L clean, L noisy."""
    half = x.shape[1] // 2
    return torch.cat([torch.cat([x[i, :n], x[i, half : half + n]]) for i, n in enumerate(lens)]).detach().numpy()


def padded(rows: np.ndarray, lens, dtype) -> torch.Tensor:
    """The inverse of ``na``: flat rows -> [B, Lmax, ...] padded with zeros."""
    out = torch.zeros((len(lens), max(lens)) + rows.shape[1:], dtype=dtype)
    start = 0
    for i, n in enumerate(lens):
        out[i, :n] = torch.as_tensor(rows[start : start + n], dtype=dtype)
        start += n
    return out


def recompute(model: colaprob.ColaModel, manifest: dict, golden: dict, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Every golden array, recomputed by colaprob from the fixture's inputs."""
    out = {}
    P, bs = model.patch_size, model.block_size
    pad = manifest["tokenizer"]["pad_token_id"]
    raw = manifest["raw_token_ids"]
    ids = [r + [pad] * (-len(r) % (P * bs)) for r in raw]
    tok_lens = [len(r) for r in ids]
    lat_lens = [n // P for n in tok_lens]
    width = max(tok_lens)
    batch = TokenBatch(
        ids=torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
        lengths=torch.tensor(tok_lens),
        n_tokens=torch.tensor([len(r) for r in raw]),
        n_bytes=torch.tensor([len(t.encode()) for t in manifest["texts"]]),
        n_words=torch.tensor([len(t.split()) for t in manifest["texts"]]),
    )
    out.update(
        input_ids=np.concatenate(ids), token_lens=np.array(tok_lens), lat_lens=np.array(lat_lens),
        raw_token_lens=np.array([len(r) for r in raw]),
    )

    # Hidden states through forward hooks (blocks return (x, kv): keep x).
    hooks = []

    def grab(name, module, first=False):
        hooks.append(module.register_forward_hook(lambda m, i, o: out.__setitem__(name, o[0] if first else o)))

    for i, block in enumerate(model.vae.encoder.blocks):
        grab(f"vae_enc_block{i}_out", block, first=True)
    grab("vae_enc_final_layer_out", model.vae.encoder.final_layer)
    q = model.posterior(batch)
    for i, block in enumerate(model.vae.decoder.blocks):
        grab(f"vae_dec_block{i}_out", block, first=True)
    logits = model.decoder_logits(q.mean, batch)  # hooks fire on this decode: decoding the mean
    for h in hooks:
        h.remove()
    for name in [k for k in out if k.startswith("vae_")]:
        out[name] = na(out[name], lat_lens)
    d = model.latent_dim
    out["vae_post_logvar_raw"] = out["vae_enc_final_layer_out"][:, d:]
    out["vae_post_mean"], out["vae_post_logvar"] = na(q.mean, lat_lens), na(q.logvar, lat_lens)
    out["vae_dec_logits_from_mean"] = na(logits, tok_lens)
    out["vae_dec_logprob_from_mean"] = na(model.decoder_log_prob(q.mean, batch), tok_lens)
    sample = q.sample(padded(golden["vae_eps"], lat_lens, dtype))
    out["vae_sampled_latent"] = na(sample, lat_lens)
    out["vae_dec_logits_from_sample"] = na(model.decoder_logits(sample, batch), tok_lens)
    out["vae_dec_logprob_from_sample"] = na(model.decoder_log_prob(sample, batch), tok_lens)

    # Flow matching in the 2L layout, with the prompt-block trick rows at timestep 0.
    fm = manifest["flow_matching"]
    z0 = (q.mean - model.latent_shift) * model.latent_scale
    z1 = padded(golden["dit_z1"], lat_lens, dtype)
    t = torch.tensor(fm["t_per_sample"], dtype=torch.float32).to(dtype)[:, None].expand(z0.shape[:2]).clone()
    for p in fm["prompt_block_positions"]:
        t[p["sample"], p["start"] : p["end"]] = 0
    zt = torch.where((t > 0)[..., None], (1 - t[..., None]) * z0 + t[..., None] * z1, z0)
    loss_mask = (t > 0).to(dtype)
    out.update(dit_z0=na(z0, lat_lens), dit_zt=na(zt, lat_lens), dit_t=np.array(fm["t_per_sample"], dtype=np.float32))
    out["dit_t_tokens"], out["dit_loss_mask"] = na(1000 * t, lat_lens), na(loss_mask, lat_lens)

    dit = model.dit
    L = z0.shape[1]
    positions = torch.arange(L).expand(len(lat_lens), L)
    x2l, tau2l, pos2l = torch.cat([z0, zt], 1), torch.cat([torch.zeros_like(t), 1000 * t], 1), torch.cat([positions, positions], 1)
    hooks = [dit.emb_in.register_forward_hook(lambda m, i, o: out.__setitem__("dit_2l_temb", o))]
    for i, block in enumerate(dit.blocks):
        grab(f"dit_2l_block{i}_out", block, first=True)
    v2l, _ = dit(x2l, tau2l, pos2l, mask_2l(L, bs))
    for h in hooks:
        h.remove()
    for name in [k for k in out if k.startswith("dit_2l_")]:
        out[name] = na_2l(out[name], lat_lens)
    allowed = mask_2l(L, bs)[0]
    rows = np.concatenate([np.r_[0:n, L : L + n] for n in lat_lens])  # padded 2L rows in NA order
    owner = np.repeat(np.arange(len(lat_lens)), [2 * n for n in lat_lens])
    out["dit_2l_attn_allowed"] = allowed[rows][:, rows].numpy() & (owner[:, None] == owner[None, :])
    out.update(dit_2l_txt=na_2l(x2l, lat_lens), dit_2l_timestep=na_2l(tau2l, lat_lens), dit_2l_out=na_2l(v2l, lat_lens))
    out["dit_2l_position_ids"] = na_2l(pos2l, lat_lens)

    v = model.prior_velocity(zt, t, z0)  # the public path: t in [0, 1], clean-history cache
    assert (v - v2l[:, L:]).abs().max() < 1e-5
    out["dit_v_pred"] = na(v, lat_lens)
    target = z1 - z0
    err = ((v.double() - target.double()) ** 2).mean(-1)
    out["dit_v_target"], out["dit_fm_err_per_token"] = na(target, lat_lens), na(err, lat_lens)
    err, mask = out["dit_fm_err_per_token"], out["dit_loss_mask"]
    out["dit_fm_loss"] = np.array([(err * mask).sum() / mask.sum()])

    blocks = range(0, L, bs)
    conditional = [dit.block_velocity(zt[:, s : s + bs], 1000 * t[:, s : s + bs], dit.prefill(z0[:, :s])) for s in blocks]
    unconditional = [dit.block_velocity(zt[:, s : s + bs], 1000 * t[:, s : s + bs]) for s in blocks]
    out["dit_v_pred_kvcache"] = na(torch.cat(conditional, 1), lat_lens)
    out["dit_v_uncond"] = na(torch.cat(unconditional, 1), lat_lens)

    probe = torch.as_tensor(golden["dit_temb_t"])
    out["dit_temb_sinusoid"] = timestep_features(probe).numpy()
    out["dit_temb_out"] = dit.emb_in(probe.to(dtype)).detach().numpy()
    return out


@pytest.fixture(scope="module")
def fixtures(fixture_dirs):
    """Per fixture folder: manifest, golden arrays, float32 and float64 recomputations."""
    result = []
    for folder in fixture_dirs:
        manifest, golden = load_fixture(folder)
        model = colaprob.load(folder)
        with torch.no_grad():
            ours32 = recompute(model, manifest, golden, torch.float32)
            ours64 = recompute(model.double(), manifest, golden, torch.float64)
        result.append((folder, manifest, golden, ours32, ours64))
    return result


def test_every_golden_array_is_reproduced(fixtures):
    for folder, manifest, golden, ours32, ours64 in fixtures:
        assert set(manifest["arrays"]) == set(golden), f"{folder}: manifest and golden.npz list different arrays"
        unknown = sorted(n for n in golden if n not in INPUTS and n.removesuffix("__f64") not in ours32)
        assert not unknown, f"{folder}/golden.npz has arrays this test does not check: {unknown}"
        report = []
        for name, expected in sorted(golden.items()):
            if name in INPUTS:
                continue
            base = name.removesuffix("__f64")
            ours, tol = (ours64[base], ATOL64) if name.endswith("__f64") else (ours32[base], ATOL)
            assert ours.shape == expected.shape, f"{folder}: {name} has shape {ours.shape}, expected {expected.shape}"
            if expected.dtype == bool or expected.dtype.kind in "iu":
                np.testing.assert_array_equal(ours, expected, err_msg=f"{folder}: {name}")
                continue
            np.testing.assert_allclose(ours, expected, atol=tol, rtol=tol, err_msg=f"{folder}: {name}")
            report.append(f"{name}: {np.abs(ours.astype(np.float64) - expected).max():.2e}")
        print(f"\n{folder.name} max abs error:\n  " + "\n  ".join(report))


def test_tokenizer_reproduces_raw_token_ids(fixture_dirs):
    for folder in fixture_dirs:
        manifest, _ = load_fixture(folder)
        tokenizer = colaprob.load(folder).tokenizer
        assert [tokenizer.encode(t) for t in manifest["texts"]] == manifest["raw_token_ids"]
        assert tokenizer.vocab_size == manifest["tokenizer"]["vocab_size"]


def test_vae_decoder_cache_matches_full_decode(fixtures):
    """Decoding a prefix, then one VAE block per call through the cache, equals the full decode."""
    for folder, manifest, golden, _, _ in fixtures:
        model = colaprob.load(folder)
        z = torch.as_tensor(golden["vae_post_mean"])[None]  # all samples as one long sequence
        step = model.vae_config.block_size
        with torch.no_grad():
            logits, cache = model.vae.decoder(z[:, : 2 * step])
            pieces = [logits]
            for s in range(2 * step, z.shape[1], step):
                logits, cache = model.vae.decoder(z[:, s : s + step], cache=cache)
                pieces.append(logits)
            torch.testing.assert_close(torch.cat(pieces, 1), model.vae.decode(z), atol=1e-5, rtol=1e-5)


def test_the_kept_copy_matches_the_published_fixture():
    """``tests/fixtures/official-tiny-a`` is a copy of the project's published fixture (kept so
    that a bare clone tests itself); where the published one sits beside the repository, the
    copy must not have drifted from it."""
    from conftest import FIXTURE

    published = FIXTURE.parents[3] / "shared" / "fixtures" / FIXTURE.name
    if not published.is_dir():
        pytest.skip(f"no published fixture at {published} to compare with")
    files = sorted(p.relative_to(published) for p in published.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(FIXTURE) for p in FIXTURE.rglob("*") if p.is_file())
    for name in files:
        assert (FIXTURE / name).read_bytes() == (published / name).read_bytes(), name
