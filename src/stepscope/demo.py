"""The demo: generate, measure, diagnose and repair on the bundled model, offline, in a few minutes.

`run_demo(out_dir)` takes a few packaged GSM8K problems, generates a trace for each with and without StepFlow
(greedy, so the two arms differ only by StepFlow), grades them, runs Step-Saliency on every trace, diagnoses
the maps and writes one self-contained HTML report with a StepFlow comparison section. Everything goes into a
temporary folder that replaces `out_dir` only when complete.
"""

from __future__ import annotations

import html
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import StepscopeError
from .io import atomic_dir, atomic_write_json
from .wording import plural

FALLBACK_PROBLEMS = [  # written for stepscope; used only when no packaged benchmark is installed
    ("demo-apples", "A basket holds 12 apples. Maria takes a third of them and then buys 5 more for the basket. "
                    "How many apples are in the basket now?", "13"),
    ("demo-train", "A train travels 60 miles per hour for 2 hours and then 40 miles per hour for 3 hours. "
                   "How many miles does it travel in total?", "240"),
]


@dataclass
class DemoSettings:
    model: str = "default"
    problems: int = 2
    benchmark: str = "gsm8k"
    max_thinking_tokens: int = 96
    max_new_tokens: int = 160
    device: str | None = None
    dtype: str = "float32"
    attn: str | None = None  # attention implementation (None: transformers' choice)
    trust_remote_code: bool = False


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_problems(benchmark: str, n: int) -> list[tuple[str, str, str]]:
    """(id, question, answer) of the first `n` problems of a packaged benchmark, else the fallback problems."""
    try:
        from .evaluate.benchmarks import load_benchmark

        bench = load_benchmark(benchmark, limit=n, use_hub=False)
        probs = [(p.id, p.prompt_text(), p.answer) for p in bench.problems[:n]]
        if probs:
            return probs
    except StepscopeError as e:
        _say(f"  (no packaged {benchmark}: {e}; using the built-in demo problems)")
    return FALLBACK_PROBLEMS[:n]


def _stepflow_section(rows: list[dict], diag_rows: list[dict]) -> str:
    """HTML of the StepFlow comparison (every value escaped: model text is untrusted)."""
    e = html.escape
    out = ["<p>Each problem was answered twice with greedy decoding: by the plain model and under StepFlow "
           "(Odds-Equal Bridge in the bottom quarter of layers, Step Momentum Injection in the top quarter, the "
           "paper's defaults). A 135M model is far too small for reasoning gains; the point is to see the "
           "machinery act: how often OEB fired, how it moved the bridge mass, and how the saliency flow "
           "changed.</p>",
           "<table><thead><tr><th>problem</th><th>gold</th><th>baseline answer</th><th>StepFlow answer</th>"
           "<th>tokens (base / SF)</th><th>OEB fired</th><th>bridge mass before &rarr; after</th>"
           "<th>SMI fired</th></tr></thead><tbody>"]
    for r in rows:
        out.append(
            f"<tr><td>{e(r['id'])}</td><td>{e(str(r['gold']))}</td>"
            f"<td>{e(str(r['baseline_answer']))} {'&#10003;' if r['baseline_correct'] else '&#10007;'}</td>"
            f"<td>{e(str(r['stepflow_answer']))} {'&#10003;' if r['stepflow_correct'] else '&#10007;'}</td>"
            f"<td>{r['baseline_tokens']} / {r['stepflow_tokens']}</td>"
            f"<td>{e(r['oeb_rate'])}</td><td>{e(r['bridge'])}</td><td>{e(str(r['smi_fires']))}</td></tr>")
    out.append("</tbody></table>")
    if diag_rows:
        out.append("<p>Flow scores of each trace (from its own Step-Saliency maps): higher lock-in means shallow "
                   "layers stay on the current step; summary&rarr;thinking is the deep layers' mean share of "
                   "the summary's saliency on the thinking.</p><table><thead><tr><th>trace</th>"
                   "<th>lock-in score</th><th>question reach (shallow)</th><th>summary&rarr;thinking (deep)</th>"
                   "</tr></thead><tbody>")
        for d in diag_rows:
            out.append(f"<tr><td>{e(d['label'])}</td><td>{e(d['lock_in'])}</td><td>{e(d['q_reach'])}</td>"
                       f"<td>{e(d['s2t'])}</td></tr>")
        out.append("</tbody></table>")
    return "".join(out)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _band_mean(values: list[float | None], positions: list[int]) -> float | None:
    """The mean of the non-null values at `positions`, None when there is none."""
    xs = [values[i] for i in positions if values[i] is not None]
    return sum(xs) / len(xs) if xs else None


