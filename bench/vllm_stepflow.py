"""Plain vLLM, vLLM with StepFlow, and stepscope's transformers engine plain and with StepFlow: the same prompts,
side by side in one run, tokens/s and ratios.

    .venv-vllm/bin/python bench/vllm_stepflow.py                  # CPU: SmolLM2, batch 8, 64 new tokens
    .venv-vllm/bin/python bench/vllm_stepflow.py --model PATH --batch 64 --new-tokens 512 --dtype bfloat16

Greedy decoding. The vLLM arms write exactly `--new-tokens` tokens per request (ignore_eos); the transformers
arms stop at end of sequence, and their tokens/s counts the tokens they wrote. Rounds alternate the arms; each
arm's figure is its median over rounds. The StepFlow/plain vLLM ratio is also given per round (the two arms run
back to back, so a slow spell of a shared machine hits both) and as the median of those. Run it in the environment scripts/env.sh's vllm_env makes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

QUESTIONS = [
    "What is 12 * 13? Explain.", "A train goes 60 km in 1.5 hours. What is its speed?",
    "Is 91 a prime number? Think it through.", "How many minutes are in a week?",
    "What is the sum of the first 20 positive integers?", "If x + 3 = 11, what is 2x?",
    "A rectangle is 7 by 9. What is its perimeter?", "What is 15% of 240?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true", help="only the two vLLM arms")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import torch
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM

    import stepscope.vllm as sv
    from stepscope.flow import StepFlowConfig, generate_traces
    from stepscope.models import default_model_path
    from stepscope.prompts import build_prompt

    path = args.model or str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    cfg = StepFlowConfig(fmt="think")
    questions = [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (variant {i})")
                 for i in range(args.batch)]
    ids = [build_prompt(tok, q, fmt="think")[1] for q in questions]
    llm = LLM(model=path, dtype=args.dtype, enforce_eager=True, max_model_len=2048, max_num_seqs=args.batch,
              seed=0, enable_prefix_caching=False)

    def vllm_arm(flow):
        params = [sv.sampling_params(cfg if flow else None, f"b{i}", max_tokens=args.new_tokens, temperature=0,
                                     ignore_eos=True) for i in range(len(ids))]
        t0 = time.perf_counter()
        outs = llm.generate([sv.prompt(p, cfg if flow else None) for p in ids], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        if flow:
            sv.collect_stats(llm, clear=True)
        return sum(len(o.outputs[0].token_ids) for o in outs) / dt

    model = None
    if not args.no_transformers:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()

    def hf_arm(flow):
        t0 = time.perf_counter()
        traces = generate_traces(model, tok, questions, stepflow=cfg if flow else None,
                                 max_new_tokens=args.new_tokens, temperature=0.0, batch_size=args.batch,
                                 fmt="think", progress=False)
        dt = time.perf_counter() - t0
        return sum(t.meta["num_new_tokens"] for t in traces) / dt

    arms = {"vllm": lambda: vllm_arm(False), "vllm+stepflow": lambda: vllm_arm(True)}
    if model is not None:
        arms.update({"transformers": lambda: hf_arm(False), "transformers+stepflow": lambda: hf_arm(True)})
    vllm_arm(False)  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            samples[name].append(fn())
    res = {k: statistics.median(v) for k, v in samples.items()}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "vllm": vllm.__version__, "torch": torch.__version__, "commit": commit, "model": path,
            "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds}
    print(json.dumps(info))
    print(f"{'arm':<24}{'tokens/s':>10}  per round")
    for k, v in res.items():
        print(f"{k:<24}{v:>10.2f}  {', '.join(f'{x:.2f}' for x in samples[k])}")
    paired = [f / p for f, p in zip(samples["vllm+stepflow"], samples["vllm"])]  # the two arms of one round
    print(f"vLLM+StepFlow / plain vLLM: {res['vllm+stepflow'] / res['vllm']:.3f} (ratio of medians); "
          f"per round {', '.join(f'{x:.3f}' for x in paired)}, median {statistics.median(paired):.3f}")
    if model is not None:
        print(f"transformers+StepFlow / transformers: {res['transformers+stepflow'] / res['transformers']:.3f}")
        print(f"vLLM+StepFlow / transformers+StepFlow: {res['vllm+stepflow'] / res['transformers+stepflow']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "tokens_per_s": res, "rounds": samples,
                       "vllm_ratio_per_round": paired, "vllm_ratio_median_per_round": statistics.median(paired)},
                      f, indent=1)


if __name__ == "__main__":
    main()
