"""``colaprob eval``: task accuracy by likelihood beside accuracy by generation, on the
official evaluation files.

Every item of every file (``colaprob.tasks.read_official``; the file name, or ``--task``,
names the task) is scored with ``colaprob.estimators.continuations``: ``log p(continuation |
context)`` of every choice (of the answer, for an open task) and of the model's own
``generate``, all on the same posterior draws, the context's blocks integrated once per item.
From those:

* ``acc``: the choice of highest ``log p`` is the answer; ``acc_norm``: the same per byte of
  the choice (lm-evaluation-harness's definitions), each with the standard error of a mean
  over items (multiple-choice tasks only);
* ``gen_acc``: the official string match of ``generate`` (``colaprob.tasks.generation_correct``);
* ``disagree``: the share of items where ``acc`` and ``gen_acc`` differ;
* ``prefers_generation``: the share of items where ``log p(generate) > log p(answer)``
  (items whose generation is the answer itself are left out);
* ``within_monte_carlo_error``: the share of multiple-choice items whose likelihood choice
  leads the runner-up by at most 2 Monte Carlo standard errors of that lead (paired: the
  choices share their draws), so that more samples could change it;
* ``within_solver_error``: the same within the solver error: the lead is no more than the sum
  of the two choices' estimated solver errors (``--no-solver-error`` skips the estimate).

Items run in batches of ``--batch-size``, each saved as it finishes (``colaprob.runner``), so
an interrupted run resumes; the result is one NetCDF file with dims ``item`` and ``choice``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from colaprob import results, runner, tasks
from colaprob.commands import options, output, runs
from colaprob.errors import ColaprobError
from colaprob.estimators.solver import Solver

HELP = "task accuracy: multiple choice by likelihood beside the official string match of the generations (NetCDF)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="FILE", help="official-format JSONL files ({id, prompt, ground_truth, generate?, choices?, few_shot_prefix?})")
    parser.add_argument("--task", help="the task's name when there is one FILE (default: the file name's stem, e.g. mmlu); it selects the string-match rule")
    options.add_model_options(parser)
    group = parser.add_argument_group("estimator")
    group.add_argument("-K", "--samples", type=options.positive_int, default=16, help="posterior samples per item, shared by its choices (default: 16)")
    group.add_argument("--chunk-size", type=options.positive_int, default=32, help="samples solved together, to bound memory (default: 32)")
    group.add_argument("--batch-size", type=options.positive_int, default=4, help="items per batch and per saved shard (default: 4)")
    options.add_solver_error_options(group, "item")
    options.add_solver_options(parser)
    options.add_output_options(parser, "eval.nc")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What ``colaprob eval`` runs with, and its run key: the ``task`` name for a single file
    (None: the file name's stem), K posterior ``samples`` per item, ``chunk_size`` samples
    solved together, ``batch_size`` items per batch and saved shard, the prior's ``solver``
    (``solver_error``: estimate each log p's solver error), ``target_error``: tighten the
    solver until every item's largest estimated error is below it (nats), the ``seed``."""

    task: str | None = None
    samples: int = 16
    chunk_size: int = 32
    batch_size: int = 4
    solver: Solver = options.DEFAULT_SOLVER
    target_error: float | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> "Settings":
        return runs.settings_from_args(cls, args, solver=options.solver_from_args(args, solver_error=not args.no_solver_error))


def run(args: argparse.Namespace) -> int:
    return runs.run_command(args, Settings.from_args(args), execute, report)


def execute(settings: Settings, target: runs.Target, ctx, desc: str = "items"):
    """Evaluate ``target``'s task files into ``target.output`` through ``colaprob.runner``, every rank of ``ctx`` together; the merged dataset."""
    return runs.run_job(prepare, settings, target, ctx, desc)


