"""Fingerprints of what StepFlow produces (tokens, a hash of the logits, stats), to check that two versions of the
code behave bit for bit alike.

    PYTHONPATH=OLD/src python scripts/stepflow_equivalence.py hf --out old_hf.json
    PYTHONPATH=NEW/src python scripts/stepflow_equivalence.py hf --out new_hf.json
    python scripts/stepflow_equivalence.py compare old_hf.json new_hf.json

Parts (each in the environment that has its engine):
- `hf`: the transformers engine on the bundled SmolLM2 (float32, greedy, "think" prompts): `model.generate` under
  StepFlow at batch 1 and 8 (the StepFlow benchmark configurations: paper defaults, 64 new tokens, kernel="torch"),
  stepscope's own loop (`generate_traces`, budget forcing) at batch 8, and one teacher-forced forward over a trace
  with a summary (the prefill path); plus a tiny random GPT-OSS-shaped model (sinks, sliding windows) at batch 4.
- `vllm`: StepFlow inside vLLM (vllm_env's venv) on SmolLM2 at batch 1 and 8, 48 tokens (ignore_eos), the top-5
  logprobs of every token hashed, and `collect_stats`.
- `demo`: `stepscope demo` into a temporary folder; every map tensor hashed, and each trace of traces.jsonl field
  by field (its meta and the dicts in it, such as config and stepflow_stats, key by key; wall-clock times left out).
Each fingerprint records which stepscope it imported. `compare` prints the entries that differ and exits 1 if any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

QUESTIONS = [
    "What is 12 * 13? Explain.", "A train goes 60 km in 1.5 hours. What is its speed?",
    "Is 91 a prime number? Think it through.", "How many minutes are in a week?",
    "What is the sum of the first 20 positive integers?", "If x + 3 = 11, what is 2x?",
    "A rectangle is 7 by 9. What is its perimeter?", "What is 15% of 240?",
]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def _tensor_sha(t) -> str:
    return _sha(t.detach().to("cpu").contiguous().numpy().tobytes())


def _hashes(obj, depth: int):
    """`obj` with every value `depth` levels down (or a non-dict above that) replaced by its hash, so that `compare`
    names the field that differs (for example /traces/ID-ARM/meta/config/KEY)."""
    if depth > 0 and isinstance(obj, dict):
        return {str(k): _hashes(v, depth - 1) for k, v in obj.items()}
    return _sha(json.dumps(obj, sort_keys=True).encode())


def _untimed(meta):
    """`meta` without its wall-clock entries (keys naming time or seconds, at any depth: meta["timing"] holds
    prefill_seconds, batch_seconds and row_seconds beside the batch's deterministic sizes)."""
    if not isinstance(meta, dict):
        return meta
    return {k: _untimed(v) for k, v in meta.items() if "time" not in k and "second" not in k}


def _where() -> str:
    import stepscope

    return str(Path(stepscope.__file__).resolve().parent)


def hf_part() -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from stepscope.flow import StepFlow, StepFlowConfig, generate_traces
    from stepscope.models import default_model_path, load_tokenizer
    from stepscope.prompts import build_prompt

    torch.manual_seed(0)
    path = str(default_model_path())
    tok = load_tokenizer("default")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = StepFlowConfig(fmt="think")
    out: dict = {"stepscope": _where()}
    for batch in (1, 8):
        ids = [build_prompt(tok, q, fmt="think")[1] for q in QUESTIONS[:batch]]
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        x = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        with torch.no_grad(), StepFlow(model, tok, cfg, kernel="torch") as flow:
            g = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=64, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
        out[f"generate_b{batch}"] = {"tokens": g.sequences[:, width:].tolist(),
                                     "logits": _tensor_sha(torch.stack(g.logits)),
                                     "stats": flow.stats.to_json()}
    traces = generate_traces(model, tok, QUESTIONS, stepflow=cfg, max_new_tokens=96, max_thinking_tokens=48,
                             temperature=0.0, batch_size=8, fmt="think", progress=False)
    out["generate_traces_b8"] = [{"tokens": t.token_ids, "stats": t.meta.get("stepflow_stats")} for t in traces]
    full = traces[0].token_ids + tok.encode("\n</think>\n\nThe answer is 156. It follows from the steps above.")
    with torch.no_grad(), StepFlow(model, tok, cfg, kernel="torch") as flow:
        logits = model(torch.tensor([full])).logits
    out["teacher_forced"] = {"logits": _tensor_sha(logits), "stats": flow.stats.to_json()}
    out.update(_gptoss_part(tok))
    return out


def _gptoss_part(tok) -> dict:
    """A tiny random GPT-OSS-shaped model (sinks, alternating sliding windows), batch 4, 24 new tokens."""
    import copy

    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from stepscope.flow import StepFlow, StepFlowConfig
    from stepscope.prompts import build_prompt

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                       num_local_experts=2, num_experts_per_tok=1, layer_types=["sliding_attention",
                                                                                "full_attention"] * 2)
    cfg._attn_implementation = "eager"
    model = GptOssForCausalLM(cfg).eval()
    tok = copy.deepcopy(tok)
    ids = [build_prompt(tok, q, fmt="think")[1] for q in QUESTIONS[:4]]
    width = max(map(len, ids))
    x = torch.tensor([[0] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    with torch.no_grad(), StepFlow(model, tok, StepFlowConfig(fmt="think", oeb_layers=[0, 1], smi_layers=[2, 3]),
                                   kernel="torch") as flow:
        g = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=24, do_sample=False,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return {"gptoss_b4": {"tokens": g.sequences[:, width:].tolist(), "logits": _tensor_sha(torch.stack(g.logits)),
                          "stats": flow.stats.to_json()}}


def vllm_part() -> dict:
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM

    import stepscope.vllm as sv
    from stepscope.flow import StepFlowConfig
    from stepscope.models import default_model_path
    from stepscope.prompts import build_prompt

    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    cfg = StepFlowConfig(fmt="think")
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=8, seed=0,
              enable_prefix_caching=False)
    out: dict = {"stepscope": _where()}
    for batch in (1, 8):
        ids = [build_prompt(tok, q, fmt="think")[1] for q in QUESTIONS[:batch]]
        params = [sv.sampling_params(cfg, f"b{batch}-{i}", max_tokens=48, temperature=0, ignore_eos=True,
                                     logprobs=5) for i in range(batch)]
        outs = llm.generate([sv.prompt(p, cfg) for p in ids], params, use_tqdm=False)
        lps = [[sorted((t, round(v.logprob, 9)) for t, v in lp.items()) for lp in o.outputs[0].logprobs]
               for o in outs]
        stats = sv.collect_stats(llm, keys=[f"b{batch}-{i}" for i in range(batch)], clear=True)
        out[f"vllm_b{batch}"] = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                 "logprobs": _sha(json.dumps(lps).encode()),
                                 "stats": {k: v.to_json() for k, v in sorted(stats.items())}}
    return out


