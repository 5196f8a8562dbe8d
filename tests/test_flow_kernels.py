"""The fused OEB decoding kernel (stepscope.core.kernels), against an independent float64 reference that loops
over rows and heads.

Here (and in CI) Triton's interpreter runs it on CPU: TRITON_INTERPRET=1 must be in the environment when triton
is imported and when the kernels are defined (lazily, on the first call); conftest.py sets it before anything is
imported, for the whole session (StepFlow's kernel="auto" still picks the kernel on CUDA devices only).
On a GPU machine, `TRITON_INTERPRET=0 pytest tests/test_flow_kernels.py` runs the same tests on the compiled
kernel: inputs are built on CPU, moved to the GPU for the call, and compared on CPU."""

import math
import os

import pytest
import torch
from conftest import require_triton

require_triton()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported (conftest.py sets it) and there is "
                "no GPU", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

from stepscope.core import kernels  # noqa: E402
from stepscope.core.kernels import available, choose_num_splits  # noqa: E402

HIDDEN = 3


def to(t):
    """A CPU input on DEVICE (strides kept where .to keeps them); None stays None."""
    return None if t is None else t.to(DEVICE)


def oeb_decode(query, key, value, kseg, qgroups, tau_b, scaling, sinks=None, stats=None, num_splits=None):
    """kernels.oeb_decode on DEVICE for CPU inputs; the output comes back to the CPU and `stats` is filled in
    place, as the kernel does."""
    st = to(stats)
    out = kernels.oeb_decode(to(query), to(key), to(value), to(kseg), to(qgroups), to(tau_b), scaling,
                             sinks=to(sinks), stats=st, num_splits=num_splits)
    if stats is not None:
        stats.copy_(st.cpu())
    return out.cpu()


def reference(query, key, value, kseg, qgroups, tau_b, scaling, sinks=None):
    """Explicit OEB for one query per row, float64: (out [B, 1, H, Dv], stats [B, H, 5], tau_s [B, H])."""
    B, H, _, D = query.shape
    Hkv, K, Dv = key.shape[1], key.shape[2], value.shape[3]
    n_rep = H // Hkv
    q, k, v = query.double(), key.double(), value.double()
    out = torch.zeros(B, 1, H, Dv, dtype=torch.float64)
    stats = torch.zeros(B, H, 5, dtype=torch.float64)
    tau_s_all = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        g_b, g_s = int(qgroups[b, 0]), int(qgroups[b, 1])
        tau_b_ = float(tau_b[b])
        eligible = 1.0 if tau_b_ > 0 else 0.0
        visible = [i for i in range(K) if int(kseg[b, i]) != HIDDEN]
        for h in range(H):
            kv = h // n_rep
            logits = [scaling * float(torch.dot(q[b, h, 0], k[b, kv, i])) for i in visible]
            if sinks is not None:
                logits.append(float(sinks[h]))
            if not logits:
                continue
            top = max(logits)
            e = [math.exp(x - top) for x in logits]
            z = sum(e)
            p = {i: e[j] / z for j, i in enumerate(visible)}  # the sink's mass is left out: it is O's
            p_b = sum(pi for i, pi in p.items() if int(kseg[b, i]) == g_b)
            p_s = sum(pi for i, pi in p.items() if int(kseg[b, i]) == g_s)
            tau_s = p_b + p_s - tau_b_
            tau_s_all[b, h] = tau_s
            fire = p_b > 0 and p_b < tau_b_ and tau_s > 0
            f_b = tau_b_ / p_b if fire else 1.0
            f_s = tau_s / p_s if fire else 1.0
            acc = torch.zeros(Dv, dtype=torch.float64)
            for i, pi in p.items():
                seg = int(kseg[b, i])
                f = f_b if seg == g_b else f_s if seg == g_s else 1.0
                acc += pi * f * v[b, kv, i]
            out[b, 0, h] = acc
            stats[b, h] = eligible * torch.tensor([float(fire), p_b, p_s, f_b * p_b, f_s * p_s],
                                                  dtype=torch.float64)
    return out, stats, tau_s_all


