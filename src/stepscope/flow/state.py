"""The forward geometry of StepFlow: what one forward pass reads on the device, built on the host in one upload.

Coordinates. Every row of a batch lives in one key/value index space ("kv index": the position in the padded
sequence, i.e. in a full cache). Row b's real tokens are the contiguous kv range [lo_b, hi_b); real token r
sits at kv index lo_b + r. Left padding (generation) gives lo_b > 0; a right-padded teacher-forced batch gives
hi_b < T. The segmenter of row b sees the real tokens only.

Per forward, the host does all the bookkeeping: it must read the new token ids once anyway, to feed the
segmenters, and everything StepFlow needs follows from the segmenters' answers and a few integers per row.
With numpy it computes, for every query of the forward, the segment index of its bridge B and current group S
and its target tau_B, the segment code of every new key, and the SMI plan; it packs them into one buffer and
uploads it in one host-to-device copy (pinned, asynchronous on CUDA). Per layer nothing is read back.

Keys keep their segment forever (a key is question until the thinking start is known, and that start is
always after it), so the key-segment one-hots and the padding mask live in per-row device buffers that grow
by the new keys of each forward (`KeyState`). A layer whose cache holds only its last K keys (sliding window)
reads a slice.

Segments follow the segmenter's boundaries: a token at real index r is question if r < thinking start,
thinking if thinking start <= r < summary start, summary after (marker tokens belong to the segment they
close). A query's segment is decided by tokens before it, so online and offline agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..core.geometry import BIG, NEG, hidden_keys, query_geometry, segment_codes
from ..core.interventions import Queries
from ..core.oeb import key_groups
from ..core.settings import FlowSettings
from ..core.smi import smi_weights

__all__ = ["BIG", "NEG", "DecodeGeometry", "ForwardState", "KeyState", "LayerGeometry", "OebGeometry", "QueryTensors",
           "build_forward_state"]

_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32,
                 np.dtype(np.int32): torch.int32, np.dtype(np.int8): torch.int8}


class Upload:
    """Numpy arrays packed into one buffer: one host-to-device copy, then typed views on the device."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, np.ndarray]] = []

    def add(self, name: str, arr: np.ndarray) -> None:
        self.parts.append((name, np.ascontiguousarray(arr)))

    def send(self, device: torch.device) -> dict[str, torch.Tensor]:
        sizes = [(-a.nbytes) % 8 + a.nbytes for _, a in self.parts]
        buf = np.zeros(max(8, sum(sizes)), dtype=np.uint8)
        o = 0
        for (_, a), n in zip(self.parts, sizes):
            buf[o:o + a.nbytes] = a.reshape(-1).view(np.uint8)
            o += n
        t = torch.from_numpy(buf)
        if device.type == "cuda":
            t = t.pin_memory()  # the caching host allocator keeps it until the copy is done
        t = t.to(device, non_blocking=True)
        out, o = {}, 0
        for (name, a), n in zip(self.parts, sizes):
            dt = _TORCH_DTYPES[a.dtype]
            out[name] = t[o:o + a.nbytes].view(dt).view(a.shape)
            o += n
        return out


# -- device-side state ---------------------------------------------------------------------------------------------

