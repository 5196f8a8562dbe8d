"""The self-contained HTML report: trace text coloured by step, interactive step heatmaps (layer slider, hover
shows both steps' text), metric-versus-depth chart, metrics table and verdicts; one file, no network.

Safety: every string from a model or a trace reaches the page either through `html.escape` (server side) or
as data in a `<script type="application/json">` block (with "<", ">", "&", U+2028 and U+2029 escaped, so text
such as `</script>` cannot end the block) that the page's script puts into the DOM with `textContent` only.
A Content-Security-Policy allows no network at all and runs only the report's own script (by its hash), so even
markup that slipped through could neither load anything nor execute.

Maps travel as 16-bit log-quantized values per layer (base64): value = 10^(lo + (q - 1) / 65534 * (hi - lo)) for
q > 0, 0 for q = 0, relative error below 2e-4 per 10 decades of range. The heatmaps are drawn client-side on a
<canvas>, so a report of 30 layers of 200 steps weighs about 3 MB.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..diagnose import BAD_DIRECTION, METRICS, SCORES, Diagnosis, Profile, diagnose, load_result
from ..errors import StepscopeError

DEFAULT_MAX_MAP_BYTES = 40_000_000  # quantized maps embedded in one report, all results together
_QMAX = 65534

METRIC_HELP = {
    "locality": "Shallow lock-in: share of a thinking step's saliency on itself and the previous step.",
    "question_reach": "Shallow lock-in: share of a thinking step's saliency on the question.",
    "far_reach": "Shallow lock-in: share on thinking steps two or more back.",
    "summary_to_thinking": "Deep decay: share of a summary step's saliency on the thinking.",
    "summary_self": "Deep decay: share of a summary step's saliency on the summary.",
    "thinking_recency": "Deep decay: part of the summary's thinking share that sits on the last 3 thinking steps.",
    "analysis_block_intensity": "Mean of M over the thinking x thinking block (released metric).",
    "final_block_intensity": "Mean of M over the summary x summary block (released metric).",
    "final_heat_anomaly": "final_block_intensity / analysis_block_intensity (released metric).",
}


def json_for_script(obj: Any) -> str:
    """JSON safe inside a <script> element: no "<", ">", "&", U+2028 or U+2029 characters remain."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def quantize_layer(m: np.ndarray) -> dict:
    """Encode one map [S, S] as {"lo", "hi", "data"}: base64 of little-endian uint16 log-quantized codes."""
    m = np.asarray(m, dtype=np.float64)
    pos = m > 0
    q = np.zeros(m.shape, dtype="<u2")
    if not pos.any():
        return {"lo": 0.0, "hi": 0.0, "data": base64.b64encode(q.tobytes()).decode("ascii")}
    logs = np.log10(m[pos])
    lo, hi = float(logs.min()), float(logs.max())
    span = hi - lo
    q[pos] = 1 + (np.rint((logs - lo) / span * _QMAX) if span > 0 else 0)
    return {"lo": lo, "hi": hi, "data": base64.b64encode(q.tobytes()).decode("ascii")}


def dequantize_layer(enc: dict, num_steps: int) -> np.ndarray:
    """The inverse of quantize_layer (what the page's script computes): float64 [S, S]."""
    q = np.frombuffer(base64.b64decode(enc["data"]), dtype="<u2").astype(np.float64).reshape(num_steps, num_steps)
    out = np.zeros_like(q)
    nz = q > 0
    out[nz] = 10.0 ** (enc["lo"] + (q[nz] - 1) / _QMAX * (enc["hi"] - enc["lo"]))
    return out


def _viridis() -> list[int]:
    import matplotlib

    rgba = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))
    return [int(round(c * 255)) for row in rgba for c in row[:3]]


