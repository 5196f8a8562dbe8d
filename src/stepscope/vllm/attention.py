"""StepFlow's attention for rows of a vLLM batch: OEB recomputed over one row's keys, SMI added to its output.

Both go through the pure mathematics of `stepscope.flow.functional` (docs/method.md §5): the queries' attention
is split into the per-group log-sum-exps and partial outputs of the bridge B, the segment S and the rest O
(`group_partials`), and `oeb_merge` turns them into the bridged output; SMI adds `step_momentum` of the window.
Scores and probabilities are float32. Engine-free: tests/test_vllm_attention.py checks both against a dense
softmax reference.
"""

from __future__ import annotations

import torch

from ..flow.functional import group_partials, oeb_merge, step_momentum

BLOCK_ELEMS = 1 << 22  # most (head, query, key, group) entries one block of queries holds


def oeb_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, qpos: torch.Tensor,
             gidx: torch.Tensor, tau: torch.Tensor, codes: torch.Tensor, scale: float, window: int | None = None,
             sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bridged attention of Q queries of one row.

    query [Q, H, D]; keys/values [Hkv, S, D] (the row's keys 0..S-1); qpos [Q] long (each query's position;
    it sees keys <= qpos, and > qpos - window in a sliding-window layer); gidx [Q, 2] long; tau [Q] float32
    (0: OEB leaves the query alone); codes [S] long; sinks [H] or None (GPT-OSS).
    Returns (out [Q, H, D] float32, fired [Q, H], masses before [Q, H, 2], after [Q, H, 2]).
    """
    Q, H, _ = query.shape
    S = keys.shape[1]
    step = max(1, BLOCK_ELEMS // max(1, H * S * 3))
    parts = [oeb_decode(query[a:a + step, None], keys[None], values[None], qpos[a:a + step, None],
                        gidx[a:a + step][:, None], tau[a:a + step, None], codes[None], scale, window, sinks)
             for a in range(0, Q, step)]
    return tuple(torch.cat([p[i][:, 0] for p in parts]) for i in range(4))  # each query a row of its own


def decode_masks(qpos: torch.Tensor, gidx: torch.Tensor, codes: torch.Tensor, window: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [R, Q, S] bool: keys a query does not see, past its position or out of its sliding window;
    group [R, Q, S] long: 0 for the bridge B, 1 for the query's group S, 2 for the rest O) of R rows' queries
    (qpos [R, Q], gidx [R, Q, 2]) over keys whose segments are codes [R, S]. The same for every layer of a
    forward with this window."""
    kpos = torch.arange(codes.shape[-1], device=codes.device)
    hidden = kpos > qpos[..., None]
    if window:
        hidden |= kpos <= qpos[..., None] - window
    group = torch.where(codes[:, None, :] == gidx[..., :1], 0, torch.where(codes[:, None, :] == gidx[..., 1:], 1, 2))
    return hidden, group


def oeb_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, qpos: torch.Tensor,
               gidx: torch.Tensor, tau: torch.Tensor, codes: torch.Tensor, scale: float, window: int | None = None,
               sinks: torch.Tensor | None = None, masks: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bridged attention of R rows at once, Q queries each (decoding: Q = 1), keys padded to a common S (a key
    past a query's position is hidden, so padding never counts).

    query [R, Q, H, D]; keys/values [R, Hkv, S, D]; qpos [R, Q]; gidx [R, Q, 2]; tau [R, Q]; codes [R, S];
    masks: `decode_masks(qpos, gidx, codes, window)` when the caller has them already.
    Returns (out [R, Q, H, D] float32, fired [R, Q, H], before [R, Q, H, 2], after [R, Q, H, 2]).
    """
    R, Q, H, D = query.shape
    hkv = keys.shape[1]
    n_rep = H // hkv
    S = keys.shape[2]
    # one plain batched product per (row, kv head): its n_rep * Q queries against its keys (no broadcast copy;
    # contiguous keys, so that every cache layout gives the same products bit for bit)
    q = query.to(torch.float32).view(R, Q, hkv, n_rep, D).permute(0, 2, 3, 1, 4).reshape(R, hkv, n_rep * Q, D)
    k = keys.to(torch.float32).contiguous()
    s = (torch.matmul(q, k.transpose(-1, -2)) * scale).view(R, hkv, n_rep, Q, S)
    hidden, group = masks if masks is not None else decode_masks(qpos, gidx, codes, window)
    s = s.masked_fill(hidden[:, None, None], float("-inf"))
    part_out, lse = group_partials(s, values.to(torch.float32)[:, :, None, None], group[:, None, None])
    sink = None if sinks is None else sinks.to(torch.float32).view(1, hkv, n_rep, 1).expand(R, hkv, n_rep, Q)
    merged, fired, before, after = oeb_merge(part_out, lse, tau[:, None, None], sink)  # [R, Hkv, n_rep, Q, ...]
    return (merged.permute(0, 3, 1, 2, 4).reshape(R, Q, H, D), fired.permute(0, 3, 1, 2).reshape(R, Q, H),
            before.permute(0, 3, 1, 2, 4).reshape(R, Q, H, 2), after.permute(0, 3, 1, 2, 4).reshape(R, Q, H, 2))


def smi_delta(values: torch.Tensor, ws: int, we: int, qpos: int, alpha: float, n_rep: int,
              window: int | None = None) -> torch.Tensor | None:
    """alpha times the mean value vector of keys [ws, we) (only those the query at `qpos` sees in a
    sliding-window layer), per query head: values [Hkv, S, D] -> [H, D] float32, or None when no key is seen."""
    lo = max(ws, qpos - window + 1) if window else ws
    if lo >= we:
        return None
    return step_momentum(values[:, lo:we], alpha).repeat_interleave(n_rep, dim=0)
