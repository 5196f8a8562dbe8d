"""The calibration in pictures: per-layer evidence with the calibrated bands shaded beside the paper's defaults
(a figure), and the report section that shows it with the table of choices (every string escaped).

Input: the evidence JSON of a calibration (`stepscope.calibration.load_calibration`).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ..calibration import contiguous_runs
from ..diagnose.metrics import format_ranges
from .figures import RC, _figure

BAND_COLORS = {"oeb_layers": "#6a4c93", "smi_layers": "#e07a1f"}
PANELS = {"oeb_layers": ("OEB: lock-in index (locality - question_reach)", "above the trace's median layer"),
          "smi_layers": ("SMI: summary_to_thinking", "below the trace's median layer")}


def _band_span(ax: Any, layers: list[int], **kw: Any) -> None:
    for run in contiguous_runs(layers):
        ax.axvspan(run[0] - 0.5, run[-1] + 0.5, **kw)


def calibration_figure(cal: dict) -> Figure:
    """Two panels (OEB, SMI): per candidate layer, the mean over traces of the layer's value minus the same
    trace's median layer; filled markers where the layer stands out; the calibrated band shaded, the paper's
    default band hatched."""
    L = int(cal["num_layers"])
    with matplotlib.rc_context(RC):
        fig = _figure(9.0, 3.0)
        axes = fig.subplots(1, 2)
        for ax, name in zip(axes, ("oeb_layers", "smi_layers")):
            c = cal["choices"][name]
            color = BAND_COLORS[name]
            _band_span(ax, c["value"], facecolor=color, alpha=0.18, lw=0)
            _band_span(ax, c["default"], hatch="///", edgecolor="#777777", fill=False, lw=0.6)
            rows = c["per_layer"]
            x = np.array([r["layer"] for r in rows], dtype=np.float64)
            y = np.array([np.nan if r["difference"] is None else r["difference"] for r in rows], dtype=np.float64)
            hit = np.array([bool(r["stands_out"]) for r in rows], dtype=bool)
            ax.axhline(0.0, color="black", lw=0.6)
            ax.plot(x, y, color=color, lw=1.2)
            ax.plot(x[hit], y[hit], ls="", marker="o", ms=5, color=color, label="stands out (q_bh, d_z)")
            ax.plot(x[~hit], y[~hit], ls="", marker="o", ms=4, mfc="white", mec=color, label="does not")
            title, what = PANELS[name]
            ax.set_title(f"{title}\ncalibrated {_text(c['value'])} ({c['source']}), paper {_text(c['default'])}",
                         parse_math=False)
            ax.set_xlabel("layer")
            ax.set_ylabel(f"mean difference, {what.split()[0]} = failure")
            ax.set_xlim(-0.5, L - 0.5)
        axes[0].legend(loc="best", fontsize=7, frameon=False)
    return fig


def _text(layers: list[int]) -> str:
    return format_ranges(sorted(layers)) or "none"


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def calibration_section(cal: dict) -> str:
    """HTML of the calibration: the figure (an embedded PNG), the table of choices beside the paper's defaults,
    and the decision rules. Every value from the file is escaped."""
    e = html.escape
    t = cal["traces"]
    png = base64.b64encode(figure_png(calibration_figure(cal))).decode("ascii")
    out = [f"<p>StepFlow calibrated for {e(str(cal.get('model')))} ({int(cal['num_layers'])} layers) from "
           f"{int(t['n'])} traces ({int(t['correct'])} correct, {int(t['wrong'])} wrong, {int(t['unlabelled'])} "
           "unlabelled). Shaded: the calibrated band; hatched: the paper's default band.</p>",
           f'<img alt="per-layer calibration evidence" style="max-width:100%" src="data:image/png;base64,{png}">',
           "<table><thead><tr><th>knob</th><th>calibrated</th><th>paper default</th><th>source</th>"
           "<th>evidence</th></tr></thead><tbody>"]
    for name in ("oeb_layers", "smi_layers", "tau_max", "alpha"):
        c = cal["choices"][name]
        show = _text if name.endswith("layers") else (lambda v: f"{v:g}")
        out.append(f"<tr><td>{e(name)}</td><td>{e(show(c['value']))}</td><td>{e(show(c['default']))}</td>"
                   f"<td>{e(str(c['source']))}</td><td>{e(str(c['reason']))}</td></tr>")
    out.append("</tbody></table><p>Rules:</p><ul>")
    out += [f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in cal.get("rules", {}).items()]
    out.append(f"</ul><p>{e(str(cal.get('note', '')))}</p>")
    return "".join(out)
