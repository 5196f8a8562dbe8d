"""One vLLM attention layer's StepFlow repair of a forward's StepFlow rows: which rows it repairs and how (the
schedule, `ForwardShared.layer_work`), and the repair in place on the layer's output (`apply_layer`).

Runs inside vLLM's worker processes (the attention backend calls it, backend.py). It translates vLLM's flat token
axis and paged cache (paged.py) into the core's inputs: decoding rows (one query each, no SMI fire in the layer)
go together through the fused paged kernel under the core's kernel policy, or through `core.oeb.oeb_decode_blocks`;
prefill rows one by one through `core.oeb.oeb_rows`; SMI fires through `core.smi.smi_delta`; then the other repairs
of each row's config (core/interventions.py) on all its queries. Counts go to each request's tally (core/tally.py)
only for positions computed here for the first time (`RowPlan.count_from`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...core.geometry import hidden_keys, query_geometry, segment_codes, segment_onehot
from ...core.interventions import Queries
from ...core.interventions import run as run_intervention
from ...core.kernel_policy import KernelPolicy
from ...core.oeb import key_groups, oeb_decode_blocks, oeb_rows
from ...core.smi import smi_delta
from ...core.tally import tally_part

if TYPE_CHECKING:
    from .worker import RowPlan


@dataclass(frozen=True)
class LayerSpec:
    """What `apply_layer` needs of one attention layer (made once per layer by backend.StepFlowImpl)."""

    index: int  # the model layer
    layout: object  # paged.CpuVecLayout or paged.FlashLayout
    window: int | None  # sliding window in keys, None for full attention
    num_heads: int  # this rank's query heads
    num_kv_heads: int
    scale: float
    sinks: torch.Tensor | None = None  # [num_heads] (GPT-OSS)


@dataclass
class LayerWork:
    """What one attention layer does for this forward's StepFlow rows (`ForwardShared.layer_work`): the decoding
    rows it repairs in one batched call, and the rows it repairs one by one (prefill rows, rows with an SMI fire)."""

    decode: DecodeInputs | None  # eligible decoding rows (one query each, no SMI fire in this layer)
    slow: list  # (RowPlan, oeb: bool, fires) of the other rows with something to do
    covers: bool  # the decoding rows are every token of the forward: the backend's own output is overwritten
    extra: list = field(default_factory=list)  # ExtraRows: the other repairs of this layer, each over its rows


class ForwardShared:
    """What the attention layers of one forward share: the geometry of its decoding rows (per sliding window),
    each layer's `LayerWork` (layers whose rows have the same OEB/SMI membership share one), the `DecodeInputs`
    of each set of decoding rows, and the counts those leave pending until `flush`. The worker makes a new one
    every forward (after flushing the last)."""

    def __init__(self, policy: KernelPolicy | None = None) -> None:
        self.policy = policy if policy is not None else KernelPolicy(off_cuda=True)
        self.work: dict = {}
        self.decode: dict = {}
        self.geometry: dict = {}

    def flush(self) -> None:
        """Add the pending counts of the decoding rows to their requests' tallies."""
        for d in self.decode.values():
            d.flush()

    def decode_geometry(self, plans: list[RowPlan], window: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`query_geometry` of every row's last query at once (gidx int64 [B, 2], tau_B float32 [B], eligible
        bool [B]), in coordinates relative to each row's query (the geometry only depends on differences)."""
        got = self.geometry.get(window)
        if got is None:
            ar = np.array([(rp.seq_len - 1, rp.t0, rp.s0) for rp in plans], dtype=np.int64)
            q, t0, s0 = ar[:, 0], ar[:, 1], ar[:, 2]
            tau_max = np.array([rp.req.config.tau_max for rp in plans])[:, None]
            g, t, _ = query_geometry(-q, np.ones_like(q), t0 - q, s0 - q, 0, 1, window, tau_max)
            got = self.geometry[window] = (g[:, 0], t[:, 0], t[:, 0] > 0)
        return got

    def layer_work(self, spec: LayerSpec, plans: list[RowPlan], block_table: torch.Tensor, block_size: int,
                   num_tokens: int) -> LayerWork | None:
        """This layer's work (None when it has none), made once per forward for each OEB/SMI membership."""
        layer, window = spec.index, spec.window
        member = tuple((layer in rp.req.oeb, layer in rp.req.smi,
                        tuple(a for a in rp.req.extra if layer in a.layers)) for rp in plans)
        key = (window, member)
        if key in self.work:
            return self.work[key]
        decode, slow = [], []
        gidx = tau = elig = None
        extra: dict = {}  # core.interventions.Active -> its rows here
        for rp, (_, _, repairs) in zip(plans, member):
            for a in repairs:
                extra.setdefault(a, []).append(rp)
        for i, (rp, (oeb, smi, _)) in enumerate(zip(plans, member)):
            fires = rp.fires if smi else ()
            if oeb and not fires and rp.q_len == 1:
                if elig is None:
                    gidx, tau, elig = self.decode_geometry(plans, window)
                if elig[i]:
                    decode.append(i)
            elif fires or (oeb and rp.geometry(window, block_table.device).sel.numel()):
                slow.append((rp, oeb, fires))
        d = None
        if decode:
            dkey = (window, tuple(decode))
            d = self.decode.get(dkey)
            if d is None:
                d = self.decode[dkey] = DecodeInputs.of([plans[i] for i in decode], gidx[decode], tau[decode],
                                                        block_table, window, block_size)
        work = self.work[key] = (LayerWork(d, slow, not slow and not extra and len(decode) == num_tokens,
                                           [ExtraRows(a, rows) for a, rows in extra.items()])
                                 if decode or slow or extra else None)
        return work


