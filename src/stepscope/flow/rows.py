"""The batch rows the transformers engine follows: a RowTracker per row, and each forward's state.

Coordinates (see state.py): row b's real tokens are the contiguous kv range [lo_b, hi_b) of the padded
sequence; its segmenter sees the real tokens only.

Per forward (`begin`): a forward with no cache, or an empty one, starts fresh rows (each row's real tokens
found from the attention mask); a forward after a cache StepFlow has followed continues them; anything else is
an error (beam search, which reorders cache rows, is not supported). The new tokens are fed to the segmenters
and the forward's device state is built (`state.build_forward_state`, one upload).

In a decoding step (one new token per row) the feeding waits (`feed_pending`): until the first SMI layer or
the end of the forward, so that the device already runs the layers before it while the host segments. A
token's segment and its OEB groups depend only on the tokens before it; only its SMI fire needs it fed. For the
same reason the state of the next decoding step is prepared after a forward with a cache (`prepare_next`),
while the device still runs this one; the next `begin` takes it if that forward is one new token per row right
after, and builds its own otherwise.

Each row's segmenter and SMI schedule is the core's `RowTracker` (core/rows.py), the same in every engine.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.rows import Fire, RowTracker
from ..core.settings import FlowSettings
from ..errors import StepscopeError
from ..formats import Format
from ..segment import Segmenter
from ..tokens import token_bytes
from .state import NEG, ForwardState, KeyState, build_forward_state


class Rows:
    """The rows of the batch StepFlow follows, the forward being run, and the counts of what was fed."""

    def __init__(self, tokenizer, fmt: Format, settings: FlowSettings, *, device: torch.device):
        self.tokenizer, self.format = tokenizer, fmt
        self.settings = settings
        self.device = device
        self._tokbytes = token_bytes(tokenizer)
        self._rows: list[RowTracker] | None = None  # the current rows
        self._batch: list[RowTracker] = []  # the rows of the last fresh batch, by their index in it
        self._keys: KeyState | None = None
        self._total = 0  # kv length after the last forward
        self._fwd: ForwardState | None = None
        self._unfed: np.ndarray | None = None  # host ids [B, 1] of a decoding step not yet fed
        self._next: ForwardState | None = None  # the next decoding step's state, prepared after a forward
        self.reset_counts()
        self.saw_rows = self.saw_thinking = False  # since `open`: some row, some row in thinking

    # -- reading --------------------------------------------------------------------------------------------

    @property
    def forward(self) -> ForwardState | None:
        """The state of the forward being run (None before the first one, or after the rows changed)."""
        return self._fwd

    @property
    def prepared(self) -> ForwardState | None:
        """The next decoding step's state, prepared after the last forward with a cache (None: none)."""
        return self._next

    @property
    def has_pending(self) -> bool:
        """A decoding step's token is held back from the segmenters."""
        return self._unfed is not None

    @property
    def segmenters(self) -> list[Segmenter]:
        return [tr.seg for tr in (self._rows or [])]

    @property
    def batch_size(self) -> int:
        """Rows of the last fresh batch."""
        return len(self._batch)

    def batch_row(self, row: int) -> RowTracker:
        """A row of the last fresh batch by its index in it (also after it left with `select`)."""
        return self._batch[row]

    def reset_counts(self) -> None:
        """Zero the counts of what was fed: forwards, real tokens, rows started, rows that reached thinking."""
        self.forwards = self.tokens = 0
        self.rows_started = self.rows_with_thinking = 0

    # -- per forward ----------------------------------------------------------------------------------------

    def open(self) -> None:
        """A StepFlow context opens: no rows yet."""
        self._rows, self._fwd, self._next, self._unfed, self._total = None, None, None, None, 0
        self.saw_rows = self.saw_thinking = False

    def close(self) -> None:
        """The context closes: feed what is held back; drop the forward's state."""
        try:
            self.feed_pending()
        finally:
            self._unfed = None
            self._fwd = self._next = None

    def begin(self, host: np.ndarray, q_len: int, past: int, masked: bool, kernel_keys: bool) -> bool:
        """A forward of q_len new tokens per row after `past` cached ones: host [B, Q] ids (and [B, Q] mask
        columns after them when `masked`). Feeds the segmenters (a decoding step: later, `feed_pending`) and
        builds the forward's state; `kernel_keys`: keep the keys' int8 codes for the fused kernel (fresh rows
        only). Returns whether the rows are fresh."""
        B, Q = host.shape[0], q_len
        ids_h = host[:, :Q]
        if past == 0:
            self._rows = None
            self._next = None
        elif self._rows is None or len(self._rows) != B or past != self._total:
            seen = 0 if self._rows is None else self._total
            raise StepscopeError(f"StepFlow lost track of the cache: it holds {past} tokens of {B} rows, StepFlow "
                                 f"has seen {seen}; start from an empty cache (beam search and reused caches are "
                                 "not supported)")
        fresh = self._rows is None
        new_pad = None
        if fresh:  # a fresh sequence: find each row's real tokens
            self._start(host, Q, masked, kernel_keys)
            spans = [(tr.lo, tr.hi) for tr in self._rows]
            if masked:
                new_pad = np.where(host[:, Q:] != 0, 0.0, NEG).astype(np.float32)
        else:
            if (masked and not (host[:, Q:] != 0).all()) or any(tr.hi != past for tr in self._rows):
                raise StepscopeError("StepFlow cannot follow padding after a row's real tokens "
                                     "(continue right-padded rows, or mask new tokens)")
            spans = [(0, Q)] * B
            for tr in self._rows:
                tr.hi = past + Q
            nxt, self._next = self._next, None
            if Q == 1 and nxt is not None and nxt.past == past:  # the state the last forward prepared
                self._unfed = ids_h
                self._total = past + 1
                self.forwards += 1
                self._fwd = nxt
                return False
        if Q == 1 and past > 0:
            # decoding: the segmenters take this token later, at the first SMI layer or at the end of the forward
            self._unfed = ids_h
            fires = [[] for _ in range(B)]
        else:
            fires = self._feed(ids_h, spans)
        self._total = past + Q
        self.forwards += 1
        self._fwd = self._build(past, Q, fires, new_pad)
        return fresh

    def _start(self, host: np.ndarray, Q: int, masked: bool, kernel_keys: bool) -> None:
        rows = []
        for b in range(host.shape[0]):
            if not masked:
                lo, hi = 0, Q
            else:
                m = host[b, Q:] != 0
                n = int(m.sum())
                lo = int(np.argmax(m)) if n else Q
                hi = lo + n
                if n and not m[lo:hi].all():
                    raise StepscopeError("StepFlow needs each row's real tokens to be contiguous "
                                         "(left or right padding)")
            tr = RowTracker(Segmenter(self.tokenizer, self.format, tokbytes=self._tokbytes), lo,
                            self.settings.smi_window)
            tr.hi = hi
            rows.append(tr)
        self._rows = rows
        self._batch = list(rows)
        self.rows_started += len(rows)
        self.saw_rows = True
        self._keys = KeyState(len(rows), self.device, max(256, 2 * Q), with_seg=kernel_keys)

    def _feed(self, ids_h: np.ndarray, spans: list[tuple[int, int]]) -> list[list[Fire]]:
        """Feed each row's new real tokens (columns spans[b] of ids_h) to its segmenter; its SMI fires."""
        fires = []
        for b, tr in enumerate(self._rows):
            a, e = spans[b]
            if e > a:
                had = tr.saw_thinking
                fires.append(tr.feed(ids_h[b, a:e].tolist()))
                self.tokens += e - a
                if tr.saw_thinking and not had:
                    self.rows_with_thinking += 1
                    self.saw_thinking = True
            else:
                fires.append([])
        return fires

    def feed_pending(self) -> None:
        """Feed the decoding token held back and add its SMI fires to the forward's state (nothing held: no-op)."""
        if self._unfed is None:
            return
        ids_h, self._unfed = self._unfed, None
        fires = self._feed(ids_h, [(0, 1)] * len(self._rows))
        if any(fires):
            self._fwd.add_fires(self._rows, fires)

    def prepare_next(self) -> None:
        """After a forward with a cache: build the state of a decoding step right after it (most likely next),
        while the device still computes this one."""
        if self._rows is not None and self._fwd is not None:
            self._next = self._build(self._total, 1, [[] for _ in self._rows], None, hi=self._total + 1)

    def _build(self, past: int, Q: int, fires: list, new_pad: np.ndarray | None, hi: int | None = None
               ) -> ForwardState:
        """The device state of a forward of Q new tokens per row after `past`; hi: every row's kv end after it
        (None: each row's own)."""
        return build_forward_state(self._rows, self._keys, past, Q, fires, new_pad, self.device, self.settings,
                                   hi=hi)

    def select(self, keep: list[int], keep_dev: torch.Tensor) -> None:
        """Keep only these current rows, in this order (the sequence axis, and so each row's offsets, stay)."""
        if self._rows is None:
            raise StepscopeError("select_rows: StepFlow has no rows yet")
        if any(not 0 <= i < len(self._rows) for i in keep):
            raise StepscopeError(f"select_rows: row index out of range 0..{len(self._rows) - 1}")
        self.feed_pending()
        self._next = None
        self._rows = [self._rows[i] for i in keep]
        self._keys.select(keep_dev)
        self._fwd = None