def prepare(settings: Settings, target: runs.Target, ctx) -> "Job":
    """Read and check everything, so a mistake stops the run before any file is written."""
    options.check_target_error(settings.target_error, settings.solver)
    if settings.task is not None and len(target.inputs) > 1:
        raise ColaprobError(f"--task names one file's task, but {len(target.inputs)} files were given; run them separately or drop --task.")
    runs.check_output_is_not_an_input(target.output, target.inputs)
    task_list = [tasks.read_official(path, settings.task) for path in target.inputs]
    if len({t.name for t in task_list}) < len(task_list):
        raise ColaprobError("two input files have the same task name; give each task once.")
    model, identity = runs.load_model(target, ctx.device)
    items = [(task, item) for task in task_list for item in task.items]
    widest = check_lengths(model, items)
    planned = plan_memory(model, widest, settings, target, ctx.device)
    results.check_writable(target.output)
    for task in task_list:  # after the checks, so that a refusal is one line
        for warning in task.warnings:
            print(f"colaprob: warning: {warning}", file=sys.stderr)
    return Job(settings, target, model, identity, items, planned, rows_per_item=widest[0])


def check_lengths(model, items) -> tuple[int, int]:
    """Refuse, before any work, an item longer than the model's limit; returns the most
    rows (choices) of an item and the longest framed row, for the memory check."""
    from colaprob.estimators.continuations import frame_continuations

    rows, tokens = 1, 1
    for task, item in items:
        try:
            framed = frame_continuations(model, [item.context], [continuations(item)])
        except ValueError as err:
            length = str(err).split(" is ", 1)[-1].split(";")[0]
            raise ColaprobError(f"{task.name} item {item.id} is {length}; task contexts are not cut, so use a model with a longer context.") from None
        rows, tokens = max(rows, len(framed.lengths)), max(tokens, int(framed.lengths.max()))
    return rows, tokens


def plan_memory(model, widest: tuple[int, int], settings: Settings, target: runs.Target, device):
    """The memory plan (``runs.plan_memory``) for batches of ``settings.batch_size`` items,
    each as wide as the widest (``widest``: its rows, all the item's continuations, which one
    solve takes together, and their framed length); refused in one sentence when one item
    does not fit even one sample and one product at a time."""
    rows, tokens = widest
    planned = runs.plan_memory(
        model, target, device, "the evaluation", solver=settings.solver, batch=settings.batch_size * rows, tokens=tokens, samples=settings.samples, chunk=settings.chunk_size
    )
    if planned.batch < rows:
        raise ColaprobError(
            f"one item with its {rows} continuations of {tokens} tokens does not fit in "
            f"{'--max-memory' if target.max_memory is not None else 'the free memory'} even one sample at a time; "
            "raise --max-memory if the memory is there, or use a machine with more memory."
        )
    return planned


def continuations(item: tasks.TaskItem) -> list[str]:
    """What is scored for an item: its choices, then its generation when it has one."""
    return item.choices + ([item.generate] if item.generate is not None else [])


