"""StepFlow's per-request counts from a vLLM engine's workers, as the transformers path's `StepFlowStats`."""

from __future__ import annotations

import numpy as np

from ..flow import StepFlowStats


def to_stats(t: dict) -> StepFlowStats:
    """One merged tally (worker.Tally.to_json) -> StepFlowStats (means over eligible query-heads)."""
    return StepFlowStats.from_sums(t["oeb_layers"], t["smi_layers"], t["oeb"], t["eligible"], t["smi"],
                                   t["forwards"], t["tokens"])


def merge_ranks(ranks: list[dict]) -> dict[str, StepFlowStats]:
    """Per-rank tallies (key -> Tally json) -> key -> StepFlowStats. Every rank holds some of the heads: OEB sums
    and eligible counts add up; SMI fires, tokens and forwards are per position, the same on every rank."""
    out = {}
    for key, first in ranks[0].items():
        t = dict(first)
        t["oeb"] = np.asarray(first["oeb"])
        t["eligible"] = np.asarray(first["eligible"])
        for r in ranks[1:]:
            if key in r:
                t["oeb"] = t["oeb"] + np.asarray(r[key]["oeb"])
                t["eligible"] = t["eligible"] + np.asarray(r[key]["eligible"])
        out[key] = to_stats(t)
    return out