def apply_layer(spec: LayerSpec, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor,
                plans: list[RowPlan], shared: ForwardShared, work: LayerWork | None = None) -> None:
    """OEB and SMI of one attention layer for the StepFlow rows of this forward, in place on `output`.

    query/output: [num_tokens, H, D] (this rank's heads); kv_cache: this layer's paged cache, already holding
    this forward's keys. Decoding rows (one query each) go through one batched call: the fused paged kernel
    where the layout has one and the core's kernel policy lets it run, else `core.oeb.oeb_decode_blocks` over
    their cache blocks; prefill rows and rows with an SMI fire one by one. `shared`: what the forward's layers
    share (the worker's, new every forward); the decoding rows' counts wait there until `shared.flush()` (the
    worker flushes before the next forward and before reading tallies). `work`: this layer's
    `shared.layer_work`, when the caller has it already."""
    if work is None:
        work = shared.layer_work(spec, plans, metadata.block_table, kv_cache.shape[2], query.shape[0])
        if work is None:
            return
    layer, window, H = spec.index, spec.window, spec.num_heads
    n_rep = H // spec.num_kv_heads
    device = query.device
    spec.layout.check()
    caches = spec.layout.views(kv_cache)
    for rp, oeb, fires in work.slow:
        req = rp.req
        keys, values = spec.layout.gather(*caches, metadata.block_table[rp.index], rp.seq_len)  # [Hkv, S, D]
        geo = rp.geometry(window, device) if oeb else None
        if geo is not None and geo.sel.numel():
            tok = rp.tok0 + geo.sel
            res = oeb_rows(query[tok], keys, values, geo.qpos, geo.gidx, geo.tau, rp.codes(device), spec.scale,
                           window, spec.sinks)
            output[tok] = res[0].to(output.dtype)
            _count_oeb([rp], layer, geo.qpos[None], res[1][None], res[2][None], res[3][None], H)
        for pos, ws, we in fires:
            d = smi_delta(values, ws, we, pos, float(req.config.alpha), n_rep, window)
            if d is not None:
                output[rp.tok0 + pos - rp.pos0] += d.to(output.dtype)
            if pos >= rp.count_from:
                req.tally.smi[layer] += 1
    d = work.decode
    if d is not None:
        got = None
        if spec.layout.paged_kernel:  # the core's kernel policy: first use checked against the torch path
            policy = shared.policy
            if policy.device is None:
                policy.attach(device)
            got = policy.run(lambda: _decode_paged_kernel(spec, query, caches, d),
                             lambda: _decode_torch(spec, query, kv_cache, d)[0], output=lambda r: r[0])
        out, part = got if got is not None else _decode_torch(spec, query, kv_cache, d)
        output.index_copy_(0, d.tok, out.to(output.dtype))
        d.counts.append((layer, part))
    for e in work.extra:
        e.apply(layer, output)


