"""Per-request StepFlow state inside a vLLM worker process, each forward's plan, and one layer's repair.

Who calls what (one worker process; every tensor-parallel rank has its own copy of all of this):
- the logits processor's `update_state(BatchUpdate)` (vLLM calls it before every forward) keeps `WORKER.rows`,
  batch index -> `Request`, in the row order of the attention metadata: added requests whose
  `SamplingParams.extra_args["stepflow"]` holds a StepFlowConfig get a `Request` (a `RowTracker` over the one
  `Segmenter`, and the request's prompt ids and live output ids); removed ones are parked (vLLM re-adds a request
  it did not schedule for a step, or preempted, with the same output list) and reaped once vLLM has dropped
  them; moved ones follow their index.
- the attention backend (backend.py) calls `WORKER.plan(metadata)` in every layer; the first call of a forward
  feeds each StepFlow request's new tokens (positions up to the forward's last query) to its segmenter and
  builds the forward's `RowPlan`s; each layer's `LayerWork` (which rows it repairs, and how) is made once per
  forward for each OEB/SMI membership (`ForwardShared`); `apply_layer` then recomputes, in an OEB layer, the
  rows' thinking and summary queries over their paged keys (decoding rows together:
  `attention.oeb_decode_blocks`; prefill rows one by one: `attention.oeb_rows`), and adds, in an SMI layer, the
  step momentum at the rows' fire positions (`attention.smi_delta`).

Coordinates: a request's token i (prompt then output) is kv position i; in a forward its queries are the
positions [seq_len - q_len, seq_len). Segment boundaries and SMI fires come from the tokens before a query,
so prefill, chunked prefill and decoding give the same result as one teacher-forced forward.

Stats (fires per layer, bridge and group masses, SMI fires) are counted once per position: a position computed
again (after preemption) acts the same but is not counted twice. A position served from vLLM's prefix cache
was never a query here; if it lies in the thinking or summary, its cached keys may not be StepFlow's (see
docs/vllm.md, prefix caching): it is counted in `cache_conflicts` and warned about once.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import StepscopeError
from ..flow.config import StepFlowConfig
from ..flow.functional import hidden_keys, key_groups, segment_codes
from ..flow.rows import RowTracker
from ..flow.state import query_geometry
from ..formats import get_format
from ..segment import Segmenter
from ..tokens import token_bytes
from .attention import oeb_decode_blocks, oeb_rows, segment_onehot, smi_delta
from .requests import request_config, request_key, request_start
from .stats_file import StatsWriter, stats_path

log = logging.getLogger("stepscope.vllm")
NO_BACKEND = ("the StepFlow attention backend is not active in this vLLM worker (StepFlow runs with vLLM's CPU_ATTN "
              "and FLASH_ATTN backends; is the 'stepscope_stepflow' general plugin excluded by VLLM_PLUGINS?)")


class Tally:
    """One request's counts, per model layer: OEB sums [L, 5] (fired, p(B), p(S) before, p(B), p(S) after, over
    eligible query-heads), eligible query-heads [L], SMI fires [L]; tokens fed, forwards, cache conflicts."""

    def __init__(self, num_layers: int, oeb_layers: list[int], smi_layers: list[int]):
        self.oeb_layers, self.smi_layers = list(oeb_layers), list(smi_layers)
        self.oeb = np.zeros((num_layers, 5))
        self.eligible = np.zeros(num_layers, dtype=np.int64)
        self.smi = np.zeros(num_layers, dtype=np.int64)
        self.tokens = self.forwards = self.cache_conflicts = 0

    def to_json(self) -> dict:
        return {"oeb_layers": self.oeb_layers, "smi_layers": self.smi_layers, "oeb": self.oeb.tolist(),
                "eligible": self.eligible.tolist(), "smi": self.smi.tolist(), "tokens": self.tokens,
                "forwards": self.forwards, "cache_conflicts": self.cache_conflicts}

    def add(self, other: Tally) -> None:
        """Add another request's counts under the same key (e.g. SamplingParams(n>1))."""
        self.oeb += other.oeb
        self.eligible += other.eligible
        self.smi += other.smi
        self.tokens += other.tokens
        self.forwards += other.forwards
        self.cache_conflicts += other.cache_conflicts


