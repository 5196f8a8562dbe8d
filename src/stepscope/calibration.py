"""Calibrate StepFlow for one model from its own Step-Saliency: OEB's layers, SMI's layers and tau_max.

    cal = stepscope.calibrate(["sal/"], model="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    cal.config            # a StepFlowConfig; cal.save("stepflow.json") writes it and stepflow.calibration.json
    print(cal.table())    # each choice beside the paper's default, with its evidence in one line

The decision rules (docs/calibrate.md says them at length; the evidence file repeats them):
- Units: traces. Per trace and layer, the lock-in index is `locality - question_reach` (docs/method.md §4:
  Shallow Lock-in is high locality and low question reach) and the decay measure is `summary_to_thinking`.
- A layer "stands out" when, over the traces, its value differs from the same trace's median layer in the
  failure's direction (lock-in index above it; summary_to_thinking below it): one-sided paired sign-flip
  permutation test (`stepscope.stats`), Benjamini-Hochberg q < Q_THRESHOLD across the candidate layers, and
  Cohen's d_z >= MIN_EFFECT.
- Candidates: the shallow half of the layers for OEB, the deep half for SMI (`stepscope.layers`).
- SMI needs the decay to fall too: the traces' `decay_slope` (over the deep half) is below 0 (one-sided
  sign-flip test, p < Q_THRESHOLD); otherwise SMI keeps the default band.
- With correct and wrong traces (meta "correct", at least MIN_GROUP each), a layer must also be worse in the
  wrong traces (`stepscope.diagnose.compare`: wrong - correct of the lock-in index > 0; of summary_to_thinking
  < 0); the comparison's statistics go into the evidence.
- The band is the longest contiguous run of layers that pass (ties: the larger summed effect). No passing layer,
  or fewer than MIN_TRACES traces with the metric: the paper's default band, with the reason.
- tau_max (needs the model): the median over traces (the correct ones when there are MIN_TRACES of them) of each
  trace's mean bridge mass p(B) over the eligible (query, head) pairs of the OEB band, as StepFlow's own OEB code
  measures it with tau_max = 0 (it then never fires, so the model is unchanged). The saliency maps hold
  attention x gradient, not attention probabilities, so they cannot give p(B). Without the model: the default.
- alpha stays at the paper's 0.06: nothing in a saliency map measures how much momentum a step needs.

Files: the config (exactly `StepFlowConfig.to_json()`, accepted wherever a StepFlow config is: `--stepflow-config`,
`StepFlowConfig.load`, vLLM requests) and beside it `<stem>.calibration.json`, the evidence.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .diagnose.metrics import format_ranges
from .errors import StepscopeError
from .flow.config import StepFlowConfig
from .layers import layer_bands

CALIBRATION_VERSION = 1
Q_THRESHOLD = 0.05
MIN_EFFECT = 0.5  # Cohen's d_z
MIN_TRACES = 4  # traces with a band's metric (below: the default band)
MIN_GROUP = 2  # correct and wrong traces each, for the comparison filter
EVIDENCE_SUFFIX = ".calibration.json"

RULES = {
    "oeb_layers": "the longest contiguous run of shallow-half layers whose lock-in index (locality - "
                  "question_reach) is above the same trace's median layer: one-sided paired sign-flip "
                  f"test over traces, Benjamini-Hochberg q < {Q_THRESHOLD} across the candidate layers, Cohen's "
                  f"d_z >= {MIN_EFFECT}; with correct and wrong traces, also wrong - correct > 0 at the layer. "
                  f"No such layer, or fewer than {MIN_TRACES} traces: the paper's default band.",
    "smi_layers": "the longest contiguous run of deep-half layers whose summary_to_thinking is below the same "
                  "trace's median layer (same test and thresholds), provided summary_to_thinking falls over the "
                  f"deep half (decay_slope < 0, one-sided sign-flip test, p < {Q_THRESHOLD}); with correct and "
                  "wrong traces, also wrong - correct < 0 at the layer. Otherwise the paper's default band.",
    "tau_max": "the median over traces (the correct ones when there are enough) of the trace's mean bridge mass "
               "p(B) over the eligible (query, head) pairs of the chosen OEB layers, measured by StepFlow's own "
               "OEB code with tau_max = 0 (which never fires); needs the model (saliency maps are attention x "
               "gradient, not attention probabilities); otherwise the paper's 0.15.",
    "alpha": "the paper's 0.06: a saliency map does not measure how much step momentum a layer needs.",
}


@dataclass
class Calibration:
    """A calibrated StepFlowConfig and the evidence behind every choice (`evidence`, JSON-ready)."""

    config: StepFlowConfig
    evidence: dict

    def to_json(self) -> dict:
        return {**self.evidence, "config": self.config.to_json()}

    def table(self) -> str:
        """The choices beside the paper's defaults, one line each (what the command prints)."""
        return format_table(self.to_json())

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the config to `path` (exactly `StepFlowConfig.to_json()`) and the evidence beside it
        (`evidence_path(path)`), each atomically; returns both paths."""
        from .io import atomic_write_json

        path = Path(path)
        ev = evidence_path(path)
        atomic_write_json(ev, {**self.to_json(), "config_file": path.name})
        atomic_write_json(path, self.config.to_json())
        return path, ev


def evidence_path(config_path: str | os.PathLike) -> Path:
    """The evidence file beside a calibrated config: stepflow.json -> stepflow.calibration.json."""
    p = Path(config_path)
    return p.with_name((p.stem if p.suffix == ".json" else p.name) + EVIDENCE_SUFFIX)


def load_calibration(path: str | os.PathLike) -> dict:
    """The evidence of a calibration: its `.calibration.json` file, or the config file it sits beside."""
    from .io import read_json_file

    p = Path(path)
    if not p.name.endswith(EVIDENCE_SUFFIX):
        p = evidence_path(p)
    if not p.is_file():
        raise StepscopeError(f"{p}: no such calibration file (stepscope calibrate writes it beside the config)")
    d = read_json_file(p)
    if not isinstance(d, dict) or "stepscope_calibration" not in d:
        raise StepscopeError(f"{p}: not a stepscope calibration (no 'stepscope_calibration' key)")
    return d


# ------------------------------------------------------------------------------------------- the inputs

def _model_key(name: Any) -> str:
    """A model name for comparison: the bundled model's aliases as one, else the last part of a path or hub id."""
    from .models import DEFAULT_MODEL_NAME, is_default_model

    name = str(name).strip().rstrip("/")
    return DEFAULT_MODEL_NAME.lower() if is_default_model(name) else Path(name).name.lower()


