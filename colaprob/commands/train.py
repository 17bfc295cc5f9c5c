"""``colaprob train``: train a byte-level Cola model from scratch (stage 1, then stage 2).

The defaults are the embedded model's network and schedule (``colaprob/tiny/REPRODUCE.md``).

The data is the embedded corpus (``pydoc_data.topics``, train and held-out splits) unless
``--train`` / ``--heldout`` name files; documents longer than the model's ``--max-tokens``
are cut into paragraph pieces that fit. The model is saved in the official layout to
``--out``, with its training log; rerunning an interrupted command resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing

import torch

from colaprob.commands import options
from colaprob.config import ByteNetwork
from colaprob.data import MODES, Document, chunk_paragraph, embedded_corpus, read_documents
from colaprob.errors import ColaprobError
from colaprob.memory import available_bytes, human
from colaprob.model import DECODER_SPACES, ColaModel
from colaprob.tokenizer import END_OF_TEXT, PAD, Framing, byte_level_tokenizer
from colaprob.train import TrainConfig, init_weights, train

HELP = "train a byte-level Cola model (Text VAE, then VAE + DiT prior) on the embedded corpus or your files"

def add_arguments(parser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--out", required=True, help="folder the trained model is saved to")
    data.add_argument("--work", help="folder of the checkpoint and log while training (default: OUT.work)")
    data.add_argument("--train", help="training documents (text or JSONL; default: the embedded train split)")
    data.add_argument("--heldout", help="held-out documents (default: the embedded held-out split)")
    data.add_argument("--mode", choices=MODES, default="auto", help="how --train and --heldout are read (see colaprob.data)")
    options.add_threads_option(data)

    net = parser.add_argument_group("model")
    for f in dataclasses.fields(ByteNetwork):
        net.add_argument("--" + f.name.replace("_", "-"), type=network_size, default=f.default, help=f"{f.metadata['help']} (default {f.default})")
    net.add_argument("--decoder-space", choices=DECODER_SPACES, default="vae", help="latents the decoder reads (default vae)")

    run = parser.add_argument_group("training")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        option = "--" + f.name.replace("_", "-")
        kind = _parse_floats if f.name == "block_size_probs" else OPTION_TYPES.get(hints[f.name], hints[f.name])
        if f.name == "seed":
            kind = options.seed
        run.add_argument(option, type=kind, default=f.default, help=f"{f.metadata['help']} (default {f.default})")


def _parse_floats(text: str) -> tuple[float, ...]:
    return tuple(options.finite_float(x) for x in text.split(","))


MAX_NETWORK_SIZE = 1 << 16
"""Widths, head counts, layer counts and contexts above 65,536 are refused: such a model would
not be trained on one machine, and building its layers could take hours before failing."""
OPTION_TYPES = {float: options.finite_float, int: options.non_negative_int}
TRAINING_BYTES_PER_PARAMETER = 16  # float32 weight, gradient and Adam's two moments


def network_size(text: str) -> int:
    value = options.positive_int(text)
    if value > MAX_NETWORK_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_NETWORK_SIZE:,}; got {value:,}")
    return value


def build_model(network: ByteNetwork = ByteNetwork(), decoder_space: str = "vae", seed: int = 0) -> ColaModel:
    """A freshly initialised byte-level model of ``network``'s shape (default: the embedded
    model's), refused in one sentence when its training state would not fit in memory."""
    tokenizer = byte_level_tokenizer()
    vae, dit = network.configs(tokenizer.vocab_size)
    framing = Framing(
        bos_id=None, eos_id=tokenizer.token_to_id(END_OF_TEXT), pad_id=tokenizer.token_to_id(PAD), max_tokens=network.max_tokens
    )
    with torch.device("meta"):  # count the parameters before allocating them
        n_parameters = sum(p.numel() for p in ColaModel(vae, dit, tokenizer, framing, decoder_space=decoder_space).parameters())
    free = available_bytes("cpu")
    if free is not None and n_parameters * TRAINING_BYTES_PER_PARAMETER > free:
        raise ColaprobError(
            f"these network options make {n_parameters:,} parameters, whose weights, gradients and optimizer state "
            f"({human(n_parameters * TRAINING_BYTES_PER_PARAMETER)}) exceed the free memory ({human(free)}); choose a smaller network."
        )
    model = ColaModel(vae, dit, tokenizer, framing, decoder_space=decoder_space)
    init_weights(model, seed)
    return model


def documents(path: str | None, split: str, mode: str, max_bytes: int) -> tuple[list[Document], str]:
    """The documents of a file (pieces of at most ``max_bytes``; a prompt is trained on as
    the start of its text) or of the embedded split, and a description for the model's info."""
    if path is None:
        docs = embedded_corpus(split, max_bytes)
        version = ".".join(map(str, sys.version_info[:3]))
        return docs, f"embedded pydoc_data.topics, {split} split (colaprob.data), Python {version}"
    docs = [
        Document(piece)
        for doc in read_documents(path, mode)
        for piece in chunk_paragraph((doc.prompt or "") + doc.text, max_bytes)
    ]
    return docs, str(path)


def command_line(args) -> str:
    """The command with every option spelled out, defaults included: it reproduces the run
    even if a later version changes a default."""
    words = ["colaprob", "train"]
    for key, value in vars(args).items():
        if key in ("command", "_run") or value is None:
            continue
        words += ["--" + key.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return shlex.join(words)


def run(args) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    network = ByteNetwork(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ByteNetwork)})
    model = build_model(network, args.decoder_space, args.seed)
    # A byte per token, room for the eos, and the framed length stays a whole number of blocks.
    multiple = model.patch_size * model.block_size
    max_bytes = args.max_tokens // multiple * multiple - 1
    if max_bytes < 4:
        raise ColaprobError(
            f"--max-tokens {args.max_tokens} leaves no room for a document: a framed sequence is a whole number of "
            f"{multiple}-token blocks with an end-of-text token, so give at least {multiple * -(-5 // multiple)}."
        )
    train_docs, train_source = documents(args.train, "train", args.mode, max_bytes)
    heldout_docs, heldout_source = documents(args.heldout, "heldout", args.mode, max_bytes)
    if not heldout_docs:
        raise ColaprobError("the held-out data holds no document.")
    info = {
        "command": command_line(args),
        "data": {
            "train": {"source": train_source, "documents": len(train_docs), "bytes": sum(len(d.text.encode()) for d in train_docs)},
            "heldout": {"source": heldout_source, "documents": len(heldout_docs)},
        },
        "torch": torch.__version__,
    }
    figures = train(model, config, args.out, train_docs, heldout_docs, work_dir=args.work, info=info)
    print(
        f"saved {args.out}: held-out reconstruction accuracy {figures['recon_acc']:.4f}, flow-matching loss "
        f"{figures['fm_loss']:.4f} (zero-velocity baseline {figures['fm_zero_baseline']:.4f})"
    )
    return 0
