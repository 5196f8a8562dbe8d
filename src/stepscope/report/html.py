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

The page itself lives in package data beside this file: templates/report.html (a `str.format` template),
templates/report.css and templates/report.js, inserted as they are.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..diagnose import BAD_DIRECTION, METRICS, SCORES, Diagnosis, Profile, diagnose
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


@functools.cache
def template(name: str) -> str:
    """One of the report's package data files ("report.html", "report.css" or "report.js") as text."""
    path = resources.files(__package__) / "templates" / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StepscopeError(f"the report template {name!r} is missing from the installed package") from None


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
    from .figures import step_ticks

    return {
        "label": label,
        "meta": _meta_view(result_meta(result), trace),
        "kinds": [s.kind for s in trace.steps],
        "texts": [s.text for s in trace.steps],
        "tokens": [[int(s.token_start), int(s.token_end)] for s in trace.steps],
        "L": int(L), "S": int(S),
        "step_ticks": step_ticks(int(S)),  # the step numbers on the heatmap's axes (as in the figures)
        "layers": [{"layer": int(x), **quantize_layer(maps[x])} for x in chosen],
        "omitted_layers": L - len(chosen),
        "diagnosis": diagnosis.to_json(),
        "groups": diagnosis.layer_groups,  # positions into the per-layer lists
        "layer_ids": diagnosis.layer_ids,  # the model layer of each map
        "depth": diagnosis.model_layers,
    }


def _as_result(x: Any) -> Any:
    if isinstance(x, str | os.PathLike):
        from ..saliency.result import load_result  # torch: only when a folder is read

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
    script = template("report.js")
    script_hash = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    glossary = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in METRIC_HELP.items())
    return template("report.html").format(
        csp=html.escape(csp, quote=True), title=html.escape(title), version=html.escape(__version__),
        style=template("report.css"), data=json_for_script(payload), script=script, extra=extra,
        glossary=glossary, n=len(results))


def render_report(results: Any, out_path: str | os.PathLike, *,
                  extra_sections: Sequence[tuple[str, str]] = (), **kwargs: Any) -> Path:
    """Write the report to `out_path` (temporary file, then rename); returns the path. See build_report_html."""
    from ..io import atomic_write_text

    text = build_report_html(results, extra_sections=extra_sections, **kwargs)
    out = Path(out_path)
    atomic_write_text(out, text)
    return out
