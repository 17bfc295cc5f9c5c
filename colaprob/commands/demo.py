"""``colaprob demo``: the whole tour on the embedded model, in a few minutes on a laptop CPU.

1. Takes an evenly spaced subset of the held-out split of the embedded corpus
   (``colaprob.data.embedded_corpus("heldout", ...)``) and writes it to ``heldout.jsonl``.
2. Scores it with the ELBO, whose prior density is the exact-trace CNF, and with IWAE-K on
   the trace chosen by ``--trace`` (default Hutchinson: the exact trace costs ``block_size *
   d`` = 64 vector-Jacobian products per ODE step on the embedded model, about 30 times one
   probe) (``scores_<name>.nc``, through the same resumable runner as ``colaprob score``).
3. Runs every diagnostic (``colaprob.diagnostics.report``: decomposition, probes,
   information curve, latent geometry) into ``report/`` (NetCDF, PNG, ``summary.md``).
4. Builds the embedded model's own task, a held-out multiple-choice cloze
   (``colaprob.tasks.embedded_cloze``), lets the model generate a continuation of every
   context, writes it in the official evaluation format (``cloze.jsonl``) and runs
   ``colaprob eval`` on it (``cloze.nc``): accuracy by likelihood beside accuracy by
   generation.
5. Writes ``README.md`` with the headline tables and prints them.

Rerunning the same command resumes: finished scores are read back, unfinished ones continue
from their last saved batch, and a finished report is kept. Other settings on an existing
folder are refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from colaprob import distributed, results, runner, windows
from colaprob.commands import options, output, runs, score
from colaprob.errors import ColaprobError
from colaprob.estimators.solver import Solver
from colaprob.estimators.statistics import KHAT_MIN_SAMPLES

HELP = "the tour on the embedded model: score held-out text (ELBO, IWAE), diagnose, write a report folder"

MANIFEST = "demo.json"
# (file name, estimator): the rows of the headline table.
ESTIMATES = (("elbo", "elbo"), ("iwae", "iwae"))


# Loose tolerances and the Hutchinson trace keep the tour to minutes on a CPU; the ELBO row
# always uses the exact trace (see the README on choosing estimator settings).
SOLVER = Solver(trace="hutchinson", rtol=1e-3, atol=1e-3)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What ``colaprob demo`` runs with, and the key of its folder: the held-out ``sequences``
    (pieces of at most ``max_bytes``), the ELBO's and the IWAE's K, the diagnostics' K and
    prior draws, the scoring ``batch_size``, the cloze task's items and K, the ``solver`` of
    the IWAE row, the cloze task and the diagnostics, and the ``seed``."""

    sequences: int = 4
    max_bytes: int = 63
    elbo_samples: int = 2
    samples: int = 32
    diagnostic_samples: int = 8
    prior_samples: int = 8
    batch_size: int = 4
    cloze_items: int = 8
    cloze_samples: int = 4
    solver: Solver = SOLVER
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> "Settings":
        return runs.settings_from_args(cls, args, solver=options.solver_from_args(args, SOLVER))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_options(parser)
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("colaprob-demo"), help="report folder (default: ./colaprob-demo)")
    parser.add_argument("--sequences", type=options.positive_int, default=4, help="held-out documents to score (default: 4)")
    parser.add_argument("--max-bytes", type=options.positive_int, default=63, help="longest held-out piece in UTF-8 bytes (default: 63)")
    parser.add_argument("--elbo-samples", type=options.positive_int, default=2, help="posterior samples of the exact-trace ELBO (default: 2)")
    parser.add_argument(
        "-K",
        "--samples",
        type=options.positive_int,
        default=32,
        help=f"posterior samples of the IWAE row; its k-hat needs at least {KHAT_MIN_SAMPLES} (default: 32)",
    )
    parser.add_argument(
        "--diagnostic-samples", type=options.positive_int, default=8, help="posterior samples for the decomposition and the probes (default: 8)"
    )
    parser.add_argument("--prior-samples", type=options.positive_int, default=8, help="prior draws per block for the probes (default: 8)")
    parser.add_argument("--batch-size", type=options.positive_int, default=4, help="documents per scoring batch (default: 4)")
    parser.add_argument("--cloze-items", type=options.positive_int, default=8, help="items of the held-out cloze task (default: 8)")
    parser.add_argument("--cloze-samples", type=options.positive_int, default=4, help="posterior samples per cloze item, shared by its choices (default: 4)")
    options.add_solver_options(parser, SOLVER)
    parser.add_argument("--overwrite", action="store_true", help="start over in a folder made with other settings")
    parser.add_argument("--seed", type=options.non_negative_int, default=0, help="random seed, a non-negative integer (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the headline numbers as JSON instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args)
    ctx = distributed.from_environment(args.device)
    try:
        out = args.output_dir
        target = runs.Target(inputs=(out / "heldout.jsonl",), output=out, model=args.model, revision=args.revision, download=args.download,
                             max_memory=args.max_memory, overwrite=args.overwrite, progress=not args.quiet)
        model, identity = runs.load_model(target, ctx.device)
        corpus = heldout_subset(settings.sequences, settings.max_bytes)
        if ctx.is_main:
            claim_folder(out, {**identity, **runs.run_record(settings), "device_type": ctx.device.type}, args.overwrite)
            write_corpus(out / "heldout.jsonl", corpus)
        ctx.barrier()
        scores = {name: score_corpus(settings, target, ctx, name, estimator) for name, estimator in ESTIMATES}
        cloze = evaluate_cloze(settings, target, ctx, model)
        if ctx.is_main:
            rows = windows.rows_to_score(model, [(doc, "heldout.jsonl") for doc in corpus], split=True)
            diagnostics = diagnose(model, settings, target, [row.document.text for row in rows])
            headline = headline_rows(scores)
            results.write_text(readme(headline, diagnostics, cloze, settings, args.model), out / "README.md")
            show(headline, diagnostics, cloze, args)
    finally:
        distributed.shutdown(ctx)
    return 0


def heldout_subset(n: int, max_bytes: int) -> list:
    """``n`` evenly spaced documents of the held-out split, in corpus order."""
    from colaprob.data import embedded_corpus

    documents = embedded_corpus("heldout", max_bytes)
    if n > len(documents):
        raise ColaprobError(f"--sequences {n} is more than the {len(documents)} held-out documents of --max-bytes {max_bytes}.")
    return [documents[i * len(documents) // n] for i in range(n)]


def claim_folder(out: Path, settings: dict, overwrite: bool) -> None:
    """Record the settings in ``demo.json``; a folder made with other settings is refused
    (or, with ``overwrite``, its results are removed)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    manifest = out / MANIFEST
    if manifest.exists() and not overwrite:
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, OSError, RecursionError):
            raise ColaprobError(f"{manifest} is unreadable or not JSON; delete it, pass --overwrite, or choose another --output-dir.") from None
        recorded = recorded if isinstance(recorded, dict) else {}
        if recorded.get(runner.RUN_KEY) != key:
            raise ColaprobError(
                f"{out} holds a demo made with other settings ({runner.describe_difference(recorded.get('settings', {}), settings)}); "
                "rerun with the same settings to resume, pass --overwrite, or choose another --output-dir."
            )
    results.check_writable(manifest)
    if overwrite:
        (out / "report" / "summary.md").unlink(missing_ok=True)
        (out / CLOZE).unlink(missing_ok=True)
    results.write_text(json.dumps({runner.RUN_KEY: key, "settings": settings}, indent=2, sort_keys=True, default=str) + "\n", manifest)


def score_corpus(settings: Settings, target: runs.Target, ctx, name: str, estimator: str):
    """``colaprob score heldout.jsonl --split --estimator E`` into ``scores_<name>.nc``: the
    ELBO with the exact trace and ``elbo_samples``, IWAE with the demo's solver and
    ``samples``; without the solver-error solve, which would multiply the tour's time."""
    solver, samples = (settings.solver.replace(trace="exact"), settings.elbo_samples) if estimator == "elbo" else (settings.solver, settings.samples)
    scoring = score.Settings(estimator_name=estimator, samples=samples, batch_size=settings.batch_size, solver=solver, seed=settings.seed, jsonl=True, split=True)
    return score.execute(scoring, dataclasses.replace(target, output=target.output / f"scores_{name}.nc"), ctx, desc=f"scoring ({name})")


CLOZE = "cloze.jsonl"


def evaluate_cloze(settings: Settings, target: runs.Target, ctx, model):
    """``colaprob eval cloze.jsonl`` into ``cloze.nc`` with the IWAE row's solver and
    ``cloze_samples``; the file (the task and the model's generations) is written once, by
    rank 0."""
    from colaprob.commands import eval as eval_command

    out = target.output
    if ctx.is_main and not (out / CLOZE).exists():
        write_cloze(model, out / CLOZE, settings.cloze_items, settings.seed)
    ctx.barrier()
    evaluation = eval_command.Settings(task="embedded_cloze", samples=settings.cloze_samples, solver=settings.solver, seed=settings.seed)
    return eval_command.execute(evaluation, dataclasses.replace(target, inputs=(out / CLOZE,), output=out / "cloze.nc"), ctx, desc="cloze")


def write_cloze(model, path: Path, n_items: int, seed: int) -> None:
    """The held-out cloze task in the official format, ``generate`` being the model's own
    greedy continuation (two DiT blocks of tokens) of each context."""
    from colaprob import generate, tasks

    task = tasks.embedded_cloze(n_items)
    sampling = generate.Sampling(max_new_tokens=2 * model.patch_size * model.block_size)
    generations = generate.generate(model, [item.context for item in task.items], sampling, seed=seed)
    lines = [
        json.dumps({"id": item.id, "prompt": item.context, "ground_truth": item.ground_truth, "choices": item.choice_texts, "generate": text})
        for item, text in zip(task.items, generations)
    ]
    results.write_text("".join(line + "\n" for line in lines), path)


def cloze_table(cloze) -> str:
    """The cloze section of the demo's README."""
    cells = _cloze_cells(cloze_row(cloze))
    head = "| " + " | ".join(h for _, h in CLOZE_COLUMNS) + " |\n|" + "---|" * len(CLOZE_COLUMNS) + "\n"
    body = "| " + " | ".join(str(cells[k]) for k, _ in CLOZE_COLUMNS) + " |\n"
    return (
        "## A task of its own: held-out cloze\n\n"
        "Each item is a held-out piece of the embedded corpus cut before its last word; the choices are that word and three "
        "held-out words of the same length (`cloze.jsonl`, built by `colaprob.tasks.embedded_cloze`). `acc (likelihood)`: the "
        "choice of highest log p(choice | context) is the word; `acc (generation)`: the first word of the model's own greedy "
        "continuation is the word (the LAMBADA rule); `disagree`: the share of items where the two verdicts differ; "
        "`log p prefers own generation`: the share where log p(generation) > log p(word). Mean ± standard error over items "
        "(chance: 0.25).\n\n" + head + body + "\n"
    )


def write_corpus(path: Path, documents: list) -> None:
    results.write_text("".join(json.dumps({"text": doc.text}) + "\n" for doc in documents), path)


def diagnose(model, settings: Settings, target: runs.Target, texts: list[str]) -> dict:
    """``colaprob.diagnostics.report`` into ``report/``, unless a finished one is there."""
    from colaprob.diagnostics import report

    folder = target.output / "report"
    names = ("decomposition", "probes", "probe_summary", "information_curve", "embedding", "density_slice")
    if (folder / "summary.md").exists():
        return {name: results.read_dataset(folder / f"{name}.nc") for name in names}
    batch = model.frame(texts)
    solver = settings.solver
    diagnostic_options = {
        "decomposition": {"n_samples": settings.diagnostic_samples, "solver": solver},
        "probes": {"n_posterior": settings.diagnostic_samples, "n_prior": settings.prior_samples, "solver": solver},
        "density_slice": {"solver": solver},
    }
    tokenizer = model.tokenizer
    return report(
        model, batch, folder, model_name=target.model, token_label=lambda t: tokenizer.decode([t]), seed=settings.seed,
        options=diagnostic_options, progress=target.progress,
    )


def headline_rows(scores: dict) -> list[dict]:
    rows = []
    for name, ds in scores.items():
        row = output.summary(ds)
        row["estimator"] = output.short_name(ds) + (" (Hutchinson)" if ds.attrs.get("trace") == "hutchinson" else " (exact trace)")
        rows.append(row)
    return rows


COLUMNS = [("estimator", "estimator"), ("nats_per_token", "nats/token"), ("bits_per_byte", "bits/byte"),
           ("token_perplexity", "token ppl"), ("solver_error", "solver error nats/token"), ("reliable_fraction", "k-hat reliable")]


def _table_rows(headline: list[dict]) -> list[dict]:
    return [{**row, **{k: output.plus_minus(row[k], row[f"{k}_se"]) for k in ("nats_per_token", "bits_per_byte", "token_perplexity")},
             **({"reliable_fraction": output.khat_cell(row)} if "reliable_fraction" in row else {}),
             **({"solver_error": f"{row['nats_per_token_solver_error']:.1e}"} if "nats_per_token_solver_error" in row else {})}
            for row in headline]


def cloze_row(cloze) -> dict:
    """The cloze task's line of ``colaprob eval``'s summary."""
    return output.summary(cloze)["embedded_cloze"]


CLOZE_COLUMNS = [("items", "cloze items"), ("acc", "acc (likelihood)"), ("acc_norm", "acc_norm"), ("gen_acc", "acc (generation)"),
                 ("disagree", "disagree"), ("prefers_generation", "log p prefers own generation")]


def _cloze_cells(row: dict) -> dict:
    cell = lambda key: "-" if not row[f"{key}_items"] else output.plus_minus(row[key], row[f"{key}_se"])
    return {"items": row["items"], **{key: cell(key) for key, _ in CLOZE_COLUMNS[1:]}}


def show(headline: list[dict], diagnostics: dict, cloze, args) -> None:
    dec = output.summary(diagnostics["decomposition"])
    if args.json:
        output.print_json({"scores": headline, "decomposition": dec, "cloze": cloze_row(cloze), "output_dir": str(args.output_dir)})
        return
    print(f"{headline[0]['sequences']} held-out documents, {headline[0]['tokens']} tokens, model {args.model}")
    output.print_table(_table_rows(headline), COLUMNS)
    print(
        f"bound: distortion {dec['distortion_nats_per_token']:.4f} + rate {dec['rate_nats_per_token']:.4f} nats/token; "
        f"I_q(X;Z) {dec['mutual_information']:.3f}, KL(q_bar||p) {dec['marginal_kl']:.3f} nats/sequence; "
        f"active units {dec['active_units']}/{dec['channels']}"
    )
    print("held-out cloze (4 choices, chance 0.25): accuracy by likelihood beside accuracy of the model's own generation")
    output.print_table([_cloze_cells(cloze_row(cloze))], CLOZE_COLUMNS)
    print(f"report: {args.output_dir / 'README.md'} (figures and NetCDF in {args.output_dir / 'report'})")


def readme(headline: list[dict], diagnostics: dict, cloze, settings: Settings, model_name: str) -> str:
    dec = output.summary(diagnostics["decomposition"])
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(output.format_cell(row.get(k)) for k, _ in COLUMNS) + " |\n" for row in _table_rows(headline))
    return (
        f"# colaprob demo: {model_name}\n\n"
        f"{headline[0]['sequences']} held-out documents of the embedded corpus (`heldout.jsonl`), "
        f"{headline[0]['tokens']} counted tokens, ELBO K = {settings.elbo_samples}, IWAE K = {settings.samples}, "
        f"ODE {settings.solver.label}, seed {settings.seed}.\n\n"
        + head + body +
        "\nELBO is a lower bound; IWAE-K a lower bound in expectation; with the Hutchinson trace the IWAE is "
        "biased (the log-determinant is unbiased, its exponential inside the log-sum-exp is not). Values are "
        "mean ± Monte Carlo standard error; `solver error` is the estimated error of the prior's ODE solve, a separate figure; `k-hat reliable` is the share of documents whose Pareto k-hat is below the threshold "
        f"(not computable, n/a, below K = {KHAT_MIN_SAMPLES}).\n\n"
        f"Where the bound goes: distortion {dec['distortion_nats_per_token']:.4f} and rate "
        f"{dec['rate_nats_per_token']:.4f} nats/token; I_q(X;Z) = {dec['mutual_information']:.3f} ± "
        f"{dec['mutual_information_se']:.3f} and KL(q_bar || p_psi) = {dec['marginal_kl']:.3f} ± {dec['marginal_kl_se']:.3f} "
        f"nats/sequence on the first {dec['window_blocks']} blocks; {dec['active_units']} of {dec['channels']} channels active.\n\n"
        + cloze_table(cloze) +
        "Files: `scores_*.nc` (one row per document), `cloze.jsonl` and `cloze.nc` (the cloze task and its evaluation), `report/summary.md` (every diagnostic and how to read it), "
        "`report/*.png`, `report/*.nc`, `demo.json` (settings).\n"
    )
