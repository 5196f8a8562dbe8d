"""The step map's axes carry step numbers (figures and HTML report, the same ticks), its colour bar labels decades
as plain text (no mathtext: laying that out made every figure slow), and `report --figures` says what it does."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
from test_report import make_result, payload_of

from stepscope.cli import main
from stepscope.report import build_report_html, figures


def nice_ticks_reference(num_steps: int, max_ticks: int) -> list[int]:
    """The smallest spacing of the form {1, 2, 5} x 10^k giving at most `max_ticks` ticks 0, d, 2d, ... < S."""
    for d in sorted(m * 10 ** k for k in range(8) for m in (1, 2, 5)):
        ticks = list(range(0, num_steps, d))
        if len(ticks) <= max_ticks:
            return ticks
    raise AssertionError("unreachable")


@pytest.mark.parametrize("S", [1, 2, 7, 8, 9, 16, 17, 40, 41, 81, 100, 119, 1000, 12345])
def test_step_ticks_follow_the_reference(S):
    assert figures.step_ticks(S) == nice_ticks_reference(S, 8)
    assert figures.step_ticks(S, max_ticks=4) == nice_ticks_reference(S, 4)


@pytest.fixture(scope="module")
def result(think_tokenizer):
    return make_result(think_tokenizer)


def test_heatmap_axes_number_the_steps_and_keep_the_segment_letters(result):
    kinds = result.trace.kinds
    S = len(kinds)
    fig = figures.heatmap_figure(result.maps, kinds, layer=1)
    ax = fig.axes[0]
    want = figures.step_ticks(S)
    assert len(want) >= 2
    edges = [0, *figures.boundaries(kinds), S]
    mids = [(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])]
    below = [(t.xy[0], t.get_text()) for t in ax.texts if t.xyann[1] < 0]  # offset down: the x axis
    beside = [(t.xy[1], t.get_text()) for t in ax.texts if t.xyann[0] < 0]  # offset left: the y axis
    for got in (below, beside):
        assert [p for p, text in got if text.isdigit()] == want  # a number at each step tick
        assert [text for _, text in got if text.isdigit()] == [str(s) for s in want]
        assert [(p, text) for p, text in got if not text.isdigit()] == list(zip(mids, ["Q", "T", "S"]))
    assert [t.get_color() for t in ax.texts if t.get_text() == "T"] == [figures.KIND_COLORS["thinking"]] * 2
    fig.canvas.draw()  # the labels render
    # under the x axis: numbers, then the letters below them, then the axis name below both
    r = fig.canvas.get_renderer()
    number = next(t for t in ax.texts if t.get_text() == "0" and t.xyann[1] < 0).get_window_extent(r)
    letter = next(t for t in ax.texts if t.get_text() == "Q" and t.xyann[1] < 0).get_window_extent(r)
    name = ax.xaxis.label.get_window_extent(r)
    assert number.y0 > letter.y1 - 1 and letter.y0 > name.y1 - 1


def test_colorbar_labels_are_plain_decades(result):
    kinds = result.trace.kinds
    fig = figures.layer_grid_figure(result.maps, kinds, layers=[0, 1])
    bars = [a for a in fig.axes if not a.images]
    assert len(bars) == 2
    fig.canvas.draw()
    for cb in bars:
        assert len(cb.yaxis.get_minorticklocs()) == 0
        lo, hi = cb.get_ylim()
        labels = [(v, t.get_text()) for v, t in zip(cb.yaxis.get_majorticklocs(), cb.yaxis.get_majorticklabels())
                  if lo <= v <= hi]
        assert labels
        for v, text in labels:
            assert "$" not in text  # no mathtext
            k = int(round(np.log10(v)))
            assert np.isclose(v, 10.0 ** k) and text == figures.decade_label(v)
    assert figures.decade_label(1e-3) == "10\u207b\u00b3" and figures.decade_label(1.0) == "1"
    assert figures.decade_label(10.0) == "10" and figures.decade_label(2e-5) == "2\u00d710\u207b\u2075"


def test_report_payload_carries_the_same_ticks(result):
    data = payload_of(build_report_html([result]))
    assert data["results"][0]["step_ticks"] == figures.step_ticks(result.trace.num_steps)


def test_report_figures_show_progress_and_workers_draw_the_same(result, tmp_path):
    import torch

    from stepscope.saliency import SaliencyResult

    dirs = []
    for k in range(2):
        d = tmp_path / "sal" / f"r{k}"
        SaliencyResult(maps=torch.tensor(result.maps), trace=result.trace, meta={"model": "tiny"}).save(d)
        dirs.append(str(d))
    files = {}
    for jobs in (1, 2):
        out, err = io.StringIO(), io.StringIO()
        figs = tmp_path / f"figs{jobs}"
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["report", *dirs, "--out", str(tmp_path / "r.html"), "--figures", str(figs), "--jobs", str(jobs),
                       "--figure-format", "svg, png"])
        assert rc == 0, err.getvalue()
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("figures of 2 results -> ") and ("2 processes" in lines[0]) == (jobs == 2)
        progress = [line.split(":")[0] for line in lines if re.match(r"figures \d", line)]
        assert progress == ["figures 1/2", "figures 2/2"]
        files[jobs] = {p.name: p.read_bytes() for p in figs.iterdir()}
    assert len(files[1]) == 8 and {re.sub(r"^.*_", "", n) for n in files[1]} == {
        "layers.png", "layers.svg", "metrics.png", "metrics.svg"}  # two results (same id), four files each
    assert files[1] == files[2]  # the worker processes draw byte for byte the same figures
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["report", *dirs, "--out", str(tmp_path / "r.html"), "--figures", str(tmp_path / "f"),
                     "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in err.getvalue()
    # PNG only by default; an unknown format is refused before any work
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", *dirs, "--out", str(tmp_path / "r.html"), "--figures", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == sorted(n for n in files[1] if n.endswith(".png"))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["report", *dirs, "--out", str(tmp_path / "r2.html"), "--figures", str(tmp_path / "bad"),
                     "--figure-format", "png,pdf"]) == 2
    assert "--figure-format 'png,pdf'" in err.getvalue() and not (tmp_path / "r2.html").exists()


def drawn_texts(fig) -> list:
    """(text, window box) of every text the figure draws: titles, axis labels, the y axis' common factor, legend
    entries and the tick labels inside the view (matplotlib keeps labels of ticks outside it, undrawn)."""
    import matplotlib.text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    skip = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(1.0, abs(hi - lo))
            skip |= {id(t.label1) for t in axis.get_major_ticks() if not lo - eps <= t.get_loc() <= hi + eps}
            skip |= {id(t.label2) for t in axis.get_major_ticks()}
    return [(t.get_text(), t.get_window_extent(r)) for t in fig.findobj(matplotlib.text.Text)
            if t.get_visible() and t.get_text().strip() and id(t) not in skip]


def test_compare_figure_texts_do_not_overlap():
    """Tiny block intensities (1e-6 scale) put matplotlib's "1e-6" factor above the axis, over the panel title;
    it now labels the y axis, and no two drawn texts of the figure intersect."""
    from test_diagnose import KINDS, structured_maps

    import stepscope.diagnose as dg

    def group(lock, seeds):
        return [dg.diagnose_maps(structured_maps(8, KINDS, lock=lock, seed=s, noise=0.3) * 1e-6, KINDS)
                for s in seeds]
    cmp = dg.compare(group(0.0, range(6)), group(0.5, range(10, 16)), n_boot=100, n_perm=100)
    fig = figures.metric_depth_figure(cmp)
    texts = drawn_texts(fig)
    clashes = [(a, b) for i, (a, ba) in enumerate(texts) for b, bb in texts[i + 1:] if ba.overlaps(bb)]
    assert not clashes, clashes
    assert any(t.startswith("\u00d71e") for t, _ in texts)  # the factor is still shown, as a y label
    diag = figures.diagnosis_depth_figure(group(0.0, range(2)))
    texts = drawn_texts(diag)
    clashes = [(a, b) for i, (a, ba) in enumerate(texts) for b, bb in texts[i + 1:] if ba.overlaps(bb)]
    assert not clashes, clashes
