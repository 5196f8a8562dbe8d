"""The whole method on the bundled SmolLM2-135M-Instruct, offline, in a few minutes on a laptop CPU.

Takes a few packaged GSM8K problems, generates a trace for each with and without StepFlow, grades them, runs
Step-Saliency on every trace, diagnoses Shallow Lock-in and Deep Decay, and writes one self-contained HTML
report (heatmaps, metrics, the StepFlow comparison) with the traces, maps and diagnoses beside it.

example:
  stepscope demo --out stepscope-demo && xdg-open stepscope-demo/report.html
"""

from __future__ import annotations

import argparse

from . import options

HELP = "run the whole method on the bundled model, offline, and write an HTML report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="stepscope-demo", help="output folder (default: ./stepscope-demo)")
    p.add_argument("--problems", type=int, default=2, help="how many problems (default 2)")
    p.add_argument("--benchmark", default="gsm8k", help="packaged benchmark to take them from (default gsm8k)")
    p.add_argument("--max-thinking-tokens", type=int, default=96, help="thinking budget per trace (default 96)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="new tokens per trace (default 160)")
    options.add_model_options(p)
    p.set_defaults(dtype="float32")  # the demo's numbers are float32's, on every device


def run(args: argparse.Namespace) -> int:
    import time

    from ..demo import DemoSettings, run_demo
    from ..errors import StepscopeError
    from ..io import check_writable

    if args.problems < 1:
        raise StepscopeError("--problems must be at least 1")
    if args.max_thinking_tokens < 1 or args.max_new_tokens <= args.max_thinking_tokens:
        raise StepscopeError("need 1 <= --max-thinking-tokens < --max-new-tokens")
    check_writable(args.out, "--out", folder=True)
    t0 = time.perf_counter()
    summary = run_demo(args.out, DemoSettings(model=args.model, problems=args.problems, benchmark=args.benchmark,
                                              max_thinking_tokens=args.max_thinking_tokens,
                                              max_new_tokens=args.max_new_tokens, device=args.device,
                                              dtype=args.dtype, attn=None if args.attn == "auto" else args.attn,
                                              trust_remote_code=args.trust_remote_code))
    print()
    print(f"{'problem':<22} {'gold':>8} {'baseline':>12} {'StepFlow':>12}  {'OEB fired':<30} bridge mass")
    for r in summary["problems"]:
        b = f"{r['baseline_answer']}{' ok' if r['baseline_correct'] else ' x'}"
        f = f"{r['stepflow_answer']}{' ok' if r['stepflow_correct'] else ' x'}"
        print(f"{str(r['id'])[:22]:<22} {str(r['gold'])[:8]:>8} {b[:12]:>12} {f[:12]:>12}  {r['oeb_rate']:<30} "
              f"{r['bridge']}")
    print()
    print(f"{'trace':<40} {'lock-in':>8} {'q-reach(shallow)':>17} {'sum->think(deep)':>17}")
    for d in summary["flow_scores"]:
        print(f"{d['label'][:40]:<40} {d['lock_in']:>8} {d['q_reach']:>17} {d['s2t']:>17}")
    print()
    conv = summary["seconds"].get("model_conversion")
    took = time.perf_counter() - t0 - (conv or 0.0)
    conv_note = f" (plus {conv:.0f} s for the one-time model conversion)" if conv else ""
    print(f"done in {took:.0f} s{conv_note}. Report: {args.out}/report.html "
          f"(traces.jsonl, saliency/<trace>/ and summary.json beside it)")
    return 0