class KeyState:
    """Per-row key buffers on the device, grown by each forward's new keys.

    onehot [B, cap, 3] float32: the key's segment (question, thinking, summary).
    padmask [B, cap] float32: 0 for a real key, NEG for padding.
    seg [B, cap] int8 (only for the fused decoding kernel): the segment code, 3 for padding.
    """

    def __init__(self, batch: int, device: torch.device, cap: int, with_seg: bool = False):
        self.onehot = torch.zeros(batch, cap, 3, dtype=torch.float32, device=device)
        self.padmask = torch.zeros(batch, cap, dtype=torch.float32, device=device)
        self.seg = torch.full((batch, cap), 3, dtype=torch.int8, device=device) if with_seg else None

    def ensure(self, total: int) -> None:
        cap = self.onehot.shape[1]
        if total <= cap:
            return
        new = max(total, 2 * cap)
        B, dev = self.onehot.shape[0], self.onehot.device
        oh = torch.zeros(B, new, 3, dtype=torch.float32, device=dev)
        pm = torch.zeros(B, new, dtype=torch.float32, device=dev)
        oh[:, :cap] = self.onehot
        pm[:, :cap] = self.padmask
        self.onehot, self.padmask = oh, pm
        if self.seg is not None:
            sg = torch.full((B, new), 3, dtype=torch.int8, device=dev)
            sg[:, :cap] = self.seg
            self.seg = sg

    def append(self, past: int, codes: torch.Tensor, padmask: torch.Tensor | None,
               seg: torch.Tensor | None = None, onehot: torch.Tensor | None = None) -> None:
        """Keys [past, past + Q): segment codes int64 [B, Q] (and their padding mask, prefill only; and their
        int8 codes with padding as 3, when the fused kernel is in use; and their one-hot float32 [B, Q, 3]
        when the caller has it: no one_hot kernel then)."""
        Q = codes.shape[1]
        self.ensure(past + Q)
        self.onehot[:, past:past + Q] = onehot if onehot is not None else torch.nn.functional.one_hot(codes, 3)
        if padmask is not None:
            self.padmask[:, past:past + Q] = padmask
        if self.seg is not None and seg is not None:
            self.seg[:, past:past + Q] = seg

    def select(self, keep: torch.Tensor) -> None:
        self.onehot = self.onehot.index_select(0, keep)
        self.padmask = self.padmask.index_select(0, keep)
        if self.seg is not None:
            self.seg = self.seg.index_select(0, keep)


@dataclass
class DecodeGeometry:
    """What the OEB layers of one key layout share in a decoding step (one query per row)."""

    kseg: torch.Tensor | None = None  # int8 [B, K]: key segment, 3 hidden (the fused kernel's input)
    # `core.oeb.key_groups` of the rows, so that each step is a few batched matmuls (PyTorch path, made on first use)
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    masks: dict = field(default_factory=dict)  # (Hkv, dtype) -> additive mask [B * Hkv, 1, K]
    kernel: object | None = None  # the fused kernel's bookkeeping of this forward (decode_path.KernelStep)


@dataclass
class OebGeometry:
    """An OEB layer's inputs of one forward (B rows, Q queries, K keys), shared by the layers with its key layout."""

    first_query: int  # index, in this layer's keys, of the forward's first query
    onehot: torch.Tensor  # float32 [B, K, 3]: key segment
    addmask: torch.Tensor  # float32 [B, Q or 1, K]: 0 visible, NEG hidden
    qt: QueryTensors  # the queries' groups and targets
    decode: DecodeGeometry | None = None  # one query per row

    def decode_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoding path's key indicators (`core.oeb.key_groups`), made on the device once per forward."""
        d = self.decode
        if d.groups is None:
            d.groups = key_groups(self.onehot, self.qt.gidx[:, 0, :], self.qt.tau_b[:, 0])
        return d.groups


@dataclass
class LayerGeometry:
    """What every band layer with the same key layout shares in one forward."""

    k_offset: int  # kv index of key 0 (a sliding-window cache holds only the last keys)
    oeb: OebGeometry | None = None  # None: the layers of this layout run SMI only
    smi_keys: tuple | None = None  # SMI: (int64 [P] window key index in this layer's keys, float32 [P] weight)


@dataclass
class QueryTensors:
    """Per-query OEB inputs of one forward for one sliding window (None: full attention), on the device."""

    gidx: torch.Tensor  # int64 [B, Q, 2]
    tau_b: torch.Tensor  # float32 [B, Q]
    eligible: torch.Tensor | None  # float32 [B, Q] (prefill stats)
    n_eligible: int  # host count
    elig_rows: np.ndarray  # host: eligible queries of each row [B]
    qgroups: torch.Tensor | None = None  # int32 [B, 2]: segment of B and of S (decoding, fused kernel)


def _query_upload(up: Upload, g: np.ndarray, t: np.ndarray, e: np.ndarray, q_len: int) -> None:
    up.add("gidx", g)
    up.add("tau", t)
    up.add("elig", e)
    if q_len == 1:
        up.add("qg", g[:, 0, :].astype(np.int32))


def _query_tensors(d: dict, elig_rows: np.ndarray) -> QueryTensors:
    return QueryTensors(d["gidx"], d["tau"], d.get("elig"), int(elig_rows.sum()), elig_rows, d.get("qg"))


class RowBounds(NamedTuple):
    """Each row's kv range and segment starts in one forward (host, int64 [B]; BIG: not known yet)."""

    lo: np.ndarray
    hi: np.ndarray
    t0: np.ndarray
    s0: np.ndarray


