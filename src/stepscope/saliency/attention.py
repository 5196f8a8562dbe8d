"""The chunked Step-Saliency attention: fast forward, block-recomputed backward that pools |A * dL/dA| into step maps.

`saliency_attention` is registered with transformers' `AttentionInterface` (and `sdpa_mask` with
`AttentionMaskInterface`) under the name `ATTN_NAME`. While a `SaliencyRun` is active (see `active_run`), every
decoder layer's attention goes through `SaliencyAttention`, a `torch.autograd.Function`:

- forward: `scaled_dot_product_attention` (GQA by repeating K/V) when the layer has neither sinks nor logit
  soft-capping; otherwise the exact blockwise recomputation below without gradients (no T x T tensor either way).
- backward: for each block of query rows, recompute the probabilities `A` (float32 or wider), form
  `dA = dO V^T`, add `mean_h |A * dA|` into the layer's step map through the one-hot step membership, and return
  the exact gradients `dZ = A * (dA - rowsum(A * dA))`, `dQ = s dZ K`, `dK = s dZ^T Q`, `dV = A^T dO`
  (and `d sinks = -sum p_sink * rowsum(A * dA)` when the sinks require grad).

GQA is handled by grouping: the `n_rep` query heads that share a KV head are stacked along the row axis, so one
matmul against the shared K/V serves the group and dK/dV sum over the group for free (head h uses KV head
h // n_rep, as `repeat_kv` does). Masks: `None` means causal (query t sees keys <= t) plus the layer's sliding
window if one is passed; a boolean mask means True = attend; a float mask is added to the logits. A row with no
key to attend (and no sink) gets A = 0 and output 0 rather than NaN.

Speed without giving up exactness: a block of rows [r0, r1) only touches keys [0, r1) (or the mask's range), so
layers are cut into at least ~8 row blocks to skip most of the causal upper triangle, and only the diagonal part
of a block is masked. On CUDA, the two products whose inputs are the model's own bf16/fp16 tensors (Q K^T and
dO V^T) run on tensor cores with float32 accumulation and float32 output (bf16 -> float32 is exact, so these are
the float32 products of the same numbers); everything else, and everything on CPU, is plain float32 (float64 for
a float64 model), with TF32 switched off for the duration of the backward.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

ATTN_NAME = "stepscope_saliency"


# ---------------------------------------------------------------------------------------------------------------
# the state of one saliency computation (shared by every layer of one forward/backward)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SaliencyRun:
    """What the attention function needs to pool saliency during one batched forward + backward.

    `step_ids`: per batch row, int64 numpy [n_b] (the step of each real token; rows are right-padded to T).
    `layer_slot`: model layer index -> index into `maps` for the layers that pool (others only pass gradients).
    `maps`: [B, Ls, S, S] sums (compute dtype) of I over (query step, key step); `head_maps`: [B, Ls, H, S, S] or None.
    """

    step_ids: list[np.ndarray]
    num_steps: int
    layer_slot: dict[int, int]
    heads: bool = False
    block_rows: int | None = None  # fixed rows per block, else chosen from the memory budget
    cpu_budget_bytes: int = 256 * 2**20  # CPU_BLOCK_BUDGET
    on_layer_done: Callable[[int], None] | None = None
    # filled during the run
    phase: str = "forward"  # "forward" (record reached layers) or "backward"
    reached: set = field(default_factory=set)
    maps: torch.Tensor | None = None
    head_maps: torch.Tensor | None = None
    block_rows_used: int = 0
    _ids_dev: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lengths = [len(s) for s in self.step_ids]
        T = max(self.lengths)
        padded = np.full((len(self.step_ids), T), -1, dtype=np.int64)  # -1: padding, in no step
        for b, s in enumerate(self.step_ids):
            padded[b, :len(s)] = s
        self.step_ids_padded = padded  # [B, T]

    def ids_on(self, device: torch.device) -> torch.Tensor:
        """Step ids [B, T] int64 on `device` (cached)."""
        key = str(device)
        if key not in self._ids_dev:
            self._ids_dev[key] = torch.from_numpy(self.step_ids_padded).to(device)
        return self._ids_dev[key]

    def step_range(self, t0: int, t1: int) -> tuple[int, int]:
        """The steps [lo, hi) that real tokens in [t0, t1) of any batch row belong to (steps are in order)."""
        lo, hi = self.num_steps, 0
        for b, n in enumerate(self.lengths):
            a, e = min(t0, n), min(t1, n)
            if a < e:
                s = self.step_ids[b]
                lo, hi = min(lo, int(s[a])), max(hi, int(s[e - 1]) + 1)
        return lo, hi

    def ensure_maps(self, batch: int, num_heads: int, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate the sums on first use, in the compute dtype (float32, or float64 for a float64 model)."""
        if self.maps is None:
            S, Ls = self.num_steps, len(self.layer_slot)
            self.maps = torch.zeros(batch, Ls, S, S, dtype=dtype, device=device)
            if self.heads:
                self.head_maps = torch.zeros(batch, Ls, num_heads, S, S, dtype=dtype, device=device)


