"""One row's steps as StepFlow follows them: its incremental segmenter, its segment bounds and its SMI schedule.

Engine-free: the transformers engine keeps one per batch row (flow/rows.py), vLLM's worker one per request.

SMI schedule (segment.py): when thinking step i-1 closes and step i is thinking too, step i's momentum fires
at real index max(step_i.token_start, step_{i-1}.closed_at); the window is `smi.smi_window` of step i-1. A fire
whose position has not been fed yet stays pending in its row. Fires happen only inside the thinking.
"""

from __future__ import annotations

from ..segment import Segmenter
from .geometry import BIG
from .smi import smi_window

Fire = tuple[int, int, int]  # (real index of the query, window start, window end)


class RowTracker:
    """One row: its segmenter, its kv range, and its pending SMI fires."""

    def __init__(self, segmenter: Segmenter, lo: int, smi_window: int | str):
        self.seg = segmenter
        self.lo = lo  # kv index of real token 0
        self.hi = lo  # kv index after the last real token
        self.smi_window = smi_window
        self.pending: list[Fire] = []
        self.saw_thinking = False  # the thinking segment has started

    def feed(self, ids) -> list[Fire]:
        """Feed new real tokens; return the SMI fires that land on them: (real index, window start, end)."""
        closed = self.seg.feed(ids)
        end = self.seg.num_tokens
        th, su = self.seg.boundaries["thinking"], self.seg.boundaries["summary"]
        self.saw_thinking = th is not None
        for st in closed:
            if st.kind == "thinking" and (su is None or st.token_end < su):
                ws, we = smi_window(st.token_start, st.token_end, self.smi_window)
                self.pending.append((max(st.token_end, st.closed_at), ws, we))
        if not self.pending:
            return []
        fires, keep = [], []
        for f in self.pending:
            if f[0] >= end:
                keep.append(f)
            elif th is not None and th <= f[0] and (su is None or f[0] < su):  # only inside the thinking
                fires.append(f)
        self.pending = keep
        return fires

    def bounds(self) -> tuple[int, int]:
        """(thinking start, summary start) in kv index space; BIG where not known yet."""
        th, su = self.seg.boundaries["thinking"], self.seg.boundaries["summary"]
        return (BIG if th is None else self.lo + th), (BIG if su is None else self.lo + su)
