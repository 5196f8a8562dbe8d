"""The geometry of StepFlow's queries: each key's segment, and each query's bridge B, group S and target tau_B.

One function, `query_geometry`, answers for every engine: the transformers engine calls it with the rows of a
padded batch (kv index space, rows starting at lo_b), vLLM's worker with one request at a time (its positions) or
with every decoding row's last query at once (coordinates relative to each query). Nothing here knows an engine.

Coordinates. A row's real tokens are the contiguous key range [lo, hi); thinking starts at t0 and the summary
at s0 (BIG while not known yet). A key's segment is 0 (question) before t0, 1 (thinking) from t0, 2 (summary)
from s0; it never changes once the key exists (t0 and s0 are only learned after their keys). A query in
thinking has B = the question keys, S = the thinking keys up to itself; a query in summary has B = the thinking
keys, S = the summary keys up to itself; every other visible key is O (docs/method.md §5). Only visible keys
count: real, causal, inside the sliding window.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

BIG = 1 << 62  # "not yet known" for a segment boundary
NEG = float(np.finfo(np.float32).min)  # additive mask value of a hidden key (finite: no NaN on empty rows)
BRIDGE, SEGMENT, OTHER = 0, 1, 2  # the groups, in this order on every "3" axis of the OEB functions


class QueryGeometry(NamedTuple):
    """OEB inputs of a forward's queries (B rows, Q queries each)."""

    gidx: np.ndarray  # int64 [B, Q, 2]: the segment (0 question, 1 thinking, 2 summary) of B and of S
    tau_b: np.ndarray  # float32 [B, Q]: the target tau_B, 0 where OEB cannot act
    eligible: np.ndarray  # float32 [B, Q]: 1 where OEB may act (tau_b > 0)


def bridge_target(n_bridge, n_segment, tau_max: float):
    """tau_B = min(sqrt(|B| / (|B| + |S|)), tau_max); 0 where the bridge is empty. Ints, floats, numpy arrays
    (float64 out) or tensors (float64 out)."""
    if isinstance(n_bridge, np.ndarray) or isinstance(n_segment, np.ndarray):
        nb = np.asarray(n_bridge, dtype=np.float64)
        ns = np.asarray(n_segment, dtype=np.float64)
        tau = np.minimum(np.sqrt(nb / np.maximum(nb + ns, 1.0)), tau_max)
        return np.where(nb > 0, tau, 0.0)
    if isinstance(n_bridge, torch.Tensor) or isinstance(n_segment, torch.Tensor):
        nb = torch.as_tensor(n_bridge, dtype=torch.float64)
        ns = torch.as_tensor(n_segment, dtype=torch.float64)
        tot = (nb + ns).clamp_min(1.0)
        return torch.where(nb > 0, torch.sqrt(nb / tot).clamp_max(tau_max), torch.zeros_like(nb))
    if n_bridge <= 0:
        return 0.0
    return min(math.sqrt(n_bridge / (n_bridge + n_segment)), tau_max)


def segment_codes(pos, t0, s0):
    """Each position's segment: 0 question (before t0), 1 thinking, 2 summary (from s0). pos, t0, s0: ints, numpy
    arrays (int64 out) or tensors (long out), broadcasting."""
    if isinstance(pos, torch.Tensor):
        return (pos >= t0).long() + (pos >= s0).long()
    if isinstance(pos, np.ndarray):
        return (pos >= t0).astype(np.int64) + (pos >= s0)
    return int(pos >= t0) + int(pos >= s0)


def hidden_keys(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Keys at positions kpos [K] that a query at position qpos [...] does not see (past its position, or out
    of its sliding window of `window` keys): bool [..., K]."""
    hidden = kpos > qpos[..., None]
    if window:
        hidden |= kpos <= qpos[..., None] - window
    return hidden


def query_geometry(lo: np.ndarray, hi: np.ndarray, t0: np.ndarray, s0: np.ndarray, past: int, q_len: int,
                   window: int | None, tau_max) -> QueryGeometry:
    """OEB groups and targets of the queries at positions [past, past + q_len) of B rows.

    lo, hi, t0, s0: int64 [B] (see the module docstring); window: a sliding window's size in keys, None for full
    attention; tau_max: a float, or one per row ([B, 1]). tau_B = min(sqrt(|B| / (|B| + |S|)), tau_max) over
    the visible keys, 0 where OEB cannot act (a question query, a query outside [lo, hi), an empty bridge).
    """
    q = (past + np.arange(q_len, dtype=np.int64))[None, :]  # [1, Q]
    lo, hi, t0, s0 = lo[:, None], hi[:, None], t0[:, None], s0[:, None]  # [B, 1]
    qseg = segment_codes(q, t0, s0)  # [B, Q]
    summ = qseg == 2
    vis_lo = np.maximum(lo, q - (window - 1)) if window else np.broadcast_to(lo, qseg.shape)
    vis_hi = q + 1
    b_lo = np.where(summ, t0, lo)
    b_hi = np.where(summ, s0, t0)
    n_b = np.clip(np.minimum(b_hi, vis_hi) - np.maximum(b_lo, vis_lo), 0, None).astype(np.float64)
    n_s = np.clip(vis_hi - np.maximum(b_hi, vis_lo), 0, None).astype(np.float64)
    elig = (q >= lo) & (q < hi) & (qseg >= 1) & (n_b > 0)
    tau_b = np.where(elig, bridge_target(n_b, n_s, tau_max), 0.0).astype(np.float32)
    gidx = np.stack([np.maximum(qseg - 1, 0), qseg], axis=-1)
    return QueryGeometry(gidx, tau_b, elig.astype(np.float32))


def segment_onehot(codes: torch.Tensor) -> torch.Tensor:
    """Each key's segment (codes [..., K] long) one-hot, float32 [..., K, 3]."""
    return torch.nn.functional.one_hot(codes, 3).to(torch.float32)
