"""colaprob as an lm-evaluation-harness model (``lm_eval.api.model.LM``, registered as
``colaprob``); needs the optional extra ``pip install colaprob[lm-eval]``.

The three request types of the harness (``Instance.args``):

* ``loglikelihood``, ``(context, continuation)`` -> ``(log p(continuation | context),
  is_greedy)``: the continuation score of ``colaprob.estimators.continuations`` (IWAE-K
  differences on common draws; consistent, not a bound). Requests of one document with the
  same context are one item, so its choices share the context's draws and its blocks are
  integrated once; the item's random stream is keyed by the document's index in the task
  (``Instance.doc_id``), so a request gets the same number as ``colaprob eval`` on the
  same item and seed.
* ``loglikelihood_rolling``, ``(text,)`` -> ``log p(text)``: the rolling chain of
  ``colaprob.estimators.rolling`` (windows conditioned on the one before), keyed by the
  document's index, so it equals ``colaprob score --rolling`` on the same texts in the same
  order and seed.
* ``generate_until``, ``(context, gen_kwargs)`` -> text: block-wise generation with
  classifier-free guidance (``colaprob.generate``), cut at the first of ``until``.

``is_greedy``. A latent model has no token-by-token argmax given the context: its text comes
from denoising latent blocks and decoding them. colaprob takes as its greedy output the
deterministic decode of ``colaprob.generate`` (temperature 0, Euler steps with CFG from
seeded starting noise) from the context, and a continuation is greedy when that output
begins with it. It therefore depends on the generation settings and the seed. With
``greedy=False`` in the model arguments nothing is generated and ``is_greedy`` is False for
every request (metrics built on it, such as LAMBADA's accuracy, are then meaningless).

Model arguments (``--model-args k=v,...``), one typed value, ``Settings``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from colaprob.estimators.cnf import Solver
from colaprob.estimators.continuations import continuation_log_prob, move_trailing_space
from colaprob.estimators.rolling import rolling_log_prob
from colaprob.generate import Sampling, generate

@dataclass
class Settings:
    """What the backend runs with. ``model``: a checkpoint folder or ``tiny``; ``device``:
    ``auto``, ``cpu`` or ``cuda``; ``samples``: K posterior draws per item; ``seed``;
    ``chunk_size``: samples solved together; ``solver``: the prior's solver (``cnf.Solver``,
    given as its fields: ``trace``, ``n_probes``, ``method``, ``rtol`` / ``atol`` (adaptive)
    or ``steps`` (fixed grid), ...); ``greedy``: compute ``is_greedy`` by generation;
    generation: ``guidance`` (CFG scale), ``gen_steps`` (Euler steps per block),
    ``max_gen_toks`` (when a request gives none)."""

    model: str = "tiny"
    device: str = "auto"
    samples: int = 16
    seed: int = 0
    chunk_size: int = 32
    solver: Solver = field(default_factory=Solver)
    greedy: bool = True
    guidance: float = 7.0
    gen_steps: int = 16
    max_gen_toks: int = 256

    @classmethod
    def from_arguments(cls, arguments: dict) -> "Settings":
        """Settings from the harness's parsed model arguments, each checked; the solver's
        fields are given flat, as the harness passes every argument."""
        own = {f.name for f in fields(cls)} - {"solver"}
        solver_fields = {f.name for f in fields(Solver)} - {"solver_error"}
        unknown = sorted(set(arguments) - own - solver_fields)
        if unknown:
            raise ValueError(f"unknown colaprob model argument(s) {', '.join(unknown)}; known: {', '.join(sorted(own | solver_fields))}")
        solver = Solver(**{k: v for k, v in arguments.items() if k in solver_fields})
        settings = cls(**{k: v for k, v in arguments.items() if k in own}, solver=solver)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("samples", "chunk_size", "gen_steps", "max_gen_toks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model argument {name} must be a positive integer, not {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"model argument seed must be a non-negative integer, not {self.seed!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"model argument device must be auto, cpu or cuda, not {self.device!r}")
        if not isinstance(self.greedy, bool):
            raise ValueError(f"model argument greedy must be true or false, not {self.greedy!r}")

    def estimator_options(self) -> dict:
        return dict(seed=self.seed, chunk_size=self.chunk_size, solver=self.solver)


@register_model("colaprob")
class ColaprobLM(LM):
    """A colaprob model behind the harness's API (module docstring); ``ColaprobLM(**model
    arguments)`` or ``ColaprobLM(model=an already loaded ColaModel, ...)``."""

    def __init__(self, **arguments):
        super().__init__()
        loaded = arguments.pop("model", "tiny")
        self.settings = Settings.from_arguments({**arguments, "model": loaded if isinstance(loaded, str) else "(given)"})
        if isinstance(loaded, str):
            import colaprob

            loaded = colaprob.load(loaded)
        wanted = self.settings.device
        device = torch.device("cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu")
        self.model = loaded.to(device).eval()
        self._device = device

    # -- loglikelihood ----------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request, in request order."""
        groups: dict[tuple, list[int]] = {}
        for r, request in enumerate(requests):
            context, continuation = request.args
            groups.setdefault((_document_key(request, r), context), []).append(r)
        items = list(groups.items())
        contexts = [context for (_, context), _ in items]
        choices = [[requests[r].args[1] for r in members] for _, members in items]
        ds = continuation_log_prob(
            self.model, contexts, choices, self.settings.samples, item_ids=[key for (key, _), _ in items], **self.settings.estimator_options()
        )
        greedy = self._greedy(contexts, choices, [key for (key, _), _ in items])
        out: list = [None] * len(requests)
        for i, (_, members) in enumerate(items):
            for j, r in enumerate(members):
                out[r] = (float(ds.log_likelihood.values[i, j]), bool(greedy[i][j]))
                self.cache_hook.add_partial("loglikelihood", requests[r].args, out[r])
        return out

    def _greedy(self, contexts: list[str], choices: list[list[str]], keys: list[int]) -> list[list[bool]]:
        """Whether the deterministic decode from each context begins with each choice; the
        starting noise of item ``i`` is seeded by the seed and ``keys[i]``."""
        if not self.settings.greedy:
            return [[False] * len(c) for c in choices]
        out = []
        for context, options, key in zip(contexts, choices, keys):
            moved = [move_trailing_space(context, option) for option in options]
            longest = max(len(self.model.tokenizer.encode(cont)) for _, cont in moved)
            sampling = Sampling(max_new_tokens=longest, steps=self.settings.gen_steps, guidance=self.settings.guidance)
            text = generate(self.model, [moved[0][0]], sampling, seed=self.settings.seed * 1_000_003 + key)[0]
            out.append([text.startswith(cont) for _, cont in moved])
        return out

    # -- loglikelihood_rolling --------------------------------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """``log p(text)`` of every request by the rolling chain (an empty text: 0)."""
        texts = [request.args[0] for request in requests]
        scored = [r for r, text in enumerate(texts) if text]
        out = [0.0] * len(requests)
        if scored:
            ds = rolling_log_prob(
                self.model,
                [texts[r] for r in scored],
                self.settings.samples,
                document_ids=[_document_key(requests[r], r) for r in scored],
                **self.settings.estimator_options(),
            )
            for r, value in zip(scored, ds.log_likelihood.values):
                out[r] = float(value)
        for request, value in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
        return out

    # -- generate_until ---------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Block-wise generation with CFG from each context, cut at the first stop string."""
        out = []
        for r, request in enumerate(requests):
            context, gen_kwargs = request.args
            sampling, until = self._sampling(dict(gen_kwargs or {}))
            text = generate(self.model, [context], sampling, seed=self.settings.seed * 1_000_003 + _document_key(request, r))[0]
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out

    def _sampling(self, gen_kwargs: dict) -> tuple[Sampling, list[str]]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        sampling = Sampling(
            max_new_tokens=int(gen_kwargs.pop("max_gen_toks", self.settings.max_gen_toks)),
            steps=self.settings.gen_steps,
            guidance=self.settings.guidance,
            temperature=temperature if do_sample else 0.0,
            top_k=gen_kwargs.pop("top_k", None),
            top_p=gen_kwargs.pop("top_p", None),
        )
        if gen_kwargs:
            raise ValueError(f"generation arguments colaprob does not take: {', '.join(sorted(gen_kwargs))}")
        return sampling, until


def _document_key(request, position: int) -> int:
    """The random-stream key of a request: its document's index in the task, or its
    position when the harness gives none."""
    return request.doc_id if isinstance(request.doc_id, int) and request.doc_id >= 0 else position