@dataclass
class ExtraRows:
    """One other repair (core/interventions.py) of one layer over the rows whose configs run it there; its inputs
    are made at the first layer that runs it and shared by the forward's layers with the same rows."""

    active: object  # core.interventions.Active
    rows: list  # RowPlan

    @functools.cached_property
    def inputs(self) -> tuple[torch.Tensor, Queries, torch.Tensor, list[int]]:
        """The rows' queries: their index in the flat token axis, position, thinking and summary start (long [N]
        each, on the host), whether each is counted (bool [N]: computed here for the first time), and each row's
        number of queries."""
        tok, pos, t0, s0, first = [], [], [], [], []
        for rp in self.rows:
            p = np.arange(rp.pos0, rp.seq_len, dtype=np.int64)
            tok.append(rp.tok0 + p - rp.pos0)
            pos.append(p)
            t0.append(np.full_like(p, rp.t0))
            s0.append(np.full_like(p, rp.s0))
            first.append(p >= rp.count_from)
        return (*(torch.from_numpy(np.concatenate(a)) for a in (tok, pos, t0, s0, first)),
                [rp.q_len for rp in self.rows])

    def apply(self, layer: int, output: torch.Tensor) -> None:
        """The repair in place on output [num_tokens, H, D]; the queries it changed into each row's tally."""
        tok, pos, t0, s0, first, sizes = self.inputs
        dev = output.device
        tok = tok.to(dev)
        sel = output.index_select(0, tok)  # [N, H, D]
        hit = run_intervention(self.active, sel, Queries(pos.to(dev), t0.to(dev), s0.to(dev)))
        output.index_copy_(0, tok, sel)
        counts = (hit.cpu() & first).split(sizes)
        for rp, c in zip(self.rows, counts):
            rp.req.tally.extra[self.active.name][layer] += int(c.sum())


def _decode_torch(spec: LayerSpec, query: torch.Tensor, kv_cache: torch.Tensor, d: DecodeInputs):
    """The decoding rows through the torch path over their cache blocks: (out [R, H, D] float32, stats [R, H, 5])."""
    keys_t, values = spec.layout.blocks(kv_cache, d.block_ids)
    if d.pad_slots is not None:  # slots past a row's keys: other data, maybe not finite; weighted by 0
        values.view(len(d.block_ids), -1, *values.shape[1:])[d.pad_slots] = 0.0
    out, fired, p_bs, factors = oeb_decode_blocks(query.index_select(0, d.tok), keys_t, values, d.hidden_blocks,
                                                  d.groups_blocks, spec.scale, spec.sinks)
    return out, tally_part(fired[..., 0], p_bs, p_bs * factors)


def _decode_paged_kernel(spec: LayerSpec, query: torch.Tensor, caches, d: DecodeInputs):
    """The decoding rows through the fused paged kernel: (out [R, H, D], stats [R, H, 5] = (fired, p(B), p(S)
    before, after))."""
    from ...core import kernels

    R, H = len(d.rows), spec.num_heads
    stats = torch.empty(R, H, 5, dtype=torch.float32, device=query.device)
    q = query.index_select(0, d.tok)
    if d.paged_plan is None:  # the forward's OEB layers with this window share the shapes: checked and planned once
        d.paged_plan = kernels.plan_decode_paged(q, caches[0], caches[1], d.block_table_i32, d.kseg, d.qgroups,
                                                 d.tau_b, spec.sinks, stats)
    out = kernels.oeb_decode_paged(q, caches[0], caches[1], d.block_table_i32, d.kseg, d.qgroups, d.tau_b,
                                   spec.scale, sinks=spec.sinks, stats=stats, plan=d.paged_plan)
    return out, stats


