"""The context term's proposal on the embedded model: the context framed as a whole text
against the prior's noise after the context.

``colaprob.estimators.continuations`` draws the context term ``log p(x_{< n_c})`` of an item
from ``draws.prefix_only_proposal``. For a model whose framing has an end-of-text token (Cola)
that is the encoder on the context framed as a whole text (``context + [eos] + [pad ...]`` to
the end of the block the context ends inside); a model without one gets the encoder on the
context alone where a latent position holds context tokens and the prior's ``N(0, I)`` on the
positions after them. This script runs both on Cola: the second through a view of the model
whose framing has no end-of-text token (only the proposal reads it; the rows are framed
before). All are consistent estimates of the same number, so at equal K the higher
``log_context`` (an IWAE, a lower bound in expectation) and the lower k-hat are the better
proposal.

Items: held-out-style contexts cut to end 1 to 3 tokens before a block boundary, 4 choices
each; IWAE-K with common random numbers, Hutchinson (one probe) or the exact trace, rk4 with
8 steps.

    python bench/context_proposal.py                 # K = 256, Hutchinson
    python bench/context_proposal.py --trace exact -K 64
    python bench/context_proposal.py --quick
"""

from __future__ import annotations

import dataclasses
import warnings

import common
import numpy as np

import colaprob
from colaprob.estimators import continuations

CONTEXTS = ["The quick brown fox", "Once upon a time there was a", "She opened the door and saw", "In the morning, the"]
CHOICES = [[" jumps", " sleeps", " runs away", " is red"], [" king", " dog", " little girl", " tree"],
           [" a cat", " nothing", " her friend", " the sea"], [" sun rose", " birds sang", " rain fell", " end"]]


class WithoutEndOfText:
    """``model`` whose framing has no end-of-text token: the proposal's other branch."""

    def __init__(self, model):
        self._model = model
        self.framing = dataclasses.replace(model.framing, eos_id=None)

    def __getattr__(self, name):
        return getattr(self._model, name)


def contexts_inside_a_block(model, n: int) -> list[str]:
    """The first ``n`` contexts, each shortened until its framed length leaves 3, 2, 3, 2, ...
    tokens of its last block to the continuation."""
    block_tokens = model.patch_size * model.block_size
    out = []
    for i, context in enumerate(CONTEXTS[:n]):
        wanted = (block_tokens - 3, block_tokens - 2)[i % 2] % block_tokens
        while continuations.frame_continuations(model, [context], [[" x"]]).context_tokens[0] % block_tokens != wanted:
            context = context[:-1]
        out.append(context)
    return out


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("-K", type=int, default=256, help="posterior samples (default 256)")
    p.add_argument("--trace", default="hutchinson", choices=("hutchinson", "exact"))
    p.add_argument("--items", type=int, default=4, help="items, at most 4 (default 4)")
    args = p.parse_args(argv)
    if args.quick:
        args.K, args.items = 8, 1
    common.start(args, "The context term's proposal on the embedded model")
    model = colaprob.load("tiny").eval()
    contexts = contexts_inside_a_block(model, args.items)
    choices = CHOICES[: args.items]
    batch = continuations.frame_continuations(model, contexts, choices)
    print(f"Embedded model (block of {model.patch_size * model.block_size} tokens), IWAE-{args.K}, {args.trace} trace, rk4 with 8 steps; "
          f"contexts of {', '.join(str(int(n)) for n in batch.context_tokens[[batch.item.tolist().index(i) for i in range(args.items)]])} framed tokens.")
    print()
    rows = []
    for name, scored in (("framed as a whole text", model), ("prior noise after the context", WithoutEndOfText(model))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # k-hat is reported in the table
            seconds, _, ds = common.timed(lambda: continuations.score_continuations(
                scored, batch, args.K, chunk_size=min(args.K, 64), method="rk4", steps=8, trace=args.trace))
        for i, context in enumerate(contexts):
            rows.append([name, repr(context), int(ds.context_tokens.values[i, 0]), f"{float(ds.log_context.values[i, 0]):.2f}",
                         f"{float(ds.log_context_se.values[i, 0]):.2f}", f"{float(ds.khat_context.values[i, 0]):.2f}",
                         f"{float(np.ptp(ds.log_context.values[i])):.2g}", f"{seconds:.0f}"])
    common.table(["proposal", "context", "context tokens", "log_context (nats)", "SE", "k-hat", "spread over choices", "CPU s (all items)"], rows)
    common.finish()


if __name__ == "__main__":
    main()
