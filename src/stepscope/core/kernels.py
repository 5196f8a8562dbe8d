"""Fused Triton kernels for one decoding step (one query per row) of attention with the Odds-Equal Bridge.

Mathematics (`core.oeb.oeb_factors` applied to one query's softmax, as the PyTorch forms compute it).
Per row b and query head h (kv head h // n_rep):

    s_k   = scaling * <q, k_k>                   for the visible keys (kseg != 3; 3 = hidden / padding)
    p     = softmax(s) over the visible keys, plus the sink logit of head h if `sinks` is given (GPT-OSS: its
            mass belongs to O, it has no value vector)
    p_B   = sum of p over the keys whose segment is qgroups[b, 0] (the bridge B)
    p_S   = sum of p over the keys whose segment is qgroups[b, 1] (the query's own group S)
            (every other visible key, and the sink, is O)
    tau_B = tau_b[b] (0: the row is not eligible),  tau_S = p_B + p_S - tau_B
    fire  = p_B > 0 and p_B < tau_B and tau_S > 0
    f_B, f_S = (tau_B / p_B, tau_S / p_S) if fire else (1, 1)
    out   = sum_k p_k * f(k) * v_k                 (f = f_B on B keys, f_S on S keys, 1 on O keys)

and optionally stats[b, h] = eligible * (fire, p_B, p_S, f_B * p_B, f_S * p_S), eligible = (tau_B > 0).
A row without any visible key and without a sink gets out = 0 (softmax over nothing; no NaN).

Layout. query [B, H, 1, D] (any strides, last dim contiguous), key [B, Hkv, K, D], value [B, Hkv, K, Dv]
(any strides, last dim contiguous), kseg int8 [B, K] (row stride free: a column slice of a wider buffer is
fine), qgroups int32 [B, 2], tau_b float32 [B], sinks [H] (any float dtype) or None, stats float32 [B, H, 5]
contiguous or None. The output is [B, 1, H, Dv] contiguous in value's dtype. Scores, probabilities and
accumulators are float32.

Paged form (`oeb_decode_paged`: StepFlow inside vLLM reads vLLM's paged cache in place, no gather). vLLM's
FLASH_ATTN backend keeps one layer's cache as kv_cache [num_blocks, Hkv, block_size, 2 * D] and splits it with
`kv_cache.transpose(1, 2).split(D, dim=-1)` into key_cache and value_cache [num_blocks, block_size, Hkv, D],
strided views (strides (Hkv * block_size * 2D, 2D, block_size * 2D, 1)); the kernel takes any strides with a
contiguous last dim. Row b's key k is key_cache[block_table[b, k // block_size], k % block_size, g] with
block_table int32 [B, n], n >= ceil(K / block_size). query is [B, H, D] (one query per row: vLLM's flat token
axis, rows chosen by the caller), the output [B, H, Dv] (the same memory as the dense form's [B, 1, H, Dv]).
Rows of different lengths and sliding windows are expressed by kseg [B, K] alone (K the longest row, 3 past a
row's length or outside its window). It is the same kernel body with the constexpr PAGED: only the address of
key k differs (block-table entry times the block stride plus slot times the slot stride, instead of k times
the key stride), and the block-table entries, keys and values of hidden keys are never loaded (the loads are
masked by visibility, not only by the key range as in the dense form), so garbage there (stale blocks, NaN in
the unused slots of a row's last block, entries past a row's length) never reaches the result. The launch
parameters are those of the dense form for the same shapes, except 8 warps instead of 4 with tl.dot (at 4 the
paged form's address arithmetic spills registers: ptxas for sm_90; not yet timed on a GPU, bench/oeb_kernel.py
--paged compares both).

One program handles one (row, kv head) pair and all its n_rep query heads: every block of BK keys and values
is loaded once and used by the query heads of that pair. Products: by tl.dot (the default, `USE_DOT`; tensor
cores on a GPU): NR = max(16, next_pow2(n_rep)) rows (tl.dot's minimum), blocks of 64 keys, scores
q.k^T accumulated in float32, and each group's probabilities cast to the value dtype times the values,
accumulated in float32 (what sdpa does); or (dot=False) by broadcast multiply-and-sum in float32 with
NR = next_pow2(n_rep), no minimum sizes. On an H100 the broadcast form took 165 us per call at batch 1 and
1,024 keys, 30x sdpa. The keys are read in a single pass with an online softmax: one
running max m per head, three running sums l_B, l_S, l_O and three accumulators acc_B, acc_S, acc_O [Dv] (all
rescaled by exp(m_old - m_new) when the max moves). At the end p_X = l_X / l with l = l_B + l_S + l_O
(+ exp(sink - m)), and out = (f_B * acc_B + f_S * acc_S + acc_O) / l, computed as tau_B * acc_B / l_B +
tau_S * acc_S / l_S + acc_O / l where it fires (no huge factor when p_B is tiny). The group factors are only
known once every key has been seen, which is why B, S and O keep separate accumulators.

Split-K (flash-decoding). For long contexts the keys of a pair are cut into `num_splits` contiguous ranges
(whole blocks); grid (B * Hkv, num_splits). Each split writes its partial state (m, l_B, l_S, l_O, acc_B,
acc_S, acc_O for its NR heads) to a float32 workspace, and a second small kernel (grid B * Hkv) merges the
splits with the usual max rescaling, decides fire and writes out and stats. With num_splits = 1 the first
kernel finishes by itself (one launch, no workspace). A split (or block) without visible keys keeps
m = -1e30 (finite) and zero sums; probabilities of masked keys are zeroed explicitly, so no exp(-inf + inf).

Only long-stable triton.language features are used (load/store with masks, arange, program_id, sum, max,
exp, where, zeros, full, trans, dot (input_precision="ieee" for float32), constexpr power-of-two blocks), so
that the same code runs on triton 3.0 to 3.9. It is validated on CPU with Triton's interpreter (TRITON_INTERPRET=1,
tests/test_flow_kernels.py; the interpreter's tl.dot runs in float32 there, since its bf16/fp16 tl.dot is wrong)
and, compiled, on a GPU by the same tests, against an explicit float64 reference (the broadcast form passed
them on an H100 with Triton 3.6; the tl.dot form has not yet run on a GPU: StepFlow's first-step check guards
it). triton is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

NUM_SMS_DEFAULT = 132  # H100 / H200
_MIN_KEYS_PER_SPLIT = 256
_ELEMS_BUDGET = 8192  # elements of the [NR, BK, BD] broadcast product per program (dot=False)
# products by tl.dot (tensor cores on a GPU) rather than the broadcast form (see the module docstring; profile:
# bench/results/stepflow_cuda_r1-distill-qwen-7b_h100_profile_stepflow.txt)
USE_DOT = True


def available(device: torch.device) -> bool:
    """Whether `oeb_decode` can run on tensors of this device."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS_DEFAULT