def fingerprint(items) -> str:
    canonical = json.dumps([[t.name, i.id, i.context, i.choices, i.gold, i.generate] for t, i in items], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


class Job:
    """Everything ``runner.run`` needs: the items, the model, the settings and the memory plan
    (as in ``colaprob score``: a batch is solved as many items at a time as fit, and a solve
    that still fails to allocate is retried with half the samples)."""

    def __init__(self, settings: Settings, target: runs.Target, model, identity, items, planned, rows_per_item: int):
        from colaprob import memory

        self.settings, self.model, self.items, self.planned = settings, model, items, planned
        self.items_per_call = max(1, planned.batch // rows_per_item)
        self.chunk = memory.AdaptiveChunk(planned.chunk, what="the evaluation")
        self.n_choices = max(len(item.choices) for _, item in items)
        record = {
            **identity,
            "inputs": [path.name for path in target.inputs],
            "tasks": sorted({task.name for task, _ in items}),
            "input_fingerprint": fingerprint(items),
            **runs.run_record(settings),
        }
        self.plan = runner.Plan(record, n_items=len(items), batch_size=settings.batch_size)

    def score_batch(self, positions: range) -> xr.Dataset:
        """The batch's scores; with ``target_error``, re-solved with tighter settings until
        every item's largest solver error (over its choices and generation) is below it."""
        s = self.settings

        def estimate(solver: Solver) -> xr.Dataset:
            solver = solver.replace(vjp_chunk=self.planned.vjp_chunk)

            def part(rows: range, chunk: int) -> xr.Dataset:
                chosen = [self.items[i] for i in rows]
                return score_items(self.model, chosen, s.samples, rows, self.n_choices, seed=s.seed, chunk_size=chunk, solver=solver)

            return runs.in_calls(positions, self.items_per_call, self.chunk, part)

        ds, _ = runs.solve_to_target(estimate, s.solver, s.target_error, largest_solver_error)
        return ds

    def finish(self, merged: xr.Dataset) -> xr.Dataset:
        """``finish`` with what each item is: its task and its id in the file. (Added to the
        merged result, not to the shards: text of varying width is stored whole only once.)"""
        return with_labels(merged, [self.items[i] for i in merged["sequence"].values])


def largest_solver_error(ds: xr.Dataset) -> np.ndarray | None:
    """[sequence] each item's largest estimated solver error over its choices and its
    generation (nats), or None when the batch has no estimate."""
    if "log_likelihood_solver_error" not in ds:
        return None
    per_choice = np.nanmax(np.where(ds["choice_valid"].values, ds["log_likelihood_solver_error"].values, -np.inf), axis=1)
    return np.fmax(per_choice, ds["generate_log_likelihood_solver_error"].values)


def score_items(model, chosen, n_samples: int, item_ids, n_choices: int, **estimator_options) -> xr.Dataset:
    """The scores of ``chosen`` ``(task, item)`` pairs over ``sequence`` (see ``batch_dataset``)."""
    from colaprob.estimators.continuations import continuation_log_prob

    contexts, scored = [item.context for _, item in chosen], [continuations(item) for _, item in chosen]
    ds = continuation_log_prob(model, contexts, scored, n_samples, item_ids=list(item_ids), **estimator_options)
    return batch_dataset(ds, chosen, n_choices)


def evaluate(model, task: tasks.Task, n_samples: int = 16, **estimator_options) -> xr.Dataset:
    """What ``colaprob eval`` computes for one task, in this process (no files): the dataset
    over ``item`` and ``choice``. ``estimator_options``: ``seed``, ``chunk_size`` and the ``solver``
    (or its fields as keywords) of ``continuation_log_prob``."""
    chosen = [(task, item) for item in task.items]
    ds = score_items(model, chosen, n_samples, range(len(chosen)), max(len(i.choices) for i in task.items), **estimator_options)
    return with_labels(ds, chosen)


def with_labels(ds: xr.Dataset, chosen) -> xr.Dataset:
    """``finish`` with what each item is: its task and its id in the file."""
    ds["task"] = ("sequence", np.array([task.name for task, _ in chosen], dtype=object))
    ds["item_id"] = ("sequence", np.array([item.id for _, item in chosen], dtype=object))
    return finish(ds)


CHOICE_VARIABLES = ("log_likelihood", "log_likelihood_se", "log_likelihood_solver_error", "n_tokens", "n_bytes", "khat", "choice_valid")


def batch_dataset(ds: xr.Dataset, chosen, n_choices: int) -> xr.Dataset:
    """The scores of a batch on the ``sequence`` (item) and ``choice`` grid of the run, the
    generation's own score split off, and what each item is."""
    n = len(chosen)
    out = {}
    has_generate = np.array([item.generate is not None for _, item in chosen])
    n_real = np.array([len(item.choices) for _, item in chosen])
    for name in (name for name in CHOICE_VARIABLES if name in ds):  # the solver error when estimated
        values = ds[name].values
        grid = np.full((n, n_choices), False if values.dtype == bool else (0 if values.dtype.kind == "i" else np.nan), dtype=values.dtype)
        gen = np.full(n, np.nan)
        for row in range(n):
            grid[row, : n_real[row]] = values[row, : n_real[row]]
            if has_generate[row]:
                gen[row] = values[row, n_real[row]]
        out[name] = (("sequence", "choice"), grid)
        if name != "choice_valid":
            out[f"generate_{name}"] = ("sequence", gen)
    out["choice_margin_se"] = ("sequence", margin_se(ds, n_real))
    out["gold"] = ("sequence", np.array([item.gold for _, item in chosen]))
    out["multiple_choice"] = ("sequence", np.array([item.choice_texts is not None for _, item in chosen]))
    out["has_generate"] = ("sequence", has_generate)
    out["generate_is_gold"] = ("sequence", np.array([item.generate is not None and item.generate == item.choices[item.gold] for _, item in chosen]))
    verdicts = [tasks.generation_correct(task.name, item) for task, item in chosen]
    out["generation_correct"] = ("sequence", np.array([np.nan if v is None else float(v) for v in verdicts]))
    out["batch_nfe"] = ("sequence", np.full(n, int(ds.attrs["nfe"])))
    out["batch_dit_rows"] = ("sequence", np.full(n, int(ds.attrs["dit_rows"])))
    keep = {k: v for k, v in ds.attrs.items() if k not in ("nfe", "dit_rows", "dit_history_rows")}
    return xr.Dataset(out, coords={"choice": np.arange(n_choices)}, attrs=keep)


def finish(merged: xr.Dataset) -> xr.Dataset:
    """Choices and verdicts of every item, on the dims ``item`` and ``choice``."""
    ds = merged.rename({"sequence": "item"})
    valid = ds["choice_valid"].values.astype(bool)
    ll = np.where(valid, ds["log_likelihood"].values, -np.inf)
    per_byte = np.where(valid, ds["log_likelihood"].values / np.maximum(ds["n_bytes"].values, 1), -np.inf)
    mc = ds["multiple_choice"].values.astype(bool)
    gold = ds["gold"].values
    ds["chosen"] = ("item", np.where(mc, ll.argmax(1), -1))
    ds["chosen_norm"] = ("item", np.where(mc, per_byte.argmax(1), -1))
    ds["correct"] = ("item", np.where(mc, (ds["chosen"].values == gold).astype(float), np.nan))
    ds["correct_norm"] = ("item", np.where(mc, (ds["chosen_norm"].values == gold).astype(float), np.nan))
    gold_ll = np.take_along_axis(ds["log_likelihood"].values, gold[:, None], 1)[:, 0]
    compared = ds["has_generate"].values.astype(bool) & ~ds["generate_is_gold"].values.astype(bool)
    ds["prefers_generation"] = ("item", np.where(compared, (ds["generate_log_likelihood"].values > gold_ll).astype(float), np.nan))
    both = mc & ~np.isnan(ds["generation_correct"].values)
    ds["disagree"] = ("item", np.where(both, (ds["correct"].values != ds["generation_correct"].values).astype(float), np.nan))
    margin = top_two(ll)[2]
    ds["choice_margin"] = ("item", np.where(mc & np.isfinite(margin), margin, np.nan))
    # Two standard errors: a lead this small could be reversed by Monte Carlo noise alone.
    ds["within_monte_carlo_error"] = ("item", np.where(mc, (np.isfinite(margin) & (margin <= 2 * ds["choice_margin_se"].values)).astype(float), np.nan))
    if "log_likelihood_solver_error" in ds:
        ds["within_solver_error"] = ("item", np.where(mc, choice_within_solver_error(ll, ds["log_likelihood_solver_error"].values), np.nan))
    for name, doc in DESCRIPTIONS.items():
        if name in ds:
            ds[name].attrs["description"] = doc
    ds.attrs["diagnostic"] = "task_evaluation"
    return ds


def top_two(log_likelihood: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(first, second, margin)`` [items]: the choice of highest ``log_likelihood`` [items,
    choices] (-inf where a choice does not exist; the first of equals, as ``argmax``), the
    runner-up, and the lead of the first over it in nats (inf for an item with one choice)."""
    padded = np.pad(log_likelihood, ((0, 0), (0, 1)), constant_values=-np.inf)
    order = np.argsort(-padded, axis=1, kind="stable")
    first, second = order[:, 0], order[:, 1]
    rows = np.arange(len(padded))
    return first, second, padded[rows, first] - padded[rows, second]


def margin_se(ds: xr.Dataset, n_real: np.ndarray) -> np.ndarray:
    """[items] the Monte Carlo SE of the lead of each item's first choice over its runner-up
    (``top_two``; NaN with one choice). Both are ``log p(joint) - log p(context)`` with one
    context term per item, so the lead is the difference of the joints, on the same draws:
    ``statistics.paired_log_mean_exp_se`` of their log-weights."""
    from colaprob.estimators import statistics

    C = ds.sizes["choice"]
    valid = np.arange(C)[None, :] < n_real[:, None]
    first, second, margin = top_two(np.where(valid, ds["log_likelihood"].values, -np.inf))
    rows, alone = np.arange(len(first)), ~np.isfinite(margin)
    weights = ds["log_weight"].values
    pick = lambda choice: xr.DataArray(weights[rows, np.minimum(choice, C - 1)], dims=("item", "sample"))
    se = statistics.paired_log_mean_exp_se(pick(first), pick(second)).values
    return np.where(alone, np.nan, se)


def choice_within_solver_error(log_likelihood: np.ndarray, solver_error: np.ndarray) -> np.ndarray:
    """[items] float (1.0 / 0.0): the choice of highest ``log_likelihood`` [items, choices]
    (-inf where a choice does not exist) leads the runner-up by at most the sum of their
    ``solver_error``, so solving more accurately could change it. An item with one choice
    cannot change."""
    first, second, margin = top_two(log_likelihood)
    rows = np.arange(len(first))
    padded = np.pad(solver_error, ((0, 0), (0, 1)))
    reach = padded[rows, first] + np.nan_to_num(padded[rows, second])
    return (np.isfinite(margin) & (margin <= reach)).astype(float)


DESCRIPTIONS = {
    "log_likelihood": "log p(continuation | context), nats: IWAE-K difference on common draws (consistent, not a bound)",
    "generate_log_likelihood": "log p(generate | context) of the model's own generation, on the same draws",
    "correct": "acc: the choice of highest log p is the answer (multiple choice only)",
    "correct_norm": "acc_norm: the choice of highest log p per byte is the answer",
    "generation_correct": "the official string match of generate (colaprob.tasks.generation_correct)",
    "prefers_generation": "log p(generate) > log p(answer); NaN without a generation or when it is the answer",
    "disagree": "correct != generation_correct (multiple choice with a generation)",
    "within_solver_error": "the chosen choice leads the runner-up by at most their summed solver errors (multiple choice only)",
    "within_monte_carlo_error": "the chosen choice leads the runner-up by at most 2 Monte Carlo SE of the lead (multiple choice only)",
    "choice_margin": "log p of the chosen choice minus the runner-up's, nats (multiple choice only)",
}


# ---------------------------------------------------------------------------------------------
# The summary


def report(ds: xr.Dataset, args) -> None:
    table = output.summary(ds)
    if args.json:
        output.print_json({"tasks": table, "estimator": ds.attrs.get("estimator", ""), "output": str(args.output)})
        return
    cell = lambda e, key: "-" if not e[f"{key}_items"] else (output.plus_minus(e[key], e[f"{key}_se"]) if e[f"{key}_items"] > 1 else f"{e[key]:.4f}")
    keys = ("acc", "acc_norm", "gen_acc", "disagree", "prefers_generation", "within_monte_carlo_error", "within_solver_error")
    rows = [{"task": task, "items": e["items"], **{key: cell(e, key) if f"{key}_items" in e else "not estimated" for key in keys}} for task, e in table.items()]
    columns = [("task", "task"), ("items", "items"), ("acc", "acc (likelihood)"), ("acc_norm", "acc_norm"), ("gen_acc", "acc (generation)"), ("disagree", "disagree"),
               ("prefers_generation", "log p prefers own generation"), ("within_monte_carlo_error", "choice within 2 SE"), ("within_solver_error", "choice within solver error")]
    output.print_table(rows, columns)
    print(f"K={ds.attrs.get('K')} posterior samples per item; ± is the standard error over items; results: {args.output}")