_ACTIVE: list[SaliencyRun] = []


class active_run:
    """Context manager: make `run` the state the registered attention function uses."""

    def __init__(self, run: SaliencyRun):
        self.run = run

    def __enter__(self) -> SaliencyRun:
        _ACTIVE.append(self.run)
        return self.run

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self.run)


# ---------------------------------------------------------------------------------------------------------------
# one block of query rows, exact
# ---------------------------------------------------------------------------------------------------------------


FORCE_FP32_MATMUL = os.environ.get("STEPSCOPE_SALIENCY_FP32_MATMUL", "") not in ("", "0")
_LOWP_OK: dict[str, bool] = {}


def lowp_matmul_ok(device: torch.device) -> bool:
    """Whether `torch.bmm(bf16, bf16, out_dtype=float32)` works on `device` and matches a float32 matmul.

    bf16 -> float32 is exact, so a tensor-core product of bf16 inputs accumulated and returned in float32 gives
    the float32 product of the same numbers (up to summation order), many times faster. Probed once per device;
    CUDA only; off when STEPSCOPE_SALIENCY_FP32_MATMUL=1.
    """
    if FORCE_FP32_MATMUL or device.type != "cuda":
        return False
    key = str(device)
    if key not in _LOWP_OK:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(2, 64, 128, device=device, generator=g).to(torch.bfloat16)
            b = torch.randn(2, 128, 96, device=device, generator=g).to(torch.bfloat16)
            got = torch.bmm(a, b, out_dtype=torch.float32)
            want = torch.bmm(a.float(), b.float())
            _LOWP_OK[key] = got.dtype == torch.float32 and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-4))
        except (RuntimeError, TypeError):
            _LOWP_OK[key] = False
    return _LOWP_OK[key]


def _matmul_wide(a: torch.Tensor, b: torch.Tensor, cdt: torch.dtype, lowp: bool) -> torch.Tensor:
    """a [..., n, d] @ b [..., d, m] with products and sums in `cdt`; `lowp`: bf16/fp16 inputs, float32 output."""
    if lowp:
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return out.view(*a.shape[:-1], b.shape[-1])
    return torch.matmul(a.to(cdt), b.to(cdt))


