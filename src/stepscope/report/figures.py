"""Matplotlib figures: per-layer step heatmaps (log colour scale, segment boundaries), layer grids,
metric-versus-depth curves (correct versus wrong, with interval bands), an evaluation's gain by chain length;
saved as PNG, SVG or both.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot, no global state, Agg canvas), so they
work headless and in threads. Titles never go through mathtext (`$` in a trace id stays a dollar sign).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator, ScalarFormatter

from ..diagnose import BAD_DIRECTION, METRICS, SCORES, Comparison, Diagnosis, layer_groups
from ..io import atomic_write_bytes
from ..layers import layer_bands

KIND_COLORS = {"question": "#6a4c93", "thinking": "#1982c4", "summary": "#e07a1f"}
GROUP_COLORS = {"correct": "#2a9d8f", "wrong": "#d62828"}
# axes.titley fixed: a title's automatic placement measures every tick label of its axes at each draw
RC = {"svg.hashsalt": "stepscope", "font.size": 8, "axes.titlesize": 9, "axes.titley": 1.0}
FIGURE_FORMATS = ("png", "svg")
_BOUNDARY = "#ffffff"


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _axes_at(fig: Figure, left: float, bottom: float, width: float, height: float) -> Any:
    """An axes at a fixed place, in inches from the figure's lower left corner. Figures of many panels are laid
    out this way, not by constrained layout: measuring every label of every panel cost more than drawing them."""
    W, H = fig.get_size_inches()
    return fig.add_axes((left / W, bottom / H, width / W, height / H))


# room around a step map panel's square, in inches: step numbers, segment letters and axis names on the left and
# below, the title above, the colour bar and its decade labels to the right
_MAP_LEFT, _MAP_BOTTOM, _MAP_TOP, _BAR_PAD, _BAR, _BAR_RIGHT = 0.62, 0.5, 0.26, 0.07, 0.1, 0.62


def _step_map_axes(fig: Figure, x0: float, y0: float, width: float, height: float,
                   colorbar: bool) -> tuple[Any, Any]:
    """The axes of one step map panel filling the box (x0, y0, width, height) (inches), and of its colour bar
    (None without one)."""
    right = _BAR_PAD + _BAR + _BAR_RIGHT if colorbar else 0.1
    side = max(0.5, min(width - _MAP_LEFT - right, height - _MAP_BOTTOM - _MAP_TOP))
    bottom = y0 + _MAP_BOTTOM + (height - _MAP_BOTTOM - _MAP_TOP - side) / 2
    ax = _axes_at(fig, x0 + _MAP_LEFT, bottom, side, side)
    cax = _axes_at(fig, x0 + _MAP_LEFT + side + _BAR_PAD, bottom, _BAR, side) if colorbar else None
    return ax, cax


def log_norm(values: np.ndarray, decades: float = 6.0) -> LogNorm:
    """A log colour scale from the largest value down `decades` decades (or to the smallest positive value)."""
    pos = values[values > 0]
    if pos.size == 0:
        return LogNorm(vmin=1e-12, vmax=1.0)
    vmax = float(pos.max())
    return LogNorm(vmin=max(float(pos.min()), vmax * 10.0 ** -decades), vmax=vmax)


def step_ticks(num_steps: int, max_ticks: int = 8) -> list[int]:
    """The step numbers a step map's axes label: 0, d, 2d, ... below `num_steps`, with d the smallest of 1, 2, 5,
    10, 20, 50, ... that gives at most `max_ticks` of them (the figures and the HTML report use the same)."""
    k = 0
    while True:
        for m in (1, 2, 5):
            d = m * 10 ** k
            if -(-num_steps // d) <= max_ticks:
                return list(range(0, num_steps, d))
        k += 1


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def decade_label(v: float, _pos: Any = None) -> str:
    """A colour-bar value as plain text (10\u207b\u00b3, 2\u00d710\u207b\u2075, 1): no mathtext, whose layout made
    every log colour bar, and so every figure, slow."""
    if not v > 0:
        return "0"
    k = int(np.floor(np.log10(v) + 1e-9))
    m = round(v / 10.0 ** k, 6)
    power = "" if k == 0 else "10" if k == 1 else "10" + str(k).translate(_SUPERSCRIPT)
    if m == 1:
        return power or "1"
    return f"{m:g}" + ("\u00d7" + power if power else "")


def _log_colorbar(ax: Any, im: Any, label: str | None, cax: Any = None) -> Any:
    """A colour bar for a log-scaled image (in `cax`, else beside `ax`): ticks at decades (1, 2, 5 when it spans
    less than one), no minor ticks."""
    if cax is not None:
        cb = ax.figure.colorbar(im, cax=cax, label=label)
    else:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label=label)
    norm = im.norm
    one_decade = np.log10(norm.vmax / norm.vmin) < 1
    cb.ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if one_decade else (1.0,)))
    cb.ax.yaxis.set_minor_locator(NullLocator())
    cb.ax.yaxis.set_major_formatter(FuncFormatter(decade_label))
    return cb


def boundaries(step_kinds: Sequence[str]) -> list[int]:
    """Step indices where a new segment starts (question -> thinking, thinking -> summary)."""
    return [i for i in range(1, len(step_kinds)) if step_kinds[i] != step_kinds[i - 1]]


def row_normalize(m: np.ndarray) -> np.ndarray:
    """N[i, :] = M[i, :] / sum_j M[i, j] (rows summing to 0 stay 0). m: [..., S, S]."""
    s = m.sum(axis=-1, keepdims=True)
    return np.divide(m, s, out=np.zeros_like(m, dtype=np.float64), where=s > 0)


def plot_step_map(ax: Any, m: np.ndarray, step_kinds: Sequence[str], *, title: str | None = None,
                  norm: LogNorm | None = None, colorbar: bool = True, normalize_rows: bool = False,
                  labels: tuple[bool, bool, bool] = (True, True, True), cax: Any = None) -> Any:
    """Draw one layer's step map [S, S] on `ax`: log colour scale, zero cells blank, segment boundaries, step
    numbers on both axes and each segment's letter beyond them. `labels`: whether to name the x axis, the y axis
    and the colour bar (a grid names only its outer panels); `cax`: the colour bar's axes (default: taken from
    `ax`)."""
    m = np.asarray(m, dtype=np.float64)
    if normalize_rows:
        m = row_normalize(m)
    norm = norm or log_norm(m)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#f0f0f0", under="#30123b")
    im = ax.imshow(np.ma.masked_less_equal(m, 0.0), cmap=cmap, norm=norm, interpolation="nearest",
                   aspect="equal")
    for b in boundaries(step_kinds):
        ax.axhline(b - 0.5, color=_BOUNDARY, lw=0.9)
        ax.axvline(b - 0.5, color=_BOUNDARY, lw=0.9)
        ax.axhline(b - 0.5, color="black", lw=0.3, ls=":")
        ax.axvline(b - 0.5, color="black", lw=0.3, ls=":")
    letter_pad = _step_axes(ax, step_kinds)
    if labels[0]:
        ax.set_xlabel("key step j", labelpad=_NUMBER_PAD + 20)
    if labels[1]:
        ax.set_ylabel("query step i", labelpad=letter_pad + 8)
    if title:
        ax.set_title(title, parse_math=False)
    if colorbar:
        _log_colorbar(ax, im, ("N[i, j]" if normalize_rows else "M[i, j]") if labels[2] else None, cax)
    return im


_NUMBER_PAD = 3.0  # points between an axis and its step numbers


def _step_axes(ax: Any, step_kinds: Sequence[str]) -> float:
    """A step map's axes: step numbers with tick marks, and each segment's letter at its middle one row further
    out (coloured by kind). Drawn as a few texts and one marker line per axis, not as matplotlib ticks: ticks
    (five artists each, made again at every draw) were most of a grid figure's time. Returns the points between
    the y axis and its letters (beyond the widest step number)."""
    from matplotlib.transforms import blended_transform_factory as blend

    ax.set_xticks([])
    ax.set_yticks([])
    ticks = step_ticks(len(step_kinds))
    edges = [0, *boundaries(step_kinds), len(step_kinds)]
    mids = [(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])]
    letters = [(m, step_kinds[a]) for m, a in zip(mids, edges[:-1])]
    xt, yt = blend(ax.transData, ax.transAxes), blend(ax.transAxes, ax.transData)
    ax.plot(ticks, [0] * len(ticks), ls="", marker=3, ms=2, mew=0.6, color="black", transform=xt, clip_on=False)
    ax.plot([0] * len(ticks), ticks, ls="", marker=0, ms=2, mew=0.6, color="black", transform=yt, clip_on=False)
    for t in ticks:
        ax.annotate(str(t), (t, 0), xycoords=xt, xytext=(0, -_NUMBER_PAD), textcoords="offset points",
                    ha="center", va="top", fontsize=6.5, annotation_clip=False)
        ax.annotate(str(t), (0, t), xycoords=yt, xytext=(-_NUMBER_PAD, 0), textcoords="offset points",
                    ha="right", va="center", fontsize=6.5, annotation_clip=False)
    pad = _NUMBER_PAD + 2 + 4.5 * len(str(ticks[-1]))
    for m, kind in letters:
        style = dict(color=KIND_COLORS[kind], fontweight="bold", textcoords="offset points", annotation_clip=False)
        ax.annotate(kind[0].upper(), (m, 0), xycoords=xt, xytext=(0, -_NUMBER_PAD - 9), ha="center", va="top",
                    **style)
        ax.annotate(kind[0].upper(), (0, m), xycoords=yt, xytext=(-pad, 0), ha="right", va="center", **style)
    return pad


def heatmap_figure(maps: Any, step_kinds: Sequence[str], layer: int, *, title: str | None = None,
                   normalize_rows: bool = False) -> Figure:
    """One layer's step map as a figure."""
    maps = _np(maps)
    with matplotlib.rc_context(RC):
        fig = _figure(5.2, 4.4, layout=None)
        ax, cax = _step_map_axes(fig, 0.0, 0.0, 5.2, 4.4, colorbar=True)
        plot_step_map(ax, maps[layer], step_kinds, normalize_rows=normalize_rows,
                      title=title or f"layer {layer} of {maps.shape[0]}", cax=cax)
    return fig


