"""``colaprob generate``: continue prompts by block-wise prior transport and decoding."""

from __future__ import annotations

import json

from colaprob.commands import options
from colaprob.data import MODES, read_documents
from colaprob.errors import ColaprobError
from colaprob.generate import Sampling, generate

HELP = "continue prompts with a Cola model: Euler + classifier-free guidance per block, then decoding"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny", help="checkpoint folder, or 'tiny' for the embedded model (default)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts", help="a file of prompts: one per line, or JSONL with 'prompt' (or 'text')")
    parser.add_argument("--mode", choices=MODES, default="auto", help="how --prompts is read (default: by extension)")
    defaults = Sampling()
    parser.add_argument("--max-new-tokens", type=options.positive_int, default=defaults.max_new_tokens, help=f"default {defaults.max_new_tokens}")
    parser.add_argument("--steps", type=options.positive_int, default=defaults.steps, help=f"Euler steps per block (default {defaults.steps})")
    parser.add_argument("--guidance", type=options.finite_float, default=defaults.guidance, help=f"classifier-free guidance scale (default {defaults.guidance})")
    parser.add_argument("--temperature", type=options.finite_float, default=defaults.temperature, help="0 is greedy decoding (default)")
    parser.add_argument("--top-k", type=options.positive_int, help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=options.finite_float, help="sample only among the most likely tokens whose probability reaches p")
    parser.add_argument("--seed", type=options.seed, default=0, help="seed of the noise and the sampling, in [0, 2**63) (default 0)")
    options.add_threads_option(parser)
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt instead of text")


def run(args) -> int:
    import colaprob

    prompts = list(args.prompt)
    if args.prompts:
        prompts += [doc.prompt if doc.prompt is not None else doc.text for doc in read_documents(args.prompts, args.mode)]
    if not prompts:
        raise ColaprobError("give at least one --prompt or a --prompts file.")
    sampling = Sampling(args.max_new_tokens, args.steps, args.guidance, args.temperature, args.top_k, args.top_p)
    model = colaprob.load(args.model).eval()
    for prompt, text in zip(prompts, generate(model, prompts, sampling, seed=args.seed)):
        print(json.dumps({"prompt": prompt, "continuation": text}) if args.jsonl else f"{prompt}{text}")
    return 0