def _block_probs(qb: torch.Tensor, k: torch.Tensor, R: int, allowed: torch.Tensor | None, col0: int,
                 bias: torch.Tensor | None, sinks: torch.Tensor | None, scale: float, softcap: float | None,
                 cdt: torch.dtype, lowp: bool):
    """Probabilities of a block of query rows over keys [k0, k1).

    qb: [B, Hkv, n_rep * R, D] (the n_rep query heads of a KV head stacked along rows); k: [B, Hkv, K, D];
    both in the model's dtype when `lowp`, else anything (cast to `cdt`). allowed: bool broadcastable to
    [B, 1, 1, R, K - col0] for keys col0.. of the block, or None (all allowed); bias: float broadcastable to
    [B, 1, 1, R, K] or None; sinks: [Hkv, n_rep] or None.
    Returns A [B, Hkv, n_rep, R, K] (cdt), the softcap tanh (or None), the row max m and denominator
    [B, Hkv, n_rep, R, 1] (for the sink probability exp(sink - m) / denom).
    """
    B, Hkv, nR, D = qb.shape
    n_rep = nR // R
    z = _matmul_wide(qb, k.transpose(-1, -2), cdt, lowp)  # [B, Hkv, n_rep*R, K]
    z = z.view(B, Hkv, n_rep, R, z.shape[-1]).mul_(scale)
    tanh = None
    if softcap:
        tanh = torch.tanh(z / softcap)
        z = tanh * softcap
    if bias is not None:
        z = z + bias
    if allowed is not None:
        z[..., col0:].masked_fill_(~allowed, -math.inf)
    m = z.amax(dim=-1, keepdim=True)  # [B, Hkv, n_rep, R, 1]
    if sinks is not None:
        m = torch.maximum(m, sinks.view(1, Hkv, n_rep, 1, 1))
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))
    a = z.sub_(m).exp_()
    denom = a.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sinks.view(1, Hkv, n_rep, 1, 1) - m)
    denom = torch.where(denom > 0, denom, torch.ones((), dtype=denom.dtype, device=denom.device))
    a.div_(denom)
    return a, tanh, m, denom


def _mask_block(mask: torch.Tensor | None, r0: int, r1: int, k0: int, k1: int, causal_offset: int,
                window: int | None, device: torch.device, cdtype: torch.dtype):
    """(allowed, col0, bias) for rows [r0, r1) and keys [k0, k1).

    allowed: bool [B|1, 1, 1, R, K - col0] for keys col0.. of the block (None: all); bias: float or None.
    Plain causal: keys before the block's first row are visible to every row, so only the diagonal part is masked.
    """
    if mask is None:
        c0 = k0 if window is not None else max(k0, r0 + causal_offset)
        q_idx = torch.arange(r0, r1, device=device)[:, None] + causal_offset
        k_idx = torch.arange(c0, k1, device=device)[None, :]
        allowed = k_idx <= q_idx
        if window is not None:
            allowed &= k_idx > q_idx - window
        return allowed, c0 - k0, None
    blk = mask[:, :, r0:r1, k0:k1].unsqueeze(2)  # [B|1, 1|H, 1, R, K]
    if blk.shape[1] != 1:
        raise ValueError("per-head attention masks are not supported")
    if blk.dtype == torch.bool:
        return blk, 0, None
    return None, 0, blk.to(cdtype)


def _key_range(mask: torch.Tensor | None, r0: int, r1: int, kv_len: int, causal_offset: int,
               window: int | None) -> tuple[int, int]:
    """The smallest key range [k0, k1) holding every key that rows [r0, r1) may attend to."""
    if mask is None:
        k1 = min(kv_len, r1 + causal_offset)
        k0 = max(0, r0 + causal_offset - window + 1) if window is not None else 0
        return k0, k1
    blk = mask[:, :, r0:r1]
    cols = blk.any(dim=2) if blk.dtype == torch.bool else (blk > torch.finfo(blk.dtype).min).any(dim=2)
    cols = cols.flatten(0, 1).any(dim=0)  # [kv_len]
    nz = torch.nonzero(cols)
    if nz.numel() == 0:  # rows attend to nothing: keep one key so shapes stay valid (A is 0 there)
        return 0, 1
    return int(nz[0]), int(nz[-1]) + 1  # one host sync per block, not per token


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


CPU_BLOCK_BUDGET = 256 * 2**20


