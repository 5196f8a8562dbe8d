"""Per-request StepFlow state inside a vLLM worker process, and each forward's plan of its StepFlow rows.

Who calls what (one worker process; every tensor-parallel rank has its own copy of all of this):
- the logits processor's `update_state(BatchUpdate)` (vLLM calls it before every forward) keeps `WORKER.rows`,
  batch index -> `Request`, in the row order of the attention metadata: added requests whose
  `SamplingParams.extra_args["stepflow"]` holds a StepFlowConfig get a `Request` (the core's `RowTracker` over
  one `Segmenter`, and the request's prompt ids and live output ids); removed ones leave the batch; moved ones
  follow their index.
- the attention backend (backend.py) calls `WORKER.plan(metadata)` in every layer; the first call of a forward
  feeds each StepFlow request's new tokens (positions up to the forward's last query) to its segmenter and
  builds the forward's `RowPlan`s; layer.py then repairs each layer (`ForwardShared.layer_work`, `apply_layer`).

Lifecycle of a request, from vLLM's own signals. A request is identified by its output list: vLLM's model runner
keeps one `CachedRequestState` per request, whose `output_token_ids` is the list the logits processor receives in
`BatchUpdate.added`, the same object each time vLLM adds the request back. A request removed from the batch is
parked (`parked`, by the list's id): vLLM also removes requests it keeps, those it did not schedule for a step
and those it preempted, and re-adds them later with the same list, which takes the parked request back. Only
the model runner's removal of a request's state (`GPUModelRunner._on_request_state_removed`, called for every
finished or aborted request at the start of its step; the logits processor wraps it when the runner builds it,
register.hook_request_removal) ends a request (`request_finished`): a parked one is finished at once; one still
in `rows` is finished when the same step's batch update removes it, after the last forward's counts are flushed
(`flush_counts`). Finishing (`_finish`) writes its final stats line and moves its tally to `finished`, under its
key.

Owner and lifecycle of `WORKER` (the one module-level instance per process): created at import; its request
state is written only by its own methods: the logits processor (processor.py) calls `configure` once and
`update` and `forward_done` every step, the model runner's hook `request_finished`, the attention backend
(backend.py) `attach_backend` once per layer and `plan` in every layer, `collect_stats`'s RPC `tallies`, the
stats file's idle thread `_live_lines` under `lock`. It lives as long as the worker process.

Coordinates: a request's token i (prompt then output) is kv position i; in a forward its queries are the
positions [seq_len - q_len, seq_len). Segment boundaries and SMI fires come from the tokens before a query,
so prefill, chunked prefill and decoding give the same result as one teacher-forced forward.

Stats (fires per layer, bridge and group masses, SMI fires) are counted once per position: a position computed
again (after preemption) acts the same but is not counted twice. A position served from vLLM's prefix cache
was never a query here; if it lies in the thinking or summary, its cached keys may not be StepFlow's (see
docs/vllm.md, prefix caching): it is counted in `cache_conflicts` and warned about once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ...core.geometry import query_geometry, segment_codes
from ...core.kernel_policy import KernelPolicy
from ...core.rows import RowTracker
from ...core.settings import FlowSettings
from ...core.tally import Tally
from ...errors import StepscopeError
from ...flow.config import StepFlowConfig
from ...formats import get_format
from ...segment import Segmenter
from ...tokens import token_bytes
from .layer import ForwardShared
from .requests import request_config, request_key, request_start
from .stats_file import StatsWriter, stats_path

log = logging.getLogger("stepscope.vllm")
NO_BACKEND = ("the StepFlow attention backend is not active in this vLLM worker (StepFlow runs with vLLM's CPU_ATTN "
              "and FLASH_ATTN backends; is the 'stepscope_stepflow' general plugin excluded by VLLM_PLUGINS?)")


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
    extra: tuple = ()  # core.interventions.Active: the other repairs of its config, in the order they run
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


def engine_tokenizer(vllm_config):
    """The tokenizer of a vLLM engine's model (its configured tokenizer and revision; no remote code)."""
    from transformers import AutoTokenizer

    mc = vllm_config.model_config
    return AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision, trust_remote_code=False)


