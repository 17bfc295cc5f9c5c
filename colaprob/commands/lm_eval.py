"""``colaprob lm-eval``: lm-evaluation-harness tasks on a colaprob model.

The harness's own command line builds models from its registry by name and cannot load a
third-party one, so this command builds the ``colaprob.lm_eval.ColaprobLM`` instance itself
and runs the installed 0.4.x harness through its Python API (``lm_eval.simple_evaluate``).
Tasks are the harness's, or task YAML files under ``--include-path`` (for example a task
over local JSON files: ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).

The result file is the harness's results (metrics per task with their standard errors) and,
per task, every document's requests with colaprob's answers (``resps``), as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from colaprob.commands import options, output
from colaprob.errors import ColaprobError

HELP = "run lm-evaluation-harness tasks (multiple choice, rolling perplexity, generation) on a colaprob model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", required=True, help="comma-separated task names (the harness's, or of YAML files under --include-path)")
    parser.add_argument(
        "--model-args",
        default="",
        help="comma-separated k=v model arguments of colaprob.lm_eval.Settings, e.g. model=tiny,samples=16,seed=0,"
        "method=euler,steps=8,trace=hutchinson,n_probes=2 (default: the embedded model, K=16, dopri5)",
    )
    parser.add_argument("--include-path", type=Path, default=None, help="folder of extra task YAML files")
    parser.add_argument("--num-fewshot", type=options.non_negative_int, default=None, help="few-shot examples per item (default: the task's)")
    parser.add_argument("--limit", type=options.positive_int, default=None, help="at most this many documents per task (for a quick look)")
    parser.add_argument("-o", "--output", type=Path, default=Path("lm_eval.json"), help="result file, JSON (default: lm_eval.json)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of the table")
    options.add_threads_option(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import simple_parse_args_string

        from colaprob.lm_eval import ColaprobLM, Settings
    except ModuleNotFoundError as err:
        raise ColaprobError(f"colaprob lm-eval needs lm-evaluation-harness ({err.name} is missing): pip install 'colaprob[lm-eval]'.") from None
    if args.include_path is not None and not args.include_path.is_dir():
        raise ColaprobError(f"--include-path {args.include_path} is not a folder.")
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not tasks:
        raise ColaprobError("--tasks names no task; give one or more, comma-separated.")
    try:
        arguments = simple_parse_args_string(args.model_args)
        Settings.from_arguments(arguments)  # checked before the slow task index is read
    except (TypeError, ValueError) as err:
        raise ColaprobError(f"--model-args: {err}.") from None
    manager = task_manager(TaskManager, tasks, args.include_path)
    model = ColaprobLM(**arguments)
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot, limit=args.limit, log_samples=True
    )
    record = {
        "colaprob_settings": dataclasses.asdict(model.settings),
        "results": results["results"],
        "samples": {task: [_sample(s) for s in samples] for task, samples in results.get("samples", {}).items()},
    }
    args.output.write_text(json.dumps(record, indent=1, default=str))
    if args.json:
        output.print_json({"results": results["results"], "output": str(args.output)})
        return 0
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and name != "alias":
                stderr = metrics.get(key.replace(name, f"{name}_stderr", 1))
                rows.append({"task": task, "metric": name, "value": float(value), "stderr": _number(stderr)})
    output.print_table(rows, [("task", "task"), ("metric", "metric"), ("value", "value"), ("stderr", "± stderr")])
    print(f"results: {args.output}")
    return 0


def task_manager(TaskManager, tasks: list[str], include_path):
    """The harness's task index: of ``include_path`` alone when it holds every task asked
    for (reading the harness's thousands of task files takes tens of seconds), else of
    both. Refuses a task name found in neither."""
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise ColaprobError(f"unknown task(s) {', '.join(unknown)}; check the names or point --include-path at their YAML files.")
    return manager


def _sample(sample: dict) -> dict:
    """One document's record: its index, the requests' arguments and colaprob's answers."""
    return {"doc_id": sample.get("doc_id"), "arguments": sample.get("arguments"), "resps": sample.get("resps"), "target": sample.get("target")}


def _number(value):
    return float(value) if isinstance(value, (int, float)) else None