def demo_part() -> dict:
    from safetensors.torch import load_file

    from stepscope.demo import run_demo

    out: dict = {"stepscope": _where()}
    with tempfile.TemporaryDirectory() as d:
        run_demo(Path(d) / "demo")
        root = Path(d) / "demo"
        out["traces"] = {}
        for line in (root / "traces.jsonl").read_text().splitlines():
            t = json.loads(line)
            meta = _untimed(t.get("meta", {}))
            out["traces"][f"{meta.get('id')}-{meta.get('arm')}"] = _hashes({**t, "meta": meta}, depth=3)
        out["maps"] = {p.parent.name: _tensor_sha(load_file(p)["maps"])
                       for p in sorted(root.glob("saliency/*/maps.safetensors"))}
    return out


def compare(a: dict, b: dict, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = []
        for k in sorted(set(a) | set(b)):
            if k == "stepscope":
                continue
            diffs += compare(a.get(k), b.get(k), f"{path}/{k}")
        return diffs
    return [] if a == b else [path]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["hf", "vllm", "demo", "compare"])
    ap.add_argument("files", nargs="*", help="compare: the two fingerprint files")
    ap.add_argument("--out", help="write the fingerprint here")
    args = ap.parse_args()
    if args.part == "compare":
        a, b = (json.loads(Path(f).read_text()) for f in args.files)
        diffs = compare(a, b)
        print(f"{a.get('stepscope')} vs {b.get('stepscope')}: "
              + ("identical" if not diffs else f"{len(diffs)} differ: " + ", ".join(diffs[:20])))
        sys.exit(1 if diffs else 0)
    got = {"hf": hf_part, "vllm": vllm_part, "demo": demo_part}[args.part]()
    text = json.dumps(got, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text)
    print(f"{args.part}: {len(text)} bytes of fingerprints from {got['stepscope']}")


if __name__ == "__main__":
    main()