@dataclass
class DecodeInputs:
    """What the OEB layers of one forward share for its decoding rows (one query each), on the batch's device,
    and the counts those layers leave for `flush`."""

    rows: list  # RowPlan [R]
    S: int  # the longest row's keys
    block_size: int  # keys per cache block
    blocks: torch.Tensor  # int [R, n]: the rows' block tables, n = ceil(S / block_size)
    codes: torch.Tensor  # long [R, n * block_size]: segment of each key slot
    tok: torch.Tensor  # long [R]: each row's query in the flat token axis
    qpos: torch.Tensor  # long [R, 1]
    gidx: torch.Tensor  # long [R, 1, 2]
    tau: torch.Tensor  # float32 [R, 1]
    first: list  # bool [R]: the row's query is counted (computed here for the first time)
    window: int | None = None
    paged_plan: object = None  # the fused paged kernel's launch plan (kernels.DecodePlan), made by its first layer
    counts: list = field(default_factory=list)  # (layer, float32 [R, H, 5]) of each OEB layer run, until flush

    @classmethod
    def of(cls, rows: list[RowPlan], gidx: np.ndarray, tau: np.ndarray, block_table: torch.Tensor,
           window: int | None, block_size: int) -> DecodeInputs:
        """rows: the decoding rows; gidx [R, 2], tau [R]: their queries' groups and targets (`query_geometry`)."""
        dev = block_table.device
        S = max(rp.seq_len for rp in rows)
        n = -(-S // block_size)
        k = torch.arange(n * block_size, device=dev)[None, :]
        t0, s0 = (torch.tensor([getattr(rp, f) for rp in rows], device=dev)[:, None] for f in ("t0", "s0"))
        return cls(rows, S, block_size, block_table[torch.tensor([rp.index for rp in rows], device=dev), :n],
                   segment_codes(k, t0, s0), torch.tensor([rp.tok0 for rp in rows], device=dev),
                   torch.tensor([rp.seq_len - 1 for rp in rows], device=dev)[:, None],
                   torch.from_numpy(np.ascontiguousarray(gidx)).to(dev)[:, None],
                   torch.from_numpy(np.ascontiguousarray(tau, dtype=np.float32)).to(dev)[:, None],
                   [rp.seq_len - 1 >= rp.count_from for rp in rows], window)

    def flush(self) -> None:
        """Add the counts of the OEB layers run so far to the rows' tallies: one reduction and one copy to the host
        for all of them."""
        if not self.counts:
            return
        layers = [layer for layer, _ in self.counts]
        parts = torch.stack([part for _, part in self.counts])  # [L, R, H, 5]
        self.counts = []
        heads = parts.shape[2]
        sums = parts.double().sum(2).cpu().numpy()  # [L, R, 5]
        for r, rp in enumerate(self.rows):
            if self.first[r]:  # a layer runs once per forward: `layers` has no repeats
                rp.req.tally.oeb[layers] += sums[:, r]
                rp.req.tally.eligible[layers] += heads

    # the torch path's form (core.oeb.oeb_decode_blocks): the rows' blocks as the cache holds them

    @functools.cached_property
    def block_ids(self) -> torch.Tensor:
        """long [R * n]: the blocks of the rows, row by row."""
        return self.blocks.reshape(-1).long()

    @functools.cached_property
    def hidden_blocks(self) -> torch.Tensor:
        """bool [R, 1, n * block_size]: key slots the row's query does not see (past its keys, or out of its
        sliding window)."""
        return hidden_keys(self.qpos, torch.arange(self.codes.shape[1], device=self.qpos.device), self.window)

    @functools.cached_property
    def groups_blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`core.oeb.key_groups` of the rows over their key slots."""
        return key_groups(segment_onehot(self.codes), self.gidx[:, 0], self.tau[:, 0])

    @functools.cached_property
    def pad_slots(self) -> tuple | None:
        """Index of the slots past each row's keys in the rows' blocks viewed as [R * n, Hkv, block, D] (None when
        there are none): their values are zeroed, so that whatever they hold is weighted by an exact 0."""
        n = self.blocks.shape[1]
        slot = torch.arange(n * self.block_size, device=self.codes.device)
        seq = torch.tensor([rp.seq_len for rp in self.rows], device=slot.device)[:, None]
        r, k = torch.nonzero(slot[None] >= seq, as_tuple=True)
        if not r.numel():
            return None
        return r * n + k // self.block_size, slice(None), k % self.block_size

    # the fused paged kernel's form of the same inputs (stepscope.core.kernels.oeb_decode_paged)

    @functools.cached_property
    def kseg(self) -> torch.Tensor:
        """int8 [R, S]: each key's segment, 3 where the row's query does not see it (past its keys, or out of
        its sliding window)."""
        return self.codes[:, :self.S].masked_fill(self.hidden_blocks[:, 0, :self.S], 3).to(torch.int8)

    @functools.cached_property
    def qgroups(self) -> torch.Tensor:
        return self.gidx[:, 0].to(torch.int32).contiguous()

    @functools.cached_property
    def tau_b(self) -> torch.Tensor:
        return self.tau[:, 0].to(torch.float32).contiguous()

    @functools.cached_property
    def block_table_i32(self) -> torch.Tensor:
        return self.blocks.to(torch.int32)


def _count_oeb(rows: list[RowPlan], layer: int, qpos: torch.Tensor, fired: torch.Tensor, before: torch.Tensor,
               after: torch.Tensor, heads: int) -> None:
    """Add OEB counts of rows' queries (qpos [R, Q]; fired [R, Q, H]; masses [R, Q, H, 2]) to their tallies, only
    for positions computed here for the first time."""
    first = qpos >= torch.tensor([rp.count_from for rp in rows], device=qpos.device)[:, None]  # [R, Q]
    part = tally_part(fired, before.double(), after.double())  # [R, Q, H, 5]
    sums = (part * first[..., None, None]).sum((1, 2)).cpu().numpy()  # [R, 5]
    n = first.sum(1).tolist()
    for rp, s, k in zip(rows, sums, n):
        if k:
            rp.req.tally.oeb[layer] += s
            rp.req.tally.eligible[layer] += k * heads