def _pick_layers(L: int, S: int, budget: int, layers: Sequence[int] | None) -> list[int]:
    if layers is not None:
        bad = [x for x in layers if not 0 <= x < L]
        if bad:
            raise StepscopeError(f"layer(s) {bad} out of range: the maps have {L} layers")
        return sorted(set(int(x) for x in layers))
    per = max(1, S * S * 2)
    fit = max(1, budget // per)
    if fit >= L:
        return list(range(L))
    from .figures import default_grid_layers

    return default_grid_layers(L, int(fit))


def _meta_view(meta: dict, trace: Any) -> dict:
    keep = {}
    for k in ("id", "model", "source_model", "correct", "problem", "ground_truth", "pool", "loss", "dtype",
              "device"):
        v = meta.get(k)
        if v is not None:
            keep[k] = v if isinstance(v, bool | int | float) else str(v)
    if trace is not None:
        keep["tokens"] = len(trace.token_ids)
        keep["format"] = str(getattr(trace, "fmt", ""))
        notes = trace.meta.get("notes") if isinstance(getattr(trace, "meta", None), dict) else None
        if notes:
            keep["notes"] = [str(n) for n in notes]
    return keep


def _result_payload(result: Any, diagnosis: Diagnosis, label: str, budget: int,
                    layers: Sequence[int] | None) -> dict:
    maps = result.maps
    if hasattr(maps, "detach"):
        maps = maps.detach().float().cpu().numpy()
    maps = np.asarray(maps)
    trace = result.trace
    L, S = maps.shape[0], maps.shape[1]
    if len(trace.steps) != S:
        raise StepscopeError(f"{label}: the maps have {S} steps but the trace has {len(trace.steps)}")
    if diagnosis.num_layers != L:
        raise StepscopeError(f"{label}: the diagnosis has {diagnosis.num_layers} layers, the maps {L}")
    chosen = _pick_layers(L, S, budget, layers)
    from ..diagnose import result_meta

    return {
        "label": label,
        "meta": _meta_view(result_meta(result), trace),
        "kinds": [s.kind for s in trace.steps],
        "texts": [s.text for s in trace.steps],
        "tokens": [[int(s.token_start), int(s.token_end)] for s in trace.steps],
        "L": int(L), "S": int(S),
        "layers": [{"layer": int(x), **quantize_layer(maps[x])} for x in chosen],
        "omitted_layers": L - len(chosen),
        "diagnosis": diagnosis.to_json(),
        "groups": diagnosis.layer_groups,  # positions into the per-layer lists
        "layer_ids": diagnosis.layer_ids,  # the model layer of each map
        "depth": diagnosis.model_layers,
    }


def _as_result(x: Any) -> Any:
    if isinstance(x, str | os.PathLike):
        return load_result(x)
    if not hasattr(x, "maps") or not hasattr(x, "trace") or x.trace is None:
        raise StepscopeError("a report needs saliency results (with .maps and .trace) or their folders")
    return x


def build_report_html(results: Any, *, diagnoses: Sequence[Diagnosis | None] | None = None,
                      baseline: Profile | str | os.PathLike | None = None, title: str = "stepscope report",
                      labels: Sequence[str] | None = None,
                      extra_sections: Sequence[tuple[str, str]] = (), layers: Sequence[int] | None = None,
                      max_map_bytes: int = DEFAULT_MAX_MAP_BYTES) -> str:
    """The report as one HTML string. `results`: one or more saliency results or result folders.

    `diagnoses` (optional, one per result) are used as given; otherwise each result is diagnosed here (with
    `baseline` when given). `extra_sections` are (title, html) pairs appended as they are: the caller escapes
    their content; scripts inside them do not run (the page's Content-Security-Policy allows only its own).
    `layers` limits the embedded layers (positions in the maps); by default all, or an even spread when the maps
    exceed `max_map_bytes`.
    """
    if not isinstance(results, list | tuple):
        results = [results]
    if not results:
        raise StepscopeError("a report needs at least one result")
    if baseline is not None and not isinstance(baseline, Profile):
        baseline = Profile.load(baseline)
    paths = [str(x) if isinstance(x, str | os.PathLike) else None for x in results]
    results = [_as_result(x) for x in results]
    diagnoses = list(diagnoses) if diagnoses is not None else [None] * len(results)
    if len(diagnoses) != len(results):
        raise StepscopeError(f"{len(results)} results but {len(diagnoses)} diagnoses")
    diagnoses = [d if d is not None else diagnose(r, baseline=baseline) for r, d in zip(results, diagnoses)]
    if labels is None:
        labels = []
        for r, p, k in zip(results, paths, range(len(results))):
            rid = getattr(r.trace, "meta", {}).get("id") if hasattr(r.trace, "meta") else None
            labels.append(str(rid) if rid is not None else (Path(p).name if p else f"result {k + 1}"))
    if len(labels) != len(results):
        raise StepscopeError(f"{len(results)} results but {len(labels)} labels")
    budget = max(1, int(max_map_bytes) // len(results))
    payload = {
        "version": __version__,
        "results": [_result_payload(r, d, str(lab), budget, layers) for r, d, lab in zip(results, diagnoses, labels)],
        "metrics": list(METRICS), "scores": list(SCORES), "bad_direction": BAD_DIRECTION,
        "metric_help": METRIC_HELP, "viridis": _viridis(), "qmax": _QMAX,
        "baseline": baseline.to_json() if baseline is not None else None,
    }
    extra = "".join(f'<section class="extra"><h2>{html.escape(str(t))}</h2>\n{body}\n</section>\n'
                    for t, body in extra_sections)
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    glossary = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in METRIC_HELP.items())
    return _PAGE.format(
        csp=html.escape(csp, quote=True), title=html.escape(title), version=html.escape(__version__),
        style=_STYLE, data=json_for_script(payload), script=_SCRIPT, extra=extra, glossary=glossary,
        n=len(results))


def render_report(results: Any, out_path: str | os.PathLike, *,
                  extra_sections: Sequence[tuple[str, str]] = (), **kwargs: Any) -> Path:
    """Write the report to `out_path` (temporary file, then rename); returns the path. See build_report_html."""
    from ..io import atomic_write_text

    text = build_report_html(results, extra_sections=extra_sections, **kwargs)
    out = Path(out_path)
    atomic_write_text(out, text)
    return out


_STYLE = """
:root { --q: #6a4c93; --t: #1982c4; --s: #e07a1f; --bad: #d62828; --ink: #1d1d1f; --mute: #6b6b70; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); margin: 0;
       background: #fafafa; }
header { padding: 14px 24px; background: #fff; border-bottom: 1px solid #e4e4e7; display: flex;
         gap: 16px; align-items: baseline; flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; }
header .gen { color: var(--mute); font-size: 12px; }
main { padding: 16px 24px; max-width: 1500px; }
section { background: #fff; border: 1px solid #e4e4e7; border-radius: 8px; padding: 12px 16px; margin: 0 0 16px; }
h2 { font-size: 15px; margin: 0 0 8px; }
.row { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; }
.meta dt { color: var(--mute); } .meta dd { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.verdict { font-weight: 600; } .verdict.flagged { color: var(--bad); }
.pill { display: inline-block; border-radius: 9px; padding: 0 8px; font-size: 12px; margin-right: 6px;
        background: #eee; } .pill.flagged { background: #fde2e2; color: var(--bad); }
.pill.ok { background: #e3f4ef; color: #1b6f5d; }
#heat-section, #chart-section { flex: 1 1 540px; min-width: 0; }
#heat-wrap { position: relative; }
#heat { border: 1px solid #ddd; image-rendering: pixelated; cursor: crosshair; max-width: 100%; }
.controls { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
.controls input[type=range] { width: 200px; }
#tip { position: fixed; pointer-events: none; background: #1d1d1f; color: #fff; padding: 8px 10px;
       border-radius: 6px; max-width: 460px; font-size: 12px; z-index: 10; white-space: pre-wrap;
       overflow-wrap: anywhere; box-shadow: 0 4px 14px rgba(0,0,0,.25); }
#tip b { color: #ffd166; }
#legend { display: flex; align-items: center; gap: 6px; font-size: 12px; color: var(--mute); }
#chart { border: 1px solid #eee; background: #fff; }
table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: right; }
th { position: sticky; top: 0; background: #fff; }
td.flag { color: var(--bad); font-weight: 700; }
tr.cur td { background: #fff6d5; }
tr.shallow td:first-child { border-left: 3px solid var(--q); } tr.deep td:first-child { border-left: 3px solid var(--s); }
.tablewrap { max-height: 420px; overflow: auto; }
#text { white-space: pre-wrap; font: 13px/1.55 ui-monospace, SFMono-Regular, Menlo, monospace;
        max-height: 560px; overflow: auto; overflow-wrap: anywhere; }
.step { border-radius: 3px; }
.k-question.even { background: #ece6f5; } .k-question.odd { background: #ddd2ee; }
.k-thinking.even { background: #e1effa; } .k-thinking.odd { background: #cde3f5; }
.k-summary.even { background: #fcebd9; } .k-summary.odd { background: #f8dcc0; }
.step.hl-row { outline: 2px solid #d62828; } .step.hl-col { outline: 2px solid #2a9d8f; }
.key span { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin: 0 4px 0 10px; }
.note { color: var(--mute); font-size: 12px; }
#stepscope-errors { color: var(--bad); }
dl.gloss { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; font-size: 12px; }
dl.gloss dt { font-family: ui-monospace, monospace; }
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="stepscope {version}">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header><h1>{title}</h1><span class="gen">stepscope {version} &middot; {n} result(s)</span>
<label id="pick-wrap">result <select id="pick"></select></label></header>
<main>
<noscript><section>This report draws its heatmaps and tables with JavaScript; the numbers are also in each
result folder's diagnosis.json.</section></noscript>
<pre id="stepscope-errors" hidden></pre>
<section id="summary"><h2>Trace</h2><div class="row"><dl class="meta" id="meta"></dl></div>
<p id="verdict" class="verdict"></p><div id="scores"></div><ul id="reasons" class="note"></ul></section>
<div class="row">
<section id="heat-section"><h2>Step map</h2>
<div class="controls">
<label>layer <input type="range" id="layer" min="0" max="0" value="0" step="1"></label>
<span id="layer-label"></span>
<label><input type="checkbox" id="norm"> row-normalized (N)</label>
</div>
<div id="heat-wrap"><canvas id="heat" width="10" height="10"></canvas></div>
<div id="legend"><span id="lg-lo"></span><canvas id="lg" width="160" height="10"></canvas><span id="lg-hi"></span>
<span>log scale; grey = 0 (masked)</span></div>
<p class="note key"><span style="background:var(--q)"></span>question<span style="background:var(--t)"></span>thinking
<span style="background:var(--s)"></span>summary &middot; rows: query step i, columns: key step j &middot;
hover a cell to read both steps</p>
<p class="note" id="omitted"></p>
</section>
<section id="chart-section"><h2>Metric by layer</h2>
<div class="controls"><select id="metric"></select><span class="note" id="metric-help"></span></div>
<svg id="chart" width="480" height="300" xmlns="http://www.w3.org/2000/svg"></svg>
<p class="note">shaded: shallow quarter (purple), deep quarter (orange); red rings: flagged against the baseline;
grey band: baseline mean &plusmn; 2 sd</p>
</section>
</div>
<section><h2>Metrics per layer</h2><div class="tablewrap"><table id="table"></table></div>
<p class="note">red: |z| &gt; 2 in the bad direction against the baseline (hover a value for its z); &ndash; = not
defined for this trace (see the reasons above)</p></section>
<section><h2>Trace text by step</h2><div id="text"></div></section>
{extra}
<section><h2>Metrics</h2><dl class="gloss">{glossary}</dl></section>
</main>
<div id="tip" hidden></div>
<div id="stepscope-status" hidden data-ok="0" data-cells="0" data-steps="0" data-results="0" data-layer=""
 data-errors="0"></div>
<script type="application/json" id="stepscope-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var status = document.getElementById("stepscope-status");
  var errors = [];
  function report(msg) {
    errors.push(String(msg));
    status.setAttribute("data-errors", String(errors.length));
    var pre = document.getElementById("stepscope-errors");
    pre.textContent = "report error: " + errors.join("\n");
    pre.hidden = false;
  }
  window.addEventListener("error", function (e) { report(e.message || e); });
  window.addEventListener("unhandledrejection", function (e) { report(e.reason); });

  var $ = function (id) { return document.getElementById(id); };
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2013";
    if (typeof v !== "number") return String(v);
    if (v === 0) return "0";
    var a = Math.abs(v);
    return (a >= 1e4 || a < 1e-3) ? v.toExponential(2) : v.toPrecision(3);
  }

  var DATA, R, cur = 0, maps = {}, layerIdx = 0, normMode = false, lastCell = null;

  function decode(r, k) {
    var key = cur + ":" + k;
    if (maps[key]) return maps[key];
    var enc = r.layers[k], S = r.S, bin = atob(enc.data), n = S * S;
    var out = new Float64Array(n), span = enc.hi - enc.lo;
    for (var i = 0; i < n; i++) {
      var q = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
      out[i] = q === 0 ? 0 : Math.pow(10, enc.lo + (q - 1) / DATA.qmax * span);
    }
    maps[key] = out;
    return out;
  }
  function rowNormalized(m, S) {
    var out = new Float64Array(S * S);
    for (var i = 0; i < S; i++) {
      var s = 0;
      for (var j = 0; j < S; j++) s += m[i * S + j];
      if (s > 0) for (var j2 = 0; j2 < S; j2++) out[i * S + j2] = m[i * S + j2] / s;
    }
    return out;
  }
  function current() {
    var m = decode(R, layerIdx);
    return normMode ? rowNormalized(m, R.S) : m;
  }
  function band(layer) {
    if (R.groups.shallow.indexOf(layer) >= 0) return "shallow";
    if (R.groups.deep.indexOf(layer) >= 0) return "deep";
    return "";
  }

  function drawHeat() {
    var S = R.S, m = current(), lut = DATA.viridis;
    var max = 0, min = Infinity;
    for (var i = 0; i < m.length; i++) { var v = m[i]; if (v > 0) { if (v > max) max = v; if (v < min) min = v; } }
    var hi = max > 0 ? Math.log10(max) : 0;
    var lo = max > 0 ? Math.max(Math.log10(min), hi - 6) : -1;
    if (hi - lo < 1e-12) lo = hi - 1;
    var off = document.createElement("canvas");
    off.width = S; off.height = S;
    var octx = off.getContext("2d"), img = octx.createImageData(S, S), px = img.data, cells = 0;
    for (var c = 0; c < S * S; c++) {
      var val = m[c], o = 4 * c;
      if (val > 0) {
        var t = (Math.log10(val) - lo) / (hi - lo);
        var k = Math.max(0, Math.min(255, Math.round(t * 255)));
        px[o] = lut[3 * k]; px[o + 1] = lut[3 * k + 1]; px[o + 2] = lut[3 * k + 2]; cells++;
      } else { px[o] = 240; px[o + 1] = 240; px[o + 2] = 240; }
      px[o + 3] = 255;
    }
    octx.putImageData(img, 0, 0);
    var cell = Math.max(1, Math.floor(520 / S)), size = cell * S;
    var cv = $("heat");
    cv.width = size; cv.height = size;
    var ctx = cv.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, size, size);
    for (var b = 1; b < S; b++) {
      if (R.kinds[b] !== R.kinds[b - 1]) {
        var x = b * size / S;
        ctx.fillStyle = "#ffffff";
        ctx.fillRect(x - 1, 0, 2, size); ctx.fillRect(0, x - 1, size, 2);
        ctx.fillStyle = "#000000";
        ctx.fillRect(x - 0.25, 0, 0.5, size); ctx.fillRect(0, x - 0.25, size, 0.5);
      }
    }
    var lg = $("lg"), lctx = lg.getContext("2d");
    for (var g = 0; g < lg.width; g++) {
      var kk = Math.round(g / (lg.width - 1) * 255);
      lctx.fillStyle = "rgb(" + lut[3 * kk] + "," + lut[3 * kk + 1] + "," + lut[3 * kk + 2] + ")";
      lctx.fillRect(g, 0, 1, lg.height);
    }
    $("lg-lo").textContent = fmt(Math.pow(10, lo));
    $("lg-hi").textContent = fmt(Math.pow(10, hi));
    var layer = R.layers[layerIdx].layer, bd = band(layer);
    $("layer-label").textContent = "layer " + R.layer_ids[layer] + " of " + R.depth + (bd ? " (" + bd + ")" : "");
    status.setAttribute("data-cells", String(cells));
    status.setAttribute("data-layer", String(R.layer_ids[layer]));
    var rows = $("table").querySelectorAll("tbody tr");
    for (var r = 0; r < rows.length; r++) rows[r].classList.toggle("cur", r === layer);
    drawChart();
  }

  function clip(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; }
  function setHighlight(cls, idx) {
    var old = $("text").querySelectorAll("." + cls);
    for (var i = 0; i < old.length; i++) old[i].classList.remove(cls);
    if (idx !== null) { var e = $("text").children[idx]; if (e) e.classList.add(cls); }
  }
  function onMove(ev) {
    var cv = $("heat"), rect = cv.getBoundingClientRect(), S = R.S;
    var j = Math.floor((ev.clientX - rect.left) / rect.width * S);
    var i = Math.floor((ev.clientY - rect.top) / rect.height * S);
    var tip = $("tip");
    if (i < 0 || j < 0 || i >= S || j >= S) { hideTip(); return; }
    var raw = decode(R, layerIdx), rowSum = 0;
    for (var k = 0; k < S; k++) rowSum += raw[i * S + k];
    tip.textContent = "";
    var head = el("b", "query step " + i + " (" + R.kinds[i] + ") \u2192 key step " + j + " (" + R.kinds[j] + ")");
    tip.appendChild(head);
    tip.appendChild(el("div", "M = " + fmt(raw[i * S + j]) + "   N = " + fmt(rowSum > 0 ? raw[i * S + j] / rowSum : 0)));
    tip.appendChild(el("div", "\u25B6 step " + i + ": " + clip(R.texts[i], 280)));
    tip.appendChild(el("div", "\u25C0 step " + j + ": " + clip(R.texts[j], 280)));
    tip.hidden = false;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + 470 > window.innerWidth) x = Math.max(0, ev.clientX - 480);
    tip.style.left = x + "px"; tip.style.top = y + "px";
    if (!lastCell || lastCell[0] !== i || lastCell[1] !== j) {
      setHighlight("hl-row", i); setHighlight("hl-col", j); lastCell = [i, j];
    }
  }
  function hideTip() { $("tip").hidden = true; setHighlight("hl-row", null); setHighlight("hl-col", null); lastCell = null; }

  function renderMeta() {
    var meta = R.meta, dl = $("meta"), d = R.diagnosis;
    dl.textContent = "";
    var add = function (k, v) { dl.appendChild(el("dt", k)); dl.appendChild(el("dd", v)); };
    Object.keys(meta).forEach(function (k) {
      var v = meta[k];
      add(k, Array.isArray(v) ? v.join("; ") : (typeof v === "string" ? clip(v, 1200) : String(v)));
    });
    add("steps", R.S + " (question " + d.step_counts.question + ", thinking " + d.step_counts.thinking +
        ", summary " + d.step_counts.summary + ")");
    var ids = R.layer_ids, span = function (g) { return g.length ? ids[g[0]] + "\u2013" + ids[g[g.length - 1]] : "none"; };
    add("layers", R.L + " of " + R.depth + " (shallow " + span(R.groups.shallow) + ", deep " + span(R.groups.deep) + ")");
    var v = $("verdict");
    if (d.verdict) {
      v.textContent = "Verdict: " + d.verdict.summary;
      v.className = "verdict" + (d.verdict.summary.indexOf("beyond") >= 0 ? " flagged" : "");
    } else {
      v.textContent = "No verdict: diagnose against a baseline profile (stepscope diagnose --baseline) to flag a single trace.";
      v.className = "verdict";
    }
    var sc = $("scores");
    sc.textContent = "";
    DATA.scores.forEach(function (k) {
      var val = d.scores[k], z = d.score_z ? d.score_z[k] : null, f = d.score_flags ? d.score_flags[k] : null;
      var txt = k + " = " + fmt(val) + (z !== null && z !== undefined ? " (z " + (z >= 0 ? "+" : "") + z.toFixed(2) + ")" : "");
      sc.appendChild(el("span", txt, "pill" + (f ? " flagged" : (f === false ? " ok" : ""))));
    });
    if (d.verdict) {
      ["shallow_lock_in", "deep_decay"].forEach(function (k) {
        var p = d.verdict[k];
        sc.appendChild(el("span", k.replace(/_/g, " ") + ": " + p.status + " \u2014 " + p.reason,
                          "pill" + (p.status === "flagged" ? " flagged" : "")));
      });
    }
    var ul = $("reasons");
    ul.textContent = "";
    Object.keys(d.reasons).sort().forEach(function (k) { ul.appendChild(el("li", k + " is null: " + d.reasons[k])); });
    $("omitted").textContent = R.omitted_layers > 0 ? (R.omitted_layers + " of " + R.L +
      " layers were left out of this file to keep it small (the slider shows the embedded ones).") : "";
  }

  function renderTable() {
    var t = $("table"), d = R.diagnosis;
    t.textContent = "";
    var thead = el("thead"), tr = el("tr");
    tr.appendChild(el("th", "layer"));
    DATA.metrics.forEach(function (m) { var th = el("th", m); th.title = DATA.metric_help[m]; tr.appendChild(th); });
    thead.appendChild(tr); t.appendChild(thead);
    var tb = el("tbody");
    for (var l = 0; l < R.L; l++) {
      var row = el("tr", null, band(l));
      row.appendChild(el("td", R.layer_ids[l]));
      DATA.metrics.forEach(function (m) {
        var td = el("td", fmt(d.metrics[m][l]));
        if (d.flags && d.flags[m][l]) td.className = "flag";
        if (d.z && d.z[m][l] !== null) td.title = "z = " + d.z[m][l].toFixed(2);
        row.appendChild(td);
      });
      tb.appendChild(row);
    }
    t.appendChild(tb);
  }

  function renderText() {
    var box = $("text");
    box.textContent = "";
    var counts = {question: 0, thinking: 0, summary: 0};
    for (var i = 0; i < R.texts.length; i++) {
      var k = R.kinds[i];
      var s = el("span", R.texts[i], "step k-" + k + (counts[k]++ % 2 ? " odd" : " even"));
      s.title = "step " + i + " (" + k + "), tokens " + R.tokens[i][0] + "\u2013" + R.tokens[i][1];
      box.appendChild(s);
    }
    status.setAttribute("data-steps", String(box.children.length));
  }

  var SVGNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function drawChart() {
    var c = $("chart"), m = $("metric").value, d = R.diagnosis, L = R.L;
    while (c.firstChild) c.removeChild(c.firstChild);
    var W = 480, H = 300, pl = 56, pr = 12, pt = 12, pb = 32;
    var ids = R.layer_ids, lo0 = ids[0], hi0 = ids[L - 1];
    var base = DATA.baseline && JSON.stringify(DATA.baseline.layers) === JSON.stringify(ids) ? DATA.baseline.metrics[m] : null;
    var ys = d.metrics[m];
    var vals = [];
    for (var l = 0; l < L; l++) {
      if (ys[l] !== null) vals.push(ys[l]);
      if (base && base.mean[l] !== null && base.std[l] !== null) { vals.push(base.mean[l] - 2 * base.std[l]); vals.push(base.mean[l] + 2 * base.std[l]); }
    }
    $("metric-help").textContent = DATA.metric_help[m];
    var X = function (l) { return pl + (hi0 > lo0 ? (ids[l] - lo0) / (hi0 - lo0) : 0.5) * (W - pl - pr); };
    var bandRect = function (ls, color) {
      if (!ls.length) return;
      c.appendChild(svg("rect", {x: X(ls[0]) - 3, y: pt, width: X(ls[ls.length - 1]) - X(ls[0]) + 6, height: H - pt - pb, fill: color, "fill-opacity": 0.08}));
    };
    bandRect(R.groups.shallow, "#6a4c93"); bandRect(R.groups.deep, "#e07a1f");
    c.appendChild(svg("line", {x1: pl, y1: H - pb, x2: W - pr, y2: H - pb, stroke: "#999"}));
    c.appendChild(svg("line", {x1: pl, y1: pt, x2: pl, y2: H - pb, stroke: "#999"}));
    c.appendChild(svg("text", {x: (W + pl) / 2, y: H - 4, "text-anchor": "middle", "font-size": 11, fill: "#666"}, "layer"));
    if (!vals.length) {
      c.appendChild(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", "font-size": 12, fill: "#999"},
                        m + " is null for this trace" + (d.reasons[m] ? ": " + clip(d.reasons[m], 60) : "")));
      return;
    }
    var lo = Math.min.apply(null, vals), hi = Math.max.apply(null, vals);
    if (hi - lo < 1e-12) { lo -= 0.5 * Math.abs(lo) + 1e-6; hi += 0.5 * Math.abs(hi) + 1e-6; }
    var pad = 0.06 * (hi - lo); lo -= pad; hi += pad;
    var Y = function (v) { return pt + (hi - v) / (hi - lo) * (H - pt - pb); };
    [lo + pad, (lo + hi) / 2, hi - pad].forEach(function (v) {
      c.appendChild(svg("text", {x: pl - 4, y: Y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#666"}, fmt(v)));
    });
    for (var t = 0; t < L; t += Math.max(1, Math.ceil(L / 10))) {
      c.appendChild(svg("text", {x: X(t), y: H - pb + 13, "text-anchor": "middle", "font-size": 10, fill: "#666"}, ids[t]));
    }
    if (base) {
      var up = [], dn = [];
      for (var b = 0; b < L; b++) if (base.mean[b] !== null && base.std[b] !== null) {
        up.push(X(b) + "," + Y(base.mean[b] + 2 * base.std[b])); dn.unshift(X(b) + "," + Y(base.mean[b] - 2 * base.std[b]));
      }
      if (up.length) c.appendChild(svg("polygon", {points: up.concat(dn).join(" "), fill: "#888", "fill-opacity": 0.18}));
    }
    var seg = [];
    var flush = function () { if (seg.length > 1) c.appendChild(svg("polyline", {points: seg.join(" "), fill: "none", stroke: "#1982c4", "stroke-width": 1.8})); seg = []; };
    for (var q = 0; q < L; q++) { if (ys[q] === null) { flush(); continue; } seg.push(X(q) + "," + Y(ys[q])); }
    flush();
    for (var p = 0; p < L; p++) {
      if (ys[p] === null) continue;
      c.appendChild(svg("circle", {cx: X(p), cy: Y(ys[p]), r: 2.5, fill: "#1982c4"}));
      if (d.flags && d.flags[m][p]) c.appendChild(svg("circle", {cx: X(p), cy: Y(ys[p]), r: 6, fill: "none", stroke: "#d62828", "stroke-width": 1.5}));
    }
    var curLayer = R.layers[layerIdx].layer;
    c.appendChild(svg("line", {x1: X(curLayer), y1: pt, x2: X(curLayer), y2: H - pb, stroke: "#d62828", "stroke-dasharray": "3,3"}));
  }

  function select(k) {
    cur = k; R = DATA.results[k]; layerIdx = 0;
    var s = $("layer");
    s.max = String(R.layers.length - 1); s.value = "0";
    renderMeta(); renderTable(); renderText(); drawHeat();
  }

  function main() {
    DATA = JSON.parse($("stepscope-data").textContent);
    var pick = $("pick");
    DATA.results.forEach(function (r, i) { var o = el("option", r.label); o.value = String(i); pick.appendChild(o); });
    if (DATA.results.length < 2) $("pick-wrap").hidden = true;
    pick.addEventListener("change", function () { select(parseInt(pick.value, 10)); });
    var ms = $("metric");
    DATA.metrics.forEach(function (m) { var o = el("option", m); o.value = m; ms.appendChild(o); });
    ms.addEventListener("change", drawChart);
    $("layer").addEventListener("input", function () { layerIdx = parseInt($("layer").value, 10); drawHeat(); });
    $("norm").addEventListener("change", function () { normMode = $("norm").checked; drawHeat(); });
    $("heat").addEventListener("mousemove", onMove);
    $("heat").addEventListener("mouseleave", hideTip);
    status.setAttribute("data-results", String(DATA.results.length));
    select(0);
  }

  // Opened as report.html#stepscope-selftest, the page drives itself (hover a cell, move the slider, switch
  // results) and writes what it saw into #stepscope-status, for headless browser tests.
  function selfTest() {
    var cv = $("heat"), rect = cv.getBoundingClientRect(), S = R.S, i = S - 1, j = 0;
    status.setAttribute("data-first-steps", status.getAttribute("data-steps"));
    status.setAttribute("data-first-cells", status.getAttribute("data-cells"));
    cv.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: rect.left + (j + 0.5) * rect.width / S,
                                                  clientY: rect.top + (i + 0.5) * rect.height / S}));
    status.setAttribute("data-tip", $("tip").hidden ? "" : $("tip").textContent);
    status.setAttribute("data-highlighted", String($("text").querySelectorAll(".hl-row, .hl-col").length));
    cv.dispatchEvent(new MouseEvent("mouseleave"));
    var s = $("layer");
    s.value = s.max; s.dispatchEvent(new Event("input"));
    status.setAttribute("data-last-layer", status.getAttribute("data-layer"));
    $("norm").checked = true; $("norm").dispatchEvent(new Event("change"));
    status.setAttribute("data-norm-cells", status.getAttribute("data-cells"));
    if (DATA.results.length > 1) {
      var pick = $("pick");
      pick.value = String(DATA.results.length - 1); pick.dispatchEvent(new Event("change"));
      status.setAttribute("data-selected", R.label);
      status.setAttribute("data-selected-steps", status.getAttribute("data-steps"));
      pick.value = "0"; pick.dispatchEvent(new Event("change"));
    }
    status.setAttribute("data-selftest", "1");
  }

  try {
    main();
    if (window.location.hash === "#stepscope-selftest") selfTest();
    status.setAttribute("data-ok", errors.length ? "0" : "1");
  } catch (e) { report(e && e.stack ? e.stack : e); }
})();
"""