@dataclass
class Request:
    """One StepFlow request in this worker."""

    key: str
    config: StepFlowConfig
    oeb: frozenset
    smi: frozenset
    tracker: RowTracker
    prompt: list[int]
    output: list[int]  # vLLM's live list of the request's output ids
    tally: Tally
    fires: dict = field(default_factory=dict)  # fire position -> (window start, window end), every fire so far
    done: int = 0  # positions [0, done) were queries here (or served from the prefix cache) or of an earlier request
    start: int = 0  # positions [0, start) belong to an earlier request under the same key (request_start)
    seq: int = 0  # this engine's count of StepFlow requests when it arrived (the same on every rank)
    written: int = -1  # its tally's forwards when its last stats line was written

    @property
    def fed(self) -> int:
        return self.tracker.seg.num_tokens

    @property
    def counted_tokens(self) -> int:
        """Tokens fed that this request counts (those from `start` on)."""
        return max(0, self.fed - self.start)


@dataclass
class Geometry:
    """OEB inputs of one row's queries for one sliding window (None: full attention)."""

    sel: torch.Tensor  # long [E]: eligible queries, as offsets from the row's first query
    qpos: torch.Tensor  # long [E]
    gidx: torch.Tensor  # long [E, 2]
    tau: torch.Tensor  # float32 [E]


@dataclass
class RowPlan:
    """One StepFlow request's part of one forward."""

    req: Request
    index: int  # batch row (attention metadata order)
    tok0: int  # its first query in the forward's flat token axis
    pos0: int  # its first query's position
    seq_len: int
    count_from: int  # stats count queries at positions >= this (first computation only)
    t0: int  # thinking start, summary start (BIG when not known yet)
    s0: int
    fires: list  # (position, window start, window end) of this forward's queries
    geometries: dict = field(default_factory=dict)

    @property
    def q_len(self) -> int:
        return self.seq_len - self.pos0

    def codes(self, device=None) -> torch.Tensor:
        """Segment of each key 0..seq_len-1: long [S]."""
        return segment_codes(torch.arange(self.seq_len, device=device), self.t0, self.s0)

    def geometry(self, window: int | None, device=None) -> Geometry:
        """The OEB inputs of this row's queries in a layer with this sliding window, on `device`."""
        key = (window, device)
        got = self.geometries.get(key)
        if got is None:
            one = np.zeros(1, dtype=np.int64)
            g, t, _ = query_geometry(one, one + self.seq_len, one + self.t0, one + self.s0, self.pos0, self.q_len,
                                     window, self.req.config.tau_max)
            sel = np.nonzero(t[0] > 0)[0]
            parts = (sel, sel + self.pos0, g[0][sel], t[0][sel])
            got = self.geometries[key] = Geometry(*(torch.from_numpy(np.ascontiguousarray(a)).to(device)
                                                    for a in parts))
        return got


