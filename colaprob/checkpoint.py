"""Checkpoints: the official HuggingFace layout, read and written with ``safetensors`` only.

A checkpoint root holds::

    cola_dlm/cola_vae/  config.json  model.safetensors   (or model-0000k-of-0000n.safetensors
    cola_dlm/cola_dit/  config.json  model.safetensors    + model.safetensors.index.json)
    tokenizer.json
    colaprob.json       optional, colaprob's own options:
                        {"framing": {"bos_id", "eos_id", "pad_id", "max_tokens"},
                         "decoder_space": "vae" | "dit", "info": {...free-form...}}

A root that holds ``cola_vae/`` and ``cola_dit/`` directly is accepted too. Every weight file
must lie inside its part's folder: an index entry with ``..``, an absolute path or a symlink
that leads out is refused. Configurations are checked against the weights' headers before any
network is built (layer counts, and no size larger than every stored dimension), so a
config.json that cannot match its weights costs no memory and no time.

A framing without ``max_tokens`` gets ``OFFICIAL_CONTEXT`` tokens, the length of the rows the
official pretraining packs documents into (``T = 2048`` in the docstring of
``cola_dlm/dataloader.py``, ByteDance-Seed/Cola-DLM at commit 6752ff1): texts longer than the
context the model was trained on are refused (or windowed with ``--split``), never run into an
allocation the machine cannot make. ``"tiny"`` names
the embedded model shipped in the package (``colaprob/tiny/``). Weights stored as F32, BF16 or
F16 are read as float32. Nothing is ever unpickled: ``.bin`` / ``.pt`` files are refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from colaprob import hub
from colaprob.config import DiTConfig, VAEConfig
from colaprob.data import read_input_bytes
from colaprob.dit import DiT
from colaprob.errors import ColaprobError
from colaprob.model import DECODER_SPACES, ColaModel
from colaprob.results import default_mode
from colaprob.tokenizer import Framing, Tokenizer
from colaprob.vae import TextVAE

TINY = Path(__file__).resolve().parent / "tiny"
PARTS = {"vae": ("cola_vae", VAEConfig, TextVAE), "dit": ("cola_dit", DiTConfig, DiT)}
READABLE_DTYPES = {"F32", "BF16", "F16"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
OPTIONS_FILE = "colaprob.json"
OFFICIAL_CONTEXT = 2048
MAX_JSON_BYTES = 64 << 20
CHECKPOINT_ENTRIES = ("cola_dlm", "cola_vae", "cola_dit", "tokenizer.json", OPTIONS_FILE)
# Config fields that are a width, a count of heads or a vocabulary: each is (or divides) a
# dimension of some stored tensor, so none can exceed the largest stored dimension.
SIZE_FIELDS = {
    "vae": ("vocab_size", "dim", "ffn_dim", "latent_dim", "patch_size", "num_heads"),
    "dit": ("txt_in_channels", "txt_out_channels", "txt_dim", "emb_dim", "heads", "head_dim", "rope_dim"),
}
# Config fields that count layers, and the state-dict prefix of each layer.
LAYER_FIELDS = {"vae": {"encoder_num_blocks": "encoder.blocks.", "decoder_num_blocks": "decoder.blocks."}, "dit": {"num_layers": "blocks."}}


# ----------------------------------------------------------------------------------------------
# Finding the pieces
# ----------------------------------------------------------------------------------------------


def resolve(path_or_name: str | Path) -> Path:
    """The checkpoint root of a path, of ``"tiny"`` (the embedded model), or of a Hugging Face
    name ``ORG/NAME`` found in the local cache (``colaprob.hub``)."""
    if str(path_or_name) == "tiny":
        if not TINY.is_dir():
            raise ColaprobError(f"the embedded model is not built yet: {TINY} does not exist (the trainer, colaprob train, writes it).")
        return TINY
    if not isinstance(path_or_name, (str, Path)):
        raise TypeError(f"load() takes a checkpoint folder or 'tiny' as path_or_name, not {type(path_or_name).__name__}.")
    root = Path(path_or_name).expanduser()
    try:
        root.stat()
    except OSError as err:
        if err.errno == errno.ENOENT:
            if hub.is_repo_id(str(path_or_name)):
                return hub.resolve(str(path_or_name))  # ORG/NAME from the local Hugging Face cache
            raise ColaprobError(f"{root} does not exist.") from None
        raise ColaprobError(f"{root} cannot be opened ({err.strerror or err}); check the path.") from None
    if not root.is_dir():
        raise ColaprobError(f"{root} is a file; give the checkpoint folder that holds cola_dlm/ and tokenizer.json.")
    return root


def part_folders(root: Path) -> dict[str, Path]:
    """``{"vae": .../cola_vae, "dit": .../cola_dit}`` under ``root/cola_dlm`` or ``root``."""
    for base in (root / "cola_dlm", root):
        if (base / "cola_vae").is_dir() or (base / "cola_dit").is_dir():
            folders = {part: base / name for part, (name, _, _) in PARTS.items()}
            for folder in folders.values():
                if not folder.is_dir():
                    raise ColaprobError(f"{folder} does not exist; a checkpoint needs both cola_vae/ and cola_dit/.")
            return folders
    raise ColaprobError(f"{root} holds neither cola_dlm/cola_vae/ nor cola_vae/, so it is not a Cola DLM checkpoint.")


def read_json(path: Path) -> dict:
    if not path.exists():
        raise ColaprobError(f"{path} does not exist.")
    try:
        d = json.loads(read_input_bytes(path, MAX_JSON_BYTES).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, or an integer too long
        raise ColaprobError(f"{path} is not valid JSON ({str(err).splitlines()[0]}).") from None
    except RecursionError:
        raise ColaprobError(f"{path} nests arrays or objects deeper than the JSON reader allows.") from None
    if not isinstance(d, dict):
        raise ColaprobError(f"{path} does not hold a JSON object.")
    return d


def weight_files(folder: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor: ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json``. Pickle-based files are refused without being opened."""
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ColaprobError(f"{index} has no weight_map.")
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise ColaprobError(f"{index} has a weight_map entry that is not a file name.")
        files = {key: folder / name for key, name in weight_map.items()}
        for name in set(weight_map.values()):
            confined(folder, name, index)
            if not (folder / name).is_file():
                raise ColaprobError(f"{folder / name} is listed in {index.name} but does not exist.")
        return files
    if single.is_file():
        confined(folder, single.name, single)
        with _open(single) as handle:
            return {key: single for key in handle.keys()}
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ColaprobError(
            f"{folder / pickles[0]} is a pickle-based PyTorch file, which colaprob never opens (it can run code); "
            "convert it to model.safetensors."
        )
    raise ColaprobError(f"{single} does not exist.")


