"""Per-row step state for StepFlow: host-side segmenters, and the device tensors one forward pass reads.

Coordinates. Every row of a batch lives in one key/value index space ("kv index": the position in the padded
sequence, i.e. in a full cache). Row b's real tokens are the contiguous kv range [lo_b, hi_b); real token r
sits at kv index lo_b + r. Left padding (generation) gives lo_b > 0; a right-padded teacher-forced batch gives
hi_b < T. The segmenter of row b sees the real tokens only.

Per forward, the host does all the bookkeeping (it must read the new token ids once anyway, to feed the
segmenters): it packs the row state into one int64 array and uploads it in a single host-to-device copy. The
attention function then derives, once per forward and per key layout (full or sliding-window layer), the
tensors every band layer shares (`LayerGeometry`): key segment one-hots, the additive mask, the bridge target
tau_B of every query, and the SMI gather plan. Nothing in the attention path reads device values back.

Segments follow the segmenter's boundaries: a token at real index r is question if r < thinking start,
thinking if thinking start <= r < summary start, summary after (marker tokens belong to the segment they
close). A query's segment is decided by tokens before it, so online and offline agree.

SMI schedule (segment.py): when thinking step i-1 closes and step i is thinking too, step i's momentum fires
at real index max(step_i.token_start, step_{i-1}.closed_at); the window is the last `w` tokens of step i-1
(or the whole step). A fire whose position has not been fed yet stays pending in its row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..segment import Segmenter, Step

BIG = 1 << 62  # "not yet known" for a segment boundary, in kv index space


class RowTracker:
    """One row: its segmenter, its kv offset, and its pending SMI fires."""

    def __init__(self, segmenter: Segmenter, lo: int, smi_window: int | str):
        self.seg = segmenter
        self.lo = lo  # kv index of real token 0
        self.hi = lo  # kv index after the last real token
        self.smi_window = smi_window
        self.pending: list[tuple[int, int, int]] = []  # (fire real index, window start, window end)

    @property
    def num_tokens(self) -> int:
        return self.seg.num_tokens

    def _window(self, step: Step) -> tuple[int, int]:
        if self.smi_window == "step":
            return step.token_start, step.token_end
        return max(step.token_start, step.token_end - int(self.smi_window)), step.token_end

    def feed(self, ids) -> list[tuple[int, int, int]]:
        """Feed new real tokens; return the SMI fires that land on them: (real index, window start, end)."""
        closed = self.seg.feed(ids)
        end = self.seg.num_tokens
        for st in closed:
            nxt_summary = self.seg.boundaries["summary"]
            if st.kind == "thinking" and (nxt_summary is None or st.token_end < nxt_summary):
                ws, we = self._window(st)
                self.pending.append((max(st.token_end, st.closed_at), ws, we))
        if not self.pending:
            return []
        fires, keep = [], []
        th, su = self.seg.boundaries["thinking"], self.seg.boundaries["summary"]
        for f in self.pending:
            if f[0] >= end:
                keep.append(f)
            elif th is not None and th <= f[0] and (su is None or f[0] < su):  # only inside the thinking
                fires.append(f)
        self.pending = keep
        return fires


@dataclass
class ForwardState:
    """What one forward pass needs: host ints, and device tensors (no host reads in the attention path)."""

    batch: int
    past: int  # kv length before this forward
    q_len: int
    device: torch.device
    any_oeb: bool  # some query of this forward sits in thinking or summary
    rows: torch.Tensor  # int64 [4, B]: lo, hi, thinking start, summary start (kv indices; BIG = unknown)
    num_fires: int
    fires: torch.Tensor | None  # int64 [3, F]: row, query index in this forward, query kv index
    pairs: torch.Tensor | None  # int64 [2, P]: fire id, key kv index (the SMI windows, flattened)
    pair_count: torch.Tensor | None  # int64 [P]: window length of the pair's fire (full layers)
    geometry: dict = field(default_factory=dict)  # LayerGeometry per key layout, built on first use

    @property
    def total(self) -> int:
        return self.past + self.q_len


def build_forward_state(trackers: list[RowTracker], past: int, q_len: int, hi: list[int],
                        fires: list[list[tuple[int, int, int]]], device: torch.device) -> ForwardState:
    """Pack the rows' host state after feeding this forward's tokens into one upload."""
    B = len(trackers)
    rows = np.empty((4, B), dtype=np.int64)
    any_oeb = False
    last_q = past + q_len - 1
    for b, tr in enumerate(trackers):
        th, su = tr.seg.boundaries["thinking"], tr.seg.boundaries["summary"]
        rows[0, b] = tr.lo
        rows[1, b] = hi[b]
        rows[2, b] = BIG if th is None else tr.lo + th
        rows[3, b] = BIG if su is None else tr.lo + su
        if th is not None and min(last_q, hi[b] - 1) >= tr.lo + th:
            any_oeb = True
    fb, fq, fk, pf, pk, pc = [], [], [], [], [], []
    for b, fl in enumerate(fires):
        lo = trackers[b].lo
        for pos, ws, we in fl:
            f = len(fb)
            fb.append(b)
            fq.append(lo + pos - past)
            fk.append(lo + pos)
            n = we - ws
            pf.extend([f] * n)
            pk.extend(range(lo + ws, lo + we))
            pc.extend([n] * n)
    F, P = len(fb), len(pf)
    flat = np.concatenate([rows.reshape(-1), np.asarray(fb + fq + fk + pf + pk + pc, dtype=np.int64)])
    dev = torch.from_numpy(flat).to(device, non_blocking=True)
    rows_t = dev[:4 * B].view(4, B)
    fires_t = pairs_t = count_t = None
    if F:
        o = 4 * B
        fires_t = dev[o:o + 3 * F].view(3, F)
        pairs_t = dev[o + 3 * F:o + 3 * F + 2 * P].view(2, P)
        count_t = dev[o + 3 * F + 2 * P:]
    return ForwardState(B, past, q_len, torch.device(device), any_oeb, rows_t, F, fires_t, pairs_t, count_t)


@dataclass
class LayerGeometry:
    """Tensors shared by every band layer with the same key layout (offset, length, sliding window) in one
    forward. Shapes use B rows, Q queries of this forward, K keys of the layer."""

    k_offset: int  # kv index of key 0 (a sliding-window cache holds only the last keys)
    onehot: torch.Tensor | None = None  # float32 [B, 1, 1, K, 3]: key segment (question, thinking, summary)
    addmask: torch.Tensor | None = None  # float32 [B, 1, 1, Q, K]: 0 visible, finfo.min hidden
    gidx: torch.Tensor | None = None  # int64 [B, 1, 1, Q, 2]: segment index of the bridge B and of S per query
    tau_b: torch.Tensor | None = None  # float32 [B, 1, 1, Q]: target bridge mass (0: OEB cannot act)
    eligible: torch.Tensor | None = None  # float32 [B, 1, 1, Q]: 1 where OEB can act (segment and bridge)
    pair_kidx: torch.Tensor | None = None  # int64 [P]: SMI window key index inside this layer's keys
    pair_weight: torch.Tensor | None = None  # float32 [P]: alpha / visible window length (0 if hidden)


def oeb_geometry(fs: ForwardState, k_offset: int, K: int, window: int | None, mask: torch.Tensor | None,
                 tau_max: float) -> LayerGeometry:
    """Key segments, visibility and bridge targets of every query (METHOD.md §5, OEB groups).

    Query in thinking: S = thinking keys up to the query, B = question keys. Query in summary: S = summary
    keys up to the query, B = thinking keys, O = question keys. Only visible keys count: real (not padding),
    causal, inside the sliding window. tau_B = min(sqrt(|B| / (|B| + |S|)), tau_max); 0 where OEB cannot act
    (question or padding query, empty bridge).
    """
    dev = fs.device
    lo, hi, t0, s0 = fs.rows[0], fs.rows[1], fs.rows[2], fs.rows[3]  # [B]
    kabs = torch.arange(k_offset, k_offset + K, device=dev)  # [K]
    qabs = torch.arange(fs.past, fs.total, device=dev)  # [Q]
    kseg = (kabs >= t0[:, None]).long() + (kabs >= s0[:, None]).long()  # [B, K]
    onehot = torch.nn.functional.one_hot(kseg, 3).to(torch.float32)[:, None, None]  # [B, 1, 1, K, 3]

    q2 = qabs[None, :]  # [1, Q]
    real_q = (q2 >= lo[:, None]) & (q2 < hi[:, None])  # [B, Q]
    qseg = (q2 >= t0[:, None]).long() + (q2 >= s0[:, None]).long()  # [B, Q]
    in_summary = qseg == 2
    vis_lo = lo[:, None].expand_as(qseg)
    if window is not None:
        vis_lo = torch.maximum(vis_lo, q2 - (window - 1))
    vis_hi = q2 + 1  # exclusive
    b_lo = torch.where(in_summary, t0[:, None], lo[:, None])
    b_hi = torch.where(in_summary, s0[:, None], t0[:, None])
    s_lo = b_hi
    n_b = (torch.minimum(b_hi, vis_hi) - torch.maximum(b_lo, vis_lo)).clamp_min(0).to(torch.float32)
    n_s = (vis_hi - torch.maximum(s_lo, vis_lo)).clamp_min(0).to(torch.float32)
    elig = real_q & (qseg >= 1) & (n_b > 0)  # [B, Q]
    tau = torch.sqrt(n_b / (n_b + n_s).clamp_min(1.0)).clamp_max(tau_max)
    tau_b = torch.where(elig, tau, torch.zeros_like(tau))
    gidx = torch.stack([(qseg - 1).clamp_min(0), qseg], dim=-1)  # [B, Q, 2]

    if mask is not None and mask.dim() == 4:
        m = mask[..., -K:] if mask.shape[-1] != K else mask
        if m.dtype == torch.bool:
            addmask = torch.zeros(m.shape, dtype=torch.float32, device=dev).masked_fill_(
                ~m, torch.finfo(torch.float32).min)
        else:
            addmask = m.to(torch.float32)
        addmask = addmask[:, :, None]  # [B, 1, 1, Q, K]
    else:  # no mask given (sdpa's causal shortcut, flash): causal, padding and window from the row state
        k2 = kabs[None, None, :]  # [1, 1, K]
        vis = (k2 <= qabs[None, :, None]) & (k2 >= lo[:, None, None]) & (k2 < hi[:, None, None])
        if window is not None:
            vis &= k2 > qabs[None, :, None] - window
        addmask = torch.zeros(vis.shape, dtype=torch.float32, device=dev).masked_fill_(
            ~vis, torch.finfo(torch.float32).min)[:, None, None]  # [B, 1, 1, Q, K]
    return LayerGeometry(k_offset, onehot, addmask, gidx[:, None, None], tau_b[:, None, None],
                         elig.to(torch.float32)[:, None, None])


def smi_geometry(fs: ForwardState, geo: LayerGeometry, K: int, window: int | None, alpha: float) -> None:
    """The SMI gather plan for a key layout: each window key's index in the layer's keys and its weight
    alpha / (visible window length). In a sliding-window layer only the keys the query can see count (ours):
    the decision keeps cached decoding and one uncached forward identical."""
    fire_id, kabs = fs.pairs[0], fs.pairs[1]  # [P]
    kidx = (kabs - geo.k_offset).clamp(0, K - 1)
    if window is None:
        weight = alpha / fs.pair_count.to(torch.float32)
    else:
        qabs = fs.fires[2][fire_id]  # [P]
        valid = (kabs > qabs - window) & (kabs >= geo.k_offset)
        count = torch.zeros(fs.num_fires, dtype=torch.float32, device=fs.device).index_add_(
            0, fire_id, valid.to(torch.float32))
        weight = torch.where(valid, alpha / count[fire_id].clamp_min(1.0), torch.zeros((), device=fs.device))
    geo.pair_kidx, geo.pair_weight = kidx, weight