def make_inputs(B, H, Hkv, K, D, dtype=torch.float32, seed=0, peak=3.0, pad=True, sinks=False,
                contiguous_query=False):
    """Random inputs laid out as in a real decoding step: the query a transposed view of [B, 1, H, D], key
    and value a slice of a longer cache, kseg a column slice of a wider int8 buffer."""
    g = torch.Generator().manual_seed(seed)
    q_store = torch.randn(B, 1, H, D, generator=g) * peak
    query = q_store.transpose(1, 2).to(dtype)
    if contiguous_query:
        query = query.contiguous()
    cache = torch.randn(2, B, Hkv, K + 5, D, generator=g).to(dtype)
    key, value = cache[0, :, :, :K], cache[1, :, :, :K]
    wide = torch.full((B, K + 9), HIDDEN, dtype=torch.int8)
    seg = torch.randint(0, 3, (B, K), generator=g, dtype=torch.int8)
    if pad and B > 1 and K > 2:
        seg[1, : K // 3] = HIDDEN  # left padding of row 1
    wide[:, 4 : 4 + K] = seg
    kseg = wide[:, 4 : 4 + K]
    qgroups = torch.tensor([[0, 1] if b % 2 == 0 else [1, 2] for b in range(B)], dtype=torch.int32)
    tau_b = torch.rand(B, generator=g) * 0.85 + 0.05
    if B > 2:
        tau_b[2] = 0.0  # not eligible
    sk = torch.randn(H, generator=g) * 2.0 if sinks else None
    return query, key, value, kseg, qgroups, tau_b, 1.0 / math.sqrt(D), sk


def check(inputs, num_splits=None, atol=1e-5, rel=None):
    query, key, value, kseg, qgroups, tau_b, scaling, sinks = inputs
    B, H = query.shape[:2]
    stats = torch.full((B, H, 5), float("nan"))
    out = oeb_decode(query, key, value, kseg, qgroups, tau_b, scaling, sinks=sinks, stats=stats,
                     num_splits=num_splits)
    assert out.shape == (B, 1, H, value.shape[-1]) and out.dtype == value.dtype and out.is_contiguous()
    ref, ref_stats, tau_s = reference(query, key, value, kseg, qgroups, tau_b, scaling, sinks)
    got = out.double()
    assert torch.isfinite(got).all() and torch.isfinite(stats).all()
    if rel is None:
        torch.testing.assert_close(got, ref, atol=atol, rtol=0)
        torch.testing.assert_close(stats.double(), ref_stats, atol=atol, rtol=0)
    else:
        tol = rel * max(ref.abs().max().item(), 1e-6)
        assert (got - ref).abs().max().item() <= tol
        assert (stats.double() - ref_stats).abs().max().item() <= rel
    return out, stats, ref_stats, tau_s


CASES = [  # B, H, Hkv, K, D, sinks, num_splits
    (1, 4, 4, 1, 16, False, None),
    (3, 6, 2, 5, 24, True, 1),
    (3, 7, 1, 37, 16, False, 4),
    (1, 6, 2, 37, 64, True, None),
    (3, 4, 4, 300, 16, False, 1),
    (3, 6, 2, 300, 24, True, 4),
    (1, 7, 1, 300, 16, True, 64),  # far more splits than blocks: most splits are empty
    (3, 7, 1, 1100, 16, False, None),
    (1, 4, 4, 1100, 64, True, 3),
]


@pytest.mark.parametrize("B,H,Hkv,K,D,sinks,num_splits", CASES)
def test_matches_reference_float32(B, H, Hkv, K, D, sinks, num_splits):
    check(make_inputs(B, H, Hkv, K, D, sinks=sinks, seed=K + D + H), num_splits=num_splits)


@pytest.mark.parametrize("B,H,Hkv,K,D,sinks,num_splits", [
    (3, 6, 2, 37, 64, True, 1),
    (3, 7, 1, 300, 64, False, 4),  # NR = 8, BD = 64: BK = 16
])
def test_matches_reference_bfloat16(B, H, Hkv, K, D, sinks, num_splits):
    out, *_ = check(make_inputs(B, H, Hkv, K, D, dtype=torch.bfloat16, sinks=sinks, seed=7), num_splits,
                    rel=2e-2)
    assert out.dtype == torch.bfloat16


def test_float16_and_contiguous_query():
    out, *_ = check(make_inputs(3, 4, 2, 37, 16, dtype=torch.float16, contiguous_query=True, seed=3), rel=2e-2)
    assert out.dtype == torch.float16


def test_fires_and_not_and_splits_agree():
    """Peaky attention: some eligible heads fire, some do not; the split count does not change the result."""
    inputs = make_inputs(3, 6, 2, 300, 16, sinks=True, peak=4.0, seed=11)
    results = [check(inputs, num_splits=n) for n in (1, 2, 4, 16)]
    _, stats, ref_stats, _ = results[0]
    fired = ref_stats[:2, :, 0]  # rows 0 and 1 are eligible, row 2 is not
    assert (fired == 1).any() and (fired == 0).any()
    assert (stats[2] == 0).all()  # not eligible: all stats zero
    for out, st, *_ in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(st, stats, atol=1e-5, rtol=0)


def test_wrong_groups_or_plain_attention_differ():
    """Where OEB fires, other groups (or tau_b = 0, plain attention) give another output: the test can fail."""
    query, key, value, kseg, qgroups, tau_b, scaling, sinks = make_inputs(1, 4, 2, 64, 16, peak=4.0, seed=5)
    tau_b = torch.tensor([0.85])
    stats = torch.zeros(1, 4, 5)
    out = oeb_decode(query, key, value, kseg, qgroups, tau_b, scaling, stats=stats)
    assert stats[0, :, 0].sum() > 0
    wrong = oeb_decode(query, key, value, kseg, torch.tensor([[0, 2]], dtype=torch.int32), tau_b, scaling)
    plain = oeb_decode(query, key, value, kseg, qgroups, torch.zeros(1), scaling)
    assert (out - wrong).abs().max() > 1e-3
    assert (out - plain).abs().max() > 1e-3
    ref, _, _ = reference(query, key, value, kseg, qgroups, torch.zeros(1), scaling)
    torch.testing.assert_close(plain.double(), ref, atol=1e-5, rtol=0)
    # plain attention is ordinary softmax attention over the visible keys
    vis = kseg[0] != HIDDEN
    k_rep = key.repeat_interleave(2, dim=1)[0, :, vis]  # [H, K', D]
    p = torch.softmax(scaling * torch.einsum("hd,hkd->hk", query[0, :, 0], k_rep), -1)
    sdpa = torch.einsum("hk,hkd->hd", p, value.repeat_interleave(2, dim=1)[0, :, vis])
    torch.testing.assert_close(plain[0, 0], sdpa, atol=1e-5, rtol=0)


def test_empty_bridge_and_negative_tau_s():
    """Row 0: no key in the bridge (p_B = 0); row 1: O holds almost all the mass (tau_S <= 0). Neither fires."""
    B, H, Hkv, K, D = 2, 4, 2, 40, 16
    query, key, value, kseg, qgroups, _, scaling, _ = make_inputs(B, H, Hkv, K, D, pad=False, seed=2)
    kseg[0][kseg[0] == 0] = 2  # row 0, groups (0, 1): no question key
    kseg[1, :10] = 0  # row 1, groups (1, 2): O = question keys, made to dominate
    key[1, :, :10] = query[1, :, 0].reshape(Hkv, 2, D).sum(1)[:, None, :] * 3.0
    tau_b = torch.tensor([0.6, 0.5])
    _, stats, ref_stats, tau_s = check((query, key, value, kseg, qgroups, tau_b, scaling, None), num_splits=2)
    assert (ref_stats[0, :, 1] == 0).all()  # p_B = 0
    assert (ref_stats[1, :, 1] < 0.5).all() and (tau_s[1] <= 0).all()  # p_B < tau_B but tau_S <= 0
    assert (stats[:, :, 0] == 0).all()


def test_no_visible_key():
    """A row whose keys are all hidden: zeros (no NaN); with a sink, also zeros (the sink has no value)."""
    query, key, value, kseg, qgroups, tau_b, scaling, _ = make_inputs(2, 4, 4, 5, 16, seed=4)
    kseg[0] = HIDDEN
    for sinks in (None, torch.randn(4)):
        stats = torch.full((2, 4, 5), float("nan"))
        out = oeb_decode(query, key, value, kseg, qgroups, tau_b, scaling, sinks=sinks, stats=stats,
                         num_splits=2)
        assert (out[0] == 0).all() and torch.isfinite(out).all() and (stats[0] == 0).all()
        ref, ref_stats, _ = reference(query, key, value, kseg, qgroups, tau_b, scaling, sinks)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.double(), ref_stats, atol=1e-5, rtol=0)


