"""StepFlow's cost: generation tokens/s with and without StepFlow, side by side in one run, and the ratio.

Three rows per batch size, same model, weights, prompts, backend and settings, timed in interleaved rounds
(plain, StepFlow, eager, plain, ...) so that drift on a shared machine hits all of them alike:
- plain: `model.generate` with the model's attention implementation (sdpa);
- stepflow: the same inside `StepFlow(model, tokenizer)` (paper defaults: OEB on the bottom quarter of
  layers, SMI on the top quarter; kernel="auto": on CUDA the OEB layers decode with the fused Triton kernel);
- stepflow_torch / stepflow_triton (optional, `--modes plain,stepflow,stepflow_torch,stepflow_triton`):
  StepFlow with its decoding path pinned, kernel="torch" (the PyTorch path) or kernel="triton" (the fused kernel
  as planned, no timing), to show what kernel="auto"'s timed choice buys;
- eager: the released research code's approach at its cost floor: eager attention in every layer, the model
  otherwise plain (its per-token host round trips per layer are not even counted).
tokens/s = batch x new tokens / wall time of the whole `generate` call (prefill included). Every timed run also
notes the host time of each decoding step (a logits processor that does no device work, the same in every
mode): the median step of the first and last quarter and the slowest step go to the JSON under "steps"; on CUDA
the GPU's temperature, SM clock and power after each run go under "telemetry".

Modes:
  python bench/stepflow_overhead.py --device cpu                      # SmolLM2-135M, batch 1 and 8
  python bench/stepflow_overhead.py --device cuda --shape r1-distill-qwen-7b --tokenizer DIR
  python bench/stepflow_overhead.py --device cpu --shape tiny --quick  # a smoke test of the GPU mode

The r1-distill-qwen-7b shape is a random-weight Qwen2 model of R1-Distill-Qwen-7B's shape built on the GPU in
bf16. Its prompts are real text (repeated to 1,024 tokens) in a user turn whose generation prompt ends with
"<think>\\n", so every generated token is a thinking query and OEB acts on each of them. The generated text of
a random model is noise: SMI fires only where that noise happens to close a step (". " after 15 characters, a
blank line), so the SMI row of the stats is small there; OEB's cost is what this shape measures. Generated ids
stay inside the tokenizer's vocabulary (the random lm_head rows beyond it are zeroed).

Results are written after every measurement (JSON and Markdown) to bench/results/stepflow_<device>_<shape>.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stepscope.flow import StepFlow, StepFlowConfig  # noqa: E402
from stepscope.io import atomic_write_json, atomic_write_text  # noqa: E402

THINK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}"
    "{% endif %}"
)

QUESTIONS = [
    "A farmer has 17 sheep and buys 3 times as many goats as sheep. He then sells 12 goats. How many animals "
    "does he have now?",
    "What is the sum of all positive divisors of 36?",
    "A rectangle has a perimeter of 30 cm and its length is twice its width. What is its area?",
    "If 4 workers build a wall in 9 days, how many days do 6 workers need for the same wall?",
    "How many ways can 5 different books be arranged on a shelf if two of them must stand together?",
    "Solve for x: 3x + 7 = 2x - 5 + 4x.",
    "A car travels 150 km in 2.5 hours. At the same speed, how long does it take to travel 240 km?",
    "What is the remainder when 2 to the power 20 is divided by 7?",
]
FILLER = (
    "First, I need to understand what the problem is asking. The quantities are given in words, so I will "
    "translate each sentence into an equation. Let me write down what I know before computing anything. "
    "Next, I check that the units agree, because a mismatch would make the final number meaningless. "
    "Then I compute the intermediate values one at a time and keep every result in a short list.\n\n"
    "Wait, let me double check the second step, since it is easy to drop a factor there. "
    "The numbers still look consistent with the first equation. "
)

SHAPES = {
    "r1-distill-qwen-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                               rope_theta=10000.0, max_position_embeddings=131072, rms_norm_eps=1e-6,
                               tie_word_embeddings=False, use_sliding_window=False),
    # R1-Distill-Qwen-7B's layer and head counts with tiny widths: on a CPU its step time is almost all
    # per-op dispatch, as a batch-1 GPU decoding step of the real model is (launch bound); a proxy for the
    # GPU's batch-1 ratio that runs anywhere
    "proxy-7b": dict(hidden_size=224, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=448, vocab_size=49152, rope_theta=10000.0, max_position_embeddings=4096,
                     tie_word_embeddings=False, use_sliding_window=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=49152, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False, use_sliding_window=False),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def load(args):
    """(model, tokenizer) for the chosen shape."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from stepscope.models import load_model, load_tokenizer

    if args.shape == "smollm2":
        model, tok = load_model("default", device=args.device, dtype=args.dtype or "float32")
    else:
        tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else load_tokenizer("default")
        cfg = Qwen2Config(**SHAPES[args.shape])
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
            args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        with torch.no_grad():
            model.lm_head.weight[len(tok):] = 0  # generated ids stay inside the tokenizer's vocabulary
        model.eval()
    if "<think>" not in (tok.chat_template or ""):
        tok.chat_template = THINK_TEMPLATE
    return model, tok


