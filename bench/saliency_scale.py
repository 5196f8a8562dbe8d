"""Peak memory and time of Step-Saliency (chunked vs reference) against a plain forward+backward, for growing T.

Side by side in one run, same model, same trace prefix, each method at each length:

- chunked:   stepscope.step_saliency(model, trace)                      (exact, blockwise backward, checkpointing)
- reference: stepscope.step_saliency(model, trace, method="reference")  (eager, every T x T kept with its grad)
- plain:     model(ids) -> mean next-token CE -> loss.backward(), sdpa, parameters requiring grad, no
             checkpointing: an ordinary training-style step, what "a forward and backward" costs
- plain_in:  the same with frozen parameters and the gradient taken w.r.t. the input embeddings only (the
             gradients saliency needs, without saliency): the strictest baseline for time
- chunked_f32mm (CUDA): chunked with every attention-backward matmul in float32 (no bf16 tensor-core products
             with float32 output): shows what that speed-up is worth, and that it changes nothing

Modes:
  --device cpu  --shape smollm2            the bundled SmolLM2-135M (float32); each measurement in a fresh
                                           subprocess, peak = that process's VmHWM (peak RSS, weights included)
  --device cuda --shape r1-distill-qwen-7b random weights of R1-Distill-Qwen-7B's shape, bf16, built on the GPU;
                                           in-process, peak = torch.cuda.max_memory_allocated (weights included);
                                           out-of-memory is caught, recorded, and larger T of that method skipped
  --shape tiny                             a tiny random Qwen2, to test this script

Results are rewritten after every measurement (JSON + a markdown table) under --out-dir, so a run cut short
keeps what it measured. `--row-budget-s` skips a method's next length when its predicted time exceeds it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "r1-distill-qwen-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               intermediate_size=18944, vocab_size=152064, rope_theta=10000.0,
                               max_position_embeddings=131072, rms_norm_eps=1e-6, use_sliding_window=False,
                               tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000, rope_theta=10000.0, max_position_embeddings=8192,
                 use_sliding_window=False, tie_word_embeddings=False),
}
METHODS = ("plain", "plain_in", "reference", "chunked", "chunked_f32mm")
CPU_METHODS = ("plain", "plain_in", "reference", "chunked")
DEFAULT_LENGTHS = {
    ("cpu", "smollm2"): [256, 512, 1024, 2048],
    ("cuda", "r1-distill-qwen-7b"): [1024, 2048, 4096, 8192, 16384, 32768],
    ("cpu", "tiny"): [64, 128, 256],
    ("cuda", "tiny"): [64, 128, 256],
}
QUICK_LENGTHS = {
    ("cpu", "smollm2"): [256, 512],
    ("cuda", "r1-distill-qwen-7b"): [1024, 4096, 32768],
    ("cpu", "tiny"): [64, 128],
    ("cuda", "tiny"): [64, 128],
}
REFERENCE_MAX = {("cpu", "smollm2"): 1024}  # the reference's T x T per layer and head stops being sensible
GROWTH = {"reference": 4.5, "chunked": 3.5, "chunked_f32mm": 3.8, "plain": 2.5, "plain_in": 2.5}  # time factor when T doubles


def log(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# models and traces
# ---------------------------------------------------------------------------------------------------------------


def build_model(shape: str, device: str):
    import torch

    if shape == "smollm2":
        from stepscope.models import load_model

        model, _ = load_model("default", device=device, dtype="float32")
        return model
    import transformers as tf

    cfg = tf.Qwen2Config(**SHAPES[shape])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model.eval()
    model.name_or_path = f"random-{shape}"
    return model


def synthetic_trace(T: int, vocab: int, seed: int = 0, step_tokens: int = 20):
    """A trace of T random tokens: question 5%, thinking to 90%, summary the rest, steps of ~step_tokens."""
    import numpy as np

    from stepscope.segment import Step
    from stepscope.trace import Trace

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=T).tolist()
    q_end, t_end = max(1, T // 20), max(2, T * 9 // 10)
    segments = {"question": (0, q_end), "thinking": (q_end, t_end), "summary": (t_end, T)}
    steps, pos = [], 0
    for kind in ("question", "thinking", "summary"):
        a, b = segments[kind]
        while a < b:
            e = b if kind == "question" else min(b, a + step_tokens)
            steps.append(Step(kind, len(steps), a, e, a, e, "x" * (e - a), e - 1))
            a = e
            pos = e
    assert pos == T
    return Trace(ids, "x" * T, "synthetic", segments, steps, list(range(1, T + 1)), {"id": f"synthetic-{T}"})


def real_trace_prefix(T: int):
    """A prefix of the longest real trace in shared/traces beside the checkout (SmolLM2 tokenizer, R1 template), else None."""
    shared = ROOT.parent / "shared" / "traces"
    if not shared.is_dir():
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tokenizer

    from stepscope.trace import Trace

    tok = make_tokenizer("think")
    best = None
    for f in sorted(shared.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                if best is None or len(rec["response"]) > len(best["response"]):
                    best = rec
    full = Trace.from_text(tok, question=best["problem"], response=best["response"], meta={"id": best["id"]})
    if len(full) < T:
        return None
    return Trace.from_ids(tok, full.token_ids[:T], meta={"id": f"{best['id']}[:{T}]"})


def make_trace(shape: str, T: int, vocab: int):
    tr = real_trace_prefix(T) if shape == "smollm2" else None
    return tr if tr is not None else synthetic_trace(T, vocab)


# ---------------------------------------------------------------------------------------------------------------
# the measured computations
# ---------------------------------------------------------------------------------------------------------------


def run_method(model, trace, method: str):
    """Run one method once; returns the maps for saliency methods, None for the plain baselines."""
    import torch
    import torch.nn.functional as F

    from stepscope.saliency import step_saliency

    if method in ("chunked", "reference"):
        return step_saliency(model, trace, method=method).maps
    if method == "chunked_f32mm":
        from stepscope.saliency import attention

        attention.FORCE_FP32_MATMUL = True
        try:
            return step_saliency(model, trace).maps
        finally:
            attention.FORCE_FP32_MATMUL = False
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([trace.token_ids], device=device)
    if method == "plain":
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            loss.backward()
        finally:
            for p, f in zip(model.parameters(), flags):
                p.grad = None
                p.requires_grad_(f)
        return None
    if method == "plain_in":
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, use_cache=False).logits
            loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            torch.autograd.grad(loss, emb)
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
        return None
    raise ValueError(method)


def measure_cuda(model, trace, method: str) -> dict:
    import torch

    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        maps = run_method(model, trace, method)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        maps = None
        status = "oom"
    else:
        status = "ok"
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    gc.collect()
    torch.cuda.empty_cache()
    row = {"status": status, "time_s": round(dt, 3) if status == "ok" else None, "peak_bytes": int(peak)}
    return row, (maps.cpu() if maps is not None else None)


def worker(args) -> None:
    """CPU mode: one measurement in this fresh process; prints one JSON line."""
    import torch

    from stepscope.saliency.memory import process_peak_rss

    torch.manual_seed(0)
    model = build_model(args.shape, "cpu")
    vocab = model.get_input_embeddings().weight.shape[0]
    trace = make_trace(args.shape, args.T, vocab)
    warm = synthetic_trace(64, vocab, seed=1)
    base = process_peak_rss()
    if args.method != "load":
        run_method(model, warm, args.method)  # first-call overheads out of the timing
    t0 = time.perf_counter()
    maps = run_method(model, trace, args.method) if args.method != "load" else None
    dt = time.perf_counter() - t0
    out = {"status": "ok", "time_s": round(dt, 3), "peak_bytes": process_peak_rss(), "loaded_rss_bytes": base,
           "num_steps": trace.num_steps}
    if maps is not None and args.save_maps:
        from safetensors.torch import save_file

        save_file({"maps": maps.contiguous()}, args.save_maps)
    print("RESULT " + json.dumps(out), flush=True)


def measure_cpu_subprocess(args, method: str, T: int, timeout: float, save_maps: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--device", "cpu", "--shape", args.shape, "--method", method,
           "--T", str(T)]
    if save_maps:
        cmd += ["--save-maps", save_maps]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "time_s": None, "peak_bytes": None, "note": f"over {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
    status = "oom" if "MemoryError" in p.stderr or p.returncode in (-9, 137) else "error"
    return {"status": status, "time_s": None, "peak_bytes": None, "note": err}


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------


def env_info(device: str) -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host_cpus": os.cpu_count()}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["device"] = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            info["load_average_at_start"] = os.getloadavg()
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
                if line.startswith("model name"):
                    info["device"] = line.split(":", 1)[1].strip()
                    break
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def cell(row: dict | None, key: str) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"].upper() if row["status"] != "skipped" else "skip"
    return f"{row['time_s']:.2f}" if key == "time" else gib(row["peak_bytes"])


def markdown(report: dict) -> str:
    rows = report["rows"]
    Ts = sorted({r["T"] for r in rows})
    by = {(r["method"], r["T"]): r for r in rows}
    env = report["env"]
    lines = [f"# Step-Saliency scaling: {report['shape']} on {env.get('device')} ({report['device']})", "",
             f"{report['model_note']}. torch {env['torch']}, transformers {env['transformers']}, "
             f"{env['date']}, commit {env.get('git_commit')}. Peak memory: {report['peak_kind']} (GiB, weights "
             "included); time in seconds, one run after a warm-up.", ""]
    if env.get("load_average_at_start"):
        lines += [f"CPU load average at start: {', '.join(f'{x:.1f}' for x in env['load_average_at_start'])} "
                  f"({env['host_cpus']} CPUs): other work shared the machine, so times are upper bounds.", ""]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    head = ["T", "steps"] + [f"{m} {k}" for m in methods for k in ("s", "GiB")] + \
        ["peak chunked/ref", "time chunked/ref", "time chunked/plain", "time chunked/plain_in"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T in Ts:
        c = by.get(("chunked", T))
        steps = next((r.get("num_steps") for r in rows if r["T"] == T and r.get("num_steps")), "")
        cells = [str(T), str(steps or "")]
        for m in methods:
            cells += [cell(by.get((m, T)), "time"), cell(by.get((m, T)), "peak")]
        for other, key in (("reference", "peak_bytes"), ("reference", "time_s"), ("plain", "time_s"),
                           ("plain_in", "time_s")):
            o = by.get((other, T))
            ok = c and o and c["status"] == "ok" and o["status"] == "ok" and c.get(key) and o.get(key)
            cells.append(f"{c[key] / o[key]:.2f}" if ok else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['method']} at T={r['T']}: {r['status']}: {r['note']}" for r in rows if r.get("note")]
    if report.get("agreement"):
        lines += ["", "Agreement of the maps at the smallest T (max |a - b| / max |b|): " + "; ".join(
            f"{a['a']} vs {a['b']}: {a['max_rel_err']:.2e}" for a in report["agreement"])]
        if report["device"] == "cuda":
            lines += ["(in bf16 the reference's own probabilities and gradients are rounded to bf16, so chunked vs "
                      "reference agrees only to bf16 precision there; the float32 checks below are the exactness "
                      "test)"]
    if report.get("checks"):
        lines += ["", "Exactness checks on this device (tiny random models, T=300, max |a - b| / max |b|): " +
                  "; ".join(f"{c['name']}: {c['max_rel_err']:.1e}" for c in report["checks"])]
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines) + "\n"


def save(report: dict, out_dir: Path, stem: str) -> None:
    from stepscope.io import atomic_write_json, atomic_write_text

    atomic_write_json(out_dir / f"{stem}.json", report)
    atomic_write_text(out_dir / f"{stem}.md", markdown(report))


def max_rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def cuda_checks() -> list[dict]:
    """Exactness on this device: chunked vs reference in float32 on tiny random Qwen2 and GPT-OSS models."""
    import torch
    import transformers as tf

    from stepscope.saliency import step_saliency

    out = []
    for arch in ("qwen2", "gptoss"):
        common = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
        if arch == "qwen2":
            cfg, impl = tf.Qwen2Config(**common, use_sliding_window=False), "sdpa"
        else:
            common.update(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                          sliding_window=8, layer_types=["sliding_attention", "full_attention"])
            cfg, impl = tf.GptOssConfig(**common), "eager"
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float32)
        if arch == "gptoss":
            for layer in m.model.layers:
                torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
        m.eval()
        tr = synthetic_trace(300, 1000, seed=2)
        c = step_saliency(m, tr, block_rows=64).maps
        r = step_saliency(m, tr, method="reference").maps
        out.append({"name": f"{arch} float32 chunked vs reference", "max_rel_err": max_rel_err(c, r)})
        log(f"check {out[-1]['name']}: {out[-1]['max_rel_err']:.2e}")
        m.to(torch.bfloat16)
        lowp = run_method(m, tr, "chunked")
        f32 = run_method(m, tr, "chunked_f32mm")
        out.append({"name": f"{arch} bf16 chunked, tensor-core vs float32 matmuls", "max_rel_err": max_rel_err(lowp, f32)})
        log(f"check {out[-1]['name']}: {out[-1]['max_rel_err']:.2e}")
        del m
    return out


# ---------------------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default=None, choices=["smollm2", "r1-distill-qwen-7b", "tiny"],
                   help="default: smollm2 on cpu, r1-distill-qwen-7b on cuda")
    p.add_argument("--lengths", default=None, help="comma-separated T values (default per mode)")
    p.add_argument("--methods", default=None, help=f"comma-separated, of {', '.join(METHODS)} (default: all; "
                   "chunked_f32mm on CUDA only)")
    p.add_argument("--quick", action="store_true", help="fewer lengths")
    p.add_argument("--row-budget-s", type=float, default=600.0,
                   help="skip a method's next T when its predicted time exceeds this (cpu: also a hard timeout)")
    p.add_argument("--reference-max", type=int, default=None, help="largest T for the reference method")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--checks", action="store_true", help="cuda: also check exactness on tiny models first")
    # worker mode (cpu subprocess)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--save-maps", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shape is None:
        args.shape = "smollm2" if args.device == "cpu" else "r1-distill-qwen-7b"
    if args.worker:
        worker(args)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device")
        return 2
    key = (args.device, args.shape)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else \
        (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS).get(key, [256, 512])
    wanted = args.methods.split(",") if args.methods else list(METHODS if args.device == "cuda" else CPU_METHODS)
    methods = [m for m in METHODS if m in wanted]
    ref_max = args.reference_max or REFERENCE_MAX.get(key)
    out_dir = Path(args.out_dir)
    stem = f"saliency_{args.device}_{args.shape}" + ("_quick" if args.quick else "")
    report = {"device": args.device, "shape": args.shape, "lengths": lengths, "methods": methods,
              "env": env_info(args.device), "rows": [], "agreement": [], "checks": [],
              "peak_kind": "torch.cuda.max_memory_allocated" if args.device == "cuda"
              else "peak RSS (VmHWM) of a fresh process per measurement",
              "model_note": ("SmolLM2-135M-Instruct, float32, real trace prefix (QwQ-32B GSM8K, SmolLM2 tokenizer)"
                             if args.shape == "smollm2" else
                             f"random weights, shape {args.shape}, "
                             f"{'bf16' if args.device == 'cuda' else 'float32'}, synthetic trace (steps of 20 tokens)")}
    log(f"saliency scaling: {args.shape} on {report['env']['device']}; T = {lengths}; methods {methods}")
    save(report, out_dir, stem)

    model = None
    if args.device == "cuda":
        if args.checks:
            report["checks"] = cuda_checks()
            save(report, out_dir, stem)
        t0 = time.perf_counter()
        model = build_model(args.shape, "cuda")
        w = model.model.layers[0].mlp.down_proj.weight
        report["weight_std_layer0_down_proj"] = float(w.float().std())
        log(f"built the model in {time.perf_counter() - t0:.1f} s; "
            f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters; "
            f"std of a weight matrix {report['weight_std_layer0_down_proj']:.4f} (random init: ~0.02)")
        vocab = model.get_input_embeddings().weight.shape[0]
        warm = synthetic_trace(256, vocab, seed=1)
        for m in methods:
            run_method(model, warm, m)
        torch.cuda.synchronize()
    else:
        base = measure_cpu_subprocess(args, "load", lengths[0], args.row_budget_s)
        report["loaded_rss_bytes"] = base.get("peak_bytes")
        log(f"process with the model loaded: {gib(base.get('peak_bytes'))} GiB peak RSS")

    blocked: dict[str, str] = {}
    last_time: dict[str, float] = {}
    last_len: dict[str, int] = {}
    maps_at: dict[tuple, object] = {}
    for T in lengths:
        for m in methods:
            row = {"method": m, "T": T}
            if m == "reference" and ref_max and T > ref_max:
                row.update(status="skipped", note=f"reference limited to T <= {ref_max} in this mode")
            elif m in blocked:
                row.update(status="skipped", note=blocked[m])
            elif m in last_time and last_time[m] * GROWTH[m] ** math.log2(T / last_len[m]) > args.row_budget_s:
                row.update(status="skipped", note=f"predicted over the {args.row_budget_s:.0f} s budget")
            elif args.device == "cuda":
                trace = synthetic_trace(T, model.get_input_embeddings().weight.shape[0])
                res, maps = measure_cuda(model, trace, m)
                row.update(res, num_steps=trace.num_steps)
                if maps is not None and T == lengths[0]:
                    maps_at[(m, T)] = maps
            else:
                save_maps = None
                if m in ("chunked", "reference", "chunked_f32mm") and T == lengths[0]:
                    save_maps = str(out_dir / f".{stem}_{m}_{T}.safetensors")
                row.update(measure_cpu_subprocess(args, m, T, args.row_budget_s, save_maps))
                if save_maps and Path(save_maps).exists():
                    from safetensors.torch import load_file

                    maps_at[(m, T)] = load_file(save_maps)["maps"]
                    Path(save_maps).unlink()
            if row["status"] == "ok":
                last_time[m], last_len[m] = row["time_s"], T
            elif row["status"] in ("oom", "timeout") and m not in blocked:
                blocked[m] = f"{row['status']} at T={T}"
            report["rows"].append(row)
            log(f"T={T:>6} {m:<10} {row['status']:<8} time {row.get('time_s')} s  peak {gib(row.get('peak_bytes'))} GiB"
                + (f"  ({row['note']})" if row.get("note") else ""))
            for x, y in (("chunked", "reference"), ("chunked", "chunked_f32mm")):
                if (x, T) in maps_at and (y, T) in maps_at and \
                        not any(a["T"] == T and a["b"] == y for a in report["agreement"]):
                    report["agreement"].append({"T": T, "a": x, "b": y,
                                                "max_rel_err": max_rel_err(maps_at[(x, T)], maps_at[(y, T)])})
            save(report, out_dir, stem)
    log(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
