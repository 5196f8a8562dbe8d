"""Choose StepFlow's layers (and, with --model, tau_max) for a model from its own Step-Saliency.

Reads saliency results of one model's traces (with meta "correct" where known: `eval --save-traces` writes it),
places OEB on the contiguous band of shallow layers where Shallow Lock-in is measured and SMI on the band of deep
layers where Deep Decay is measured (with correct and wrong traces: where the wrong ones are worse), and, given
--model, sets tau_max from the bridge mass OEB acts on in those layers. Weak evidence keeps the paper's default
and says so. Writes --out (a StepFlow config: `generate`/`eval --stepflow-config FILE`, `eval --arms
calibrated=@FILE`, StepFlowConfig.load, vLLM requests) and beside it <stem>.calibration.json (every choice with
its per-layer evidence; `stepscope report --calibration FILE` draws it). docs/calibrate.md states the rules.

examples:
  stepscope calibrate sal/ --out stepflow.json
  stepscope calibrate sal/ --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --out r1-7b.json
  stepscope eval --model M --benchmark aime24 --arms baseline,stepflow,calibrated=@r1-7b.json --out runs/cal
"""

from __future__ import annotations

import argparse
import sys

HELP = "choose StepFlow's layers and tau_max for a model from its own Step-Saliency results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="SALIENCY_DIR", help="saliency result folder(s), or folder(s) of them")
    p.add_argument("--out", required=True, metavar="FILE.json",
                   help="the StepFlow config to write (the evidence goes beside it, as <stem>.calibration.json)")
    g = p.add_argument_group("model (only to measure the bridge mass for tau_max; without it tau_max stays 0.15)")
    g.add_argument("--model", default=None, help="the model the saliency was computed on (hub id or local folder; "
                                                 "'default' for the bundled one)")
    g.add_argument("--dtype", default="auto", help="weights dtype (default auto)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--n-perm", type=int, default=10_000, help="random sign flips per test beyond 16 traces "
                                                               "(default 10000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from ..calibration import calibrate, evidence_path
    from ..errors import StepscopeError
    from ..io import check_writable

    if not args.out.lower().endswith(".json"):
        raise StepscopeError(f"--out {args.out}: expected a .json file name")
    if args.n_perm < 1:
        raise StepscopeError("--n-perm must be at least 1")
    check_writable(args.out, "--out")
    check_writable(evidence_path(args.out), "--out")

    def say(msg: str) -> None:
        print(f"stepscope calibrate: {msg}", file=sys.stderr, flush=True)

    cal = calibrate(args.dirs, model=args.model, device=args.device, dtype=args.dtype, n_perm=args.n_perm,
                    seed=args.seed, progress=say)
    config, evidence = cal.save(args.out)
    print(cal.table())
    print(f"wrote {config} (the StepFlow config) and {evidence} (the evidence)")
    return 0