class Worker:
    """The StepFlow requests of this worker process (one per process: `WORKER`)."""

    def __init__(self) -> None:
        self.rows: dict[int, Request] = {}
        self.parked: dict[int, Request] = {}  # id(output list) -> a request out of the batch for now
        self.finished: dict[str, Tally] = {}
        self.batch_size = 0
        self.vllm_config = None
        self.backend = False  # the StepFlow attention backend runs in this process
        self.problem: str | None = None  # why this engine cannot serve StepFlow requests (processor.py), if so
        self.refused: set[int] = set()  # batch rows of StepFlow requests stopped (`problem`, or no backend)
        self._tokenizer = None
        self._tokbytes = None
        self._formats: dict = {}
        self._ctx = None
        self._plans: list[RowPlan] | None = None
        self.shared = ForwardShared()  # what this forward's layers share (work, decoding inputs, pending counts)
        self._warned: set[str] = set()
        # the stats file (stats_file.py): its idle thread reads the requests under `lock`, only while no forward
        # of StepFlow rows runs (`busy`: from `plan` at the forward's first layer to `forward_done` after it)
        self.lock = threading.Lock()
        self.busy = False
        self.seq = 0
        self.stats_out: StatsWriter | None = None

    # -- the batch (logits processor) -------------------------------------------------------------------------

    def update(self, batch_update) -> None:
        """Follow vLLM's persistent batch: removed, then added, then moved requests."""
        with self.lock:
            self._update(batch_update)

    def forward_done(self) -> None:
        """The logits processor's `apply`: this step's forward has run."""
        with self.lock:
            self.busy = False
            if self.stats_out is not None:
                self.stats_out.touch()

    def _update(self, batch_update) -> None:
        self.flush_counts()  # the last forward's counts, before a request that finished is parked and reaped
        if batch_update is None:
            return
        from vllm.v1.sample.logits_processor.interface import MoveDirectionality

        self.batch_size = batch_update.batch_size
        for index in batch_update.removed:
            self._park(index)
            self.refused.discard(index)
        for index, params, prompt, output in batch_update.added:
            self._park(index)  # an added request may take the slot of one that finished
            self.refused.discard(index)
            cfg = request_config(params)
            if cfg is None:
                continue
            problem = self.problem or (None if self.backend else NO_BACKEND)
            if problem:  # the front end could not see it: stop the request, never decode it plainly
                self.refused.add(index)
                log.error("StepFlow request %r stopped at its first token: %s", request_key(params), problem)
                continue
            req = self.parked.pop(id(output), None)
            if req is None or req.output is not output:
                req = self._new_request(request_key(params), cfg, list(prompt or []), output)
                req.start = req.done = request_start(params)
            self.rows[index] = req
        for a, b, direction in batch_update.moved:
            fa, fb = a in self.refused, b in self.refused
            self.refused -= {a, b}
            self.refused |= ({b} if fa else set()) | ({a} if fb and direction == MoveDirectionality.SWAP else set())
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None:
                if direction == MoveDirectionality.SWAP:
                    self.rows[a] = rb
                else:
                    self.parked[id(rb.output)] = rb
        self._reap()

    def refused_rows(self) -> list[int]:
        """Batch rows of the StepFlow requests this engine cannot serve (the logits processor stops them)."""
        return sorted(self.refused)

    def _park(self, index: int) -> None:
        req = self.rows.pop(index, None)
        if req is not None:
            self.parked[id(req.output)] = req

    def _reap(self) -> None:
        """Parked requests vLLM no longer holds (finished or aborted): keep only their counts."""
        for k in [k for k, r in self.parked.items() if sys.getrefcount(r.output) <= 2]:
            self._finish(self.parked.pop(k))

    def _finish(self, req: Request) -> None:
        req.tally.tokens = req.counted_tokens
        if self.stats_out is not None:
            self.stats_out.write([self._line(req, final=True)])
        got = self.finished.get(req.key)
        if got is None:
            self.finished[req.key] = req.tally
        else:
            got.add(req.tally)

    def _new_request(self, key: str, cfg: StepFlowConfig, prompt: list[int], output: list[int]) -> Request:
        tok = self._tokenizer_once()
        fkey = (cfg.fmt, cfg.markers)
        fmt = self._formats.get(fkey)
        if fmt is None:
            fmt = self._formats[fkey] = get_format(cfg.fmt, tok, markers=cfg.markers)
        num_layers = self.num_layers
        oeb, smi = cfg.resolve(num_layers)
        tracker = RowTracker(Segmenter(tok, fmt, tokbytes=self._tokbytes), 0, cfg.smi_window)
        if self.stats_out is None and stats_path():
            self.stats_out = StatsWriter.for_engine(self.vllm_config, self.lock, self._live_lines)
        self.seq += 1
        return Request(key, cfg, frozenset(oeb), frozenset(smi), tracker, prompt, output,
                       Tally(num_layers, oeb, smi), seq=self.seq)

    def _line(self, req: Request, final: bool) -> dict:
        req.written = req.tally.forwards
        return self.stats_out.line(req.seq, req.key, final, req.tally.to_json(), len(req.prompt),
                                   req.config.to_json())

    def _live_lines(self) -> list[dict]:
        """Stats lines of the requests in (or parked out of) the batch whose tallies changed since their last
        line; none while a forward runs (the stats writer's idle thread calls this under `lock`). Parked requests
        vLLM has let go of are finished first (their final lines are written by `_finish`)."""
        if self.busy:
            return []
        self.flush_counts()
        self._reap()
        out = []
        for req in list(self.rows.values()) + list(self.parked.values()):
            if req.tally.forwards != req.written:
                req.tally.tokens = req.counted_tokens
                out.append(self._line(req, final=False))
        return out

    @property
    def num_layers(self) -> int:
        return int(self.vllm_config.model_config.get_total_num_hidden_layers())

    def _tokenizer_once(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            mc = self.vllm_config.model_config
            self._tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                                            trust_remote_code=False)
            self._tokbytes = token_bytes(self._tokenizer)
        return self._tokenizer

    # -- one forward (attention backend) --------------------------------------------------------------------

    def plan(self, metadata) -> list[RowPlan] | None:
        """This forward's StepFlow rows (built by its first attention call), or None when it has none."""
        from vllm.forward_context import get_forward_context

        ctx = get_forward_context()
        if ctx is self._ctx:
            return self._plans
        with self.lock:
            self._ctx, self._plans = ctx, None
            self.flush_counts()
            self.shared = ForwardShared()
            if not self.rows:
                return None
            qsl = metadata.query_start_loc.tolist()
            if len(qsl) - 1 != self.batch_size:  # a dummy forward (profiling, warm-up): not the batch we follow
                return None
            self.busy = True  # until forward_done: the stats writer's idle thread keeps off the rows
            seq = metadata.seq_lens.tolist()
            self._plans = [self._plan_row(req, i, qsl[i], qsl[i + 1] - qsl[i], seq[i])
                           for i, req in sorted(self.rows.items())]
            return self._plans

    def _plan_row(self, req: Request, index: int, tok0: int, q_len: int, seq_len: int) -> RowPlan:
        n_p, fed = len(req.prompt), req.fed
        if seq_len > n_p + len(req.output):
            raise StepscopeError(f"StepFlow request {req.key!r}: vLLM computes {seq_len} tokens but the request "
                                 f"holds {n_p + len(req.output)} (speculative decoding is not supported)")
        if seq_len > fed:
            new = req.prompt[fed:seq_len] + req.output[max(0, fed - n_p):seq_len - n_p]
            if new and min(new) < 0:
                raise StepscopeError("StepFlow needs each step's tokens before the forward; vLLM's async "
                                     "scheduling leaves placeholders (run with async_scheduling=False)")
            for pos, ws, we in req.tracker.feed(new):
                req.fires[pos] = (ws, we)
        pos0 = seq_len - q_len
        t0, s0 = req.tracker.bounds()
        if pos0 > req.done:  # served from the prefix cache: never a query here
            conflicts = pos0 - max(req.done, t0)
            if conflicts > 0:
                req.tally.cache_conflicts += conflicts
                self._warn("cache", "a StepFlow request reused prefix-cached keys of thinking or summary "
                           "positions that StepFlow did not compute; give StepFlow requests a cache_salt "
                           "(stepscope.vllm.prompt) or disable prefix caching (docs/vllm.md)")
            req.done = pos0
        count_from, req.done = req.done, max(req.done, seq_len)
        req.tally.forwards += 1
        fires = [(p, *req.fires[p]) for p in range(pos0, seq_len) if p in req.fires]
        return RowPlan(req, index, tok0, pos0, seq_len, count_from, t0, s0, fires)

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)

    # -- stats --------------------------------------------------------------------------------------------------

    def flush_counts(self) -> None:
        """The decoding rows' counts of the last forward into their tallies (its OEB layers leave them pending)."""
        self.shared.flush()

    def tallies(self, keys=None, clear: bool = False) -> dict[str, dict]:
        """Counts by request key (active, parked and finished requests with the same key added up)."""
        with self.lock:
            return self._tallies(keys, clear)

    def _tallies(self, keys=None, clear: bool = False) -> dict[str, dict]:
        self.flush_counts()
        self._reap()
        out: dict[str, Tally] = {}
        live = list(self.rows.values()) + list(self.parked.values())
        for key, t in self.finished.items():
            if keys is None or key in keys:
                acc = out[key] = Tally(len(t.eligible), t.oeb_layers, t.smi_layers)
                acc.add(t)
        for req in live:
            if keys is None or req.key in keys:
                req.tally.tokens = req.counted_tokens
                acc = out.get(req.key)
                if acc is None:
                    acc = out[req.key] = Tally(len(req.tally.eligible), req.tally.oeb_layers,
                                               req.tally.smi_layers)
                acc.add(req.tally)
        if clear:
            for key in out:
                self.finished.pop(key, None)
        return {k: v.to_json() for k, v in out.items()}


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


