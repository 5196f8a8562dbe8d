"""stepscope.report: HTML report (escaping, data, CSP, quantized maps) and matplotlib figures."""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import stepscope.diagnose as dg
from stepscope.errors import StepscopeError
from stepscope.report import build_report_html, figures, render_report
from stepscope.report import html as rhtml
from stepscope.saliency.result import load_result
from stepscope.trace import Trace

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_QUESTION = f"Compute 2+3. {XSS_IMG} and a </script> tag, an & and a \u2028 line separator."
XSS_RESPONSE = (
    "First, I add the two numbers carefully here. "
    f"The text {XSS_SCRIPT} is only text in this step. "
    "Then I double check the sum of two and three. "
    f"An image tag {XSS_IMG} must stay text as well. "
    "So the sum is five, and that is the answer.\n</think>\n\n"
    f"The answer is 5. {XSS_SCRIPT}\n\nFinal answer: **5** {XSS_IMG}"
)


@dataclass
class FakeResult:
    """Duck-typed saliency result: maps [L, S, S], trace, meta."""

    maps: np.ndarray
    trace: Trace
    meta: dict = field(default_factory=dict)


def make_result(tokenizer, question=XSS_QUESTION, response=XSS_RESPONSE, L=4, seed=0, meta=None):
    trace = Trace.from_text(tokenizer, question=question, response=response,
                            meta=meta or {"id": f"xss {XSS_SCRIPT}", "problem": question, "correct": False})
    S = trace.num_steps
    rng = np.random.default_rng(seed)
    maps = (rng.random((L, S, S)) * np.tril(np.ones((S, S)))).astype(np.float32)  # [L, S, S]
    maps *= 10.0 ** rng.uniform(-6, 0, size=(L, S, S)).astype(np.float32)  # a wide range of magnitudes
    return FakeResult(maps, trace, {"model": f"tiny {XSS_IMG}", "pooling": "mean"})


