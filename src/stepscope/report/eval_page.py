"""An evaluation run's HTML page (summary.html): what summary.md says, as HTML, with the gain-by-chain-length
figure (inline SVG) under its table; one file, no script, no network.

Safety: every string (model names, arm names, benchmark sources) is escaped with `html.escape`; the figure is
matplotlib's SVG, whose text matplotlib escapes; the Content-Security-Policy runs no script and loads nothing.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
figure { margin: 0.6em 0; } figure svg { max-width: 100%; height: auto; }
p { max-width: 60em; }
"""
FIGURE_SECTION = "Gain by chain length"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(rows: list[str]) -> str:
    """A Markdown pipe table (header, separator, rows) as an HTML table, every cell escaped."""
    head, body = _cells(rows[0]), [_cells(r) for r in rows[2:]]
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out) + "\n</tbody></table>"


def markdown_to_html(text: str, figures: dict[str, str] | None = None) -> str:
    """The summary's Markdown (headings, pipe tables, paragraphs) as HTML; `figures` maps a "## " heading to
    markup placed after that section's first table."""
    figures = figures or {}
    out: list[str] = []
    lines = text.splitlines()
    i, section, placed = 0, "", set()
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            if section in figures and section not in placed:
                out.append(f"<figure>{figures[section]}</figure>")
                placed.add(section)
            i = j
            continue
        if line.startswith("## "):
            section = line[3:].strip()
            out.append(f"<h2>{html.escape(section)}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:].strip())}</h1>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out)


def _inline_svg(svg: str) -> str:
    """The <svg> element of a standalone SVG document (its XML declaration and DOCTYPE dropped)."""
    return svg[svg.index("<svg"):]


def eval_page_html(summary: dict, markdown_text: str) -> str:
    """The page of one run: `markdown_text` (summary.md) as HTML, the gain-by-length figure where it applies."""
    from ..evaluate.summary import arm_label

    figures = {}
    sec = summary.get("chain_length") or {}
    if sec.get("available") and sec.get("trend") and any(b["n_problems"] for b in sec["bins"]):
        from .figures import gain_by_length_figure, svg_text

        labels = {a: arm_label(a) for a in summary.get("arms", {})}
        figures[FIGURE_SECTION] = _inline_svg(svg_text(gain_by_length_figure(sec, labels)))
    title = html.escape(markdown_text.splitlines()[0].lstrip("# ").strip() if markdown_text else "stepscope eval")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{html.escape(CSP, quote=True)}">\n'
            f"<title>{title}</title><style>{STYLE}</style></head>\n<body>\n"
            f"{markdown_to_html(markdown_text, figures)}\n</body></html>\n")


def write_eval_page(path: str | os.PathLike, summary: dict, markdown_text: str) -> Path:
    """Write the page (temporary file, then rename); returns its path."""
    from ..io import atomic_write_text

    out = Path(path)
    atomic_write_text(out, eval_page_html(summary, markdown_text))
    return out
