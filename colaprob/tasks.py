"""Evaluation tasks: the official release's evaluation files, their string-match accuracy, and
a held-out cloze task of the embedded corpus.

The official format (``eval_output/tasks_default/*.jsonl`` of ByteDance-Seed/Cola-DLM): one
JSON object a line, ``{"id", "prompt", "ground_truth", "generate"?, "choices"?,
"few_shot_prefix"?, "others"?}``. Its ``scripts/acc_calc.py`` made the files from the model's
outputs: it moved the prefix common to every prompt of a file into ``few_shot_prefix`` and cut
``generate`` at its first newline preceded by a word character, keeping the rest as
``others``. So what the model was given is ``few_shot_prefix + prompt`` and what it generated
is ``generate`` (then ``others``).

Framing of an item (see the README, "Task evaluation"):

* context = ``few_shot_prefix + prompt``;
* a choice, or the ``ground_truth`` of an open task, is scored with lm-evaluation-harness's
  ``target_delimiter`` ``" "`` in front (unless it already starts with whitespace or the
  context ends with whitespace, which then moves into the continuation, as the harness does);
* ``generate`` is scored verbatim: it is the text the model produced after the context,
  leading space included.

The generative accuracy re-implements the official string match (``accuracy_rule``):
LAMBADA compares the first word; MMLU, OBQA, RACE and SIQA compare the chosen option, read
from the generation as a letter or as the text of a choice; the other tasks require the
normalised generation to equal the normalised answer.
"""

from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from colaprob.data import check_no_surrogate, read_jsonl
from colaprob.errors import ColaprobError

FIELDS = ("id", "prompt", "ground_truth", "generate", "choices", "few_shot_prefix", "others")
DELIMITER = " "  # lm-evaluation-harness's target_delimiter
FIRST_WORD_TASKS = ("lambada", "embedded_cloze")
OPTION_TASKS = ("mmlu", "obqa", "race", "siqa")
EXACT_TASKS = ("hellaswag", "squad", "story_cloze")
KNOWN_TASKS = FIRST_WORD_TASKS + OPTION_TASKS + EXACT_TASKS  # the official eight and the embedded cloze


@dataclass
class TaskItem:
    """One item, framed. ``context``: what the model is given; ``choices``: the scored
    continuations (each with its word-boundary space; an open task has one, its answer);
    ``gold``: index of the answer in ``choices``; ``generate``: the model's own continuation,
    verbatim (None if the file has none); ``ground_truth`` and ``choice_texts``: as in the
    file, for the string match."""

    id: str
    context: str
    choices: list[str]
    gold: int
    generate: str | None
    ground_truth: str
    choice_texts: list[str] | None


@dataclass
class Task:
    """A task file read: its name (which selects the accuracy rule), items and the warnings
    that name what was not used."""

    name: str
    items: list[TaskItem]
    warnings: list[str] = field(default_factory=list)

    @property
    def multiple_choice(self) -> bool:
        return any(item.choice_texts is not None for item in self.items)


# ---------------------------------------------------------------------------------------------
# Reading


def read_official(path: str | Path, task: str | None = None) -> Task:
    """Read an official-format file; ``task`` names it (default: the file name's stem, as the
    official script keys its rules on the file name)."""
    path = Path(path)
    name = task or path.stem
    items, unused = [], {}
    for number, record in read_jsonl(path):
        items.append(_item(record, path, number))
        for key in record:
            if key not in FIELDS or key == "others":
                unused.setdefault(key, number)
    if not items:
        raise ColaprobError(f"{path} holds no records; give an official-format JSONL file.")
    warnings = []
    if "others" in unused:
        warnings.append(f"{path.name}: field 'others' (the generation after its first line, which the official accuracy ignores) is not used")
    warnings += [f"{path.name}: field {key!r} (first on line {line}) is not part of the official format and is not used" for key, line in unused.items() if key != "others"]
    if name not in KNOWN_TASKS:
        warnings.append(f"{path.name}: task {name!r} is none of {', '.join(KNOWN_TASKS)}; its generative accuracy uses the exact-match rule")
    choice_tasks = sum(item.choice_texts is not None for item in items)
    if 0 < choice_tasks < len(items):
        raise ColaprobError(f"{path} mixes {choice_tasks} records with choices and {len(items) - choice_tasks} without; split it into two files.")
    return Task(name, items, warnings)