def _diagnoses(results: Sequence[Any]) -> tuple[list, list]:
    """(Diagnosis, Trace) of every result, checked to come from one model with every layer computed."""
    from .diagnose import diagnose
    from .saliency.result import find_results, load_result

    items: list[Any] = []
    for r in results:
        if isinstance(r, str | os.PathLike):
            items += [load_result(p) for p in find_results([r])]
        else:
            items.append(r)
    if not items:
        raise StepscopeError("calibrate needs saliency results")
    models = {}
    for r in items:
        models.setdefault(str(r.meta.get("model")), []).append(r)
    if len(models) > 1:
        shown = ", ".join(f"{m} ({len(v)})" for m, v in models.items())
        raise StepscopeError(f"the results come from different models ({shown}): calibrate one model at a time")
    depths = {int(r.meta.get("num_layers", r.num_layers)) for r in items}
    if len(depths) > 1:
        raise StepscopeError(f"the results describe models of {sorted(depths)} layers: calibrate one model at a time")
    L = depths.pop()

    for r in items:
        missing = sorted(set(range(L)) - set(r.layers))
        if missing:
            rid = r.trace.meta.get("id", "a result")
            raise StepscopeError(f"{rid}: saliency was computed on layers {format_ranges(sorted(r.layers))} of {L}; "
                                 f"calibrate needs every layer to place a contiguous band (missing "
                                 f"{format_ranges(missing)}): rerun stepscope saliency with --layers all")
    return [diagnose(r) for r in items], [r.trace for r in items]