def prompts(tok, batch: int, prompt_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, P]: real text in a user turn, the generation prompt ending in <think>."""
    rows = []
    for b in range(batch):
        head = tok.apply_chat_template([{"role": "user", "content": "X"}], add_generation_prompt=True,
                                       tokenize=False)
        fixed = len(tok(head, add_special_tokens=False)["input_ids"]) - 1
        body = QUESTIONS[b % len(QUESTIONS)] + "\n\n"
        while len(tok(body, add_special_tokens=False)["input_ids"]) < prompt_tokens - fixed:
            body += FILLER
        ids = tok(body, add_special_tokens=False)["input_ids"][:prompt_tokens - fixed - (b % 3)]
        body = tok.decode(ids)
        text = tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                       tokenize=False)
        rows.append(tok(text, add_special_tokens=False)["input_ids"])
    P = max(len(r) for r in rows)
    ids = torch.zeros(batch, P, dtype=torch.long)
    mask = torch.zeros(batch, P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r)
        mask[b, P - len(r):] = 1
    return ids, mask


def set_impl(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepClock:
    """A logits processor that only notes the host time of each decoding step (no device work, no sync), so
    that a run's slow steps can be told apart: early or late, steady or spiky."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores

    def summary(self) -> dict:
        d = [b - a for a, b in zip(self.times, self.times[1:])]
        if len(d) < 8:
            return {}
        q = len(d) // 4
        return {"first_quarter_ms": statistics.median(d[:q]) * 1e3, "last_quarter_ms": statistics.median(d[-q:]) * 1e3,
                "max_ms": max(d) * 1e3}


