"""StepFlow's per-request counts from a vLLM engine's workers, as the transformers path's `StepFlowStats`.

A tally is core.tally.Tally.to_json: per-layer OEB sums [L, 5] and eligible query-heads [L], SMI fires [L], and the
request's tokens, forwards and cache conflicts. Tensor-parallel ranks each hold some of the heads: their OEB sums
and eligible counts add up, while SMI fires, tokens and forwards are per position, the same on every rank.
"""

from __future__ import annotations

import numpy as np

from ...core.tally import StepFlowStats, Tally

_PER_HEAD = ("oeb", "eligible")  # summed over ranks; the rest (SMI fires, tokens, forwards) is rank 0's


def to_stats(t: dict) -> StepFlowStats:
    """One merged tally (core.tally.Tally.to_json) -> StepFlowStats (means over eligible query-heads)."""
    return Tally.from_json(t).to_stats()


def merge_rank_tallies(tallies: list[dict]) -> dict:
    """One request's (or key's) tallies from its tensor-parallel ranks, rank 0 first -> one tally."""
    t = dict(tallies[0])
    for name in _PER_HEAD:
        t[name] = np.sum([np.asarray(r[name]) for r in tallies], axis=0)
    return t


def merge_ranks(ranks: list[dict]) -> dict[str, StepFlowStats]:
    """Per-rank tallies (key -> Tally json), rank 0 first -> key -> StepFlowStats."""
    out = {}
    for key in ranks[0]:
        out[key] = to_stats(merge_rank_tallies([r[key] for r in ranks if key in r]))
    return out