# --------------------------------------------------------------------------------------------- the tests

def _none(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _layer_tests(values: np.ndarray, candidates: list[int], sign: int, n_perm: int, seed: int) -> list[dict]:
    """Per candidate layer: is `values` [traces, L] (NaN where null) off the same trace's median layer in the
    direction `sign` (+1 above, -1 below)? One-sided paired sign-flip test, BH across the candidates."""
    from .stats import benjamini_hochberg, paired_permutation_test

    with warnings.catch_warnings():  # a trace without the metric in any layer: NaN, left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(values, axis=1)  # [traces]
    rows = []
    for layer in candidates:
        v = values[:, layer]
        ok = np.isfinite(v) & np.isfinite(ref)
        row = {"layer": layer, "n": int(ok.sum()), "mean": _none(v[ok].mean()) if ok.any() else None,
               "median_layer_mean": _none(ref[ok].mean()) if ok.any() else None, "difference": None,
               "p_value": None, "d_z": None}
        if ok.sum() >= 2:
            t = paired_permutation_test(sign * v[ok], sign * ref[ok], n_perm=n_perm, alternative="greater",
                                        seed=seed + layer)
            row.update(difference=_none((v[ok] - ref[ok]).mean()), p_value=t.p_value,
                       d_z=None if t.effect_size is None else t.effect_size)
        rows.append(row)
    for row, q in zip(rows, benjamini_hochberg([r["p_value"] for r in rows])):
        row["q_bh"] = q
        dz = row["d_z"]
        big = dz is None and (row["difference"] or 0.0) * sign > 0 or dz is not None and dz >= MIN_EFFECT
        row["stands_out"] = bool(q is not None and q < Q_THRESHOLD and big)
    return rows


def contiguous_runs(layers: Sequence[int]) -> list[list[int]]:
    """Sorted layers split into runs of consecutive ones: [0, 1, 2, 5] -> [[0, 1, 2], [5]]."""
    out: list[list[int]] = []
    for x in sorted(layers):
        if out and x == out[-1][-1] + 1:
            out[-1].append(x)
        else:
            out.append([x])
    return out


def _pick_band(rows: list[dict]) -> list[int]:
    """The longest contiguous run of passing layers (ties: the larger summed d_z)."""
    passing = [r["layer"] for r in rows if r["passes"]]
    effect = {r["layer"]: r["d_z"] or 0.0 for r in rows}
    runs = contiguous_runs(passing)
    if not runs:
        return []
    return max(runs, key=lambda run: (len(run), sum(effect[x] for x in run)))


def _comparison_filter(rows: list[dict], cmp, metric_signs: dict[str, int], sign: int) -> None:
    """Add each row's wrong - correct difference (from `compare`) and whether it is in the failure's direction."""
    for row in rows:
        parts, diff = {}, 0.0
        for name, s in metric_signs.items():
            r = cmp.metrics[name][row["layer"]]
            d = r["difference"]
            w = r["welch"] or {}
            parts[name] = {"difference": None if d is None else d["estimate"], "welch_p": w.get("p_value"),
                           "welch_p_holm": w.get("p_holm"), "hedges_g": w.get("effect_size")}
            diff = math.nan if d is None else diff + s * d["estimate"]
        row["wrong_minus_correct"] = {"value": _none(diff), "metrics": parts}
        row["passes"] = row["passes"] and math.isfinite(diff) and sign * diff > 0


def _band_choice(values: np.ndarray, candidates: list[int], default: list[int], sign: int, cmp,
                 metric_signs: dict[str, int], what: str, n_perm: int, seed: int,
                 extra_gate: tuple[bool, str] | None = None) -> dict:
    n = int(np.isfinite(values[:, candidates]).any(axis=1).sum()) if candidates else 0
    rows = _layer_tests(values, candidates, sign, n_perm, seed)
    for r in rows:
        r["passes"] = r["stands_out"]
    if cmp is not None:
        _comparison_filter(rows, cmp, metric_signs, sign)
    band = _pick_band(rows)

    out = {"default": default, "candidates": candidates, "traces": n, "per_layer": rows}
    if n < MIN_TRACES:
        reason = f"only {n} trace(s) have {what} (at least {MIN_TRACES} needed): the paper's default band"
    elif extra_gate is not None and not extra_gate[0]:
        reason = extra_gate[1] + ": the paper's default band"
    elif not band:
        stand = [r["layer"] for r in rows if r["stands_out"]]
        reason = (f"no candidate layer ({format_ranges(candidates)}) stands out: the paper's default band" if not stand
                  else f"layers {format_ranges(stand)} stand out, but wrong traces are not worse than correct ones "
                       "there: the paper's default band")
    else:
        reason = None
    if reason is None:
        sel = [r for r in rows if r["layer"] in band]
        dz = [r["d_z"] for r in sel if r["d_z"] is not None]
        reason = (f"{what} stands out in layers {format_ranges(band)} over {n} traces (q_bh <= "
                  f"{max(r['q_bh'] for r in sel):.3g}" + (f", d_z {min(dz):.2f}-{max(dz):.2f}" if dz else "") + ")"
                  + ("; wrong traces are worse there" if cmp is not None else ""))
        out.update(value=band, source="measured", reason=reason)
    else:
        out.update(value=default, source="default", reason=reason)
    for r in rows:
        r["chosen"] = r["layer"] in out["value"]
    return out


# ------------------------------------------------------------------------------------------ bridge mass

def measure_bridge_mass(model, tokenizer, traces: Sequence[Any], layers: list[int],
                        progress: Callable[[int, int], None] | None = None) -> list[dict[int, float] | None]:
    """Per trace, the mean bridge mass p(B) over the eligible (query, head) pairs of each layer in `layers`: one
    teacher-forced forward under StepFlow with OEB on those layers and tau_max = 0, so OEB never fires and the
    model is unchanged; the masses are StepFlow's own stats (the code that applies OEB). None for a trace with
    no eligible query (no thinking)."""
    import torch

    from .flow import StepFlow

    out: list[dict[int, float] | None] = []
    device = next(model.parameters()).device
    for k, trace in enumerate(traces):
        cfg = StepFlowConfig(oeb_layers=list(layers), smi=False, tau_max=0.0, fmt=trace.format or trace.fmt)
        with torch.no_grad(), StepFlow(model, tokenizer, cfg) as flow:
            model(torch.tensor([trace.token_ids], device=device))
        st = flow.stats
        masses = {i: st.bridge_mass_before[i] for i in layers if st.oeb_eligible.get(i)}
        out.append(masses or None)
        if progress:
            progress(k + 1, len(traces))
    return out


def _tau_choice(masses: list[dict[int, float] | None] | None, labels: list[bool | None], layers: list[int],
                ids: list[str | None]) -> dict:
    default = StepFlowConfig.tau_max
    out: dict = {"default": default, "layers": layers}
    if masses is None:
        return {**out, "value": default, "source": "default",
                "reason": "no model given: the bridge mass p(B) is an attention probability, which saliency maps "
                          "(attention x gradient) do not hold; pass --model to measure it"}
    per_trace = [None if m is None else float(np.mean([m[i] for i in layers if i in m])) for m in masses]
    out["per_trace"] = [{"id": i, "correct": c, "bridge_mass": v} for i, c, v in zip(ids, labels, per_trace)]
    out["per_layer_mean"] = {str(i): _none(np.mean(v)) if (v := [m[i] for m in masses if m and i in m]) else None
                             for i in layers}
    good = [v for v, c in zip(per_trace, labels) if v is not None and c is True]
    pool, which = (good, "correct ") if len(good) >= MIN_TRACES else \
        ([v for v in per_trace if v is not None], "")
    if len(pool) < MIN_TRACES:
        return {**out, "value": default, "source": "default",
                "reason": f"only {len(pool)} trace(s) have a bridge mass (at least {MIN_TRACES} needed)"}
    qs = np.quantile(pool, [0.0, 0.25, 0.5, 0.75, 1.0])
    out["distribution"] = dict(zip(("min", "q25", "median", "q75", "max"), map(float, qs)), n=len(pool),
                               traces=which.strip() or "all")
    value = round(min(float(qs[2]), 0.999), 3)
    return {**out, "value": value, "source": "measured",
            "reason": f"median of the mean bridge mass p(B) of {len(pool)} {which}traces over layers "
                      f"{_ranges(layers)} (quartiles {qs[1]:.3f}-{qs[3]:.3f})"}


def _ranges(xs: list[int]) -> str:
    return format_ranges(sorted(xs)) if xs else "none"


# ------------------------------------------------------------------------------------------- calibrate

def calibrate(results: Sequence[Any] | str | os.PathLike, *, model: Any = None, tokenizer: Any = None,
              device: str | None = None, dtype: str = "auto", n_perm: int = 10_000, n_boot: int = 2_000,
              seed: int = 0, progress: Callable[[str], None] | None = None) -> Calibration:
    """Choose OEB's and SMI's layers (and, given the model, tau_max) from Step-Saliency results of one model.

    `results`: SaliencyResult objects, result folders, or folders of them. `model`: a loaded model (with its
    `tokenizer`) or a model name for `stepscope.models.load_model`, used only to measure the bridge mass for
    tau_max; it must be the model the results come from. The rules: docs/calibrate.md (and the module docstring).
    """
    from .diagnose import compare

    if isinstance(results, str | os.PathLike):
        results = [results]
    diags, traces = _diagnoses(list(results))
    L = diags[0].model_layers
    bands = layer_bands(L)
    deep_half = list(bands["deep_half"])
    shallow_half = [x for x in range(L) if x < deep_half[0]] or [0]
    defaults = StepFlowConfig().resolve(L)
    ids = [d.id for d in diags]
    labels = [d.meta.get("correct") if isinstance(d.meta.get("correct"), bool) else None for d in diags]
    n_c, n_w = labels.count(True), labels.count(False)

    def metric(name: str) -> np.ndarray:  # [traces, L]
        return np.stack([d.metric(name) for d in diags])

    lock = metric("locality") - metric("question_reach")
    s2t = metric("summary_to_thinking")
    cmp = None
    if n_c >= MIN_GROUP and n_w >= MIN_GROUP:
        cmp = compare([d for d, c in zip(diags, labels) if c], [d for d, c in zip(diags, labels) if c is False],
                      n_boot=n_boot, n_perm=n_perm, seed=seed)
    oeb = _band_choice(lock, shallow_half, defaults[0], +1, cmp,
                       {"locality": 1, "question_reach": -1}, "lock-in", n_perm, seed)
    slope = _slope_test([d.scores.get("decay_slope") for d in diags], n_perm, seed)
    gate = (slope["falling"], "summary_to_thinking does not fall over the deep half "
            f"(mean decay_slope {_fmt(slope['mean'])}, p {_fmt(slope['p_value'])})")
    smi = _band_choice(s2t, deep_half, defaults[1], -1, cmp, {"summary_to_thinking": 1}, "decay",
                       n_perm, seed + 10_000, extra_gate=gate)
    smi["decay_slope"] = slope

    masses = None
    if model is not None:
        name = model if isinstance(model, str) else None
        if name is not None:
            from .models import load_model

            model, tokenizer = load_model(name, device=device, dtype=dtype)
        if tokenizer is None:
            raise StepscopeError("measuring the bridge mass needs the model's tokenizer too")
        from .saliency.core import model_name

        given = {_model_key(model_name(model))} | ({_model_key(name)} if name is not None else set())
        if _model_key(diags[0].meta.get("model")) not in given:
            raise StepscopeError(f"the results come from {diags[0].meta.get('model')}, but the model given is "
                                 f"{model_name(model)}: calibrate with the model the saliency was computed on")
        if progress:
            progress(f"measuring the bridge mass of {len(traces)} traces in layers {format_ranges(oeb['value'])}")
        step = None if progress is None else (lambda k, n: progress(f"bridge mass: {k}/{n} traces"))
        masses = measure_bridge_mass(model, tokenizer, traces, oeb["value"], progress=step)
    tau = _tau_choice(masses, labels, oeb["value"], ids)
    alpha = {"value": StepFlowConfig.alpha, "default": StepFlowConfig.alpha, "source": "default",
             "reason": "kept at " + RULES["alpha"]}

    fmts = {(t.format.think_start, t.format.think_end) for t in traces
            if t.format is not None and t.format.name not in ("think", "harmony")}
    config = StepFlowConfig(oeb_layers=oeb["value"], smi_layers=smi["value"], tau_max=tau["value"],
                            alpha=alpha["value"])
    if len(fmts) == 1:  # custom markers: the config must name them (auto would not find them)
        config = replace(config, fmt="markers", markers=fmts.pop())
    evidence = {
        "stepscope_calibration": CALIBRATION_VERSION, "model": diags[0].meta.get("model"), "num_layers": L,
        "traces": {"n": len(diags), "ids": ids, "correct": n_c, "wrong": n_w, "unlabelled": labels.count(None)},
        "defaults": {"oeb_layers": defaults[0], "smi_layers": defaults[1], "tau_max": StepFlowConfig.tau_max,
                     "alpha": StepFlowConfig.alpha},
        "candidates": {"oeb_layers": shallow_half, "smi_layers": deep_half},
        "rules": RULES,
        "settings": {"q_threshold": Q_THRESHOLD, "min_effect_d_z": MIN_EFFECT, "min_traces": MIN_TRACES,
                     "min_group": MIN_GROUP, "n_perm": n_perm, "n_boot": n_boot, "seed": seed,
                     "test": "one-sided paired sign-flip permutation (exact up to 16 traces), Benjamini-Hochberg "
                             "across candidate layers"},
        "comparison": None if cmp is None else {"correct": n_c, "wrong": n_w,
                                                "shared_problems": cmp.pairing["shared_problems"],
                                                "direction": "wrong - correct", "settings": cmp.settings},
        "choices": {"oeb_layers": oeb, "smi_layers": smi, "tau_max": tau, "alpha": alpha},
        "note": "calibrate places the repair where the failure is measured; whether that raises accuracy is for "
                "stepscope eval to show (--arms baseline,stepflow,calibrated=@FILE)",
    }
    return Calibration(config, _jsonable(evidence))


def _slope_test(slopes: list[float | None], n_perm: int, seed: int) -> dict:
    """Whether summary_to_thinking falls over the deep half: the traces' decay_slope below 0 (one-sided)."""
    from .stats import paired_permutation_test

    xs = np.array([s for s in slopes if s is not None and math.isfinite(s)], dtype=np.float64)
    out = {"n": int(xs.size), "mean": _none(xs.mean()) if xs.size else None, "p_value": None, "falling": False}
    if xs.size >= 2:
        t = paired_permutation_test(xs, np.zeros_like(xs), n_perm=n_perm, alternative="less", seed=seed)
        out.update(p_value=t.p_value, d_z=t.effect_size,
                   falling=bool(t.p_value is not None and t.p_value < Q_THRESHOLD and xs.mean() < 0))
    return out


def _jsonable(x: Any) -> Any:
    """Plain JSON: numpy scalars as Python numbers, NaN and inf as None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def format_table(cal: dict) -> str:
    """The terminal table of a calibration (its JSON): each knob, calibrated beside the paper's default."""
    ch, t = cal["choices"], cal["traces"]
    labelled = f"; {t['correct']} correct, {t['wrong']} wrong" if t["correct"] or t["wrong"] else ""
    from .evaluate.summary import model_label

    lines = [f"{t['n']} traces of {model_label(str(cal.get('model')))} ({cal['num_layers']} layers){labelled}",
             f"{'knob':<11} {'calibrated':<12} {'paper':<10} {'source':<9} evidence"]
    for name in ("oeb_layers", "smi_layers", "tau_max", "alpha"):
        c = ch[name]
        show = _ranges if name.endswith("layers") else (lambda v: f"{v:g}")
        lines.append(f"{name:<11} {show(c['value']):<12} {show(c['default']):<10} {c['source']:<9} {c['reason']}")
    return "\n".join(lines)