def run_once(model, tok, ids, mask, new_tokens: int, mode: str, device: str, clock: StepClock | None = None
             ) -> tuple[float, float, dict | None]:
    """Wall seconds and process CPU seconds of one generate call in `mode`, and StepFlow's stats."""
    from transformers import LogitsProcessorList

    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    if clock is not None:
        kw["logits_processor"] = LogitsProcessorList([clock])
    stats = None
    if mode == "eager":
        set_impl(model, "eager")
    try:
        sync(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        with torch.inference_mode():
            if mode.startswith("stepflow"):
                kernel = {"stepflow_torch": "torch", "stepflow_triton": "triton"}.get(mode, "auto")
                with StepFlow(model, tok, StepFlowConfig(fmt="think"), kernel=kernel) as flow:
                    out = model.generate(**kw)
                    sync(device)
                    dt = time.perf_counter() - t0
                    dc = time.process_time() - c0
                stats = flow.stats.to_json()
                stats["kernel"] = "triton" if flow.decode_path.uses_kernel else "torch"  # what the OEB layers used
                stats["decode_paths"] = flow.decode_paths  # kernel="auto": the path timed fastest per shape
            else:
                out = model.generate(**kw)
                sync(device)
                dt = time.perf_counter() - t0
                dc = time.process_time() - c0
    finally:
        if mode == "eager":
            set_impl(model, "sdpa")
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt, dc, stats


def telemetry(device: str) -> dict | None:
    """The GPU's temperature (C), SM clock (MHz) and power draw (mW) right after a run (None off CUDA or without
    pynvml): a slowing GPU shows here, a slowing host does not."""
    if not device.startswith("cuda"):
        return None
    try:
        return {"temp_c": torch.cuda.temperature(), "sm_mhz": torch.cuda.clock_rate(),
                "power_mw": torch.cuda.power_draw()}
    except Exception:  # noqa: BLE001 - pynvml missing or unsupported: no telemetry
        return None


def self_check(tok, device: str) -> dict:
    """StepFlow on this device: a tiny float32 model's cached greedy decoding (left-padded batch of two) must
    give the logits of one teacher-forced forward per row. Returns the largest difference and the stats."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(1)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES["tiny"]), attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
        for layer in model.model.layers:  # peaky attention, so that OEB fires
            layer.self_attn.q_proj.weight.data.mul_(12.0)
    cfg = StepFlowConfig(fmt="think", tau_max=0.6, alpha=0.5)
    rows = []
    for i in range(2):
        text = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i]}], add_generation_prompt=True,
                                       tokenize=False) + FILLER[:200 + 150 * i]
        rows.append(tok(text, add_special_tokens=False)["input_ids"])
    P = max(len(r) for r in rows)
    ids = torch.zeros(2, P, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r)
        mask[b, P - len(r):] = 1
    n = 24
    with torch.inference_mode():
        with StepFlow(model, tok, cfg) as flow:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        stats = flow.stats
        raw = torch.stack(out.logits, 1)  # [2, n, V]
        worst = 0.0
        for b, r in enumerate(rows):
            seq = r + out.sequences[b, P:].tolist()
            with StepFlow(model, tok, cfg):
                tf = model(torch.tensor([seq], device=device)).logits[0, len(r) - 1:len(r) - 1 + n]
            worst = max(worst, (tf - raw[b]).abs().max().item())
    return {"max_abs_logit_diff": worst, "oeb_fires": stats.total_oeb_fires, "smi_fires": stats.total_smi_fires,
            "kernel": "triton" if flow.decode_path.uses_kernel else "torch", "passed": worst < 1e-4}


def sync_check(model, tok, device: str, prompt_tokens: int, batch: int, new_tokens: int = 16) -> dict:
    """CUDA only: how many synchronizing CUDA operations (torch.cuda.set_sync_debug_mode("warn")) plain and
    StepFlow generation make per new token, and where in Python (file:line, the most frequent first). StepFlow
    should add one per decoding step at most (the pre-hook's copy of the token ids): any other sync lets the
    device run dry while the host catches up."""
    if not device.startswith("cuda"):
        return {"skipped": "needs CUDA"}
    return count_syncs(model, tok, device, prompt_tokens, batch, new_tokens, torch.cuda.set_sync_debug_mode)


def count_syncs(model, tok, device: str, prompt_tokens: int, batch: int, new_tokens: int, set_mode) -> dict:
    """`sync_check`'s counting, with the debug-mode setter passed in (a CPU smoke run passes a stand-in)."""
    import warnings

    ids, mask = prompts(tok, batch, prompt_tokens)
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    res = {}
    for mode in ("plain", "stepflow"):
        for timed in (False, True):  # the first run of each mode compiles and tunes (not counted)
            with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                set_mode("warn" if timed else "default")
                try:
                    if mode == "stepflow":
                        with StepFlow(model, tok, StepFlowConfig(fmt="think")):
                            model.generate(**kw)
                    else:
                        model.generate(**kw)
                finally:
                    set_mode("default")
        sites: dict[str, int] = {}
        for w in caught:
            if "synchroniz" in str(w.message):
                key = f"{Path(w.filename).name}:{w.lineno}"
                sites[key] = sites.get(key, 0) + 1
        n = sum(sites.values())
        res[mode] = {"syncs": n, "per_token": n / new_tokens,
                     "sites": dict(sorted(sites.items(), key=lambda kv: -kv[1])[:8])}
    return res


def profile(model, tok, args, prompt_tokens: int, out: Path, stem: str, batch: int) -> dict:
    """torch.profiler over `--profile-tokens` new tokens at this batch size, plain then StepFlow (each warmed up
    once): the top ops by self CPU time and by device time, written to <stem>_profile_<mode>[_b<batch>].txt, and
    per mode the wall time and the device's busy time (the sum of every op's self device time; on CPU the self
    CPU time): busy / wall near 1 means the step waits for the device, well below 1 for the host."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids, mask = prompts(tok, batch, prompt_tokens)
    ids, mask = ids.to(args.device), mask.to(args.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    summary = {}
    for mode in ("plain", "stepflow"):
        run_once(model, tok, ids, mask, args.profile_tokens, mode, args.device)
        with torch_profile(activities=acts) as prof:
            dt, _, _ = run_once(model, tok, ids, mask, args.profile_tokens, mode, args.device)
        ka = prof.key_averages()
        dev_key = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        busy = sum(getattr(e, dev_key) for e in ka) / 1e6
        summary[mode] = {"wall_s": dt, "device_busy_s": busy, "busy_fraction": busy / dt}
        text = (f"{mode}: {args.profile_tokens} new tokens at batch {batch} in {dt:.3f}s under the profiler; "
                f"device busy {busy:.3f}s ({busy / dt:.0%} of the wall time)\n\n"
                f"by self CPU time\n{ka.table(sort_by='self_cpu_time_total', row_limit=40)}\n\n"
                f"by {dev_key}\n{ka.table(sort_by=dev_key, row_limit=30)}\n")
        suffix = "" if batch == 1 else f"_b{batch}"
        atomic_write_text(out / f"{stem}_profile_{mode}{suffix}.txt", text)
        log(f"profile batch {batch} {mode}: {dt:.3f}s for {args.profile_tokens} tokens, device busy {busy:.3f}s")
    return summary


def paired_label(row: dict) -> str:
    """StepFlow / plain within each round (the two runs next to each other in time, so that a slow spell of a
    shared machine hits both): the median and the range over rounds."""
    sec = row.get("seconds") or {}
    pairs = [p / s for p, s in zip(sec.get("plain") or [], sec.get("stepflow") or [])]
    if not pairs:
        return "-"
    return f"{statistics.median(pairs):.3f} ({min(pairs):.3f}-{max(pairs):.3f})"


def decode_path_label(st: dict) -> str:
    """What the OEB layers decoded with: kernel="auto"'s timed choices (each distinct one once), else the path."""
    labels = []
    for e in st.get("decode_paths") or []:
        lab = e["path"] if e["path"] == "torch" else f"triton bk{e['block_k']} w{e['num_warps']}"
        if lab not in labels:
            labels.append(lab)
    return ", ".join(labels) or st.get("kernel", "torch")


def markdown(res: dict) -> str:
    lines = [f"# StepFlow overhead: {res['shape']} on {res['device_name']}", "",
             f"{res['dtype']}, prompts of about {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens "
             f"(greedy, min_new_tokens = max_new_tokens), median of {res['repeats']} interleaved rounds; "
             f"torch {res['torch']}, transformers {res['transformers']}; machine load {res.get('load')}.", "",
             "| batch | plain tok/s | StepFlow tok/s | StepFlow / plain | each round's StepFlow / plain: median (range) "
             "| OEB decoding kernel "
             "| StepFlow, path pinned / plain | eager (released code's floor) tok/s "
             "| eager / plain | StepFlow / plain by CPU time | OEB fires / eligible | SMI fires |",
             "|---:|---:|---:|---:|---:|:--|---:|---:|---:|---:|---:|---:|"]
    for b, row in sorted(res["batches"].items(), key=lambda kv: int(kv[0])):
        m = row.get("median_tokens_per_s", {})
        if "plain" not in m:
            continue
        sf, eg = m.get("stepflow"), m.get("eager")
        st = row.get("stepflow_stats") or {}
        fires = sum(st.get("oeb_fires", {}).values()) if st else 0
        elig = sum(st.get("oeb_eligible", {}).values()) if st else 0
        smi = sum(st.get("smi_fires", {}).values()) if st else 0
        pinned = ", ".join(f"{k} {row[f'ratio_stepflow_{k}']:.3f}" for k in ("triton", "torch")
                           if row.get(f"ratio_stepflow_{k}") is not None) or "-"
        lines.append(f"| {b} | {m['plain']:.1f} | {sf or 0:.1f} | {row.get('ratio_stepflow', 0):.3f} | "
                     f"{paired_label(row)} | "
                     f"{decode_path_label(st)} | {pinned} | "
                     f"{eg or 0:.1f} | {row.get('ratio_eager', 0):.3f} | "
                     f"{row.get('cpu_time_ratio_stepflow', float('nan')):.3f} | {fires} / {elig} | {smi} |")
    for b, row in sorted(res["batches"].items(), key=lambda kv: int(kv[0])):
        for e in (row.get("stepflow_stats") or {}).get("decode_paths") or []:
            times = ", ".join(f"{k} {v:.1f}" for k, v in sorted(e["times_us"].items(), key=lambda kv: kv[1]))
            lines += ["", f"Batch {b}, {e['keys'][0]}-{e['keys'][1]} keys: kernel=\"auto\" chose {e['path']}"
                      + (f" (block_k {e['block_k']}, {e['num_warps']} warps)" if e["path"] == "triton" else "")
                      + f"; µs per OEB layer call: {times}."]
    if res.get("self_check"):
        c = res["self_check"]
        lines += ["", f"Self-check on this device (tiny float32 model, cached greedy decoding of a left-padded batch "
                      f"versus one teacher-forced forward per row): max |logit difference| "
                      f"{c['max_abs_logit_diff']:.2e}, OEB fires {c['oeb_fires']}, SMI fires {c['smi_fires']}, OEB decoding "
                      f"kernel {c.get('kernel', 'torch')}."]
    sc = res.get("sync_check") or {}
    if "plain" in sc:
        lines += ["", "Synchronizing CUDA operations per new token (batch 1, torch.cuda.set_sync_debug_mode): " + "; ".join(
            f"{m} {v['per_token']:.2f} (" + ", ".join(f"{k} x{c}" for k, c in v["sites"].items()) + ")"
            for m, v in sc.items())]
    for b, pr in (res.get("profile") or {}).items():
        lines += ["", f"Profile at batch {b} (torch.profiler; busy: the sum of the ops' self device time): " + "; ".join(
            f"{m} {v['wall_s']:.2f} s wall, device busy {v['device_busy_s']:.2f} s ({v['busy_fraction']:.0%})"
            for m, v in pr.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, choices=["smollm2", *SHAPES],
                    help="smollm2 (default on CPU) or a random model shape (r1-distill-qwen-7b default on CUDA)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for random shapes (default: SmolLM2's)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8 on CPU, 1,16 on CUDA)")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (median reported)")
    ap.add_argument("--modes", default="plain,stepflow,eager")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="new tokens of the untimed warm-up run of every mode but the first (default: "
                         "--new-tokens); the first mode always warms up at full length (a short warm-up left "
                         "the first timed GPU run 3x slow: allocator and clocks)")
    ap.add_argument("--profile-tokens", type=int, default=0,
                    help="also profile N decoding tokens of plain and StepFlow with torch.profiler (tables of the "
                         "top ops by self CPU and device time, written beside the results)")
    ap.add_argument("--profile-batch-sizes", default="1", help="batch sizes to profile (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    ap.add_argument("--no-timing", action="store_true", help="only the self-check and the profiles (no timed rounds)")
    ap.add_argument("--sync-check", action="store_true",
                    help="CUDA: count the synchronizing CUDA operations per new token of plain and StepFlow (batch 1)")
    ap.add_argument("--self-check", action="store_true",
                    help="first check StepFlow's cached decoding against teacher forcing on this device")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.shape = args.shape or ("r1-distill-qwen-7b" if cuda else "smollm2")
    batches = [int(x) for x in (args.batch_sizes or ("1,16" if cuda else "1,8")).split(",")]
    prompt_tokens = args.prompt_tokens or (1024 if cuda else 96)
    new_tokens = args.new_tokens or (512 if cuda else 96)
    repeats = args.repeats or (3 if cuda else 5)
    if args.quick:
        new_tokens = args.new_tokens or (256 if cuda else 16)
        repeats = args.repeats or (2 if cuda else 1)
        prompt_tokens = args.prompt_tokens or (1024 if cuda else 48)
    modes = args.modes.split(",")
    known = ("plain", "stepflow", "stepflow_torch", "stepflow_triton", "eager")
    if any(m not in known for m in modes):
        sys.exit(f"--modes: unknown mode(s) {', '.join(m for m in modes if m not in known)} (known: {', '.join(known)})")

    import transformers

    t0 = time.perf_counter()
    model, tok = load(args)
    log(f"model {args.shape} loaded in {time.perf_counter() - t0:.1f}s on {device_name(args.device)}")
    res = {"shape": args.shape, "device": args.device, "device_name": device_name(args.device),
           "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "prompt_tokens": prompt_tokens,
           "new_tokens": new_tokens, "repeats": repeats, "modes": modes, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load": " ".join(f"{x:.1f}" for x in os.getloadavg()), "batches": {}}
    out = Path(args.out)
    stem = f"stepflow_{'cuda' if cuda else 'cpu'}_{args.shape}"

    def save():
        atomic_write_json(out / f"{stem}.json", res)
        atomic_write_text(out / f"{stem}.md", markdown(res))

    if args.self_check:
        res["self_check"] = self_check(tok, args.device)
        log(f"self-check: {res['self_check']}")
        save()
    if args.sync_check:
        try:
            res["sync_check"] = sync_check(model, tok, args.device, prompt_tokens, 1)
        except Exception as e:  # noqa: BLE001 - a diagnostic: never let it stop the run
            res["sync_check"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log(f"sync check: {res['sync_check']}")
        save()
    if args.profile_tokens:
        for pb in [int(x) for x in args.profile_batch_sizes.split(",")]:
            res.setdefault("profile", {})[str(pb)] = profile(model, tok, args, prompt_tokens, out, stem, pb)
            save()
    for B in [] if args.no_timing else batches:
        ids, mask = prompts(tok, B, prompt_tokens)
        ids, mask = ids.to(args.device), mask.to(args.device)
        row = res["batches"][str(B)] = {"prompt_ids_shape": list(ids.shape), "seconds": {m: [] for m in modes},
                                        "cpu_seconds": {m: [] for m in modes}}
        warm = args.warmup_tokens if args.warmup_tokens is not None else new_tokens
        for i, m in enumerate(modes):  # untimed warm-up: allocator and clocks (first mode at full length),
            # kernels and their compilation (every mode)
            run_once(model, tok, ids, mask, new_tokens if i == 0 else min(warm, new_tokens), m, args.device)
        for r in range(repeats):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                clock = StepClock()
                dt, dc, stats = run_once(model, tok, ids, mask, new_tokens, m, args.device, clock)
                row.setdefault("steps", {mm: [] for mm in modes})[m].append(clock.summary())
                row["seconds"][m].append(dt)
                row["cpu_seconds"][m].append(dc)
                tel = telemetry(args.device)
                if tel is not None:
                    row.setdefault("telemetry", {m: [] for m in modes})[m].append(tel)
                if stats is not None:
                    row["stepflow_stats" if m == "stepflow" else f"{m}_stats"] = stats
                log(f"batch {B:>3} round {r + 1}/{repeats} {m:>8}: {dt:7.2f}s  {B * new_tokens / dt:9.1f} tok/s")
            med = {m: B * new_tokens / statistics.median(v) for m, v in row["seconds"].items() if v}
            row["median_tokens_per_s"] = med
            if "plain" in med:
                for m in med:
                    if m != "plain":
                        row[f"ratio_{m}"] = med[m] / med["plain"]
                        if not cuda:  # CPU time is robust to other processes on a shared machine
                            c = row["cpu_seconds"]
                            row[f"cpu_time_ratio_{m}"] = statistics.median(c["plain"]) / statistics.median(c[m])
            save()
        ratios = ", ".join(f"{k[6:]} / plain = {v:.3f}" for k, v in row.items() if k.startswith("ratio_"))
        log(f"batch {B}: {ratios}")
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    save()
    log(markdown(res))
    log(json.dumps({b: {k: v for k, v in r.items() if k.startswith("ratio")} for b, r in res["batches"].items()}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