class Elements(HTMLParser):
    """Every start tag (name, attrs) and the text of every element, as a browser's tokenizer sees them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.script_bodies: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.script_bodies.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_bodies[-1] += data
        else:
            self.text.append(data)


def parse(page: str) -> Elements:
    p = Elements()
    p.feed(page)
    p.close()
    return p


def payload_of(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="stepscope-data">(.*?)</script>', page, re.S)
    assert m, "data block missing"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def result(think_tokenizer):
    return make_result(think_tokenizer)


# ---------------------------------------------------------------- escaping

def test_json_for_script_cannot_close_the_script():
    obj = {"a": "</script><script>alert(1)</script>", "b": "x\u2028y\u2029z & <!-- -->", "c": [1.5, None]}
    text = rhtml.json_for_script(obj)
    for ch in "<>&\u2028\u2029":
        assert ch not in text
    assert json.loads(text) == obj


def test_model_text_is_never_markup(result):
    page = build_report_html([result], title=f"report {XSS_SCRIPT}",
                             labels=[f"label {XSS_IMG}"])
    p = parse(page)
    assert [t for t, _ in p.tags].count("script") == 2  # the data block and the report's own script
    assert not any(t == "img" for t, _ in p.tags)
    assert not any(k.startswith("on") for _, attrs in p.tags for k in attrs)  # no inline handlers at all
    assert "alert(1)" not in p.script_bodies[1]  # the executable script is ours alone
    assert f"report {XSS_SCRIPT}" in "".join(p.text)  # the title is shown as text
    data = payload_of(page)  # the payload survives exactly
    r = data["results"][0]
    assert "".join(r["texts"]) == result.trace.text
    assert r["label"] == f"label {XSS_IMG}" and r["meta"]["model"] == f"tiny {XSS_IMG}"
    assert XSS_SCRIPT in "".join(r["texts"]) and XSS_IMG in "".join(r["texts"])


def test_csp_allows_only_the_report_script_and_no_network(result):
    page = build_report_html([result])
    csp = html_lib.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1))
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    body = parse(page).script_bodies[1]
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing external


def test_extra_sections_are_appended_verbatim_with_escaped_titles(result, tmp_path):
    out = render_report([result], tmp_path / "r.html",
                        extra_sections=[(f"StepFlow {XSS_IMG}", "<p id='demo-section'>before/after</p>")])
    page = out.read_text(encoding="utf-8")
    assert "<p id='demo-section'>before/after</p>" in page
    assert "StepFlow &lt;img src=x onerror=alert(1)&gt;" in page
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file


# ---------------------------------------------------------------- embedded data

def test_quantized_maps_round_trip(result):
    data = payload_of(build_report_html([result]))
    r = data["results"][0]
    assert r["S"] == result.trace.num_steps and r["L"] == 4 and len(r["layers"]) == 4
    assert r["kinds"] == result.trace.kinds
    for enc in r["layers"]:
        m = result.maps[enc["layer"]].astype(np.float64)
        back = rhtml.dequantize_layer(enc, r["S"])
        assert np.array_equal(back == 0, m == 0)
        span = enc["hi"] - enc["lo"]  # decades
        bound = 10 ** (span / (2 * rhtml._QMAX)) - 1 + 1e-12  # half a quantization step in log space
        nz = m > 0
        assert np.max(np.abs(back[nz] / m[nz] - 1)) <= bound
        assert bound < 2e-4 * max(1.0, span / 10)


def test_diagnosis_in_payload_matches_diagnose(result):
    data = payload_of(build_report_html([result]))
    assert data["results"][0]["diagnosis"] == json.loads(json.dumps(dg.diagnose(result).to_json()))


def test_baseline_gives_z_scores_and_verdict_in_payload(think_tokenizer, result):
    others = [make_result(think_tokenizer, seed=s) for s in range(1, 6)]
    profile = dg.build_profile([dg.diagnose(o) for o in others])
    data = payload_of(build_report_html([result], baseline=profile))
    d = data["results"][0]["diagnosis"]
    assert d["z"] is not None and d["verdict"] is not None and data["baseline"]["num_layers"] == 4


def test_several_results_and_layer_budget(think_tokenizer):
    a = make_result(think_tokenizer, L=10, seed=1)
    b = make_result(think_tokenizer, question="What is 1+1?", response="One plus one is two, clearly enough. "
                    "I will check it once more to be sure.\n</think>\n\nTwo.", L=10, seed=2,
                    meta={"id": "second"})
    S = a.trace.num_steps
    budget = 2 * 4 * S * S * 2  # room for 4 layers of `a` (each result gets half)
    data = payload_of(build_report_html([a, b], max_map_bytes=budget))
    ra, rb = data["results"]
    assert rb["label"] == "second"
    layers = [x["layer"] for x in ra["layers"]]
    assert layers[0] == 0 and layers[-1] == 9 and len(layers) <= 4 and ra["omitted_layers"] == 10 - len(layers)
    pick = payload_of(build_report_html([a], layers=[2, 7]))["results"][0]
    assert [x["layer"] for x in pick["layers"]] == [2, 7]
    with pytest.raises(StepscopeError, match="out of range"):
        build_report_html([a], layers=[10])


def test_report_from_result_folder(result, tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "res"
    folder.mkdir()
    save_file({"maps": result.maps}, str(folder / "maps.safetensors"))
    result.trace.save(folder / "trace.json")
    (folder / "meta.json").write_text(json.dumps(result.meta))
    loaded = load_result(folder)
    assert np.array_equal(np.asarray(loaded.maps), result.maps)
    page = build_report_html([folder])
    assert payload_of(page)["results"][0]["texts"] == [s.text for s in result.trace.steps]
    with pytest.raises(StepscopeError, match="not a saliency result"):
        build_report_html([tmp_path])
    with pytest.raises(StepscopeError, match="steps"):
        build_report_html([FakeResult(result.maps[:, :3, :3], result.trace)])


# ---------------------------------------------------------------- figures

def test_heatmap_has_log_scale_and_segment_boundaries(result):
    kinds = result.trace.kinds
    fig = figures.heatmap_figure(result.maps, kinds, layer=1, title="$not math$ " + XSS_SCRIPT)
    ax = fig.axes[0]
    im = ax.images[0]
    from matplotlib.colors import LogNorm

    assert isinstance(im.norm, LogNorm)
    m = result.maps[1]
    assert im.norm.vmax == pytest.approx(float(m.max()))
    assert im.norm.vmin == pytest.approx(max(float(m[m > 0].min()), float(m.max()) * 1e-6))
    assert np.ma.is_masked(im.get_array()) and im.get_array().mask.sum() == (m <= 0).sum()
    expect = sorted(b - 0.5 for b in figures.boundaries(kinds))
    assert len(expect) == 2  # question|thinking and thinking|summary
    drawn = [line for line in ax.lines if line.get_linestyle() != "None"]  # not the tick marks (markers only)
    hlines = sorted({line.get_ydata()[0] for line in drawn if line.get_ydata()[0] == line.get_ydata()[1]})
    assert hlines == expect
    assert ax.get_title() == "$not math$ " + XSS_SCRIPT


def test_save_figure_writes_png_and_svg(result, tmp_path):
    fig = figures.layer_grid_figure(result.maps, result.trace.kinds, layers=[0, 3], normalize_rows=True)
    assert len([a for a in fig.axes if a.images]) == 2
    paths = figures.save_figure(fig, tmp_path / "grid")
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ET.fromstring(paths[1].read_bytes())  # well-formed XML
    with pytest.raises(StepscopeError, match="out of range"):
        figures.layer_grid_figure(result.maps, result.trace.kinds, layers=[4])
    assert figures.default_grid_layers(30, 8)[0] == 0 and figures.default_grid_layers(30, 8)[-1] == 29
    assert figures.default_grid_layers(3) == [0, 1, 2]


def test_metric_depth_and_score_figures(think_tokenizer, tmp_path):
    from test_diagnose import KINDS, structured_maps

    c = [dg.diagnose(structured_maps(6, KINDS, seed=s, noise=0.3), step_kinds=KINDS) for s in range(4)]
    w = [dg.diagnose(structured_maps(6, KINDS, seed=10 + s, noise=0.3, lock=0.5), step_kinds=KINDS)
         for s in range(4)]
    cmp = dg.compare(c, w, n_boot=300, n_perm=300)
    fig = figures.metric_depth_figure(cmp, metrics=["locality", "summary_self"], ncols=2)
    ax = fig.axes[0]  # locality
    mean, low, high = cmp.curve("locality", "wrong")
    wrong_line = [line for line in ax.lines if line.get_label().startswith("wrong")][0]
    assert np.allclose(wrong_line.get_ydata(), mean)
    assert len(ax.collections) >= 2  # two interval bands
    assert any("*" == line.get_marker() for line in ax.lines)  # Holm-significant shallow layers starred
    assert figures.save_figure(figures.scores_figure(cmp), tmp_path / "scores", formats=("svg",))[0].exists()
    depth = figures.diagnosis_depth_figure(c[:2], metrics=["locality"], labels=["a$b", "c"], ncols=1)
    assert [t.get_text() for t in depth.axes[0].get_legend().get_texts()] == ["a\\$b", "c"]


def test_row_normalize():
    m = np.array([[1.0, 3.0], [0.0, 0.0]])
    assert np.array_equal(figures.row_normalize(m), np.array([[0.25, 0.75], [0.0, 0.0]]))


def test_package_exports():
    assert Path(rhtml.__file__).name == "html.py"
    assert callable(render_report)
