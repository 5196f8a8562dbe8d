"""The fused OEB decoding kernel alone against sdpa: time per call (one layer, one decoding step), same inputs.

  python bench/oeb_kernel.py                               # CUDA: R1-Distill-Qwen-7B's attention, bf16
  python bench/oeb_kernel.py --paged                       # CUDA: the same over vLLM's paged KV cache
  TRITON_INTERPRET=1 python bench/oeb_kernel.py --smoke    # CPU: tiny float32 shapes through the interpreter
                                                           # (checks every variant; its times mean nothing)
  TRITON_INTERPRET=1 python bench/oeb_kernel.py --smoke --paged

Shape (default): 28 query heads, 4 kv heads, head dim 128, 1,536 keys (a 1,024-token question and 512 thinking
tokens: the end of bench/stepflow_overhead.py's runs), batch 1 and 16. Rows, all on the same tensors:
- sdpa (GQA): torch's scaled_dot_product_attention with enable_gqa and no mask;
- sdpa (repeat_kv + mask): what transformers' sdpa attention runs for a padded batch (a boolean mask rules
  out sdpa's GQA path, so keys and values are first repeated per query head): the plain model's cost;
- the kernel's variants: products by tl.dot with 4 or 8 warps and 32 or 64 keys per block (the default is
  marked), and the broadcast form.
Every variant is checked before it is timed: with tau_B = 0 (no row eligible) OEB changes nothing, so the kernel
must give float32 attention's output (tolerance 2e-2 x the largest output magnitude for bf16 inputs, 1e-4 for
float32). Timed with tau_B = 0.15, the bridge being the question (OEB fires on some heads): the median over
`--reps` CUDA-event timings of `--inner` back-to-back calls. Results: bench/results/oeb_kernel_<device>.{json,md}.

--paged: the same keys and values scattered into a paged cache in vLLM's FLASH_ATTN layout (kv_cache
[num_blocks, Hkv, block_size, 2 * D], `--block-size` keys per block, blocks handed out in a random order, block 0
left unused as vLLM's null block), read in place by `oeb_decode_paged` (its default, 8 warps, and 4 warps),
against FlashAttention-style decoding of the same cache: sdpa (GQA) over the keys and values gathered from the
cache by the block table into dense [B, Hkv, K, D] tensors once, before timing (the gather is not in the
baseline's time), and the dense kernel over those gathered tensors. Each row's check is the largest absolute
difference of its plain output (tau_B = 0) from the baseline's (same tolerances); the ratio is its median per
call over the baseline's. Results: bench/results/oeb_kernel_paged_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stepscope.core import kernels  # noqa: E402
from stepscope.io import atomic_write_json, atomic_write_text  # noqa: E402


def inputs(B: int, H: int, Hkv: int, K: int, D: int, question: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, K, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, K, D, generator=g).to(device, dtype)
    kseg = torch.ones(B, K, dtype=torch.int8)
    kseg[:, :question] = 0  # question keys, then thinking (the query's own segment)
    qgroups = torch.tensor([[0, 1]] * B, dtype=torch.int32)
    return q, k, v, kseg.to(device), qgroups.to(device)


def reference(q, k, v, scaling: float) -> torch.Tensor:
    """float32 attention, explicit (GQA by repeating keys and values): [B, 1, H, D]."""
    n_rep = q.shape[1] // k.shape[1]
    kr = k.float().repeat_interleave(n_rep, dim=1)
    vr = v.float().repeat_interleave(n_rep, dim=1)
    p = torch.softmax(q.float() @ kr.transpose(-1, -2) * scaling, dim=-1)
    return (p @ vr).transpose(1, 2)


def timed(fn, device: str, inner: int, reps: int) -> float:
    """Median microseconds per call."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / inner)
        else:
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t) * 1e6 / inner)
    return statistics.median(times)


VARIANTS = [  # (name, dot, block_k, num_warps); None: the default
    ("tl.dot, 64 keys/block, 4 warps (default)", True, None, None),
    ("tl.dot, 64 keys/block, 8 warps", True, 64, 8),
    ("tl.dot, 32 keys/block, 4 warps", True, 32, 4),
    ("broadcast form", False, None, None),
]