def confined(folder: Path, name: str, source: Path) -> Path:
    """``folder / name``, refused unless it is a file name inside ``folder`` that stays inside
    it once symbolic links are followed (an index must not reach other files)."""
    target = folder / name
    inside = not Path(name).is_absolute() and ".." not in Path(name).parts
    if not inside or not target.resolve().is_relative_to(folder.resolve()):
        raise ColaprobError(f"{source} names {name!r}, which lies outside {folder}; weight files must be inside the checkpoint folder.")
    return target


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ColaprobError(f"{path} is not a readable safetensors file ({err}).") from None


def stored_shapes(files: dict[str, Path]) -> dict[str, tuple[list[int], str]]:
    """``{key: (shape, dtype)}`` from the safetensors headers alone (``files``: ``weight_files``)."""
    out = {}
    for path in sorted(set(files.values())):
        with _open(path) as handle:
            for key in handle.keys():
                if files.get(key) == path:
                    piece = handle.get_slice(key)
                    out[key] = (list(piece.get_shape()), piece.get_dtype())
    for key, path in files.items():
        if key not in out:
            raise ColaprobError(f"{path} does not hold {key}, which the index says it does.")
    return out


def impossible_sizes(part: str, config, stored: dict, source: Path) -> list[str]:
    """Config fields the stored tensors cannot match, from the headers alone: a layer count
    other than the number of layers stored, or a size larger than every stored dimension.
    Checked before ``expected_layout`` builds the network, which a config with a billion
    layers or a width of a billion would make slow or impossible."""
    largest = max((n for shape, _ in stored.values() for n in shape), default=0)
    problems = []
    for name, prefix in LAYER_FIELDS[part].items():
        found = {m.group(1) for key in stored if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
        if getattr(config, name) != len(found):
            problems.append(f"{source} sets {name} to {getattr(config, name)}, but the weights hold {len(found)} such layers.")
    for name in SIZE_FIELDS[part]:
        if getattr(config, name) > largest:
            problems.append(f"{source} sets {name} to {getattr(config, name)}, larger than any dimension of the stored weights ({largest}).")
    return problems


def expected_layout(part: str, config) -> tuple[dict[str, list[int]], set[str]]:
    """State-dict shapes of the network a config describes, and which keys are buffers (the
    DiT's RoPE frequencies) rather than parameters; built on the meta device (no memory)."""
    with torch.device("meta"):
        module = PARTS[part][2](config)
    return {k: list(v.shape) for k, v in module.state_dict().items()}, {k for k, _ in module.named_buffers()}


def mismatches(files: dict[str, Path], stored: dict, expected: dict) -> list[str]:
    """Sentences naming every missing, unexpected or wrongly shaped tensor (and bad dtypes)."""
    folder = next(iter(files.values())).parent
    index = folder / "model.safetensors.index.json"
    where = index if index.is_file() else folder / "model.safetensors"
    problems = []
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    if missing:
        problems.append(f"{where} lacks {len(missing)} tensor(s) the config needs: {', '.join(missing[:5])}.")
    if unexpected:
        problems.append(f"{where} has {len(unexpected)} tensor(s) the config does not describe: {', '.join(unexpected[:5])}.")
    for key, (shape, dtype) in stored.items():
        if key in expected and shape != expected[key]:
            problems.append(f"{files[key]} stores {key} with shape {shape} where the config needs {expected[key]}.")
        if dtype not in READABLE_DTYPES:
            problems.append(f"{files[key]} stores {key} as {dtype}; only F32, BF16 and F16 weights are read.")
    return problems


def pieces_problems(vae_config: VAEConfig, dit_config: DiTConfig, tokenizer: Tokenizer, root: Path, folders: dict) -> list[str]:
    """Inconsistencies between the VAE, the DiT and the tokenizer."""
    problems = []
    for name in ("txt_in_channels", "txt_out_channels"):
        if getattr(dit_config, name) != vae_config.latent_dim:
            problems.append(
                f"{folders['dit'] / 'config.json'} sets {name} {getattr(dit_config, name)}, "
                f"but the VAE latent_dim is {vae_config.latent_dim}."
            )
    if tokenizer.vocab_size > vae_config.vocab_size:
        problems.append(
            f"{root / 'tokenizer.json'} has {tokenizer.vocab_size} tokens, more than the VAE vocab_size "
            f"{vae_config.vocab_size} in {folders['vae'] / 'config.json'}."
        )
    return problems


def framing_problems(framing: Framing, vae_config: VAEConfig, dit_config: DiTConfig, source: str) -> list[str]:
    """Framing ids outside the vocabulary the decoder predicts, or a block longer than the
    context (every framed text is a whole number of blocks)."""
    problems = [
        f"{source} sets framing {name} to {value}, outside the vocabulary of {vae_config.vocab_size} tokens."
        for name, value in framing.to_dict().items()
        if name.endswith("_id") and value is not None and value >= vae_config.vocab_size
    ]
    block = vae_config.patch_size * dit_config.block_size
    if block > framing.max_tokens:
        problems.append(
            f"the prior block of this checkpoint is {block} tokens (patch_size {vae_config.patch_size} x DiT block_size "
            f"{dit_config.block_size}), longer than its context of {framing.max_tokens} tokens; check the config.json files."
        )
    return problems


def read_options(root: Path) -> dict:
    """``colaprob.json`` (empty when absent), checked."""
    path = root / OPTIONS_FILE
    if not path.exists():
        return {}
    options = read_json(path)
    unknown = sorted(set(options) - {"framing", "decoder_space", "info"})
    if unknown:
        raise ColaprobError(f"{path} has unknown entries {unknown}; it may hold framing, decoder_space and info.")
    if not isinstance(options.get("info", {}), dict):
        raise ColaprobError(f"{path} sets info to {options['info']!r}, but it must be a JSON object.")
    if not isinstance(options.get("decoder_space", "vae"), str) or options.get("decoder_space", "vae") not in DECODER_SPACES:
        raise ColaprobError(f"{path} sets decoder_space to {options['decoder_space']!r}, but it must be 'vae' or 'dit'.")
    if "framing" in options:
        options["framing"] = Framing.from_dict(options["framing"], str(path))
    return options


# ----------------------------------------------------------------------------------------------
# load / save / describe
# ----------------------------------------------------------------------------------------------


def load(path_or_name: str | Path, *, decoder_space: str | None = None) -> ColaModel:
    """Load a checkpoint folder (official layout or one ``save`` wrote) as a float32
    ``ColaModel`` on the CPU; ``decoder_space`` overrides the checkpoint's option."""
    root = resolve(path_or_name)
    folders = part_folders(root)
    configs, state = {}, {}
    for part, folder in folders.items():
        cls = PARTS[part][1]
        configs[part] = cls.from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
        files = weight_files(folder)
        stored = stored_shapes(files)
        problems = impossible_sizes(part, configs[part], stored, folder / "config.json")
        problems = problems or mismatches(files, stored, expected_layout(part, configs[part])[0])
        if problems:
            raise ColaprobError(problems[0])
    tokenizer = Tokenizer.from_file(root / "tokenizer.json")
    options = read_options(root)
    options["framing"] = with_context(options.get("framing") or Framing.official(tokenizer))
    problems = pieces_problems(configs["vae"], configs["dit"], tokenizer, root, folders)
    problems += framing_problems(options["framing"], configs["vae"], configs["dit"], str(root / OPTIONS_FILE))
    if problems:
        raise ColaprobError(problems[0])
    for part, folder in folders.items():  # only now that everything agrees: read the weights
        state.update({f"{part}.{k}": v for k, v in read_tensors(weight_files(folder)).items()})
    if decoder_space is not None:
        options["decoder_space"] = decoder_space
    with torch.device("meta"):  # no random initialisation: the weights come from the files
        model = ColaModel(configs["vae"], configs["dit"], tokenizer, **options)
    model.load_state_dict(state, assign=True)
    return model


def with_context(framing: Framing) -> Framing:
    """``framing`` with ``OFFICIAL_CONTEXT`` where it states no ``max_tokens`` (see the module
    docstring)."""
    if framing.max_tokens is not None:
        return framing
    return Framing(framing.bos_id, framing.eos_id, framing.pad_id, OFFICIAL_CONTEXT)


def read_tensors(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors, upcast to float32, refusing NaN and infinities."""
    tensors = {}
    for path in sorted(set(files.values())):
        with _open(path) as handle:
            for key in handle.keys():
                if files[key] != path:
                    continue
                try:
                    tensor = handle.get_tensor(key).to(torch.float32)
                except (SafetensorError, OSError) as err:
                    raise ColaprobError(f"{path} is corrupt: {key} cannot be read ({err}).") from None
                if not torch.isfinite(tensor).all():
                    raise ColaprobError(f"{path} holds NaN or infinite values in {key}.")
                tensors[key] = tensor
    return tensors


def save(model: ColaModel, path: str | Path) -> Path:
    """Write ``model`` in the official layout plus ``colaprob.json``, float32 weights.

    The folder is written next to its destination and renamed into place, so an interrupted
    save never leaves a half-written checkpoint; an existing checkpoint there is replaced, any
    other existing non-empty folder is refused. Files of an existing checkpoint folder that are
    not part of a checkpoint (a README, notes) are kept. Loading it back gives bit-identical
    weights.
    """
    if not isinstance(model, ColaModel):
        raise TypeError(f"save() takes a ColaModel as model, not {type(model).__name__}.")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"save() takes a folder path as path, not {type(path).__name__}.")
    path = Path(path).expanduser()
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / "cola_dlm").is_dir())):
        raise ColaprobError(f"{path} exists and is not a Cola DLM checkpoint, so it is not overwritten.")
    try:
        options = json.dumps({"framing": model.framing.to_dict(), "decoder_space": model.decoder_space, "info": model.info}, indent=2)
    except TypeError as err:
        raise ColaprobError(f"the model's info cannot be written to {OPTIONS_FILE} ({err}).") from None
    _write_checkpoint(model, options, path)
    return path


def _write_checkpoint(model: ColaModel, options: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(default_mode(0o777))  # mkdtemp makes 0700; a checkpoint is an ordinary folder
    try:
        for part, module in (("vae", model.vae), ("dit", model.dit)):
            folder = tmp / "cola_dlm" / PARTS[part][0]
            folder.mkdir(parents=True)
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
            (folder / "config.json").write_text(json.dumps(module.config.to_dict(), indent=2) + "\n")
        model.tokenizer.save(tmp / "tokenizer.json")
        (tmp / OPTIONS_FILE).write_text(options + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            path.rename(old)
            tmp.rename(path)
            # The user's own files move into the new folder; until then they are in `old`.
            for entry in old.iterdir():
                if entry.name not in CHECKPOINT_ENTRIES:
                    entry.rename(path / entry.name)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def inspect_checkpoint(path_or_name: str | Path) -> dict:
    """What ``colaprob inspect`` reports, as data: configs, parameter counts per part, stored
    dtypes, options, and every problem found (as warnings; only a checkpoint whose files cannot
    be found or parsed at all raises)."""
    root = resolve(path_or_name)
    folders = part_folders(root)
    report = {"path": str(root), "configs": {}, "parameters": {}, "dtypes": [], "warnings": []}
    configs = {}
    for part, folder in folders.items():
        cls = PARTS[part][1]
        raw = read_json(folder / "config.json")
        report["configs"][part] = raw
        for key in cls.unknown_keys(raw):
            report["warnings"].append(f"{folder / 'config.json'} has the unknown key {key!r}, which is ignored.")
        try:
            configs[part] = cls.from_dict(raw, str(folder / "config.json"))
        except ColaprobError as err:
            report["warnings"].append(str(err))
        try:
            files = weight_files(folder)
            stored = stored_shapes(files)
        except ColaprobError as err:
            report["warnings"].append(str(err))
            continue
        report["dtypes"] = sorted(set(report["dtypes"]) | {dtype for _, dtype in stored.values()})
        shapes, buffers = expected_layout(part, configs[part]) if part in configs else (None, set())
        for key, (shape, _) in stored.items():
            group = key.split(".")[0] if part == "vae" else "dit"  # encoder / decoder / dit
            if key not in buffers:
                report["parameters"][group] = report["parameters"].get(group, 0) + int(torch.Size(shape).numel())
        if shapes is not None:
            report["warnings"] += mismatches(files, stored, shapes)
    try:
        tokenizer = Tokenizer.from_file(root / "tokenizer.json")
        report["tokenizer_vocab_size"] = tokenizer.vocab_size
        if len(configs) == 2:
            report["warnings"] += pieces_problems(configs["vae"], configs["dit"], tokenizer, root, folders)
        options = read_options(root)
        framing = options.get("framing") or Framing.official(tokenizer)
        report["framing"] = framing.to_dict()
        report["decoder_space"] = options.get("decoder_space", "vae")
        report["info"] = options.get("info", {})
    except ColaprobError as err:
        report["warnings"].append(str(err))
    return report


def describe(path_or_name: str | Path) -> str:
    """``inspect_checkpoint`` as text for a terminal."""
    r = inspect_checkpoint(path_or_name)
    lines = [f"checkpoint {r['path']}"]
    for part, raw in r["configs"].items():
        fields = ", ".join(f"{k}={v}" for k, v in sorted(raw.items()) if k not in ("architectures", "transformers_version"))
        lines.append(f"{part} config: {fields}")
    counts = r["parameters"]
    lines.append("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" (total {sum(counts.values()):,})")
    lines.append(f"stored dtypes: {', '.join(r['dtypes']) or 'none'}")
    if "tokenizer_vocab_size" in r:
        lines.append(f"tokenizer: {r['tokenizer_vocab_size']} tokens")
    if "framing" in r:
        lines.append(f"framing: {r['framing']}; decoder space: {r['decoder_space']}")
    if r.get("info"):
        lines.append(f"info: {json.dumps(r['info'])}")
    lines += [f"warning: {w}" for w in r["warnings"]] or ["no inconsistencies found"]
    return "\n".join(lines)


def config_hash(model) -> str:
    """A short hash of everything that configures the model: both network configurations,
    the framing and the decoder's input space."""
    config = {
        "vae": model.vae_config.to_dict(),
        "dit": model.dit_config.to_dict(),
        "framing": model.framing.to_dict(),
        "decoder_space": model.decoder_space,
    }
    return _short_hash(json.dumps(config, sort_keys=True).encode("utf-8"))


def weights_hash(model) -> str:
    """A short hash of every weight's bytes, so retrained weights under the same name and
    configuration count as another model."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