class Worker:
    """The StepFlow requests of this worker process (one per process: `WORKER`)."""

    def __init__(self) -> None:
        self.rows: dict[int, Request] = {}
        self.parked: dict[int, Request] = {}  # id(output list) -> a request out of the batch for now
        self.ending: set[int] = set()  # id(output list) of requests in `rows` that vLLM finished (leave at removal)
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
        self.kernel_policy = KernelPolicy(off_cuda=True)  # the fused kernel's mode, first-use check, fallback
        self.shared = ForwardShared(self.kernel_policy)  # what this forward's layers share (work, inputs, counts)
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
        self.flush_counts()  # the last forward's counts, before a request that vLLM finished leaves
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
            try:
                cfg = request_config(params)
            except StepscopeError as e:  # valid in the front end, not here (a repair this process lacks)
                self._refuse(index, params, str(e))
                continue
            if cfg is None:
                continue
            problem = self.problem or (None if self.backend else NO_BACKEND)
            if problem:
                self._refuse(index, params, problem)
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
                    self._leave(rb)

    def _refuse(self, index: int, params, why: str) -> None:
        """The front end could not see why this engine cannot serve the request: stop it at its first token,
        never decode it plainly."""
        self.refused.add(index)
        log.error("StepFlow request %r stopped at its first token: %s", request_key(params), why)

    def refused_rows(self) -> list[int]:
        """Batch rows of the StepFlow requests this engine cannot serve (the logits processor stops them)."""
        return sorted(self.refused)

    def configure(self, vllm_config, problem: str | None) -> None:
        """The engine's config, and why this engine cannot serve StepFlow requests (None: it can); the logits
        processor calls it once, when vLLM builds it."""
        self.vllm_config, self.problem = vllm_config, problem

    def attach_backend(self) -> None:
        """StepFlow's attention backend runs in this process (backend.py, when vLLM builds a layer)."""
        self.backend = True

    def _park(self, index: int) -> None:
        req = self.rows.pop(index, None)
        if req is not None:
            self._leave(req)

    def _leave(self, req: Request) -> None:
        """A request leaves the batch: finished when vLLM has finished it (`request_finished`), else parked until
        vLLM re-adds it (same output list) or finishes it."""
        if id(req.output) in self.ending:
            self.ending.discard(id(req.output))
            self._finish(req)
        else:
            self.parked[id(req.output)] = req

    def request_finished(self, output: list) -> None:
        """vLLM's model runner has dropped a request's state (finished or aborted; the plugin's hook on
        `GPUModelRunner._on_request_state_removed`, register.hook_request_removal): `output` is its output list,
        the one the logits processor received. A parked request is finished now; one still in the batch is
        finished when the batch update of the same step removes it (`_leave`, after the last forward's counts are
        in). Requests that are not StepFlow's are not here."""
        with self.lock:
            req = self.parked.get(id(output))
            if req is not None and req.output is output:
                del self.parked[id(output)]
                self._finish(req)
            elif any(r.output is output for r in self.rows.values()):
                self.ending.add(id(output))

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
        settings = FlowSettings.resolve(cfg, num_layers)
        tracker = RowTracker(Segmenter(tok, fmt, tokbytes=self._tokbytes), 0, cfg.smi_window)
        if self.stats_out is None and stats_path():
            self.stats_out = StatsWriter.for_engine(self.vllm_config, self.lock, self._live_lines)
        self.seq += 1
        tally = Tally(num_layers, list(settings.oeb_layers), list(settings.smi_layers), settings.extra_by_name)
        return Request(key, cfg, settings.oeb, settings.smi, tracker, prompt, output, tally, settings.extra,
                       seq=self.seq)

    def _line(self, req: Request, final: bool) -> dict:
        req.written = req.tally.forwards
        return self.stats_out.line(req.seq, req.key, final, req.tally.to_json(), len(req.prompt),
                                   req.config.to_json())

    def _live_lines(self) -> list[dict]:
        """Stats lines of the requests in (or parked out of) the batch whose tallies changed since their last
        line; none while a forward runs (the stats writer's idle thread calls this under `lock`). Requests vLLM
        has finished are not here: `_finish` wrote their final lines."""
        if self.busy:
            return []
        self.flush_counts()
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
            self._tokenizer = engine_tokenizer(self.vllm_config)
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
            self.shared = ForwardShared(self.kernel_policy)
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
        out: dict[str, Tally] = {}
        live = list(self.rows.values()) + list(self.parked.values())
        for key, t in self.finished.items():
            if keys is None or key in keys:
                acc = out[key] = t.copy_empty()
                acc.add(t)
        for req in live:
            if keys is None or req.key in keys:
                req.tally.tokens = req.counted_tokens
                acc = out.get(req.key)
                if acc is None:
                    acc = out[req.key] = req.tally.copy_empty()
                acc.add(req.tally)
        if clear:
            for key in out:
                self.finished.pop(key, None)
        return {k: v.to_json() for k, v in out.items()}


def worker_tallies(worker, keys=None, clear: bool = False) -> dict[str, dict]:
    """`collective_rpc` target: this process's counts (`worker` is vLLM's worker object, unused)."""
    return WORKER.tallies(None if keys is None else set(keys), clear)


WORKER = Worker()