def run_batch(B: int, args, dtype, device: str) -> dict:
    H, Hkv, K, D, question = args.heads, args.kv_heads, args.keys, args.head_dim, args.question
    q, k, v, kseg, qg = inputs(B, H, Hkv, K, D, question, dtype, device)
    scaling = D ** -0.5
    zero = torch.zeros(B, dtype=torch.float32, device=device)
    tau = torch.full((B,), 0.15, dtype=torch.float32, device=device)
    stats = torch.zeros(B, H, 5, dtype=torch.float32, device=device)
    want = reference(q, k, v, scaling)
    tol = (2e-2 if dtype != torch.float32 else 1e-4) * max(1.0, want.abs().max().item())
    rows = []
    n_rep = H // Hkv
    if device.startswith("cuda"):  # sdpa's two forms (torch's CPU sdpa is not what a GPU user runs)
        F = torch.nn.functional
        mask = torch.ones(B, 1, 1, K, dtype=torch.bool, device=device)

        def sdpa_gqa():
            return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)

        def sdpa_repeat():
            kr = k[:, :, None].expand(B, Hkv, n_rep, K, D).reshape(B, H, K, D)
            vr = v[:, :, None].expand(B, Hkv, n_rep, K, D).reshape(B, H, K, D)
            return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=scaling)

        for name, fn in (("sdpa (GQA)", sdpa_gqa), ("sdpa (repeat_kv + mask)", sdpa_repeat)):
            err = (fn().transpose(1, 2).float() - want).abs().max().item()
            rows.append({"name": name, "max_err": err, "ok": err <= tol,
                         "us": timed(fn, device, args.inner, args.reps)})
    for name, dot, bk, nw in VARIANTS:
        row = {"name": name}
        try:
            ns = 2 if args.smoke else None  # (the smoke test's few keys: still two splits and the combine kernel)
            plan0 = kernels.plan_decode(q, k, v, kseg, qg, zero, None, stats, ns, dot=dot, block_k=bk,
                                        num_warps=nw)
            got = kernels.oeb_decode(q, k, v, kseg, qg, zero, scaling, None, stats, plan=plan0)
            row["max_err"] = err = (got.float() - want).abs().max().item()
            row["ok"] = err <= tol
            plan = kernels.plan_decode(q, k, v, kseg, qg, tau, None, stats, ns, dot=dot, block_k=bk, num_warps=nw)
            row.update(num_splits=plan.num_splits, block_k=plan.BK, num_warps=plan.num_warps)
            kernels.oeb_decode(q, k, v, kseg, qg, tau, scaling, None, stats, plan=plan)
            row["fired_heads"] = int(stats[:, :, 0].sum().item())
            row["us"] = timed(lambda p=plan: kernels.oeb_decode(q, k, v, kseg, qg, tau, scaling, None, stats, plan=p),
                              device, args.inner, args.reps)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile here is reported, not fatal
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    base = next((r["us"] for r in rows if r["name"] == "sdpa (repeat_kv + mask)" and "us" in r), None)
    for r in rows:
        if base and "us" in r:
            r["vs_plain_sdpa"] = r["us"] / base
    return {"batch": B, "tolerance": tol, "rows": rows}


PAGED_VARIANTS = [  # (name, num_warps); None: the default
    ("oeb_decode_paged, default (8 warps)", None),
    ("oeb_decode_paged, 4 warps", 4),
]


def paged_cache(k, v, block_size: int, seed: int = 0):
    """k, v [B, Hkv, K, D] scattered into vLLM's FLASH_ATTN layout: (kv_cache [num_blocks, Hkv, block_size,
    2 * D], block_table int32 [B, ceil(K / block_size)]); blocks 1.. in a random order, block 0 unused (zeros)."""
    B, Hkv, K, D = k.shape
    pages = -(-K // block_size)
    order = 1 + torch.randperm(B * pages, generator=torch.Generator(device="cpu").manual_seed(seed))
    block_table = order.view(B, pages).to(torch.int32).to(k.device)
    pad = pages * block_size - K
    kv = torch.cat([_pad_keys(k, pad), _pad_keys(v, pad)], dim=-1)  # [B, Hkv, pages * block_size, 2D]
    kv = kv.view(B, Hkv, pages, block_size, 2 * D).transpose(1, 2)  # [B, pages, Hkv, block_size, 2D]
    kv_cache = torch.zeros(1 + B * pages, Hkv, block_size, 2 * D, dtype=k.dtype, device=k.device)
    kv_cache[block_table.long()] = kv
    return kv_cache, block_table


def _pad_keys(t: torch.Tensor, n: int) -> torch.Tensor:
    """t [..., K, D] with n zero keys appended."""
    return torch.nn.functional.pad(t, (0, 0, 0, n))


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, K: int) -> torch.Tensor:
    """key_cache or value_cache [num_blocks, block_size, Hkv, D] gathered by the block table: [B, Hkv, K, D]."""
    g = cache[block_table.long()]  # [B, pages, block_size, Hkv, D]
    B, pages, bs, Hkv, D = g.shape
    return g.reshape(B, pages * bs, Hkv, D)[:, :K].transpose(1, 2)