def default_grid_layers(num_layers: int, n: int = 8) -> list[int]:
    """About n layers spread over the depth, always including the first and the last."""
    if num_layers <= n:
        return list(range(num_layers))
    return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, n)})


def layer_grid_figure(maps: Any, step_kinds: Sequence[str], layers: Sequence[int] | None = None, *,
                      ncols: int = 4, normalize_rows: bool = False, shared_scale: bool = False,
                      title: str | None = None, layer_ids: Sequence[int] | None = None,
                      num_model_layers: int | None = None) -> Figure:
    """Step maps of chosen layers side by side (each on its own log scale unless `shared_scale`).

    `layers` are positions in `maps`; `layer_ids` (the model layer of each map, default 0..L-1) and
    `num_model_layers` name them and place them in the shallow/deep bands when only some layers were computed.
    """
    maps = _np(maps)
    L = maps.shape[0]
    layers = list(default_grid_layers(L) if layers is None else layers)
    bad = [x for x in layers if not 0 <= x < L]
    if bad:
        from ..errors import StepscopeError

        raise StepscopeError(f"layer(s) {bad} out of range: the maps have {L} layers")
    ids = list(range(L)) if layer_ids is None else list(layer_ids)
    groups = layer_groups(num_model_layers or (max(ids) + 1), ids)
    ncols = max(1, min(ncols, len(layers)))
    nrows = -(-len(layers) // ncols)
    values = row_normalize(maps[layers]) if normalize_rows else maps[layers]
    shared = log_norm(values) if shared_scale else None
    with matplotlib.rc_context(RC):
        top = 0.3 if title else 0.0
        fig = _figure(3.3 * ncols, 2.9 * nrows + top, layout=None)
        for k, layer in enumerate(layers):
            row, col = divmod(k, ncols)
            ax, cax = _step_map_axes(fig, 3.3 * col, 2.9 * (nrows - 1 - row), 3.3, 2.9, colorbar=not shared_scale)
            band = " (shallow)" if layer in groups["shallow"] else " (deep)" if layer in groups["deep"] else ""
            outer = (k + ncols >= len(layers), col == 0, col == ncols - 1 or k == len(layers) - 1)
            plot_step_map(ax, maps[layer], step_kinds, norm=shared, colorbar=not shared_scale,
                          normalize_rows=normalize_rows, title=f"layer {ids[layer]}{band}", labels=outer, cax=cax)
        if title:
            fig.suptitle(title, parse_math=False, y=1 - 0.06 / fig.get_size_inches()[1], va="top")
    return fig


def _metric_grid(metrics: Sequence[str], ncols: int, suptitle: bool = False) -> tuple[Figure, Any]:
    """A figure with one panel per metric in rows of `ncols` (each 3.4 x 2.4 inches, tick labels and the title
    inside that box; 0.35 inches more on top for a `suptitle`); returns it and the panels' axes (an array)."""
    nrows = -(-len(metrics) // ncols)
    top = 0.35 if suptitle else 0.0
    fig = _figure(3.4 * ncols, 2.4 * nrows + top, layout=None)
    axes = np.empty(len(metrics), dtype=object)
    for k in range(len(metrics)):
        row, col = divmod(k, ncols)
        axes[k] = _axes_at(fig, 3.4 * col + 0.55, 2.4 * (nrows - 1 - row) + 0.4, 3.4 - 0.55 - 0.12, 2.4 - 0.4 - 0.3)
    return fig, axes


def _exponent_as_label(ax: Any) -> None:
    """Put the y axis' common factor (matplotlib's "1e-6" above the axis, where it runs into the panel title) in
    the y label instead; call it once the panel's data are drawn (the factor follows the view limits)."""
    fmt = ax.yaxis.get_major_formatter()
    if not isinstance(fmt, ScalarFormatter):
        return
    fmt.set_locs(ax.yaxis.get_majorticklocs())
    text = fmt.get_offset()
    if text:
        ax.yaxis.get_offset_text().set_visible(False)
        ax.set_ylabel(("\u00d7" + text) if text.startswith("1e") else text, labelpad=1)


def _band_shading(ax: Any, num_model_layers: int) -> None:
    """Shade the shallow and deep quarters of a model's layers (x = model layer index)."""
    bands = layer_bands(num_model_layers)
    ax.axvspan(bands["shallow"][0] - 0.5, bands["shallow"][-1] + 0.5, color="#6a4c93", alpha=0.07, lw=0)
    ax.axvspan(bands["deep"][0] - 0.5, bands["deep"][-1] + 0.5, color="#e07a1f", alpha=0.07, lw=0)


def metric_depth_figure(comparison: Comparison, metrics: Sequence[str] = METRICS, *, alpha: float = 0.05,
                        ncols: int = 3) -> Figure:
    """Metric versus layer, correct versus wrong: group means with their bootstrap interval bands.

    A star marks layers where Welch's Holm-adjusted p < alpha. Shaded: shallow (purple) and deep (orange) bands.
    """
    depth = comparison.num_model_layers or comparison.num_layers
    x = np.array(comparison.layer_ids)
    with matplotlib.rc_context(RC):
        fig, axes = _metric_grid(metrics, ncols, suptitle=True)
        for ax, name in zip(axes.flat, metrics):
            _band_shading(ax, depth)
            for group in ("correct", "wrong"):
                mean, low, high = comparison.curve(name, group)
                n = comparison.groups[group]["n"]
                k = comparison.groups[group].get("n_problems", n)  # the unit of the statistics
                ax.plot(x, mean, color=GROUP_COLORS[group], lw=1.4, marker="o", ms=2,
                        label=f"{group} (n={n})" if k == n else f"{group} ({n} traces, {k} problems)")
                ax.fill_between(x, low, high, color=GROUP_COLORS[group], alpha=0.2, lw=0)
            hits = [r["layer"] for r in comparison.metrics[name]
                    if r["welch"] and r["welch"].get("p_holm") is not None and r["welch"]["p_holm"] < alpha]
            if hits:
                top = ax.get_ylim()[1]
                ax.plot(hits, [top] * len(hits), ls="", marker="*", color="black", ms=5, clip_on=False)
            direction = {1: "high = bad", -1: "low = bad", 0: ""}[BAD_DIRECTION[name]]
            ax.set_title(name + (f"  ({direction})" if direction else ""))
            ax.set_xlabel("layer")
            ax.set_xlim(-0.5, depth - 0.5)
            _exponent_as_label(ax)
        axes.flat[0].legend(loc="best", fontsize=7, frameon=False)
        fig.suptitle(f"correct vs wrong: means with {comparison.settings['level']:.0%} bootstrap intervals; "
                     f"* = Welch p_holm < {alpha:g}", y=1 - 0.08 / fig.get_size_inches()[1], va="top")
    return fig


def scores_figure(comparison: Comparison, scores: Sequence[str] = SCORES) -> Figure:
    """Per-trace scores by group (dots) with the group mean and its interval (bar)."""
    rng = np.random.default_rng(0)
    with matplotlib.rc_context(RC):
        fig = _figure(2.6 * len(scores), 2.6)
        axes = fig.subplots(1, len(scores), squeeze=False)[0]
        for ax, name in zip(axes, scores):
            s = comparison.scores[name]
            for k, group in enumerate(("correct", "wrong")):
                vals = np.array([v for v in s["values"][group] if v is not None], dtype=np.float64)
                ax.scatter(k + rng.uniform(-0.12, 0.12, vals.size), vals, s=9, color=GROUP_COLORS[group], alpha=0.7)
                ci = s[group]
                if ci is not None:
                    ax.plot([k - 0.25, k + 0.25], [ci["estimate"]] * 2, color="black", lw=1.5)
                    if ci["low"] is not None:
                        ax.plot([k, k], [ci["low"], ci["high"]], color="black", lw=1)
            ax.set_xticks([0, 1], ["correct", "wrong"])
            ax.set_xlim(-0.6, 1.6)
            p = s["welch"]["p_value"] if s["welch"] else None
            ax.set_title(name + ("" if p is None else f"\nWelch p={p:.3g}"))
    return fig


ARM_COLORS = ("#1982c4", "#e07a1f", "#6a4c93", "#2a9d8f", "#d62828")


def gain_by_length_figure(section: dict, labels: dict[str, str] | None = None) -> Figure:
    """An evaluation's gain by chain length (the summary's "chain_length" entry, stepscope.evaluate.chain): per
    length bin of the reference arm, each other arm's paired gain in accuracy points with its CI (error bar),
    the bins' length range and problem count below. `labels`: display names of the arms."""
    bins = section["bins"]
    arms = list(section["trend"])
    labels = labels or {}
    with matplotlib.rc_context(RC):
        fig = _figure(max(3.2, 1.1 * len(bins) + 1.4), 2.6)
        ax = fig.subplots()
        ax.axhline(0.0, color="#999999", lw=0.8)
        width = 0.6 / max(1, len(arms))
        for k, arm in enumerate(arms):
            xs, ys, lo, hi = [], [], [], []
            for b in bins:
                c = (b.get("comparisons") or {}).get(arm)
                if not b["n_problems"] or c is None:
                    continue
                xs.append(b["index"] + (k - (len(arms) - 1) / 2) * width)
                ys.append(100 * c["diff"])
                lo.append(100 * (c["diff"] - c["ci_low"]))
                hi.append(100 * (c["ci_high"] - c["diff"]))
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=3, lw=1.2, color=ARM_COLORS[k % len(ARM_COLORS)],
                        label=labels.get(arm, arm))
        ticks = [f"{b['index'] + 1}: " + ("none" if not b["n_problems"] else
                 f"{b['min_length']:,.0f}–{b['max_length']:,.0f}\n{b['n_problems']} problems") for b in bins]
        ax.set_xticks(range(len(bins)), ticks)
        ax.set_xlim(-0.6, len(bins) - 0.4)
        ref = labels.get(section["binned_on"], section["binned_on"])
        ax.set_xlabel(f"bin of {ref}'s thinking {section['unit']}", parse_math=False)
        ax.set_ylabel(f"gain over {ref} (points)", parse_math=False)
        level = next(iter(section["trend"].values()))["level"] if arms else 0.95
        ax.set_title(f"gain by chain length ({level:.0%} CI)", parse_math=False)
        for t in ax.legend(loc="best", frameon=False, fontsize=7).get_texts():
            t.set_parse_math(False)
    return fig


def svg_text(fig: Figure) -> str:
    """The figure as an SVG document (text kept as text), for pages that embed it inline."""
    buf = io.BytesIO()
    with matplotlib.rc_context({**RC, "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue().decode("utf-8")


def diagnosis_depth_figure(diagnoses: Sequence[Diagnosis], metrics: Sequence[str] = METRICS,
                           labels: Sequence[str] | None = None, ncols: int = 3) -> Figure:
    """Metric versus layer for single traces (one line each); with a baseline, flagged layers are circled."""
    depth = diagnoses[0].model_layers
    labels = list(labels or [d.id or f"trace {i}" for i, d in enumerate(diagnoses)])
    with matplotlib.rc_context(RC):
        fig, axes = _metric_grid(metrics, ncols)
        for ax, name in zip(axes.flat, metrics):
            _band_shading(ax, depth)
            for d, label in zip(diagnoses, labels):
                y, x = d.metric(name), np.array(d.layer_ids)
                ax.plot(x, y, lw=1.2, marker="o", ms=2, label=label.replace("$", r"\$"))
                if d.flags is not None:
                    hit = [i for i, f in enumerate(d.flags[name]) if f]
                    ax.plot(x[hit], y[hit], ls="", marker="o", ms=7, mfc="none", mec="red")
            ax.set_title(name)
            ax.set_xlabel("layer")
            _exponent_as_label(ax)
        if len(diagnoses) <= 8:
            axes.flat[0].legend(loc="best", fontsize=6, frameon=False)
    return fig


def result_figures(stem: str | os.PathLike, maps: Any, step_kinds: Sequence[str], diagnosis: Diagnosis,
                   label: str, formats: Sequence[str] = ("png",)) -> list[Path]:
    """The figures `stepscope report --figures` writes of one result: STEM_layers (the step maps of about 8 layers
    spread over the depth) and STEM_metrics (every metric by layer), each in `formats`; returns the paths.
    Its arguments are plain data, so that worker processes can draw several results at once."""
    maps = _np(maps)
    grid = layer_grid_figure(maps, step_kinds, default_grid_layers(maps.shape[0]), title=label,
                             layer_ids=diagnosis.layer_ids, num_model_layers=diagnosis.model_layers)
    paths = save_figure(grid, f"{os.fspath(stem)}_layers", formats)
    return paths + save_figure(diagnosis_depth_figure([diagnosis], labels=[label]), f"{os.fspath(stem)}_metrics",
                               formats)


def save_figure(fig: Figure, stem: str | os.PathLike, formats: Sequence[str] = ("png", "svg"),
                dpi: int = 150) -> list[Path]:
    """Write `fig` as stem.png and stem.svg (each through a temporary file and a rename); returns the paths."""
    out = []
    if fig.get_layout_engine() is not None:
        with matplotlib.rc_context(RC):
            fig.draw_without_rendering()  # lay out once: the positions then hold for every format
        # no layout engine from here on: "none" would leave a placeholder engine, and savefig draws a figure that
        # has one twice (a dry run, then the real one)
        with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
            fig.set_layout_engine(None)
    for fmt in formats:
        buf = io.BytesIO()
        with matplotlib.rc_context(RC):
            fig.savefig(buf, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
        path = Path(f"{os.fspath(stem)}.{fmt}")
        atomic_write_bytes(path, buf.getvalue())
        out.append(path)
    return out


def _np(maps: Any) -> np.ndarray:
    if hasattr(maps, "detach"):
        maps = maps.detach().float().cpu().numpy()
    m = np.asarray(maps)
    if m.ndim != 3:
        from ..errors import StepscopeError

        raise StepscopeError(f"step maps must have shape [layers, steps, steps], got {tuple(m.shape)}")
    return m
