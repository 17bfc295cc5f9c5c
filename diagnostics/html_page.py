"""A report folder's ``index.html``: one self-contained page (no scripts, no network, no
files beside it) with the summary, its tables and every figure embedded as a base64 PNG.

The summary is the markdown of ``reporting.summary_markdown``; ``markdown_to_html`` renders
the part of markdown it uses -- ``#``/``##`` headings, pipe tables, ``-`` lists, paragraphs,
inline code -- with every piece of text HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import re

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f2f2f2; }
figure { margin: 2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def page(summary_markdown: str, figures: dict[str, bytes], title: str) -> str:
    """The HTML page: ``summary_markdown`` rendered, then ``figures`` (name -> PNG bytes)."""
    shown = "\n".join(
        f'<figure id="{html.escape(name)}"><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        f"<figcaption>{html.escape(name)}.png</figcaption></figure>"
        for name, png in figures.items()
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"{markdown_to_html(summary_markdown)}\n<h2>Figures</h2>\n{shown}\n</body>\n</html>\n"
    )


def markdown_to_html(text: str) -> str:
    """The markdown subset of the summary as HTML (module docstring)."""
    out, table, items, paragraph = [], [], [], []

    def flush():
        if table:
            head, *rows = [row for row in table if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", row)]
            out.append("<table><thead>" + _row(head, "th") + "</thead><tbody>" + "".join(_row(r, "td") for r in rows) + "</tbody></table>")
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if paragraph:
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    for line in text.splitlines():
        stripped = line.strip()
        kind = "table" if stripped.startswith("|") else "item" if stripped.startswith("- ") else "text"
        if not stripped or stripped.startswith("#") or (table and kind != "table") or (items and kind != "item"):
            flush()
        if not stripped:
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", stripped)
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif kind == "table":
            table.append(stripped)
        elif kind == "item":
            items.append(stripped[2:])
        else:
            paragraph.append(stripped)
    flush()
    return "\n".join(out)


def _row(line: str, cell: str) -> str:
    # Cells split at pipes that are not escaped (the summary writes \| inside a cell).
    cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
    return "<tr>" + "".join(f"<{cell}>{_inline(c.strip())}</{cell}>" for c in cells) + "</tr>"


def _inline(text: str) -> str:
    text = html.escape(text.replace("\\|", "|"), quote=False)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