def _text(record: dict, key: str, path: Path, number: int, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        need = "a string" if key in record else "present"
        raise ColaprobError(f"{path} line {number}: field {key!r} must be {need}; every record needs a string {key!r}.")
    check_no_surrogate(value, key, f"line {number} of {path}")
    return value


def _item(record: dict, path: Path, number: int) -> TaskItem:
    prompt = _text(record, "prompt", path, number)
    ground_truth = _text(record, "ground_truth", path, number)
    prefix = _text(record, "few_shot_prefix", path, number, required=False) or ""
    generate = _text(record, "generate", path, number, required=False)
    context = prefix + prompt
    choice_texts = record.get("choices")
    if choice_texts is not None:
        if not isinstance(choice_texts, list) or not choice_texts or not all(isinstance(c, str) and c.strip() for c in choice_texts):
            raise ColaprobError(f"{path} line {number}: 'choices' must be a non-empty list of non-empty strings.")
        for choice in choice_texts:
            check_no_surrogate(choice, "choices", f"line {number} of {path}")
        gold = gold_choice(ground_truth, choice_texts)
        if gold is None:
            raise ColaprobError(f"{path} line {number}: ground_truth {ground_truth!r} is none of the choices (by text or letter).")
        choices = [with_delimiter(context, c) for c in choice_texts]
    else:
        if not ground_truth.strip():
            raise ColaprobError(f"{path} line {number}: ground_truth is empty; an open task needs an answer to score.")
        gold, choices = 0, [with_delimiter(context, ground_truth)]
    if generate is not None:
        generate = first_line(generate)
        generate = generate if generate.strip() else None  # nothing generated: nothing to score or match
    return TaskItem(str(record.get("id", number)), context, choices, gold, generate, ground_truth, choice_texts)


def with_delimiter(context: str, answer: str) -> str:
    """The continuation of an answer: ``" " + answer``, unless the answer already starts with
    whitespace or the context ends with it (that whitespace moves into the continuation)."""
    if answer[:1].isspace() or context[-1:].isspace():
        return answer
    return DELIMITER + answer


def first_line(generation: str) -> str:
    """The official cut: a generation ends at its first newline preceded by a word character
    (files written by the official script are already cut; cutting again changes nothing)."""
    for match in re.finditer("\n", generation):
        if re.search(r"\w", generation[: match.start()]):
            return generation[: match.start()]
    return generation


# ---------------------------------------------------------------------------------------------
# The official string match


def normalise(text: str | None) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    text = re.sub(r"[^\w\s]", "", str(text or "").lower().strip())
    return " ".join(text.split())


def similarity(a: str, b: str) -> float:
    """``difflib`` ratio of the normalised texts (1 for two empty texts)."""
    a, b = normalise(a), normalise(b)
    return 1.0 if not a and not b else difflib.SequenceMatcher(None, a, b).ratio()


def option_letter(text: str, n_choices: int) -> int | None:
    """The option a text names by letter: the whole text is a letter (optionally in brackets or
    with a full stop), else the last "answer / option / choice (is) X", else, in a short text,
    the last bracketed letter. None if none, or outside the choices."""
    raw = str(text or "").strip()
    found = None
    whole = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\.?", raw)
    keyword = re.findall(r"(?i)\b(?:final\s+answer|answer|option|choice)\b\s*(?:is|=|:|：)?\s*[(\[]?\s*([A-Za-z])\s*[)\]]?(?=\s|$|[.,;:!?])", raw)
    if whole:
        found = whole.group(1)
    elif keyword:
        found = keyword[-1]
    elif len(raw) <= 40 and re.findall(r"[(\[]\s*([A-Za-z])\s*[)\]]", raw):
        found = re.findall(r"[(\[]\s*([A-Za-z])\s*[)\]]", raw)[-1]
    if found is None:
        return None
    index = string.ascii_uppercase.index(found.upper())
    return index if index < min(n_choices, 26) else None


def option_by_text(text: str, choices: list[str]) -> int | None:
    """The choice a text names by its words: equal after normalising (also once a leading
    "the answer is" is dropped), else the only choice contained in it, else the most similar
    choice if its similarity is at least 0.9."""
    norm = [normalise(c) for c in choices]
    if not normalise(text):
        return None
    if normalise(text) in norm:
        return norm.index(normalise(text))
    cleaned = re.sub(r"(?i)^(the\s+)?(correct\s+)?(final\s+)?(answer|option|choice)\b\s*(is|=|:|：)?\s*", "", str(text)).strip()
    if not normalise(cleaned):
        return None
    if normalise(cleaned) in norm:
        return norm.index(normalise(cleaned))
    contained = [i for i, c in enumerate(norm) if c and c in normalise(cleaned)]
    if len(contained) == 1:
        return contained[0]
    scores = [similarity(cleaned, c) for c in choices]
    best = int(np.argmax(scores))
    return best if scores[best] >= 0.9 else None


def answer_segment(text: str) -> str:
    """What follows "answer (is)" on the last line that has it, else the whole text."""
    raw = str(text or "").strip()
    for line in reversed([line.strip() for line in raw.splitlines() if line.strip()]):
        match = re.search(r"(?i)\b(?:final\s+answer|answer)\b\s*(?:is|=|:|：)?\s*(.+)$", line)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return raw


def generated_option(generation: str, choices: list[str]) -> int | None:
    """The option a generation picks: by letter, then by text, in its answer segment and then
    in the whole generation."""
    for candidate in (answer_segment(generation), generation):
        for pick in (option_letter(candidate, len(choices)), option_by_text(candidate, choices)):
            if pick is not None:
                return pick
    return None


def gold_choice(ground_truth: str, choices: list[str]) -> int | None:
    """Index of the answer among the choices: the same text, else by letter, else by text."""
    if ground_truth in choices:
        return choices.index(ground_truth)
    letter = option_letter(ground_truth, len(choices))
    return letter if letter is not None else option_by_text(ground_truth, choices)


def accuracy_rule(task: str) -> str:
    """``first_word`` (LAMBADA and the embedded cloze), ``option`` (MMLU, OBQA, RACE, SIQA) or ``exact`` (the rest,
    and any other task): which official string match a task's generations get."""
    return "first_word" if task in FIRST_WORD_TASKS else "option" if task in OPTION_TASKS else "exact"


def generation_correct(task: str, item: TaskItem) -> bool | None:
    """The official verdict on an item's ``generate`` (None if it has none): threshold 1, so
    a similarity must be 1 (equal normalised texts) to count."""
    if item.generate is None:
        return None
    rule = accuracy_rule(task)
    if rule == "first_word":
        first = lambda text: (normalise(text).split() or [""])[0]
        return first(item.generate) == first(item.ground_truth)
    if rule == "option" and item.choice_texts:
        picked = generated_option(item.generate, item.choice_texts)
        gold = gold_choice(item.ground_truth, item.choice_texts)
        if picked is not None and gold is not None and picked == gold:
            return True
    return similarity(item.generate, item.ground_truth) >= 1.0


# ---------------------------------------------------------------------------------------------
# Summary of an evaluation

SUMMARY = {
    "acc": "correct",
    "acc_norm": "correct_norm",
    "gen_acc": "generation_correct",
    "disagree": "disagree",
    "prefers_generation": "prefers_generation",
    "within_monte_carlo_error": "within_monte_carlo_error",
    "within_solver_error": "within_solver_error",
}


def summarise(ds: xr.Dataset) -> xr.Dataset:
    """Per task, from a ``colaprob eval`` result: ``items`` and, for each of ``acc``,
    ``acc_norm``, ``gen_acc``, ``disagree``, ``prefers_generation``,
    ``within_monte_carlo_error`` and (where estimated) ``within_solver_error``, the mean over the items
    where it is defined, its standard error over items (``sd / sqrt(n)``, NaN for fewer than
    two) and ``n`` (``<name>_items``). Dims: ``task``."""
    names = sorted(set(ds["task"].values.tolist()))
    out = {"items": ("task", np.array([(ds["task"].values == t).sum() for t in names]))}
    for key, variable in SUMMARY.items():
        if variable not in ds:  # within_solver_error: only where the solver error was estimated
            continue
        stats = [_mean_se(ds[variable].values[ds["task"].values == t].astype(float)) for t in names]
        for j, suffix in enumerate(("", "_se", "_items")):
            out[key + suffix] = ("task", np.array([s[j] for s in stats]))
    return xr.Dataset(out, coords={"task": np.array(names, dtype=object)}, attrs={"diagnostic": "task_summary"})


def _mean_se(values: np.ndarray) -> tuple[float, float, int]:
    v = values[~np.isnan(values)]
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")), int(len(v))


# ---------------------------------------------------------------------------------------------
# The embedded model's own task


def embedded_cloze(n_items: int = 16, n_choices: int = 4, max_bytes: int = 60, seed: int = 0) -> Task:
    """A multiple-choice cloze of the embedded corpus's held-out split, deterministic in its
    arguments: from each held-out piece (in corpus order) of at most ``max_bytes`` bytes with
    at least 24 bytes before its last purely alphabetic word of 3 to 12 letters, the context
    is the text before that word, the answer is the word and the distractors are other
    held-out words of the same length (the nearest lengths if too few), drawn with ``seed``;
    the answer's position among the choices is drawn too. ``generate`` is left empty (the
    caller generates; the first-word rule judges it, as LAMBADA's)."""
    from colaprob.data import embedded_corpus

    if n_items < 1 or n_choices < 2:
        raise ColaprobError("the cloze task needs at least one item and two choices.")
    pieces = [doc.text for doc in embedded_corpus("heldout", max_bytes)]
    vocabulary = sorted({w for p in pieces for w in re.findall(r"\b[A-Za-z]{3,12}\b", p)})
    rng = np.random.default_rng([seed, n_choices])
    items = []
    for number, piece in enumerate(pieces):
        words = [m for m in re.finditer(r"(?<=\s)[A-Za-z]{3,12}(?=[\s.,;:]|$)", piece)]
        if not words or words[-1].start() < 24:
            continue
        answer = words[-1].group()
        context = piece[: words[-1].start()].rstrip()
        pool = [w for w in vocabulary if w.lower() != answer.lower()]
        gap = next(g for g in range(13) if sum(abs(len(w) - len(answer)) <= g for w in pool) >= n_choices - 1)
        nearest = [w for w in pool if abs(len(w) - len(answer)) <= gap]
        distractors = [str(w) for w in rng.choice(nearest, n_choices - 1, replace=False)]
        if len((context + DELIMITER + max(distractors + [answer], key=len)).encode("utf-8")) > max_bytes:
            continue
        gold = int(rng.integers(n_choices))
        texts = distractors[:gold] + [answer] + distractors[gold:]
        items.append(TaskItem(f"heldout-{number}", context, [with_delimiter(context, t) for t in texts], gold, None, answer, texts))
        if len(items) == n_items:
            break
    return Task("embedded_cloze", items)
