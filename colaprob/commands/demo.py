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
import hashlib
import json
from pathlib import Path

from colaprob import distributed, results, runner
from colaprob.commands import _shared, score
from colaprob.errors import ColaprobError
from colaprob.estimators.statistics import KHAT_MIN_SAMPLES

HELP = "the tour on the embedded model: score held-out text (ELBO, IWAE), diagnose, write a report folder"

MANIFEST = "demo.json"
# (file name, estimator): the rows of the headline table.
ESTIMATES = (("elbo", "elbo"), ("iwae", "iwae"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _shared.add_model_options(parser)
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("colaprob-demo"), help="report folder (default: ./colaprob-demo)")
    parser.add_argument("--sequences", type=_shared.positive_int, default=4, help="held-out documents to score (default: 4)")
    parser.add_argument("--max-bytes", type=_shared.positive_int, default=63, help="longest held-out piece in UTF-8 bytes (default: 63)")
    parser.add_argument("--elbo-samples", type=_shared.positive_int, default=2, help="posterior samples of the exact-trace ELBO (default: 2)")
    parser.add_argument(
        "-K",
        "--samples",
        type=_shared.positive_int,
        default=32,
        help=f"posterior samples of the IWAE row; its k-hat needs at least {KHAT_MIN_SAMPLES} (default: 32)",
    )
    parser.add_argument(
        "--diagnostic-samples", type=_shared.positive_int, default=8, help="posterior samples for the decomposition and the probes (default: 8)"
    )
    parser.add_argument("--prior-samples", type=_shared.positive_int, default=8, help="prior draws per block for the probes (default: 8)")
    parser.add_argument("--batch-size", type=_shared.positive_int, default=4, help="documents per scoring batch (default: 4)")
    parser.add_argument("--cloze-items", type=_shared.positive_int, default=8, help="items of the held-out cloze task (default: 8)")
    parser.add_argument("--cloze-samples", type=_shared.positive_int, default=4, help="posterior samples per cloze item, shared by its choices (default: 4)")
    # Loose tolerances and the Hutchinson trace keep the tour to minutes on a CPU; the ELBO row
    # always uses the exact trace (see the README on choosing estimator settings).
    _shared.add_cnf_options(parser, default_trace="hutchinson", default_tolerance=1e-3)
    parser.add_argument("--overwrite", action="store_true", help="start over in a folder made with other settings")
    parser.add_argument("--seed", type=_shared.non_negative_int, default=0, help="random seed, a non-negative integer (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the headline numbers as JSON instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    cnf_options = _shared.cnf_options(args)
    ctx = distributed.from_environment(args.device)
    try:
        out = args.output_dir
        model, identity = _shared.load_model(args.model, ctx.device, args.revision, args.download)
        corpus = heldout_subset(args.sequences, args.max_bytes)
        settings = {**identity, "sequences": args.sequences, "max_bytes": args.max_bytes, "K": args.samples, "elbo_K": args.elbo_samples, "diagnostic_K": args.diagnostic_samples,
                    "n_prior": args.prior_samples, "batch_size": args.batch_size, "cloze_items": args.cloze_items, "cloze_K": args.cloze_samples, "trace": args.trace,
                    **cnf_options, "seed": args.seed, "device_type": ctx.device.type}
        if ctx.is_main:
            claim_folder(out, settings, args.overwrite)
            write_corpus(out / "heldout.jsonl", corpus)
        ctx.barrier()
        scores = {name: score_corpus(args, ctx, out, name, estimator) for name, estimator in ESTIMATES}
        cloze = evaluate_cloze(args, ctx, out, model)
        if ctx.is_main:
            rows = _shared.cut_rows(model, [(doc, "heldout.jsonl") for doc in corpus], split=True)
            diagnostics = diagnose(model, args, out, [row.document.text for row in rows], cnf_options)
            headline = headline_rows(scores)
            results.write_text(readme(headline, diagnostics, cloze, args), out / "README.md")
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


def score_corpus(args, ctx, out: Path, name: str, estimator: str):
    """``colaprob score heldout.jsonl --split --estimator E ...`` into ``scores_<name>.nc``: the
    ELBO with the exact trace and ``--elbo-samples``, IWAE with ``--trace`` and ``-K``; without
    the solver-error solve (``--no-solver-error``), which would multiply the tour's time."""
    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    trace, samples = ("exact", args.elbo_samples) if estimator == "elbo" else (args.trace, args.samples)
    options = ["--model", args.model, "--estimator", estimator, "--trace", trace, "-K", samples,
               "--batch-size", args.batch_size, "--seed", args.seed, "--method", args.method, "--probes", args.probes,
               "-o", out / f"scores_{name}.nc", *(["--steps", args.steps] if args.steps else ["--rtol", args.rtol, "--atol", args.atol]),
               "--split", "--no-solver-error", *(["--overwrite"] if args.overwrite else []), *(["--quiet"] if args.quiet else [])]
    score_args = parser.parse_args([str(out / "heldout.jsonl"), *map(str, options)])
    job = score.prepare(score_args, ctx)
    return runner.run(job.plan, job.score_batch, score_args.output, finish=score.finish, ctx=ctx,
                      overwrite=args.overwrite, progress=not args.quiet, desc=f"scoring ({name})")


CLOZE = "cloze.jsonl"


def evaluate_cloze(args, ctx, out: Path, model):
    """``colaprob eval cloze.jsonl`` into ``cloze.nc`` with the IWAE row's solver settings and
    ``--cloze-samples``; the file
    (the task and the model's generations) is written once, by rank 0."""
    from colaprob.commands import eval as eval_command

    if ctx.is_main and not (out / CLOZE).exists():
        write_cloze(model, out / CLOZE, args.cloze_items, args.seed)
    ctx.barrier()
    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    options = ["--model", args.model, "--task", "embedded_cloze", "--trace", args.trace, "-K", args.cloze_samples, "--seed", args.seed,
               "--method", args.method, "--probes", args.probes, "-o", out / "cloze.nc",
               *(["--steps", args.steps] if args.steps else ["--rtol", args.rtol, "--atol", args.atol]),
               *(["--overwrite"] if args.overwrite else []), *(["--quiet"] if args.quiet else [])]
    eval_args = parser.parse_args([str(out / CLOZE), *map(str, options)])
    job = eval_command.prepare(eval_args, ctx)
    return runner.run(job.plan, job.score_batch, eval_args.output, finish=job.finish, ctx=ctx, overwrite=args.overwrite, progress=not args.quiet, desc="cloze")


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


def diagnose(model, args, out: Path, texts: list[str], cnf_options: dict) -> dict:
    """``colaprob.diagnostics.report`` into ``report/``, unless a finished one is there."""
    from colaprob.diagnostics import report

    folder = out / "report"
    names = ("decomposition", "probes", "probe_summary", "information_curve", "embedding", "density_slice")
    if (folder / "summary.md").exists():
        return {name: results.read_dataset(folder / f"{name}.nc") for name in names}
    batch = model.frame(texts)
    options = {
        "decomposition": {"n_samples": args.diagnostic_samples, "trace": args.trace, "cnf_options": cnf_options},
        "probes": {"n_posterior": args.diagnostic_samples, "n_prior": args.prior_samples, "trace": args.trace, "cnf_options": cnf_options},
        "density_slice": {"trace": args.trace, "cnf_options": cnf_options},
    }
    tokenizer = model.tokenizer
    return report(model, batch, folder, model_name=args.model, token_label=lambda t: tokenizer.decode([t]), seed=args.seed, options=options, progress=not args.quiet)


def headline_rows(scores: dict) -> list[dict]:
    rows = []
    for name, ds in scores.items():
        row = score.summary(ds, "")
        row["estimator"] = score.short_name(ds) + (" (Hutchinson)" if ds.attrs.get("trace") == "hutchinson" else " (exact trace)")
        rows.append(row)
    return rows


COLUMNS = [("estimator", "estimator"), ("nats_per_token", "nats/token"), ("bits_per_byte", "bits/byte"),
           ("token_perplexity", "token ppl"), ("solver_error", "solver error nats/token"), ("reliable_fraction", "k-hat reliable")]


def _table_rows(headline: list[dict]) -> list[dict]:
    return [{**row, **{k: _shared.plus_minus(row[k], row[f"{k}_se"]) for k in ("nats_per_token", "bits_per_byte", "token_perplexity")},
             **({"reliable_fraction": score.khat_cell(row)} if "reliable_fraction" in row else {}),
             **({"solver_error": f"{row['nats_per_token_solver_error']:.1e}"} if "nats_per_token_solver_error" in row else {})}
            for row in headline]


def cloze_row(cloze) -> dict:
    """The cloze task's line of ``colaprob eval``'s summary."""
    from colaprob.commands import eval as eval_command

    return eval_command.summary(cloze)["embedded_cloze"]


CLOZE_COLUMNS = [("items", "cloze items"), ("acc", "acc (likelihood)"), ("acc_norm", "acc_norm"), ("gen_acc", "acc (generation)"),
                 ("disagree", "disagree"), ("prefers_generation", "log p prefers own generation")]


def _cloze_cells(row: dict) -> dict:
    cell = lambda key: "-" if not row[f"{key}_items"] else _shared.plus_minus(row[key], row[f"{key}_se"])
    return {"items": row["items"], **{key: cell(key) for key, _ in CLOZE_COLUMNS[1:]}}


def show(headline: list[dict], diagnostics: dict, cloze, args) -> None:
    from colaprob.commands import decompose

    dec = decompose.summary(diagnostics["decomposition"])
    if args.json:
        _shared.print_json({"scores": headline, "decomposition": dec, "cloze": cloze_row(cloze), "output_dir": str(args.output_dir)})
        return
    print(f"{headline[0]['sequences']} held-out documents, {headline[0]['tokens']} tokens, model {args.model}")
    _shared.print_table(_table_rows(headline), COLUMNS)
    print(
        f"bound: distortion {dec['distortion_nats_per_token']:.4f} + rate {dec['rate_nats_per_token']:.4f} nats/token; "
        f"I_q(X;Z) {dec['mutual_information']:.3f}, KL(q_bar||p) {dec['marginal_kl']:.3f} nats/sequence; "
        f"active units {dec['active_units']}/{dec['channels']}"
    )
    print("held-out cloze (4 choices, chance 0.25): accuracy by likelihood beside accuracy of the model's own generation")
    _shared.print_table([_cloze_cells(cloze_row(cloze))], CLOZE_COLUMNS)
    print(f"report: {args.output_dir / 'README.md'} (figures and NetCDF in {args.output_dir / 'report'})")


def readme(headline: list[dict], diagnostics: dict, cloze, args) -> str:
    from colaprob.commands import decompose

    dec = decompose.summary(diagnostics["decomposition"])
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(_shared.format_cell(row.get(k)) for k, _ in COLUMNS) + " |\n" for row in _table_rows(headline))
    return (
        f"# colaprob demo: {args.model}\n\n"
        f"{headline[0]['sequences']} held-out documents of the embedded corpus (`heldout.jsonl`), "
        f"{headline[0]['tokens']} counted tokens, ELBO K = {args.elbo_samples}, IWAE K = {args.samples}, "
        f"ODE {args.method} at rtol {args.rtol:g} / atol {args.atol:g}, seed {args.seed}.\n\n"
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