def block_budget(device: torch.device, run: SaliencyRun | None = None) -> int:
    """Bytes for one block's temporaries: a quarter of the free CUDA memory, else a fixed CPU budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 4)
    return run.cpu_budget_bytes if run is not None else CPU_BLOCK_BUDGET


def rows_for_budget(batch: int, heads: int, kv_len: int, budget: int, softcap: bool = False) -> int:
    """Rows per block: the block's temporaries (about 5 [B, H, rows, T] float32 tensors) fit `budget`, and a layer
    has at least ~8 blocks (a block of rows [r0, r1) only looks at keys < r1, so n blocks compute (n + 1) / 2n
    of the causal square)."""
    per_row = batch * heads * max(kv_len, 1) * 4 * (6 if softcap else 5)
    rows = int(budget // per_row)
    if rows >= 64:
        rows = rows // 64 * 64
    causal_cap = max(128, 64 * -(-kv_len // (8 * 64)))
    return max(16, min(rows, causal_cap, 8192))


def choose_block_rows(run: SaliencyRun | None, batch: int, heads: int, kv_len: int, device: torch.device,
                      softcap: bool) -> int:
    """Rows per block for this layer now (`run.block_rows` when fixed), from the free memory of the moment."""
    if run is not None and run.block_rows:
        return max(1, run.block_rows)
    return rows_for_budget(batch, heads, kv_len, block_budget(device, run), softcap)


# ---------------------------------------------------------------------------------------------------------------
# the autograd function
# ---------------------------------------------------------------------------------------------------------------


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, Hkv, n_rep, T, D] (a view when possible)."""
    return x.unflatten(1, (hkv, x.shape[1] // hkv))


def _sdpa_forward(q, k, v, mask, scale, causal_offset, window):
    """O = softmax(s Q K^T + mask) V with torch's fused kernel; q [B, H, Tq, D], k/v [B, Hkv, Tk, D]."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # [B, H, Tk, D]
        v = v.repeat_interleave(n_rep, dim=1)
    Tq, Tk = q.shape[2], k.shape[2]
    if mask is None and window is None and causal_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, scale=scale)
    if mask is None:  # causal with an offset or a window: build the boolean mask
        qi = torch.arange(Tq, device=q.device)[:, None] + causal_offset
        ki = torch.arange(Tk, device=q.device)[None, :]
        mask = ki <= qi
        if window is not None:
            mask &= ki > qi - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _blockwise_forward(q, k, v, mask, sinks, scale, softcap, causal_offset, window, rows):
    """The same attention computed exactly, block of rows by block of rows (for sinks / softcap)."""
    B, H, Tq, D = q.shape
    hkv = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    out = torch.empty(B, hkv, H // hkv, Tq, v.shape[-1], dtype=q.dtype, device=q.device)
    qg = _grouped(q, hkv)
    s = None if sinks is None else sinks.to(cdt).view(hkv, H // hkv)
    lowp = q.dtype in (torch.bfloat16, torch.float16) and cdt == torch.float32 and lowp_matmul_ok(q.device)
    for r0 in range(0, Tq, rows):
        r1 = min(Tq, r0 + rows)
        k0, k1 = _key_range(mask, r0, r1, k.shape[2], causal_offset, window)
        allowed, col0, bias = _mask_block(mask, r0, r1, k0, k1, causal_offset, window, q.device, cdt)
        R = r1 - r0
        qb = qg[:, :, :, r0:r1].reshape(B, hkv, -1, D)  # [B, Hkv, n_rep*R, D]
        a, _, _, _ = _block_probs(qb, k[:, :, k0:k1], R, allowed, col0, bias, s, scale, softcap, cdt, lowp)
        o = torch.matmul(a.view(B, hkv, -1, k1 - k0), v[:, :, k0:k1].to(cdt))  # [B, Hkv, n_rep*R, Dv]
        out[:, :, :, r0:r1] = o.view(B, hkv, -1, R, v.shape[-1]).to(q.dtype)
    return out.flatten(1, 2)  # [B, H, Tq, Dv]


class SaliencyAttention(torch.autograd.Function):
    """softmax attention whose backward pools |A * dL/dA| into step maps and returns exact input gradients."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, scale, softcap, window, layer_idx, run):
        # q [B, H, Tq, D]; k, v [B, Hkv, Tk, D]; sinks [H] or None; mask None | bool/float [B|1, 1, Tq, Tk]
        causal_offset = k.shape[2] - q.shape[2]
        ctx.scale, ctx.softcap, ctx.window, ctx.layer_idx, ctx.run = scale, softcap, window, layer_idx, run
        ctx.causal_offset = causal_offset
        ctx.has_sinks = sinks is not None
        ctx.save_for_backward(q, k, v, sinks if sinks is not None else None, mask if mask is not None else None)
        with torch.no_grad():
            if sinks is None and not softcap:
                out = _sdpa_forward(q, k, v, mask, scale, causal_offset, window)
            else:
                rows = choose_block_rows(run, q.shape[0], q.shape[1], k.shape[2], q.device, bool(softcap))
                out = _blockwise_forward(q, k, v, mask, sinks, scale, softcap, causal_offset, window, rows)
        return out  # [B, H, Tq, Dv]

    @staticmethod
    def backward(ctx, dout):
        with exact_float32_matmul(dout.device):
            return _backward(ctx, dout)


@contextlib.contextmanager
def exact_float32_matmul(device: torch.device):
    """float32 matmuls in full precision (no TF32) for the duration, whatever the global setting; restored after."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _backward(ctx, dout):
    """The blockwise backward of SaliencyAttention (see the module docstring)."""
    q, k, v, sinks, mask = ctx.saved_tensors
    run: SaliencyRun | None = ctx.run
    scale, softcap, window, off = ctx.scale, ctx.softcap, ctx.window, ctx.causal_offset
    B, H, Tq, D = q.shape
    hkv, Tk = k.shape[1], k.shape[2]
    n_rep = H // hkv
    dev = q.device
    cdt = _compute_dtype(q.dtype)
    slot = None if run is None else run.layer_slot.get(ctx.layer_idx)

    lowp = q.dtype in (torch.bfloat16, torch.float16) and cdt == torch.float32 and lowp_matmul_ok(dev)
    qg = _grouped(q, hkv)  # [B, Hkv, n_rep, Tq, D]
    dog = _grouped(dout, hkv)  # [B, Hkv, n_rep, Tq, Dv]
    kc = k.to(cdt)  # [B, Hkv, Tk, D]
    s = None if sinks is None else sinks.to(cdt).view(hkv, n_rep)
    dq = torch.empty(B, hkv, n_rep, Tq, D, dtype=cdt, device=dev)
    dk = torch.zeros(B, hkv, Tk, D, dtype=cdt, device=dev)
    dv = torch.zeros(B, hkv, Tk, v.shape[-1], dtype=cdt, device=dev)
    dsinks = torch.zeros(hkv, n_rep, dtype=cdt, device=dev) if sinks is not None else None
    if slot is not None:
        run.ensure_maps(B, H, dev, cdt)
        ids = run.ids_on(dev)  # [B, T]
    rows = choose_block_rows(run, B, H, Tk, dev, bool(softcap))
    if run is not None:
        run.block_rows_used = max(run.block_rows_used, rows)

    for r0 in range(0, Tq, rows):
        r1 = min(Tq, r0 + rows)
        R = r1 - r0
        k0, k1 = _key_range(mask, r0, r1, Tk, off, window)
        allowed, col0, bias = _mask_block(mask, r0, r1, k0, k1, off, window, dev, cdt)
        qb = qg[:, :, :, r0:r1].reshape(B, hkv, n_rep * R, D)  # [B, Hkv, n_rep*R, D], model dtype
        a, tanh, m, denom = _block_probs(qb, k[:, :, k0:k1] if lowp else kc[:, :, k0:k1], R, allowed, col0,
                                         bias, s, scale, softcap, cdt, lowp)
        dob = dog[:, :, :, r0:r1].reshape(B, hkv, n_rep * R, -1)  # [B, Hkv, n_rep*R, Dv], model dtype
        prod = _matmul_wide(dob, v[:, :, k0:k1].transpose(-1, -2), cdt, lowp).view(B, hkv, n_rep, R, -1)  # dA
        prod.mul_(a)  # A * dA   [B, Hkv, n_rep, R, K]
        qb, dob = qb.to(cdt), dob.to(cdt)

        if slot is not None:  # pool |A * dA| into the step map
            _pool_block(run, slot, prod, ids, r0 + off, r1 + off, k0, k1, H)  # query row r is token r + off

        rowdot = prod.sum(dim=-1, keepdim=True)  # sum_k A dA = rowsum(dO * O)   [B, Hkv, n_rep, R, 1]
        if dsinks is not None:
            p_sink = torch.exp(s.view(1, hkv, n_rep, 1, 1) - m) / denom
            dsinks -= (p_sink * rowdot).sum(dim=(0, 3, 4))
        dz = prod.addcmul_(a, rowdot, value=-1.0)  # A * (dA - rowdot)
        if tanh is not None:
            dz.mul_(1.0 - tanh * tanh)
        dz = dz.view(B, hkv, n_rep * R, -1)
        dq[:, :, :, r0:r1] = torch.matmul(dz, kc[:, :, k0:k1]).view(B, hkv, n_rep, R, D).mul_(scale)
        dk[:, :, k0:k1] += torch.matmul(dz.transpose(-1, -2), qb).mul_(scale)
        dv[:, :, k0:k1] += torch.matmul(a.view(B, hkv, n_rep * R, -1).transpose(-1, -2), dob)
        del a, prod, dz, tanh

    if run is not None and run.on_layer_done is not None and slot is not None:
        run.on_layer_done(ctx.layer_idx)
    dsk = None
    if sinks is not None and ctx.needs_input_grad[3]:
        dsk = dsinks.reshape(H).to(sinks.dtype)
    return (dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsk,
            None, None, None, None, None, None)


def _pool_block(run: SaliencyRun, slot: int, prod: torch.Tensor, ids: torch.Tensor, r0: int, r1: int, k0: int,
                k1: int, H: int) -> None:
    """maps[b, slot, i, j] += sum over t in [r0, r1) of step i, k in [k0, k1) of step j of mean_h |prod|.

    prod: A * dA [B, Hkv, n_rep, R, K]. Pooling multiplies by one-hot membership matrices restricted to the
    steps present in the block (steps are contiguous token ranges, so the ranges are known on the host).
    """
    sq0, sq1 = run.step_range(r0, r1)
    sk0, sk1 = run.step_range(k0, k1)
    if sq0 >= sq1 or sk0 >= sk1:
        return
    B = prod.shape[0]
    R, K = r1 - r0, k1 - k0
    dev, cdt = prod.device, prod.dtype
    pq = (ids[:, r0:r1, None] == torch.arange(sq0, sq1, device=dev)).to(cdt)  # [B, R, Sq]
    pk = (ids[:, k0:k1, None] == torch.arange(sk0, sk1, device=dev)).to(cdt)  # [B, K, Sk]
    sal = prod.abs()  # [B, Hkv, n_rep, R, K]
    if run.head_maps is not None:
        sh = sal.view(B, H, R, K)
        pooled_h = torch.matmul(pq.transpose(1, 2).unsqueeze(1), torch.matmul(sh, pk.unsqueeze(1)))  # [B,H,Sq,Sk]
        run.head_maps[:, slot, :, sq0:sq1, sk0:sk1] += pooled_h.to(run.head_maps.device)
        mean = sh.sum(dim=1)
    else:
        mean = sal.sum(dim=(1, 2))  # [B, R, K]
    del sal
    pooled = torch.matmul(pq.transpose(1, 2), torch.matmul(mean, pk)) / H  # [B, Sq, Sk]
    run.maps[:, slot, sq0:sq1, sk0:sk1] += pooled.to(run.maps.device)  # layers may sit on several devices


# ---------------------------------------------------------------------------------------------------------------
# the function registered with transformers
# ---------------------------------------------------------------------------------------------------------------


def saliency_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    run = _ACTIVE[-1] if _ACTIVE else None
    layer_idx = getattr(module, "layer_idx", None)
    if dropout and module.training:
        raise RuntimeError("stepscope saliency needs attention dropout off (model.eval())")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    if attention_mask is not None:
        window = None  # the mask already holds the window
        if attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = attention_mask[..., : key.shape[-2]]
    if run is not None and run.phase == "forward" and layer_idx is not None:
        run.reached.add(int(layer_idx))
    out = SaliencyAttention.apply(query, key, value, sinks, attention_mask, scale, softcap or None,
                                  int(window) if window else None, layer_idx, run)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention and mask functions under ATTN_NAME (idempotent); returns the name."""
    from transformers import AttentionInterface

    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # older layout
        from transformers.masking_utils import AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_NAME, saliency_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