def run_batch_paged(B: int, args, dtype, device: str) -> dict:
    H, Hkv, K, D, question = args.heads, args.kv_heads, args.keys, args.head_dim, args.question
    q, k, v, kseg, qg = inputs(B, H, Hkv, K, D, question, dtype, device)
    kv_cache, block_table = paged_cache(k, v, args.block_size)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)  # as vLLM's FlashAttentionImpl.forward
    kd, vd = gather_paged(key_cache, block_table, K), gather_paged(value_cache, block_table, K)
    if not (torch.equal(kd, k) and torch.equal(vd, v)):
        raise SystemExit("the paged cache does not hold the keys and values it was built from")
    kd, vd = kd.contiguous(), vd.contiguous()  # the gathered copies the baseline reads (outside its timing)
    qp = q[:, :, 0]  # [B, H, D]: one query per row, as vLLM's flat token axis
    scaling = D ** -0.5
    zero = torch.zeros(B, dtype=torch.float32, device=device)
    tau = torch.full((B,), 0.15, dtype=torch.float32, device=device)
    stats = torch.zeros(B, H, 5, dtype=torch.float32, device=device)
    F = torch.nn.functional

    def sdpa():
        return F.scaled_dot_product_attention(q, kd, vd, scale=scaling, enable_gqa=True)

    base = sdpa().transpose(1, 2)[:, 0].float()  # [B, H, D]
    tol = (2e-2 if dtype != torch.float32 else 1e-4) * max(1.0, base.abs().max().item())
    err_ref = (base - reference(q, k, v, scaling)[:, 0]).abs().max().item()
    rows = [{"name": "sdpa (GQA) over the gathered cache (baseline; gather not timed)", "max_err": err_ref,
             "ok": err_ref <= tol, "us": timed(sdpa, device, args.inner, args.reps)}]
    ns = 2 if args.smoke else None
    cases = [(name, nw, True) for name, nw in PAGED_VARIANTS] + [("oeb_decode (dense) over the gathered cache", None,
                                                                   False)]
    for name, nw, paged in cases:
        row = {"name": name}
        try:
            if paged:
                def plan_for(t, nw=nw):
                    return kernels.plan_decode_paged(qp, key_cache, value_cache, block_table, kseg, qg, t, None, stats,
                                                     ns, num_warps=nw)

                def call(t, p):
                    return kernels.oeb_decode_paged(qp, key_cache, value_cache, block_table, kseg, qg, t, scaling,
                                                    None, stats, plan=p)
            else:
                def plan_for(t, nw=nw):
                    return kernels.plan_decode(q, kd, vd, kseg, qg, t, None, stats, ns, num_warps=nw)

                def call(t, p):
                    return kernels.oeb_decode(q, kd, vd, kseg, qg, t, scaling, None, stats, plan=p)[:, 0]
            got = call(zero, plan_for(zero))
            row["max_err"] = err = (got.float() - base).abs().max().item()
            row["ok"] = err <= tol
            plan = plan_for(tau)
            row.update(num_splits=plan.num_splits, block_k=plan.BK, num_warps=plan.num_warps)
            call(tau, plan)
            row["fired_heads"] = int(stats[:, :, 0].sum().item())
            row["us"] = timed(lambda c=call, p=plan: c(tau, p), device, args.inner, args.reps)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile here is reported, not fatal
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    for r in rows:
        if "us" in r:
            r["vs_baseline"] = r["us"] / rows[0]["us"]
    return {"batch": B, "tolerance": tol, "rows": rows}


