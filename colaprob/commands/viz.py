"""``colaprob viz``: the figure of a diagnostics file, as PNG, PDF or SVG.

Takes a NetCDF file written by ``colaprob decompose``, ``colaprob probe``, ``colaprob eval``
(the per-task comparison of accuracy by likelihood and by generation) or a report folder
(``decomposition``, ``probes``, ``probe_summary``, ``information_curve``, ``embedding``,
``density_slice``) and draws it with ``colaprob.diagnostics.plots``; the
file's ``diagnostic`` attribute says which figure. Token ids are labelled with the text of
the model named in the file (or ``--model``).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from colaprob import results
from colaprob.commands import options, output
from colaprob.errors import ColaprobError

HELP = "draw the figure of a diagnostics NetCDF file (decompose, probe, report) as PNG, PDF or SVG"
FORMATS = ("png", "pdf", "svg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE.nc", help="a NetCDF file from decompose, probe, eval or a report folder")
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="figure path (default: FILE with the format's suffix, or FILE_sequence<k>.<suffix> for probes)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="png (raster, --dpi), pdf or svg (vector) (default: the suffix of --output if it is one of these, else png)",
    )
    parser.add_argument("--sequence", type=options.non_negative_int, default=0, help="probes: the sequence to draw (default: 0)")
    parser.add_argument("--model", default=None, help="label tokens with this model's tokenizer (default: the model named in the file)")
    parser.add_argument("--no-labels", action="store_true", help="label tokens by id; load no model")
    parser.add_argument("--dpi", type=options.positive_int, default=110, help="resolution of a PNG (default: 110)")
    parser.add_argument("--json", action="store_true", help="print the written paths as JSON")


def run(args: argparse.Namespace) -> int:
    ds = results.read_dataset(args.file)
    kind = ds.attrs.get("diagnostic") or _guess(ds)
    # The file's own model at the snapshot it was scored with; --model as given.
    label = None if args.no_labels else token_label(args.model or ds.attrs.get("model"), None if args.model else ds.attrs.get("model_revision"))
    figures = draw(kind, ds, args.sequence, label)
    suffix_format = args.output.suffix.lower().lstrip(".") if args.output is not None else ""
    fmt = args.format or (suffix_format if suffix_format in FORMATS else "png")
    written = []
    for suffix, figure in figures.items():
        path = args.output if args.output is not None and len(figures) == 1 else args.file.with_name(f"{args.file.stem}{suffix}.{fmt}")
        results.check_writable(path)
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, dpi=args.dpi)
        written.append(str(results.write_bytes(buffer.getvalue(), path)))
    if args.json:
        output.print_json({"diagnostic": kind, "figures": written})
    else:
        print("\n".join(f"wrote {path}" for path in written))
    return 0


def draw(kind: str, ds, sequence: int, label) -> dict:
    """``{file-name suffix: figure}`` for a dataset of diagnostic ``kind``."""
    from colaprob import tasks
    from colaprob.diagnostics import plots

    if kind == "probes":
        if sequence >= ds.sizes["sequence"]:
            raise ColaprobError(f"--sequence {sequence} is out of range; the file holds {ds.sizes['sequence']} sequences.")
        figures = {f"_sequence{sequence}": plots.plot_probes(ds, sequence, token_label=label)}
        if "count" in ds:  # the summary that colaprob probe stores with the probes
            figures["_summary"] = plots.plot_probe_summary(ds)
        return figures
    drawers = {
        "decomposition": plots.plot_decomposition,
        "probe_summary": plots.plot_probe_summary,
        "information_curve": plots.plot_information_curve,
        "embedding": lambda d: plots.plot_embedding(d, token_label=label),
        "density_slice": lambda d: plots.plot_density_slice(d, token_label=label),
        "task_evaluation": lambda d: plots.plot_task_accuracy(tasks.summarise(d)),
    }
    if kind not in drawers:
        raise ColaprobError(
            f"no figure for this file (diagnostic {kind!r}); viz draws files of decompose, probe, eval and report "
            f"({', '.join(['probes', *drawers])})."
        )
    return {"": drawers[kind](ds)}


def token_label(model_name: str | None, revision: str | None = None):
    """``token id -> text`` from the model's tokenizer (a Hugging Face name at ``revision``,
    from the local cache), or None (ids) without a model."""
    if not model_name:
        return None
    import colaprob
    from colaprob import hub

    path = hub.resolve(model_name, revision) if hub.is_repo_id(model_name) else model_name
    tokenizer = colaprob.load(path).tokenizer
    return lambda token: tokenizer.decode([token])


def _guess(ds) -> str:
    # Files written before the diagnostic attribute existed: recognise them by a variable.
    markers = {"mutual_information": "decomposition", "decoder_probe": "probes", "log_likelihood": "score"}
    return next((kind for name, kind in markers.items() if name in ds), "unknown")