def test_value_dim_differs_from_key_dim():
    query, key, value, kseg, qgroups, tau_b, scaling, _ = make_inputs(3, 4, 2, 37, 16, seed=6)
    value = torch.randn(3, 2, 37, 24)
    check((query, key, value, kseg, qgroups, tau_b, scaling, None), num_splits=2)


def test_choose_num_splits():
    assert choose_num_splits(300, 8, 128) == 1
    assert choose_num_splits(511, 1, 16) == 1
    for K, pairs, bk in ((1100, 1, 16), (4096, 8, 64), (32768, 64, 16), (100_000, 2, 128), (2048, 512, 32)):
        s = choose_num_splits(K, pairs, bk)
        nblocks = -(-K // bk)
        per = -(-nblocks // s)
        assert 1 <= s <= max(1, K // 256) and (s - 1) * per < nblocks  # no empty split
        assert pairs * s < 2 * 132 + pairs  # about two programs per SM
    assert choose_num_splits(32768, 1, 64) > 1
    assert choose_num_splits(0, 1, 16) == 1


def test_available_and_argument_checks():
    assert available(DEVICE)  # the interpreter is on, or a GPU
    query, key, value, kseg, qgroups, tau_b, scaling, _ = make_inputs(1, 4, 2, 5, 16)
    with pytest.raises(ValueError):
        oeb_decode(query, key, value, kseg.long(), qgroups, tau_b, scaling)
    with pytest.raises(ValueError):
        oeb_decode(query, key, value, kseg, qgroups.long(), tau_b, scaling)
    with pytest.raises(ValueError):
        oeb_decode(query.expand(1, 4, 2, 16), key, value, kseg, qgroups, tau_b, scaling)
    assert kernels.NUM_SMS_DEFAULT == 132


def test_one_plan_serves_every_layer_of_a_forward():
    """StepFlow plans once per forward (kernels.plan_decode) and launches every OEB layer with that plan: each
    layer's inputs (other values, other strides of the same shapes) still give the reference output."""
    layers = [make_inputs(3, 6, 2, 300, 24, sinks=s, seed=20 + i, contiguous_query=i == 1) for i, s in
              enumerate((False, True, False))]
    q, k, v, kseg, qg, tau, scaling, _ = layers[0]
    plan = kernels.plan_decode(to(q), to(k), to(v), to(kseg), to(qg), to(tau), num_splits=4)
    assert plan.num_splits == 4 and plan.ws_elems > 0
    for q, k, v, kseg, qg, tau, scaling, sinks in layers:
        stats = torch.zeros(3, 6, 5, device=DEVICE)
        out = kernels.oeb_decode(to(q), to(k), to(v), to(kseg), to(qg), to(tau), scaling, sinks=to(sinks),
                                 stats=stats, plan=plan)
        ref, ref_stats, _ = reference(q, k, v, kseg, qg, tau, scaling, sinks)
        torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.cpu().double(), ref_stats, atol=1e-5, rtol=0)


def test_plan_checks_name_the_problem():
    q, k, v, kseg, qg, tau, scaling, _ = make_inputs(2, 4, 2, 9, 16)
    with pytest.raises(ValueError, match="tau_b must be float32"):
        kernels.plan_decode(q, k, v, kseg, qg, tau.double())
    with pytest.raises(ValueError, match="stats must be"):
        kernels.plan_decode(q, k, v, kseg, qg, tau, stats=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="one query per row"):
        kernels.plan_decode(q.expand(2, 4, 3, 16), k, v, kseg, qg, tau)


@pytest.mark.parametrize("dot", [True, False])
@pytest.mark.parametrize("B,H,Hkv,K,D,sinks,num_splits", [CASES[1], CASES[5], (2, 7, 1, 300, 64, True, 1)])
def test_both_product_forms(dot, B, H, Hkv, K, D, sinks, num_splits):
    """Products by tl.dot (the default: 16 query rows at least, blocks of 64 keys) and by broadcast
    multiply-and-sum give the reference output, float32 and bfloat16 (on CPU, Triton's interpreter runs the
    dot form in float32: its bf16 tl.dot is wrong; the GPU run of these tests covers bf16 operands)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v, kseg, qg, tau, scaling, sk = make_inputs(B, H, Hkv, K, D, dtype=dtype, sinks=sinks, seed=9)
        stats = torch.zeros(B, H, 5, device=DEVICE)
        plan = kernels.plan_decode(to(q), to(k), to(v), to(kseg), to(qg), to(tau), to(sk), stats,
                                   num_splits=num_splits, dot=dot)
        assert plan.dot == dot and (plan.NR >= 16) == (dot or H // Hkv > 8)
        out = kernels.oeb_decode(to(q), to(k), to(v), to(kseg), to(qg), to(tau), scaling, to(sk), stats, plan=plan)
        ref, ref_stats, _ = reference(q, k, v, kseg, qg, tau, scaling, sk)
        err = (out.cpu().double() - ref).abs().max().item()
        assert err <= tol * max(1.0, ref.abs().max().item()), (dtype, err)
        assert (stats.cpu().double() - ref_stats).abs().max().item() <= tol


@pytest.mark.parametrize("block_k,num_warps", [(16, 4), (32, 8), (128, 4)])
def test_block_size_and_warps_overrides(block_k, num_warps):
    """plan_decode's block_k / num_warps (what bench/oeb_kernel.py compares) give the reference output."""
    q, k, v, kseg, qg, tau, scaling, sk = make_inputs(2, 8, 2, 300, 32, sinks=True, seed=4)
    stats = torch.zeros(2, 8, 5, device=DEVICE)
    plan = kernels.plan_decode(to(q), to(k), to(v), to(kseg), to(qg), to(tau), to(sk), stats, num_splits=3,
                               block_k=block_k, num_warps=num_warps)
    assert (plan.BK, plan.num_warps) == (block_k, num_warps) and plan.keys_per_split % block_k == 0
    out = kernels.oeb_decode(to(q), to(k), to(v), to(kseg), to(qg), to(tau), scaling, to(sk), stats, plan=plan)
    ref, ref_stats, _ = reference(q, k, v, kseg, qg, tau, scaling, sk)
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.cpu().double(), ref_stats, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        kernels.plan_decode(q, k, v, kseg, qg, tau, block_k=48)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the smoke mode runs on the interpreter")
def test_kernel_bench_smoke(tmp_path):
    """bench/oeb_kernel.py --smoke checks every kernel variant against float32 attention and writes its tables."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("oeb_kernel", os.path.join(os.path.dirname(__file__), "..",
                                                                             "bench", "oeb_kernel.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "oeb_kernel_cpu_smoke.json").read_text())
    rows = res["batches"][0]["rows"]
    assert len(rows) == len(mod.VARIANTS) and all(r["ok"] and r["num_splits"] == 2 for r in rows)
    assert "| 2 | broadcast form |" in (tmp_path / "oeb_kernel_cpu_smoke.md").read_text()
    # --paged: oeb_decode_paged over a cache in vLLM's layout against sdpa over the gathered cache
    assert mod.main(["--smoke", "--paged", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "oeb_kernel_paged_cpu_smoke.json").read_text())
    rows = res["batches"][0]["rows"]
    assert len(rows) == len(mod.PAGED_VARIANTS) + 2 and all(r["ok"] and "us" in r for r in rows)
    assert [r["num_warps"] for r in rows[1:3]] == [8, 4] and all(r["num_splits"] == 2 for r in rows[1:])
    assert "| 2 | oeb_decode_paged, 4 warps |" in (tmp_path / "oeb_kernel_paged_cpu_smoke.md").read_text()


# --- the paged form: vLLM's FLASH_ATTN cache read in place ------------------------------------------------------

GARBAGE_BLOCK = 2**31 - 1  # a block-table entry no cache has: reading it would fault, not just spoil the result


def paged_cache(key, value, kseg, block_size, seed=0):
    """Scatter dense key/value [B, Hkv, K, D] into a new cache laid out as vLLM's FLASH_ATTN backend keeps it:
    kv_cache [num_blocks, Hkv, block_size, 2 * D] (keys in [..., :D], values in [..., D:]), blocks 1, 2, ...
    handed out in a random order. Only visible keys (kseg != 3) are written, and only pages holding one get a
    block; every other slot holds NaN or 1e30, and the block-table entries of pages without a visible key (and
    one extra column) are garbage: in turn block 0 (kept spare, as vLLM keeps its null block), the last block
    (also spare) and GARBAGE_BLOCK. Returns (kv_cache, block_table int32 [B, ceil(K / block_size) + 1])."""
    B, Hkv, K, D = key.shape
    assert value.shape == key.shape
    pages = -(-K // block_size)
    used = [[j for j in range(pages) if (kseg[b, j * block_size:(j + 1) * block_size] != HIDDEN).any()]
            for b in range(B)]
    num_blocks = sum(len(u) for u in used) + 2
    order = (1 + torch.randperm(num_blocks - 2, generator=torch.Generator().manual_seed(seed))).tolist()
    garbage = [0, num_blocks - 1, GARBAGE_BLOCK]
    kv_cache = torch.full((num_blocks, Hkv, block_size, 2 * D), float("nan"), dtype=key.dtype)
    kv_cache[:, :, 1::2] = 1e30
    block_table = torch.empty(B, pages + 1, dtype=torch.int32)
    handed = 0
    for b in range(B):
        for j in range(pages + 1):
            if j not in used[b]:
                block_table[b, j] = garbage[(b + j) % 3]
                continue
            blk = order[handed]
            handed += 1
            block_table[b, j] = blk
            for k in range(j * block_size, min(K, (j + 1) * block_size)):
                if kseg[b, k] != HIDDEN:
                    kv_cache[blk, :, k % block_size, :D] = key[b, :, k]
                    kv_cache[blk, :, k % block_size, D:] = value[b, :, k]
    return kv_cache, block_table


def vllm_views(kv_cache, head_size):
    """key_cache, value_cache [num_blocks, block_size, Hkv, D] as vLLM's FlashAttentionImpl.forward makes them."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def paged_inputs(B, H, Hkv, K, D, block_size, dtype, sinks, seed):
    """make_inputs with rows of different lengths (row 0 the longest; row 1 also has make_inputs' hidden start:
    a sliding window), the query rows picked out of a wider flat token buffer, and the paged cache."""
    query, key, value, kseg, qgroups, tau_b, scaling, sk = make_inputs(B, H, Hkv, K, D, dtype=dtype, sinks=sinks,
                                                                       seed=seed)
    for b in range(1, B):
        kseg[b, max(1, K - 11 * b - 3):] = HIDDEN
    flat = torch.randn(2 * B + 1, H, D).to(dtype)
    flat[1::2][:B] = query[:, :, 0]
    kv_cache, block_table = paged_cache(key, value, kseg, block_size, seed=seed)
    return query, key, value, kseg, qgroups, tau_b, scaling, sk, flat, kv_cache, block_table


PAGED_CASES = [  # B, H, Hkv, K, D, block_size, sinks, num_splits, dtype
    (3, 4, 4, 40, 16, 16, False, 1, torch.float32),
    (3, 4, 2, 90, 16, 16, True, 2, torch.float32),
    (2, 7, 1, 90, 32, 32, True, 3, torch.float32),  # 2 blocks of 64 keys, 3 splits: one is empty
    (3, 4, 2, 70, 16, 32, True, 1, torch.bfloat16),
    (2, 7, 1, 90, 16, 16, False, 2, torch.bfloat16),
    (3, 4, 4, 40, 32, 32, True, 2, torch.bfloat16),
]


@pytest.mark.parametrize("B,H,Hkv,K,D,block_size,sinks,num_splits,dtype", PAGED_CASES)
def test_paged_matches_reference_and_dense(B, H, Hkv, K, D, block_size, sinks, num_splits, dtype):
    """oeb_decode_paged over vLLM's cache layout gives the float64 reference and the dense kernel's output and
    stats for the same keys; the NaN / 1e30 slots and garbage block-table entries are never read."""
    (query, key, value, kseg, qgroups, tau_b, scaling, sk, flat, kv_cache,
     block_table) = paged_inputs(B, H, Hkv, K, D, block_size, dtype, sinks, seed=K + D + H)
    kv_dev = to(kv_cache)
    key_cache, value_cache = vllm_views(kv_dev, D)
    assert key_cache.shape == (kv_cache.shape[0], block_size, Hkv, D)
    assert key_cache.stride() == (Hkv * block_size * 2 * D, 2 * D, block_size * 2 * D, 1)
    for b in range(B):  # the addressing rule: row b's key k at key_cache[block_table[b, k // bs], k % bs]
        for k in range(K):
            if kseg[b, k] != HIDDEN:
                blk = int(block_table[b, k // block_size])
                assert torch.equal(key_cache[blk, k % block_size].cpu(), key[b, :, k])
                assert torch.equal(value_cache[blk, k % block_size].cpu(), value[b, :, k])
    stats = torch.full((B, H, 5), float("nan"), device=DEVICE)
    out = kernels.oeb_decode_paged(to(flat)[1::2][:B], key_cache, value_cache, to(block_table), to(kseg), to(qgroups),
                                   to(tau_b), scaling, sinks=to(sk), stats=stats, num_splits=num_splits)
    assert out.shape == (B, H, D) and out.dtype == dtype and out.is_contiguous()
    out, stats = out.cpu(), stats.cpu()
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
    ref, ref_stats, _ = reference(query, key, value, kseg, qgroups, tau_b, scaling, sk)
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * max(ref.abs().max().item(), 1e-6)
    assert (out.double() - ref[:, 0]).abs().max().item() <= tol
    assert (stats.double() - ref_stats).abs().max().item() <= (1e-5 if dtype == torch.float32 else 2e-2)
    dense_stats = torch.zeros(B, H, 5)
    dense = oeb_decode(query, key, value, kseg, qgroups, tau_b, scaling, sinks=sk, stats=dense_stats,
                       num_splits=num_splits)
    same = (1e-6 if dtype == torch.float32 else 2**-7) * max(1.0, dense.abs().max().item())
    torch.testing.assert_close(out, dense[:, 0], atol=same, rtol=0)
    torch.testing.assert_close(stats, dense_stats, atol=1e-6, rtol=0)


def test_paged_small_blocks_broadcast_form_and_one_plan():
    """Blocks of 16 keys inside pages of 32, the broadcast form, and one plan_decode_paged plan serving two layers
    (two caches of the same shapes, one of them with a garbage-free full-length row set)."""
    B, H, Hkv, K, D, bs = 3, 4, 2, 90, 16, 32
    layers = [paged_inputs(B, H, Hkv, K, D, bs, torch.float32, sinks=s, seed=30 + i)
              for i, s in enumerate((True, False))]
    flat, kv_cache, block_table = layers[0][8:]
    key_cache, value_cache = vllm_views(to(kv_cache), D)
    query, kseg, qgroups, tau_b = to(flat)[1::2][:B], to(layers[0][3]), to(layers[0][4]), to(layers[0][5])
    plan = kernels.plan_decode_paged(query, key_cache, value_cache, to(block_table), kseg, qgroups, tau_b,
                                     stats=torch.zeros(B, H, 5, device=DEVICE), num_splits=3, dot=False,
                                     block_k=16)
    assert (plan.page_size, plan.BK, plan.num_splits, plan.dot) == (bs, 16, 3, False)
    for query, key, value, kseg, qgroups, tau_b, scaling, sk, flat, kv_cache, block_table in layers:
        key_cache, value_cache = vllm_views(to(kv_cache), D)
        stats = torch.zeros(B, H, 5, device=DEVICE)
        out = kernels.oeb_decode_paged(to(flat)[1::2][:B], key_cache, value_cache, to(block_table), to(kseg),
                                       to(qgroups), to(tau_b), scaling, sinks=to(sk), stats=stats, plan=plan)
        ref, ref_stats, _ = reference(query, key, value, kseg, qgroups, tau_b, scaling, sk)
        torch.testing.assert_close(out.cpu().double(), ref[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.cpu().double(), ref_stats, atol=1e-5, rtol=0)


def test_paged_row_without_keys_and_plan_checks():
    """A row whose keys are all hidden (its block table all garbage) gives zeros; plan_decode_paged names the
    problem of each wrong argument."""
    B, H, Hkv, K, D, bs = 2, 4, 2, 20, 16, 16
    query, key, value, kseg, qgroups, tau_b, scaling, _ = make_inputs(B, H, Hkv, K, D, seed=8)
    kseg[1] = HIDDEN
    kv_cache, block_table = paged_cache(key, value, kseg, bs)
    assert (block_table[1] == GARBAGE_BLOCK).any()
    for e in block_table[1].tolist():  # the rest are spare blocks, nothing but NaN and 1e30
        assert e == GARBAGE_BLOCK or (kv_cache[e].isnan() | (kv_cache[e] == 1e30)).all()
    kc, vc = vllm_views(kv_cache, D)
    q = query[:, :, 0]
    stats = torch.full((B, H, 5), float("nan"), device=DEVICE)
    kcd, vcd = vllm_views(to(kv_cache), D)
    out = kernels.oeb_decode_paged(to(q), kcd, vcd, to(block_table), to(kseg), to(qgroups), to(tau_b), scaling,
                                   stats=stats, num_splits=2).cpu()
    ref, ref_stats, _ = reference(query, key, value, kseg, qgroups, tau_b, scaling)
    assert (out[1] == 0).all() and (stats[1] == 0).all()
    torch.testing.assert_close(out.double(), ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.cpu().double(), ref_stats, atol=1e-5, rtol=0)

    def plan(**kw):
        args = dict(query=q, key_cache=kc, value_cache=vc, block_table=block_table, kseg=kseg, qgroups=qgroups,
                    tau_b=tau_b)
        args.update(kw)
        return kernels.plan_decode_paged(**args)

    assert plan().page_size == bs
    with pytest.raises(ValueError, match="block_table too short: 1 blocks of 16 keys"):
        plan(block_table=block_table[:, :1])
    with pytest.raises(ValueError, match="block_table must be int32"):
        plan(block_table=block_table.long())
    with pytest.raises(ValueError, match=r"query must be \[B, H, D\]"):
        plan(query=query)
    with pytest.raises(ValueError, match="must share a dtype"):
        plan(query=q.double())
    with pytest.raises(ValueError, match="contiguous last dimension"):
        plan(key_cache=kc.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="shapes do not fit"):
        plan(value_cache=vc[:, :, :1])
    with pytest.raises(ValueError, match="kseg must be int8"):
        plan(kseg=kseg.long())
    with pytest.raises(ValueError, match="tau_b must be float32"):
        plan(tau_b=tau_b.double())
    dense_plan = kernels.plan_decode(query, key, value, kseg, qgroups, tau_b)
    # one launch-parameter choice for both forms: the paged one differs in its block size and, with tl.dot, warps
    assert plan()._replace(page_size=0, num_warps=dense_plan.num_warps) == dense_plan
    assert (plan().num_warps, dense_plan.num_warps) == (8, 4)
    with pytest.raises(ValueError, match="plan with plan_decode_paged"):
        kernels.oeb_decode_paged(q, kc, vc, block_table, kseg, qgroups, tau_b, scaling, plan=dense_plan)
    with pytest.raises(ValueError, match="use oeb_decode_paged"):
        kernels.oeb_decode(query, key, value, kseg, qgroups, tau_b, scaling, plan=plan())