class SmiPlan(NamedTuple):
    """The SMI fires of one forward (host): per fire its row, query index in the forward and kv index [F]; per
    (fire, window key) pair the fire and the key's kv index [P]."""

    fire_b: np.ndarray
    fire_qi: np.ndarray
    fire_qabs: np.ndarray
    pair_fire: np.ndarray
    pair_k: np.ndarray


class SmiTensors(NamedTuple):
    """The SMI plan on the device: fires int64 [2, F] (row, query index), pairs int64 [2, P] (fire, kv index)."""

    fires: torch.Tensor
    pairs: torch.Tensor


@dataclass
class ForwardState:
    """One forward: host ints and arrays, and the uploaded device tensors (no host reads in the attention)."""

    batch: int
    past: int  # kv length before this forward
    q_len: int
    device: torch.device
    settings: FlowSettings
    any_oeb: bool  # some query of this forward sits in thinking or summary
    bounds: RowBounds
    fires: SmiPlan
    keys: KeyState
    fire_tensors: SmiTensors | None = None  # None: no fire
    windows: dict = field(default_factory=dict)  # window -> QueryTensors
    smi: dict = field(default_factory=dict)  # window -> pair weights float32 [P] on the device
    geometry: dict = field(default_factory=dict)  # LayerGeometry per key layout
    real: tuple | None = None  # real_queries(), made by its first call

    def real_queries(self) -> tuple[torch.Tensor, torch.Tensor, Queries] | None:
        """The forward's real queries (not padding) for the other repairs: (row long [N], query index long [N],
        `core.interventions.Queries` in each row's own positions); None when there are none. One upload per forward,
        at the first layer that asks."""
        if self.real is None:
            lo, hi, t0, s0 = self.bounds
            kv = self.past + np.arange(self.q_len, dtype=np.int64)[None, :]  # [1, Q]
            rows, cols = np.nonzero((kv >= lo[:, None]) & (kv < hi[:, None]))
            if not len(rows):
                self.real = ()
                return None
            lo_r = lo[rows]

            def own(b: np.ndarray) -> np.ndarray:  # a boundary in the row's own positions (BIG stays BIG)
                return np.where(b[rows] >= BIG, BIG, b[rows] - lo_r)

            up = Upload()
            for name, a in (("rows", rows), ("cols", cols), ("pos", kv[0, cols] - lo_r), ("t0", own(t0)),
                            ("s0", own(s0))):
                up.add(name, a.astype(np.int64))
            d = up.send(self.device)
            self.real = (d["rows"], d["cols"], Queries(d["pos"], d["t0"], d["s0"]))
        return self.real or None

    @property
    def num_fires(self) -> int:
        return len(self.fires.fire_b)

    @property
    def total(self) -> int:
        return self.past + self.q_len

    def query_tensors(self, window: int | None) -> QueryTensors:
        """OEB inputs of this forward's queries for a layer with this sliding window."""
        got = self.windows.get(window)
        if got is None:  # a sliding window seen for the first time in this forward: one more small upload
            g, t, e = query_geometry(*self.bounds, self.past, self.q_len, window, self.settings.tau_max)
            up = Upload()
            _query_upload(up, g, t, e, self.q_len)
            got = self.windows[window] = _query_tensors(up.send(self.device), e.sum(1))
        return got

    def add_fires(self, trackers: list, fires: list[list[tuple[int, int, int]]]) -> None:
        """The SMI plan of this forward, known only after its tokens were fed (a decoding step whose feeding
        StepFlow deferred until its first SMI layer): one more small upload, when anything fires."""
        self.fires = _fire_arrays(trackers, fires, self.past)
        if self.num_fires:
            up = Upload()
            _fire_upload(up, self.fires, self.settings.alpha)
            self._set_fire_tensors(up.send(self.device))

    def _set_fire_tensors(self, dev: dict) -> None:
        self.fire_tensors = SmiTensors(dev["fires"], dev["pairs"])
        self.smi[None] = dev["pair_w"]

    def layer(self, K: int, window: int | None, mask: torch.Tensor | None, oeb: bool) -> LayerGeometry:
        """The geometry of a band layer with K cached keys and this sliding window (shared by the layers with the
        same key layout in this forward); `mask`: the 4D mask transformers built, if any. A static cache's slots
        after the tokens seen so far are empty: the geometry covers the first `total` keys then."""
        gkey = (K, window, id(mask), oeb)
        geo = self.geometry.get(gkey)
        if geo is None:
            Kt, mt = K, mask
            if K > self.total:
                Kt, mt = self.total, (mask[..., :self.total] if mask is not None else None)
            geo = self.geometry[gkey] = layer_geometry(self, Kt, window, mt, oeb)
            self.geometry[("mask", gkey)] = mask  # keep the mask alive so that its id stays unique
        return geo

    def smi_keys(self, geo: LayerGeometry, K: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(window key index [P] inside the layer's K keys, weight [P]) of every SMI (fire, key) pair."""
        if geo.smi_keys is None:
            geo.smi_keys = ((self.fire_tensors.pairs[1] - geo.k_offset).clamp_(0, K - 1), self.smi_pair_weights(window))
        return geo.smi_keys

    def smi_pair_weights(self, window: int | None) -> torch.Tensor:
        got = self.smi.get(window)
        if got is None:
            f = self.fires
            up = Upload()
            up.add("w", smi_weights(f.fire_qabs, f.pair_fire, f.pair_k, window, self.settings.alpha))
            got = self.smi[window] = up.send(self.device)["w"]
        return got


def build_forward_state(trackers: list, keys: KeyState, past: int, q_len: int,
                        fires: list[list[tuple[int, int, int]]],
                        new_pad: np.ndarray | None, device: torch.device, settings: FlowSettings,
                        hi: int | None = None) -> ForwardState:
    """Pack the rows' host state after feeding this forward's tokens into one upload.

    trackers: the rows (rows.RowTracker: kv range lo/hi, segment bounds()); fires: each row's SMI fires.
    new_pad float32 [B, Q] (prefill): the new keys' padding mask.
    hi: every row's kv end after this forward, when it is the same for all (decoding; else each row's tr.hi).
    """
    B = len(trackers)
    lo_l = [tr.lo for tr in trackers]
    hi_l = [tr.hi for tr in trackers] if hi is None else [hi] * B
    bounds = [tr.bounds() for tr in trackers]
    lo, hi = np.array(lo_l, dtype=np.int64), np.array(hi_l, dtype=np.int64)
    t0 = np.array([x[0] for x in bounds], dtype=np.int64)
    s0 = np.array([x[1] for x in bounds], dtype=np.int64)
    last_q = past + q_len - 1
    tau_max = settings.tau_max
    any_oeb = bool(settings.oeb_layers) and any(min(last_q, h - 1) >= b[0] for h, b in zip(hi_l, bounds))
    plan = _fire_arrays(trackers, fires, past)
    up = Upload()
    fast = q_len == 1 and any_oeb
    if fast:  # decoding: the geometry and the new key's segment in two arrays
        ints, floats, n_elig = _decode_pack(lo, hi, t0, s0, past, tau_max)
        up.add("ints", ints)
        up.add("floats", floats)
        if keys.seg is not None:  # the fused kernel's inputs: the new keys' int8 codes, the rows' groups
            up.add("seg8", ints[:B].astype(np.int8).reshape(B, 1))
            up.add("qg", ints[B:].astype(np.int32).reshape(B, 2))
    else:
        # segment code of every new key (final: a key's segment never changes once it is fed)
        kabs = past + np.arange(q_len, dtype=np.int64)[None, :]
        new_codes = segment_codes(kabs, t0[:, None], s0[:, None])
        up.add("codes", new_codes)
        if keys.seg is not None:
            seg8 = new_codes if new_pad is None else np.where(new_pad < 0, 3, new_codes)
            up.add("seg8", seg8.astype(np.int8))
    if new_pad is not None:
        up.add("pad", new_pad)
    if any_oeb and not fast:
        g, t, e = query_geometry(lo, hi, t0, s0, past, q_len, None, tau_max)
        _query_upload(up, g, t, e, q_len)
        n_elig = e.sum(1)
    num_fires = len(plan.fire_b)
    if num_fires:
        _fire_upload(up, plan, settings.alpha)
    dev = up.send(device)
    if fast:
        ints, floats = dev.pop("ints"), dev.pop("floats")
        dev.update(codes=ints[:B].view(B, 1), gidx=ints[B:].view(B, 1, 2), tau=floats[:B].view(B, 1),
                   elig=floats[B:2 * B].view(B, 1), onehot=floats[2 * B:].view(B, 1, 3))
    keys.append(past, dev["codes"], dev.get("pad"), dev.get("seg8"), dev.get("onehot"))
    fs = ForwardState(B, past, q_len, device, settings, any_oeb, RowBounds(lo, hi, t0, s0), plan, keys)
    if any_oeb:
        fs.windows[None] = _query_tensors(dev, n_elig)
    if num_fires:
        fs._set_fire_tensors(dev)
    return fs


def _fire_arrays(trackers: list, fires: list[list[tuple[int, int, int]]], past: int) -> SmiPlan:
    """The SMI plan of a forward from each row's fires (real index, window start, end): per fire its row,
    query index in the forward and kv index; per (fire, window key) pair the fire and the key's kv index."""
    fb, fq, fk, pf, pk = [], [], [], [], []
    for b, fl in enumerate(fires):
        lo_b = trackers[b].lo
        for pos, ws, we in fl:
            f = len(fb)
            fb.append(b)
            fq.append(lo_b + pos - past)
            fk.append(lo_b + pos)
            pf.extend([f] * (we - ws))
            pk.extend(range(lo_b + ws, lo_b + we))
    return SmiPlan(*(np.asarray(a, dtype=np.int64) for a in (fb, fq, fk, pf, pk)))


def _fire_upload(up: Upload, plan: SmiPlan, alpha: float) -> None:
    up.add("fires", np.stack([plan.fire_b, plan.fire_qi]))
    up.add("pairs", np.stack([plan.pair_fire, plan.pair_k]))
    up.add("pair_w", smi_weights(plan.fire_qabs, plan.pair_fire, plan.pair_k, None, alpha))


def _decode_pack(lo: np.ndarray, hi: np.ndarray, t0: np.ndarray, s0: np.ndarray, q: int, tau_max: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query per row, at kv index q, full attention: int64 [3B] (key codes, then gidx pairs) and float32
    [5B] (tau_B, eligible, the new key's one-hot segment) of `query_geometry`, packed for one upload, and the
    eligible count of each row [B]."""
    g, t, e = query_geometry(lo, hi, t0, s0, q, 1, None, tau_max)
    codes = g[:, 0, 1]  # a query's own segment is its S's
    oh = (codes[:, None] == np.arange(3)).astype(np.float32)
    return (np.concatenate([codes, g[:, 0].reshape(-1)]), np.concatenate([t[:, 0], e[:, 0], oh.reshape(-1)]),
            e.sum(1))


def layer_geometry(fs: ForwardState, K: int, window: int | None, mask: torch.Tensor | None,
                   oeb: bool) -> LayerGeometry:
    """Key segments, additive mask and query tensors for a layer with K keys (the last K of the forward's
    kv range) and this sliding window. `mask`: the 4D mask transformers built (bool or additive), if any."""
    k_offset = max(fs.total - K, 0)  # a sliding-window cache holds only the last K keys
    geo = LayerGeometry(k_offset)
    if not oeb:
        return geo
    fs.keys.ensure(k_offset + K)  # a static cache may hold more slots than tokens
    onehot = fs.keys.onehot[:, k_offset:k_offset + K]  # [B, K, 3]
    decode = DecodeGeometry() if fs.q_len == 1 else None
    if fs.q_len == 1 and (window is None or K <= window):
        addmask = fs.keys.padmask[:, None, k_offset:k_offset + K]  # decoding: only padding is hidden
        if fs.keys.seg is not None:  # every visible key is in the cache: the kernel needs no other mask
            decode.kseg = fs.keys.seg[:, k_offset:k_offset + K]
    elif mask is not None:
        m = mask[:, 0, :, -K:]  # [B, Q, K] (the same for every head)
        addmask = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, NEG) \
            if m.dtype == torch.bool else m.to(torch.float32)
    else:  # no mask given (sdpa's causal shortcut, flash): causal, padding and window from the row state
        hidden = hidden_keys(torch.arange(fs.past, fs.total, device=fs.device)[None, :],
                             torch.arange(k_offset, k_offset + K, device=fs.device), window)  # [1, Q, K]
        addmask = fs.keys.padmask[:, None, k_offset:k_offset + K].masked_fill(hidden, NEG)  # [B, Q, K]
    geo.oeb = OebGeometry(fs.past - k_offset, onehot, addmask, fs.query_tensors(window), decode)
    return geo