def run_demo(out_dir: str | Path = "stepscope-demo", settings: DemoSettings | None = None) -> dict:
    """Run the whole method on the bundled model; returns the summary (also written to summary.json)."""
    import torch

    from .diagnose import diagnose
    from .evaluate.grading import grade_math_detail
    from .flow import StepFlowConfig, generate_traces
    from .models import default_model_path, default_model_ready, is_default_model, load_model
    from .report.html import render_report
    from .saliency import step_saliency

    s = settings or DemoSettings()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    out_dir = Path(out_dir)
    t_convert = None
    if is_default_model(s.model) and not default_model_ready():  # the one-time GGUF -> safetensors conversion
        _say("[1/5] converting the bundled model to safetensors (once; later runs reuse it)")
        t0 = time.perf_counter()
        default_model_path()
        t_convert = time.perf_counter() - t0
        _say(f"      converted in {t_convert:.0f} s (not counted in the method's time below)")
    _say(f"[1/5] loading {s.model} model")
    model, tok = load_model(s.model, device=s.device, dtype=s.dtype, attn_implementation=s.attn,
                            trust_remote_code=s.trust_remote_code)
    L = model.config.num_hidden_layers
    problems = load_problems(s.benchmark, s.problems)
    _say(f"      {type(model).__name__}, {L} layers; {len(problems)} {s.benchmark} problems")

    questions = [q for _, q, _ in problems]
    metas = [{"id": pid, "answer": gold} for pid, _, gold in problems]
    common = dict(max_new_tokens=s.max_new_tokens, max_thinking_tokens=s.max_thinking_tokens, temperature=0.0,
                  batch_size=len(questions), progress=False, metas=metas)
    _say(f"[2/5] generating {len(questions)} traces without StepFlow (thinking budget {s.max_thinking_tokens} "
         "tokens, greedy)")
    t0 = time.perf_counter()
    base = generate_traces(model, tok, questions, stepflow=None, **common)
    t_base = time.perf_counter() - t0
    _say(f"      {sum(t.meta['num_new_tokens'] for t in base)} tokens in {t_base:.1f} s")
    _say(f"[3/5] generating the same {len(questions)} traces under StepFlow")
    t0 = time.perf_counter()
    flow = generate_traces(model, tok, questions, stepflow=StepFlowConfig(), **common)
    t_flow = time.perf_counter() - t0
    _say(f"      {sum(t.meta['num_new_tokens'] for t in flow)} tokens in {t_flow:.1f} s")

    rows = []
    for (pid, _, gold), b, f in zip(problems, base, flow):
        gb, gf = grade_math_detail(gold, b), grade_math_detail(gold, f)
        b.meta.update(arm="baseline", correct=gb.correct, extracted_answer=gb.answer)
        f.meta.update(arm="stepflow", correct=gf.correct, extracted_answer=gf.answer)
        st = f.meta.get("stepflow_stats") or {}
        fires = sum((st.get("oeb_fires") or {}).values())
        elig = sum((st.get("oeb_eligible") or {}).values())
        before = [v for v in (st.get("bridge_mass_before") or {}).values() if v is not None]
        after = [v for v in (st.get("bridge_mass_after") or {}).values() if v is not None]
        rows.append({
            "id": pid, "gold": gold, "baseline_answer": gb.answer, "baseline_correct": gb.correct,
            "stepflow_answer": gf.answer, "stepflow_correct": gf.correct,
            "baseline_tokens": b.meta["num_new_tokens"], "stepflow_tokens": f.meta["num_new_tokens"],
            "oeb_rate": f"{fires / elig:.1%} of {plural(elig, 'query-head')}" if elig else "n/a",
            "bridge": f"{sum(before) / len(before):.3f} → {sum(after) / len(after):.3f}" if before and after
            else "n/a",
            "smi_fires": sum((st.get("smi_fires") or {}).values()),
        })

    traces = [t for pair in zip(base, flow) for t in pair]
    labels = [f"{t.meta['id']} · {t.meta['arm']}" for t in traces]
    _say(f"[4/5] Step-Saliency on {len(traces)} traces ({L} layers, exact chunked backward)")
    t0 = time.perf_counter()
    results = []
    for i, t in enumerate(traces):
        results.append(step_saliency(model, t))
        _say(f"      {labels[i]}: {len(t)} tokens, {t.num_steps} steps")
    t_sal = time.perf_counter() - t0

    _say("[5/5] diagnosing and writing the report")
    diags = [diagnose(r) for r in results]
    diag_rows = []
    for lab, d in zip(labels, diags):
        bands = d.layer_groups  # positions of the shallow and deep layers in the per-layer lists
        diag_rows.append({
            "label": lab,
            "lock_in": _fmt(d.scores["lock_in_score"]),
            "q_reach": _fmt(_band_mean(d.metrics["question_reach"], bands["shallow"])),
            "s2t": _fmt(_band_mean(d.metrics["summary_to_thinking"], bands["deep"])),
        })
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "traces.jsonl", "w", encoding="utf-8") as fh:
            for t in traces:
                fh.write(json.dumps(t.to_json(), ensure_ascii=False) + "\n")
        for lab, r, d in zip(labels, results, diags):
            sub = tmp / "saliency" / lab.replace(" · ", "-")
            r.save(sub)
            atomic_write_json(sub / "diagnosis.json", d.to_json())
        report = render_report(results, tmp / "report.html", diagnoses=diags, labels=labels,
                               title="stepscope demo: SmolLM2-135M-Instruct",
                               extra_sections=[("StepFlow comparison", _stepflow_section(rows, diag_rows))])
        summary = {
            "model": s.model, "layers": L, "problems": rows, "flow_scores": diag_rows,
            "seconds": {"generate_baseline": round(t_base, 2), "generate_stepflow": round(t_flow, 2),
                        "saliency": round(t_sal, 2),
                        "total": round(time.perf_counter() - t_start - (t_convert or 0.0), 2),
                        "model_conversion": None if t_convert is None else round(t_convert, 2)},
            "report": "report.html",
        }
        atomic_write_json(tmp / "summary.json", summary)
        del report
    summary["seconds"]["total"] = round(time.perf_counter() - t_start - (t_convert or 0.0), 2)
    return summary