class ForwardShared:
    """What the attention layers of one forward share: the geometry of its decoding rows (per sliding window),
    each layer's `LayerWork` (layers whose rows have the same OEB/SMI membership share one), the `DecodeInputs`
    of each set of decoding rows, and the counts those leave pending until `flush`. The worker makes a new one
    every forward (after flushing the last)."""

    def __init__(self) -> None:
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
        member = tuple((layer in rp.req.oeb, layer in rp.req.smi) for rp in plans)
        key = (window, member)
        if key in self.work:
            return self.work[key]
        decode, slow = [], []
        gidx = tau = elig = None
        for i, (rp, (oeb, smi)) in enumerate(zip(plans, member)):
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
        work = self.work[key] = (LayerWork(d, slow, not slow and len(decode) == num_tokens)
                                 if decode or slow else None)
        return work


def apply_layer(spec: LayerSpec, query: torch.Tensor, kv_cache: torch.Tensor, metadata, output: torch.Tensor,
                plans: list[RowPlan], shared: ForwardShared | None = None, work: LayerWork | None = None) -> None:
    """OEB and SMI of one attention layer for the StepFlow rows of this forward, in place on `output`.

    query/output: [num_tokens, H, D] (this rank's heads); kv_cache: this layer's paged cache, already holding
    this forward's keys. Decoding rows (one query each) go through one batched call: the fused paged kernel
    where the layout has one and it can run, else `attention.oeb_decode_blocks` over their cache blocks; prefill
    rows and rows with an SMI fire one by one. `shared`: what the forward's layers share (default: the worker's,
    new every forward); the decoding rows' counts wait there until `shared.flush()` (the worker flushes before
    the next forward and before reading tallies). `work`: this layer's `shared.layer_work`, when the caller has
    it already."""
    shared = WORKER.shared if shared is None else shared
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
        if spec.layout.paged_kernel and _kernel_runs(device):
            out, part = _decode_paged_kernel(spec, query, caches, d)
        else:
            keys_t, values = spec.layout.blocks(kv_cache, d.block_ids)
            if d.pad_slots is not None:  # slots past a row's keys: other data, maybe not finite; weighted by 0
                values.view(len(d.block_ids), -1, *values.shape[1:])[d.pad_slots] = 0.0
            out, fired, p_bs, factors = oeb_decode_blocks(query.index_select(0, d.tok), keys_t, values,
                                                          d.hidden_blocks, d.groups_blocks, spec.scale, spec.sinks)
            part = torch.cat([fired.to(torch.float32), p_bs, p_bs * factors], -1)
        output.index_copy_(0, d.tok, out.to(output.dtype))
        d.counts.append((layer, part))