def markdown(res: dict) -> str:
    """The results table; with --paged (res has "block_size") against the gathered-cache baseline, with warps."""
    paged = "block_size" in res
    if paged:
        title = f"# The fused OEB decoding kernel over vLLM's paged KV cache, per call: {res['device_name']}"
        keys = f"{res['keys']} keys ({res['question']} question) in blocks of {res['block_size']}; "
        note = (" The baseline reads keys and values gathered from the cache beforehand: the gather is not in its "
                "time.")
        ratio_key, ratio_head, extra = "vs_baseline", "/ baseline", " warps |"
        err_head = "max abs diff from the baseline, tau_B = 0 (the baseline: from float32 attention)"
    else:
        title = f"# The fused OEB decoding kernel per call: {res['device_name']}"
        keys, note = f"{res['keys']} keys ({res['question']} question); ", ""
        ratio_key, ratio_head, extra = "vs_plain_sdpa", "/ sdpa (repeat_kv + mask)", ""
        err_head = "max error (tau_B = 0)"
    lines = [title, "",
             f"{res['dtype']}, {res['heads']} query heads, {res['kv_heads']} kv heads, head dim {res['head_dim']}, "
             f"{keys}median of {res['reps']} x {res['inner']} calls; torch {res['torch']}, triton {res['triton']}."
             f"{note}", "",
             f"| batch | variant | us per call | {ratio_head} |{extra} splits | {err_head} | ok |",
             "|---:|:--|---:|---:|" + "---:|" * bool(extra) + "---:|---:|:--|"]
    for b in res["batches"]:
        for r in b["rows"]:
            us = f"{r['us']:.1f}" if "us" in r else r.get("error", "-")
            ratio = f"{r[ratio_key]:.2f}" if ratio_key in r else "-"
            err = f"{r['max_err']:.2e}" if "max_err" in r else "-"
            warps = f" {r.get('num_warps', '-')} |" if paged else ""
            lines.append(f"| {b['batch']} | {r['name']} | {us} | {ratio} |{warps} {r.get('num_splits', '-')} | {err} "
                         f"| {'yes' if r.get('ok') else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny float32 shapes (CPU with TRITON_INTERPRET=1)")
    ap.add_argument("--batch-sizes", default=None)
    ap.add_argument("--inner", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--paged", action="store_true", help="over vLLM's paged KV cache: oeb_decode_paged against "
                    "sdpa over the gathered cache")
    ap.add_argument("--block-size", type=int, default=16, help="keys per cache block (--paged; vLLM's default 16)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no CUDA device: run the smoke test with TRITON_INTERPRET=1 and --smoke")
    device = "cuda" if cuda else "cpu"
    if args.smoke:
        args.heads, args.kv_heads, args.head_dim, args.keys, args.question = 4, 2, 16, 80, 48
        dtype = torch.float32
        args.inner, args.reps = args.inner or 1, args.reps or 1
    else:
        args.heads, args.kv_heads, args.head_dim, args.keys, args.question = 28, 4, 128, 1536, 1024
        dtype = torch.bfloat16
        args.inner, args.reps = args.inner or 20, args.reps or 15
    import triton

    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    res = {"device_name": name, "dtype": str(dtype).replace("torch.", ""), "heads": args.heads,
           "kv_heads": args.kv_heads, "head_dim": args.head_dim, "keys": args.keys, "question": args.question,
           "inner": args.inner, "reps": args.reps, "torch": torch.__version__, "triton": triton.__version__,
           "smoke": args.smoke, "batches": []}
    if args.paged:
        res["block_size"] = args.block_size
    for B in [int(x) for x in (args.batch_sizes or ("2" if args.smoke else "1,16")).split(",")]:
        res["batches"].append((run_batch_paged if args.paged else run_batch)(B, args, dtype, device))
        print(f"batch {B}: " + "; ".join(f"{r['name']}: {r['us']:.1f} us" if "us" in r else
                                          f"{r['name']}: {r.get('error')}" for r in res["batches"][-1]["rows"]),
              flush=True)
    stem = Path(args.out) / f"oeb_kernel_{'paged_' if args.paged else ''}{'cuda' if cuda else 'cpu_smoke'}"
    table = markdown(res)
    atomic_write_json(stem.with_suffix(".json"), res)
    atomic_write_text(stem.with_suffix(".md"), table)
    print(table)
    bad = [r["name"] for b in res["batches"] for r in b["rows"] if not r.get("ok")]
    if bad:
        print(f"variants that failed their check: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
