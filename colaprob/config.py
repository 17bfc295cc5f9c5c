"""Configurations of the two Cola DLM networks, field for field as the official ``config.json``.

``VAEConfig`` (``model_type = "cola_text_vae"``) and ``DiTConfig`` (``model_type =
"cola_dit"``) carry every field of the official classes with the official defaults (a field
missing from a file takes its default). ``from_dict`` reads a parsed ``config.json``,
``to_dict`` writes one the official classes would read back. Settings that the official
forward pass cannot run (or runs wrongly) are refused with one sentence.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from colaprob.errors import ColaprobError

# Keys ``transformers.PretrainedConfig`` adds to every file; they say nothing about the network.
GENERIC_KEYS = {"architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "model_type"}


class _Config:
    """What the two configurations share: reading, writing and type checking."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json"):
        """Build from a parsed ``config.json``; ``source`` names the file in error messages."""
        if not isinstance(d, dict):
            raise ColaprobError(f"{source} does not hold a JSON object.")
        model_type = d.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ColaprobError(f"{source} has model_type {model_type!r} where {cls.model_type!r} is expected.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in d.items():
            if key in fields:
                values[key] = _checked(key, value, fields[key].type, source)
        config = cls(**values)
        config.validate(source)
        return config

    def check_ranges(self, source: str, positive: tuple[str, ...], unit_interval: tuple[str, ...]) -> None:
        """Every float field finite (a NaN or infinity reaches every number computed with it),
        the ``positive`` fields above 0 and the ``unit_interval`` fields in [0, 1)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ColaprobError(f"{source} sets {field.name} to {value}, but it must be a finite number.")
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ColaprobError(f"{source} sets {name} to {value}, but it must be greater than 0.")
        for name in unit_interval:
            if not 0 <= getattr(self, name) < 1:
                raise ColaprobError(f"{source} sets {name} to {getattr(self, name)}, but it must lie in [0, 1).")

    @classmethod
    def unknown_keys(cls, d: dict[str, Any]) -> list[str]:
        """Keys of a ``config.json`` that are neither a field nor a generic HuggingFace key."""
        names = {f.name for f in dataclasses.fields(cls)}
        return sorted(k for k in d if k not in names and k not in GENERIC_KEYS)

    def to_dict(self) -> dict[str, Any]:
        """An official-looking ``config.json`` (weights are always written in float32)."""
        d = dataclasses.asdict(self)
        d.update(model_type=self.model_type, architectures=[self.architecture], dtype="float32")
        return dict(sorted(d.items()))

    def validate(self, source: str) -> None:
        raise NotImplementedError


def _checked(key: str, value: Any, annotation: str, source: str) -> Any:
    """``value`` if it fits the field's annotation (an int counts as a float)."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
    allowed = tuple(t for name in annotation.split(" | ") if name != "None" for t in kinds[name])
    if value is None and "None" in annotation:
        return None
    if isinstance(value, bool) != (allowed == (bool,)) or not isinstance(value, allowed):
        raise ColaprobError(f"{source} sets {key} to {value!r}, which is not a valid {key}.")
    return value


@dataclass
class VAEConfig(_Config):
    """The Text VAE (reference section 2.1). ``dim`` = D, ``ffn_dim`` = F, ``latent_dim`` = d,
    ``patch_size`` = P tokens per latent position, ``block_size`` in latent positions."""

    model_type: ClassVar[str] = "cola_text_vae"
    architecture: ClassVar[str] = "ColaTextVAEModel"

    vocab_size: int = 100278
    encoder_num_blocks: int = 4
    decoder_num_blocks: int = 4
    dim: int = 1536
    ffn_dim: int = 6144
    latent_dim: int = 16
    patch_size: int = 1
    num_heads: int = 12
    shared_heads_kv: int = 1
    encoder_last_ln: bool = True
    layer_norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    layer_norm_affine: bool = True
    post_norm: bool = True
    qk_bias: bool = False
    qk_norm: bool = True
    qk_norm_affine: bool = True
    clip_qkv: float | None = None
    rope_theta: float = 500000
    rope_full_precision: bool = True
    bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    act: str = "swiglu"
    causal: bool = False  # stored by the official class, never used by its forward pass
    block_causal: bool = True
    block_size: int = 4
    init_fn: str = "normal"
    init_std: float = 0.02
    init_cutoff_factor: float = 3
    use_variation: bool = True
    use_emb: bool = True  # stored, unused
    scaling_factor: float = 1.0
    shifting_factor: float = 0.0

    @property
    def head_size(self) -> int:
        return self.dim // self.num_heads

    def validate(self, source: str = "the VAE config") -> None:
        self.check_ranges(source, ("layer_norm_eps", "rope_theta", "clip_qkv"), ("dropout", "attn_dropout"))
        positive = ["vocab_size", "dim", "ffn_dim", "latent_dim", "patch_size", "num_heads", "block_size"]
        for name in positive + ["encoder_num_blocks", "decoder_num_blocks"]:
            if getattr(self, name) < (1 if name in positive else 0):
                raise ColaprobError(f"{source} sets {name} to {getattr(self, name)}, which is too small.")
        if self.dim % self.num_heads or self.head_size % 2:
            raise ColaprobError(f"{source} sets dim {self.dim} and num_heads {self.num_heads}, but dim / num_heads must be an even integer.")
        if self.shared_heads_kv not in (1, self.num_heads):
            raise ColaprobError(
                f"{source} sets shared_heads_kv to {self.shared_heads_kv}, but only 1 (multi-head) or num_heads "
                f"({self.num_heads}, multi-query) run in the official code."
            )
        if self.layer_norm_type != "layer_norm":
            raise ColaprobError(f"{source} sets layer_norm_type to {self.layer_norm_type!r}, but only 'layer_norm' exists.")
        if self.act not in ("swiglu", "silu", "gelu"):
            raise ColaprobError(f"{source} sets act to {self.act!r}, but only 'swiglu', 'silu' and 'gelu' exist.")
        if self.act == "swiglu" and self.ffn_dim % 2:
            raise ColaprobError(f"{source} sets ffn_dim to {self.ffn_dim}, but SwiGLU needs an even ffn_dim.")
        if self.init_std < 0 or self.init_cutoff_factor < 0:
            raise ColaprobError(f"{source} sets init_std {self.init_std} and init_cutoff_factor {self.init_cutoff_factor}, but neither may be negative.")
        if self.scaling_factor == 0:
            raise ColaprobError(f"{source} sets scaling_factor to 0, which maps every latent to the same point.")


@dataclass
class DiTConfig(_Config):
    """The block-causal DiT prior (reference section 2.2). ``txt_dim`` = W, attention width
    ``heads * head_dim``, MLP width ``txt_dim * expand_ratio``, ``block_size`` in latent
    positions (the generation block)."""

    model_type: ClassVar[str] = "cola_dit"
    architecture: ClassVar[str] = "ColaDiTModel"

    txt_in_channels: int = 16
    txt_out_channels: int = 16
    txt_dim: int = 2048
    emb_dim: int = 2048
    heads: int = 16
    head_dim: int = 128
    expand_ratio: int = 4
    num_layers: int = 24
    norm_eps: float = 1e-5
    qk_bias: bool = False
    patch_size: int = 1
    rope_dim: int = 96
    block_size: int = 4

    def validate(self, source: str = "the DiT config") -> None:
        self.check_ranges(source, ("norm_eps",), ())
        for name in ["txt_in_channels", "txt_out_channels", "txt_dim", "heads", "head_dim", "expand_ratio", "block_size"]:
            if getattr(self, name) < 1:
                raise ColaprobError(f"{source} sets {name} to {getattr(self, name)}, which is too small.")
        if self.num_layers < 0:
            raise ColaprobError(f"{source} sets num_layers to {self.num_layers}, which is too small.")
        if self.patch_size != 1:
            raise ColaprobError(f"{source} sets patch_size to {self.patch_size}, but the official DiT only runs with patch_size 1.")
        if self.emb_dim != self.txt_dim:
            raise ColaprobError(f"{source} sets emb_dim {self.emb_dim} different from txt_dim {self.txt_dim}, which the official DiT cannot run.")
        if self.rope_dim % 2 or not 0 <= self.rope_dim <= self.head_dim:
            raise ColaprobError(f"{source} sets rope_dim to {self.rope_dim}, but it must be even and at most head_dim {self.head_dim}.")


def _size(help: str) -> dict:
    return {"help": help}


@dataclass(frozen=True, kw_only=True)
class ByteNetwork:
    """The shape of the byte-level Cola model ``colaprob train`` builds; the defaults are the
    embedded model's network (``colaprob/tiny/REPRODUCE.md``). ``configs(vocab_size)`` gives
    the two official configurations."""

    latent_dim: int = dataclasses.field(default=16, metadata=_size("latent channels d"))
    patch_size: int = dataclasses.field(default=1, metadata=_size("tokens per latent position"))
    vae_dim: int = dataclasses.field(default=128, metadata=_size("VAE width"))
    vae_heads: int = dataclasses.field(default=4, metadata=_size("VAE attention heads"))
    vae_ffn_dim: int = dataclasses.field(default=512, metadata=_size("VAE SwiGLU width (before halving)"))
    vae_blocks: int = dataclasses.field(default=2, metadata=_size("transformer blocks of the encoder and of the decoder, each"))
    vae_block_size: int = dataclasses.field(default=4, metadata=_size("VAE attention block, in latent positions"))
    dit_width: int = dataclasses.field(default=128, metadata=_size("DiT width"))
    dit_heads: int = dataclasses.field(default=2, metadata=_size("DiT attention heads"))
    dit_head_dim: int = dataclasses.field(default=64, metadata=_size("DiT head width"))
    dit_rope_dim: int = dataclasses.field(default=48, metadata=_size("rotated channels per DiT head"))
    dit_layers: int = dataclasses.field(default=3, metadata=_size("DiT blocks"))
    dit_expand: int = dataclasses.field(default=4, metadata=_size("DiT MLP width / DiT width"))
    dit_block_size: int = dataclasses.field(default=4, metadata=_size("DiT (generation) block, in latent positions"))
    max_tokens: int = dataclasses.field(default=64, metadata=_size("longest framed sequence, in tokens"))

    def configs(self, vocab_size: int) -> tuple[VAEConfig, DiTConfig]:
        """The VAE and DiT configurations of this shape, each validated."""
        vae = VAEConfig(
            vocab_size=vocab_size,
            encoder_num_blocks=self.vae_blocks,
            decoder_num_blocks=self.vae_blocks,
            latent_dim=self.latent_dim,
            patch_size=self.patch_size,
            dim=self.vae_dim,
            num_heads=self.vae_heads,
            ffn_dim=self.vae_ffn_dim,
            block_size=self.vae_block_size,
        )
        dit = DiTConfig(
            txt_in_channels=self.latent_dim,
            txt_out_channels=self.latent_dim,
            txt_dim=self.dit_width,
            emb_dim=self.dit_width,
            heads=self.dit_heads,
            head_dim=self.dit_head_dim,
            rope_dim=self.dit_rope_dim,
            num_layers=self.dit_layers,
            expand_ratio=self.dit_expand,
            block_size=self.dit_block_size,
        )
        vae.validate("the VAE options")
        dit.validate("the DiT options")
        return vae, dit