@functools.cache
def _kernel_runs(device: torch.device) -> bool:
    """Whether the fused kernel runs on this device (a CUDA device, or Triton's interpreter): asked once."""
    from ..flow import kernels

    return kernels.available(device)


def _decode_paged_kernel(spec: LayerSpec, query: torch.Tensor, caches, d: DecodeInputs):
    """The decoding rows through the fused paged kernel: (out [R, H, D], stats [R, H, 5] = (fired, p(B), p(S)
    before, after))."""
    from ..flow import kernels

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

    # the torch path's form (attention.oeb_decode_blocks): the rows' blocks as the cache holds them

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
        """`functional.key_groups` of the rows over their key slots."""
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

    # the fused paged kernel's form of the same inputs (stepscope.flow.kernels.oeb_decode_paged)

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
    part = torch.cat([fired.to(torch.float64)[..., None], before.double(), after.double()], -1)  # [R, Q, H, 5]
    sums = (part * first[..., None, None]).sum((1, 2)).cpu().numpy()  # [R, 5]
    n = first.sum(1).tolist()
    for rp, s, k in zip(rows, sums, n):
        if k:
            rp.req.tally.oeb[layer] += s
            rp.req.tally.eligible[layer] += k * heads


def worker_tallies(worker, keys=None, clear: bool = False) -> dict[str, dict]:
    """`collective_rpc` target: this process's counts (`worker` is vLLM's worker object, unused)."""
    return WORKER.tallies(None if keys is None else set(keys), clear)


WORKER = Worker()
