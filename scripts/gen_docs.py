"""Regenerate docs/cli.md and docs/api.md from the code itself (a test checks they are current).

usage: python scripts/gen_docs.py [--check]
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (module, names): the public API, in reading order
API = [
    ("stepscope.trace", ["Trace", "load_traces"]),
    ("stepscope.segment", ["Step", "Segmenter"]),
    ("stepscope.formats", ["Format", "register_format", "get_format", "detect_format"]),
    ("stepscope.models", ["load_model", "load_tokenizer", "default_model_path"]),
    ("stepscope.saliency", ["step_saliency", "SaliencyResult", "estimate_memory"]),
    ("stepscope.diagnose", ["diagnose", "build_profile", "compare", "Diagnosis"]),
    ("stepscope.calibration", ["calibrate", "Calibration", "load_calibration"]),
    ("stepscope.report.html", ["render_report", "build_report_html"]),
    ("stepscope.flow", ["StepFlowConfig", "StepFlow", "generate_traces"]),
    ("stepscope.decoding", ["DecodeConfig"]),
    ("stepscope.layers", ["layer_bands", "parse_layers", "resolve_layers"]),
    ("stepscope.prompts", ["build_prompt"]),
    ("stepscope.evaluate", ["load_benchmark", "BenchmarkSpec", "register_benchmark", "grade_math", "grade_choice",
                            "grade_code", "run_eval"]),
    ("stepscope.stats", ["bootstrap_ci", "paired_bootstrap_ci", "paired_permutation_test", "welch_test",
                         "mann_whitney_test", "holm", "benjamini_hochberg"]),
    ("stepscope.demo", ["run_demo"]),
]


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _sig(name: str, obj) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def api_markdown() -> str:
    out = ["# API reference", "",
           "Generated from the docstrings by `python scripts/gen_docs.py`; a test checks that it is current.", ""]
    for modname, names in API:
        mod = importlib.import_module(modname)  # a public module or name that is gone is an error, not a gap
        out += [f"## `{modname}`", "", _doc(mod).split("\n\n")[0], ""]
        for name in names:
            obj = getattr(mod, name)
            out += [f"### `{_sig(name, obj)}`", "", _doc(obj), ""]
            if inspect.isclass(obj):
                for mname, m in inspect.getmembers(obj):
                    if mname.startswith("_") or not (inspect.isfunction(m) or inspect.ismethod(m)):
                        continue
                    if m.__qualname__.split(".")[0] != obj.__name__ or not m.__doc__:
                        continue
                    out += [f"- `{_sig(mname, m)}`: {_doc(m).splitlines()[0]}"]
                out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from stepscope.cli import cli_reference_markdown

    files = {ROOT / "docs" / "cli.md": cli_reference_markdown().rstrip() + "\n",
             ROOT / "docs" / "api.md": api_markdown()}
    stale = [p for p, text in files.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
    if "--check" in sys.argv:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run python scripts/gen_docs.py")
        return 1 if stale else 0
    for p, text in files.items():
        p.parent.mkdir(exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
