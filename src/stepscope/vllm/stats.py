"""StepFlow's per-request counts from a vLLM engine's workers, as the transformers path's `StepFlowStats`."""

from __future__ import annotations

import numpy as np

from ..flow import StepFlowStats


def to_stats(t: dict) -> StepFlowStats:
    """One merged tally (worker.Tally.to_json) -> StepFlowStats (means over eligible query-heads)."""
    s, n, smi = np.asarray(t["oeb"]), np.asarray(t["eligible"]), np.asarray(t["smi"])

    def mean(col: int) -> dict:
        return {i: float(s[i, col] / n[i]) if n[i] else 0.0 for i in t["oeb_layers"]}

    return StepFlowStats(
        oeb_layers=list(t["oeb_layers"]), smi_layers=list(t["smi_layers"]),
        oeb_fires={i: int(round(s[i, 0])) for i in t["oeb_layers"]},
        oeb_eligible={i: int(n[i]) for i in t["oeb_layers"]},
        bridge_mass_before=mean(1), bridge_mass_after=mean(3), group_mass_before=mean(2), group_mass_after=mean(4),
        smi_fires={i: int(smi[i]) for i in t["smi_layers"]}, forwards=int(t["forwards"]), tokens=int(t["tokens"]))


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