def choose_num_splits(K: int, pairs: int, block_k: int, num_sms: int = NUM_SMS_DEFAULT) -> int:
    """Splits per (row, kv head) pair: about 2 programs per SM in all, each split at least 256 keys (so 1 for
    K < 512), whole blocks of keys per split and no empty split."""
    nblocks = max(1, -(-K // block_k))
    want = -(-2 * num_sms // max(1, pairs))
    s = max(1, min(want, K // _MIN_KEYS_PER_SPLIT, nblocks))
    per = -(-nblocks // s)
    return -(-nblocks // per)


@functools.cache
def _kernels():
    """The kernels, defined on first use (triton is imported here, not at module import). Every name they use
    is a module global (declared below), never a closure variable, so that any triton version resolves it."""
    global tl, _oeb_empty_state, _oeb_finish, _oeb_split_kernel, _oeb_combine_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _oeb_empty_state(NR: tl.constexpr, BDV: tl.constexpr):
        # the online-softmax state of NR heads before any key: max, the three sums, the three accumulators
        m = tl.full([NR], -1.0e30, tl.float32)
        lb = tl.zeros([NR], tl.float32)
        ls = tl.zeros([NR], tl.float32)
        lo = tl.zeros([NR], tl.float32)
        acc_b = tl.zeros([NR, BDV], tl.float32)
        acc_s = tl.zeros([NR, BDV], tl.float32)
        acc_o = tl.zeros([NR, BDV], tl.float32)
        return m, lb, ls, lo, acc_b, acc_s, acc_o

    @triton.jit
    def _oeb_finish(b64, g, m, lb, ls, lo, acc_b, acc_s, acc_o, tau_ptr, s_tau, sink_ptr, out_ptr, stats_ptr,
                    H, Dv, n_rep, NR: tl.constexpr, BDV: tl.constexpr, HAS_SINK: tl.constexpr,
                    HAS_STATS: tl.constexpr):
        # from the merged state of the NR heads of pair (b, g): add the sink, decide fire, write out and stats
        offs_r = tl.arange(0, NR)
        offs_d = tl.arange(0, BDV)
        rmask = offs_r < n_rep
        heads = g * n_rep + offs_r
        if HAS_SINK:
            sink = tl.load(sink_ptr + heads, mask=rmask, other=0.0).to(tl.float32)
            m_fin = tl.maximum(m, sink)
            alpha = tl.exp(m - m_fin)
            lb = lb * alpha
            ls = ls * alpha
            lo = lo * alpha + tl.exp(sink - m_fin)
            acc_b = acc_b * alpha[:, None]
            acc_s = acc_s * alpha[:, None]
            acc_o = acc_o * alpha[:, None]
        l_tot = lb + ls + lo
        l_safe = tl.where(l_tot > 0.0, l_tot, 1.0)
        p_b = lb / l_safe
        p_s = ls / l_safe
        tau_b = tl.load(tau_ptr + b64 * s_tau).to(tl.float32)
        tau_s = p_b + p_s - tau_b
        fire = (p_b > 0.0) & (p_b < tau_b) & (tau_s > 0.0)
        # f_B / l = tau_B / l_B and f_S / l = tau_S / l_S: weights of the three accumulators, never a huge
        # factor (l_B, l_S > 0 where it fires: p_B > 0, and p_S > tau_B - p_B > 0)
        w_o = 1.0 / l_safe
        w_b = tl.where(fire, tau_b / tl.where(fire, lb, 1.0), w_o)
        w_s = tl.where(fire, tau_s / tl.where(fire, ls, 1.0), w_o)
        out = acc_b * w_b[:, None] + acc_s * w_s[:, None] + acc_o * w_o[:, None]
        optr = out_ptr + (b64 * H + heads)[:, None] * Dv + offs_d[None, :]
        tl.store(optr, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & (offs_d[None, :] < Dv))
        if HAS_STATS:
            el = tl.where(tau_b > 0.0, 1.0, 0.0)
            sptr = stats_ptr + (b64 * H + heads) * 5
            tl.store(sptr, el * tl.where(fire, 1.0, 0.0), mask=rmask)
            tl.store(sptr + 1, el * p_b, mask=rmask)
            tl.store(sptr + 2, el * p_s, mask=rmask)
            tl.store(sptr + 3, el * tl.where(fire, tau_b, p_b), mask=rmask)  # f_B * p_B
            tl.store(sptr + 4, el * tl.where(fire, tau_s, p_s), mask=rmask)  # f_S * p_S

    @triton.jit
    def _oeb_split_kernel(q_ptr, s_qb, s_qh, k_ptr, s_kb, s_kh, s_kk, v_ptr, s_vb, s_vh, s_vk,
                         seg_ptr, s_seg, qg_ptr, s_qg0, s_qg1, tau_ptr, s_tau, sink_ptr, out_ptr, stats_ptr,
                         ws_ptr, bt_ptr, s_bt, scaling, H, Hkv, K, D, Dv, n_rep, keys_per_split,
                         NR: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                         FINAL: tl.constexpr, HAS_SINK: tl.constexpr, HAS_STATS: tl.constexpr,
                         DOT: tl.constexpr, DOT_F32: tl.constexpr, PAGED: tl.constexpr,
                         PAGE_SIZE: tl.constexpr):
        # dense: s_kb / s_kh / s_kk are the row / kv head / key strides of key [B, Hkv, K, D] (value alike);
        # PAGED: the block / kv head / slot strides of key_cache [num_blocks, PAGE_SIZE, Hkv, D], key kk of row b
        # in block bt[b, kk // PAGE_SIZE], slot kk % PAGE_SIZE (bt_ptr, s_bt: the block table and its row stride)
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // Hkv
        g = pid % Hkv
        b64 = b.to(tl.int64)
        g64 = g.to(tl.int64)
        offs_r = tl.arange(0, NR)
        offs_d = tl.arange(0, BD)
        offs_dv = tl.arange(0, BDV)
        offs_k = tl.arange(0, BK)
        rmask = offs_r < n_rep
        dmask = offs_d < D
        dvmask = offs_dv < Dv

        heads = g64 * n_rep + offs_r
        q = tl.load(q_ptr + b64 * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)  # [NR, BD], the input dtype
        if not DOT:
            q = q.to(tl.float32) * scaling
        elif DOT_F32:
            q = q.to(tl.float32)
        g_b = tl.load(qg_ptr + b64 * s_qg0)
        g_s = tl.load(qg_ptr + b64 * s_qg0 + s_qg1)

        m, lb, ls, lo, acc_b, acc_s, acc_o = _oeb_empty_state(NR, BDV)

        if PAGED:
            k_base = k_ptr + g64 * s_kh
            v_base = v_ptr + g64 * s_vh
        else:
            k_base = k_ptr + b64 * s_kb + g64 * s_kh
            v_base = v_ptr + b64 * s_vb + g64 * s_vh
        seg_base = seg_ptr + b64 * s_seg
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, K)
        for k0 in range(start, end, BK):
            kk = k0 + offs_k
            kmask = kk < end
            seg = tl.load(seg_base + kk, mask=kmask, other=3).to(tl.int32)
            vis = kmask & (seg != 3)
            in_b = vis & (seg == g_b)
            in_s = vis & (seg == g_s)
            in_o = vis & (seg != g_b) & (seg != g_s)
            if PAGED:  # only visible keys are read: hidden ones may sit in garbage blocks or slots
                lmask = vis
                blk = tl.load(bt_ptr + b64 * s_bt + kk // PAGE_SIZE, mask=vis, other=0).to(tl.int64)
                slot = (kk % PAGE_SIZE).to(tl.int64)
                k_off = blk * s_kb + slot * s_kk
                v_off = blk * s_vb + slot * s_vk
            else:
                lmask = kmask
                k_off = kk.to(tl.int64) * s_kk
                v_off = kk.to(tl.int64) * s_vk
            kt = tl.load(k_base + k_off[:, None] + offs_d[None, :],
                         mask=lmask[:, None] & dmask[None, :], other=0.0)  # [BK, BD], the input dtype
            if DOT:
                if DOT_F32:  # float32 operands, exact products ("ieee", not tf32)
                    s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee") * scaling  # [NR, BK]
                else:  # bf16/fp16 operands on tensor cores, accumulated in float32
                    s = tl.dot(q, tl.trans(kt)) * scaling
            else:
                s = tl.sum(q[:, None, :] * kt.to(tl.float32)[None, :, :], axis=2)  # [NR, BK]
            s = tl.where(vis[None, :], s, -1.0e30)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.where(vis[None, :], tl.exp(s - m_new[:, None]), 0.0)  # [NR, BK]
            p_b = tl.where(in_b[None, :], p, 0.0)
            p_s = tl.where(in_s[None, :], p, 0.0)
            p_o = tl.where(in_o[None, :], p, 0.0)
            vt = tl.load(v_base + v_off[:, None] + offs_dv[None, :],
                         mask=lmask[:, None] & dvmask[None, :], other=0.0)  # [BK, BDV], the input dtype
            lb = lb * alpha + tl.sum(p_b, axis=1)
            ls = ls * alpha + tl.sum(p_s, axis=1)
            lo = lo * alpha + tl.sum(p_o, axis=1)
            if DOT:
                if DOT_F32:
                    v32 = vt.to(tl.float32)
                    acc_b = acc_b * alpha[:, None] + tl.dot(p_b, v32, input_precision="ieee")
                    acc_s = acc_s * alpha[:, None] + tl.dot(p_s, v32, input_precision="ieee")
                    acc_o = acc_o * alpha[:, None] + tl.dot(p_o, v32, input_precision="ieee")
                else:  # probabilities in the value dtype times values, accumulated in float32 (as sdpa does)
                    acc_b = acc_b * alpha[:, None] + tl.dot(p_b.to(vt.dtype), vt)
                    acc_s = acc_s * alpha[:, None] + tl.dot(p_s.to(vt.dtype), vt)
                    acc_o = acc_o * alpha[:, None] + tl.dot(p_o.to(vt.dtype), vt)
            else:
                v32 = vt.to(tl.float32)
                acc_b = acc_b * alpha[:, None] + tl.sum(p_b[:, :, None] * v32[None, :, :], axis=1)
                acc_s = acc_s * alpha[:, None] + tl.sum(p_s[:, :, None] * v32[None, :, :], axis=1)
                acc_o = acc_o * alpha[:, None] + tl.sum(p_o[:, :, None] * v32[None, :, :], axis=1)
            m = m_new

        if FINAL:
            _oeb_finish(b64, g64, m, lb, ls, lo, acc_b, acc_s, acc_o, tau_ptr, s_tau, sink_ptr, out_ptr,
                        stats_ptr, H, Dv, n_rep, NR, BDV, HAS_SINK, HAS_STATS)
        else:
            # workspace per (pair, split): m [NR], l [3, NR], acc [3, NR, BDV]
            per = NR * 4 + 3 * NR * BDV
            ws = ws_ptr + (pid.to(tl.int64) * tl.num_programs(1) + split) * per
            tl.store(ws + offs_r, m)
            tl.store(ws + NR + offs_r, lb)
            tl.store(ws + 2 * NR + offs_r, ls)
            tl.store(ws + 3 * NR + offs_r, lo)
            a_off = 4 * NR + offs_r[:, None] * BDV + offs_dv[None, :]
            tl.store(ws + a_off, acc_b)
            tl.store(ws + NR * BDV + a_off, acc_s)
            tl.store(ws + 2 * NR * BDV + a_off, acc_o)

    @triton.jit
    def _oeb_combine_kernel(ws_ptr, tau_ptr, s_tau, sink_ptr, out_ptr, stats_ptr,
                           H, Hkv, Dv, n_rep, num_splits,
                           NR: tl.constexpr, BDV: tl.constexpr, HAS_SINK: tl.constexpr,
                           HAS_STATS: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // Hkv
        g = pid % Hkv
        b64 = b.to(tl.int64)
        g64 = g.to(tl.int64)
        offs_r = tl.arange(0, NR)
        offs_dv = tl.arange(0, BDV)
        a_off = 4 * NR + offs_r[:, None] * BDV + offs_dv[None, :]
        per = NR * 4 + 3 * NR * BDV

        m, lb, ls, lo, acc_b, acc_s, acc_o = _oeb_empty_state(NR, BDV)
        base = ws_ptr + pid.to(tl.int64) * num_splits * per
        for sp in range(0, num_splits):
            ws = base + sp * per
            m_i = tl.load(ws + offs_r)
            m_new = tl.maximum(m, m_i)
            a = tl.exp(m - m_new)
            c = tl.exp(m_i - m_new)
            lb = lb * a + tl.load(ws + NR + offs_r) * c
            ls = ls * a + tl.load(ws + 2 * NR + offs_r) * c
            lo = lo * a + tl.load(ws + 3 * NR + offs_r) * c
            acc_b = acc_b * a[:, None] + tl.load(ws + a_off) * c[:, None]
            acc_s = acc_s * a[:, None] + tl.load(ws + NR * BDV + a_off) * c[:, None]
            acc_o = acc_o * a[:, None] + tl.load(ws + 2 * NR * BDV + a_off) * c[:, None]
            m = m_new
        _oeb_finish(b64, g64, m, lb, ls, lo, acc_b, acc_s, acc_o, tau_ptr, s_tau, sink_ptr, out_ptr,
                    stats_ptr, H, Dv, n_rep, NR, BDV, HAS_SINK, HAS_STATS)

    return _oeb_split_kernel, _oeb_combine_kernel


def _block_k(NR: int, BD: int, BDV: int) -> int:
    """Keys per block: a power of two in [16, 128], NR * BK * max(BD, BDV) within the budget where possible."""
    bk = max(1, _ELEMS_BUDGET // (NR * max(BD, BDV)))
    return max(16, min(128, 1 << (bk.bit_length() - 1)))


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


class DecodePlan(NamedTuple):
    """Launch parameters of `oeb_decode` (or `oeb_decode_paged`) for one set of shapes: made once per forward by
    StepFlow and reused by every OEB layer of that forward (the layers share B, H, Hkv, K, D and the device)."""

    B: int
    H: int
    Hkv: int
    K: int
    D: int
    Dv: int
    n_rep: int
    NR: int
    BK: int
    BD: int
    BDV: int
    num_splits: int
    keys_per_split: int
    num_warps: int
    ws_elems: int  # float32 workspace elements (0: one launch, no workspace)
    dot: bool  # scores and value sums by tl.dot (NR >= 16) instead of broadcast products
    dot_f32: bool  # tl.dot on float32 operands with input_precision="ieee" (exact); else bf16/fp16 operands
    other_device: bool  # the tensors are on a CUDA device other than the current one (launch under a guard)
    page_size: int = 0  # the paged cache's block size (`oeb_decode_paged`); 0: a dense cache (`oeb_decode`)


def _check_row_args(B: int, H: int, K: int, kseg: torch.Tensor, qgroups: torch.Tensor, tau_b: torch.Tensor,
                    sinks: torch.Tensor | None, stats: torch.Tensor | None) -> None:
    """The per-row arguments both cache forms share (ValueError naming the problem)."""
    if kseg.dtype != torch.int8 or tuple(kseg.shape) != (B, K):
        raise ValueError(f"kseg must be int8 [{B}, {K}], got {kseg.dtype} {tuple(kseg.shape)}")
    if qgroups.dtype != torch.int32 or tuple(qgroups.shape) != (B, 2):
        raise ValueError(f"qgroups must be int32 [{B}, 2], got {qgroups.dtype} {tuple(qgroups.shape)}")
    if tau_b.dtype != torch.float32 or tuple(tau_b.shape) != (B,):
        raise ValueError(f"tau_b must be float32 [{B}], got {tau_b.dtype} {tuple(tau_b.shape)}")
    if sinks is not None and tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must be [{H}], got {tuple(sinks.shape)}")
    if stats is not None and (stats.dtype != torch.float32 or tuple(stats.shape) != (B, H, 5)
                              or not stats.is_contiguous()):
        raise ValueError(f"stats must be a contiguous float32 [{B}, {H}, 5] tensor")


def _launch_plan(B: int, H: int, Hkv: int, K: int, D: int, Dv: int, query: torch.Tensor, num_splits: int | None,
                 dot: bool | None, block_k: int | None, num_warps: int | None, page_size: int = 0) -> DecodePlan:
    """The launch parameters for checked shapes: the one place that chooses them, for both cache forms."""
    n_rep = H // Hkv
    dot = USE_DOT if dot is None else dot
    NR = max(16, _next_pow2(n_rep)) if dot else _next_pow2(n_rep)  # tl.dot needs 16 rows at least
    BD = max(16, _next_pow2(D))
    BDV = max(16, _next_pow2(Dv))
    BK = (64 if max(BD, BDV) <= 128 else 32) if dot else _block_k(NR, BD, BDV)
    if block_k is not None:
        if block_k & (block_k - 1) or block_k < (16 if dot else 1):
            raise ValueError(f"block_k must be a power of two (at least 16 with dot), got {block_k}")
        BK = block_k
    pairs = B * Hkv
    if num_splits is None:
        num_splits = choose_num_splits(K, pairs, BK, _num_sms(query.device))
    num_splits = max(1, int(num_splits))
    nblocks = max(1, -(-K // BK))
    keys_per_split = -(-nblocks // num_splits) * BK
    if num_warps is None:
        if dot:  # the paged form (block-table entries per key) spills registers at 4 warps, not at 8 (ptxas -v
            # for sm_90, bf16, head dims 64 to 256: up to 644 bytes per thread; scripts/compile_flow_kernels.py)
            num_warps = 8 if page_size else 4
        else:
            num_warps = 4 if NR * BK * max(BD, BDV) <= _ELEMS_BUDGET else 8
    ws_elems = 0 if num_splits == 1 else pairs * num_splits * (4 * NR + 3 * NR * BDV)
    # float32 operands for float32 inputs, and for every input under Triton's interpreter (its bf16/fp16 tl.dot is
    # wrong: seen with Triton 3.9); bf16/fp16 operands on a GPU
    dot_f32 = query.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    other_device = query.device.type == "cuda" and query.device.index != torch.cuda.current_device()
    return DecodePlan(B, H, Hkv, K, D, Dv, n_rep, NR, BK, BD, BDV, num_splits, keys_per_split, num_warps,
                      ws_elems, dot, dot_f32, other_device, page_size)


def plan_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kseg: torch.Tensor,
                qgroups: torch.Tensor, tau_b: torch.Tensor, sinks: torch.Tensor | None = None,
                stats: torch.Tensor | None = None, num_splits: int | None = None, dot: bool | None = None,
                block_k: int | None = None, num_warps: int | None = None) -> DecodePlan:
    """Check the arguments of `oeb_decode` (ValueError naming the problem) and choose its launch parameters.
    dot: products by tl.dot (tensor cores; the default, `USE_DOT`) or by broadcast multiply-and-sum.
    block_k (a power of two, at least 16 with dot) and num_warps override the defaults (bench/oeb_kernel.py)."""
    B, H, Q, D = query.shape
    Bk, Hkv, K, Dk = key.shape
    Dv = value.shape[-1]
    if Q != 1:
        raise ValueError(f"oeb_decode needs one query per row, got {Q}")
    if Bk != B or Dk != D or value.shape[:3] != key.shape[:3] or H % Hkv:
        raise ValueError(f"shapes do not fit: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    _check_row_args(B, H, K, kseg, qgroups, tau_b, sinks, stats)
    return _launch_plan(B, H, Hkv, K, D, Dv, query, num_splits, dot, block_k, num_warps)


def plan_decode_paged(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_table: torch.Tensor, kseg: torch.Tensor, qgroups: torch.Tensor, tau_b: torch.Tensor,
                      sinks: torch.Tensor | None = None, stats: torch.Tensor | None = None,
                      num_splits: int | None = None, dot: bool | None = None, block_k: int | None = None,
                      num_warps: int | None = None) -> DecodePlan:
    """Check the arguments of `oeb_decode_paged` (ValueError naming the problem) and choose its launch parameters
    (the same choice as `plan_decode` for the same B, H, Hkv, K, D; the keyword arguments as there). K is
    kseg's length (the longest row); the block table must hold ceil(K / block_size) blocks per row at least."""
    if query.dim() != 3:
        raise ValueError(f"query must be [B, H, D] (one query per row), got {tuple(query.shape)}")
    if key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError(f"key_cache and value_cache must be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    B, H, D = query.shape
    _, page_size, Hkv, Dk = key_cache.shape
    Dv = value_cache.shape[-1]
    if Dk != D or value_cache.shape[:3] != key_cache.shape[:3] or Hkv == 0 or H % Hkv:
        raise ValueError(f"shapes do not fit: query {tuple(query.shape)}, key_cache {tuple(key_cache.shape)}, "
                         f"value_cache {tuple(value_cache.shape)}")
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError(f"query, key_cache and value_cache must share a dtype, got {query.dtype}, "
                         f"{key_cache.dtype} and {value_cache.dtype}")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("key_cache and value_cache need a contiguous last dimension (the cache is never copied)")
    if kseg.dim() != 2:
        raise ValueError(f"kseg must be int8 [B, K], got {kseg.dtype} {tuple(kseg.shape)}")
    K = kseg.shape[1]
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must be int32 [{B}, blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if block_table.shape[1] * page_size < K:
        raise ValueError(f"block_table too short: {block_table.shape[1]} blocks of {page_size} keys per row, "
                         f"fewer than K = {K} keys (kseg's length)")
    if not (key_cache.device == value_cache.device == block_table.device == query.device):
        raise ValueError(f"query, key_cache, value_cache and block_table must be on one device, got "
                         f"{query.device}, {key_cache.device}, {value_cache.device} and {block_table.device}")
    _check_row_args(B, H, K, kseg, qgroups, tau_b, sinks, stats)
    return _launch_plan(B, H, Hkv, K, D, Dv, query, num_splits, dot, block_k, num_warps, page_size)


def _launch(plan: DecodePlan, out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, k_strides: tuple,
            value: torch.Tensor, v_strides: tuple, kseg: torch.Tensor, qgroups: torch.Tensor, tau_b: torch.Tensor,
            scaling: float, sinks: torch.Tensor | None, stats: torch.Tensor | None,
            block_table: torch.Tensor | None) -> torch.Tensor:
    """Launch the split kernel (and the combine kernel for num_splits > 1) into `out` [B, H, Dv] (any view of
    that contiguous memory). k_strides / v_strides: (row or block, kv head, key or slot) strides of key and value
    (see `_oeb_split_kernel`); block_table None for a dense cache."""
    split_kernel, combine_kernel = _kernels()
    if plan.other_device:  # e.g. a model on cuda:1: triton launches on the current device
        with torch.cuda.device(query.device):
            return _launch(plan._replace(other_device=False), out, query, key, k_strides, value, v_strides, kseg,
                           qgroups, tau_b, scaling, sinks, stats, block_table)
    H, Dv, pairs = plan.H, plan.Dv, plan.B * plan.Hkv
    final = plan.num_splits == 1
    ws = out if final else torch.empty(plan.ws_elems, dtype=torch.float32, device=query.device)
    sink_arg = sinks if sinks is not None else tau_b
    stats_arg = stats if stats is not None else tau_b
    paged = block_table is not None
    bt_arg, s_bt = (block_table, block_table.stride(0)) if paged else (qgroups, 0)
    split_kernel[(pairs, plan.num_splits)](
        query, query.stride(0), query.stride(1), key, *k_strides, value, *v_strides, kseg, kseg.stride(0),
        qgroups, qgroups.stride(0), qgroups.stride(1), tau_b, tau_b.stride(0), sink_arg, out, stats_arg,
        ws, bt_arg, s_bt, float(scaling), H, plan.Hkv, plan.K, plan.D, Dv, plan.n_rep, plan.keys_per_split,
        NR=plan.NR, BK=plan.BK, BD=plan.BD, BDV=plan.BDV, FINAL=final, HAS_SINK=sinks is not None,
        HAS_STATS=stats is not None, DOT=plan.dot, DOT_F32=plan.dot_f32, PAGED=paged,
        PAGE_SIZE=plan.page_size if paged else 1, num_warps=plan.num_warps)
    if not final:
        combine_kernel[(pairs,)](
            ws, tau_b, tau_b.stride(0), sink_arg, out, stats_arg,
            H, plan.Hkv, Dv, plan.n_rep, plan.num_splits,
            NR=plan.NR, BDV=plan.BDV, HAS_SINK=sinks is not None, HAS_STATS=stats is not None, num_warps=4)
    return out


def oeb_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kseg: torch.Tensor,
               qgroups: torch.Tensor, tau_b: torch.Tensor, scaling: float, sinks: torch.Tensor | None = None,
               stats: torch.Tensor | None = None, num_splits: int | None = None,
               plan: DecodePlan | None = None) -> torch.Tensor:
    """One decoding step of attention with the Odds-Equal Bridge (see the module docstring).

    query [B, H, 1, D], key [B, Hkv, K, D], value [B, Hkv, K, Dv], kseg int8 [B, K] (0 question, 1 thinking,
    2 summary, 3 hidden), qgroups int32 [B, 2] (segment of B, segment of S), tau_b float32 [B] (0: not
    eligible), sinks [H] or None, stats float32 [B, H, 5] contiguous or None (written, not accumulated).
    num_splits: None chooses it (`choose_num_splits`); an explicit value is used as given (empty splits are
    fine). `plan`: the result of `plan_decode` for these shapes (its checks are then skipped: the caller
    vouches that the shapes are the planned ones). Returns [B, 1, H, Dv] contiguous in value's dtype.
    Compilation errors propagate."""
    if plan is None:
        plan = plan_decode(query, key, value, kseg, qgroups, tau_b, sinks, stats, num_splits)
    elif plan.page_size:
        raise ValueError("oeb_decode got a plan of plan_decode_paged (a paged cache): use oeb_decode_paged")
    query, key, value = _last_contiguous(query), _last_contiguous(key), _last_contiguous(value)
    kseg = _last_contiguous(kseg)
    if sinks is not None:
        sinks = sinks.contiguous()
    out = torch.empty(plan.B, 1, plan.H, plan.Dv, dtype=value.dtype, device=value.device)
    return _launch(plan, out, query, key, (key.stride(0), key.stride(1), key.stride(2)), value,
                   (value.stride(0), value.stride(1), value.stride(2)), kseg, qgroups, tau_b, scaling, sinks, stats,
                   None)


def oeb_decode_paged(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_table: torch.Tensor, kseg: torch.Tensor, qgroups: torch.Tensor, tau_b: torch.Tensor,
                     scaling: float, sinks: torch.Tensor | None = None, stats: torch.Tensor | None = None,
                     num_splits: int | None = None, plan: DecodePlan | None = None) -> torch.Tensor:
    """`oeb_decode` reading a paged KV cache in place (vLLM's FLASH_ATTN layout; see the module docstring).

    query [B, H, D] (one query per row: vLLM's flat token axis, rows selected by the caller; any strides),
    key_cache [num_blocks, block_size, Hkv, D] and value_cache [num_blocks, block_size, Hkv, Dv] (any strides,
    last dim contiguous: e.g. vLLM's `kv_cache.transpose(1, 2).split(head_size, dim=-1)` views), block_table
    int32 [B, n] (row b's key k in block block_table[b, k // block_size], slot k % block_size), kseg int8
    [B, K] with K the longest row (3 hides a key: past a row's length, outside its sliding window; hidden keys
    are never read, so their blocks, slots and block-table entries may hold anything). qgroups, tau_b, sinks,
    stats, num_splits as in `oeb_decode`; `plan`: the result of `plan_decode_paged` for these shapes (its checks
    are then skipped). Returns [B, H, Dv] contiguous in the cache's dtype. Compilation errors propagate."""
    if plan is None:
        plan = plan_decode_paged(query, key_cache, value_cache, block_table, kseg, qgroups, tau_b, sinks, stats,
                                 num_splits)
    elif plan.page_size != key_cache.shape[1]:
        raise ValueError(f"the plan is for block size {plan.page_size} (0: a dense cache), the cache's is "
                         f"{key_cache.shape[1]}: plan with plan_decode_paged")
    query, kseg, block_table = _last_contiguous(query), _last_contiguous(kseg), _last_contiguous(block_table)
    if sinks is not None:
        sinks = sinks.contiguous()
    out = torch.empty(plan.B, plan.H, plan.Dv, dtype=value_cache.dtype, device=value_cache.device)
    return _launch(plan, out, query, key_cache, (key_cache.stride(0), key_cache.stride(2), key_cache.stride(1)),
                   value_cache, (value_cache.stride(0), value_cache.stride(2), value_cache.stride(1)), kseg, qgroups,
                   tau_b, scaling, sinks, stats, block_table)
