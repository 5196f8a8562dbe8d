"""StepFlow's named stats tally: the five OEB columns, the per-layer `Tally` every engine fills, and `StepFlowStats`,
what a reader gets back.

Per OEB layer, summed over the eligible (query, head) pairs: `COLUMNS` = fired, p(B) and p(S) before, p(B) and
p(S) after; with the number of eligible pairs; per SMI layer the fires. `tally_part` builds the five columns of
any set of pairs; `Tally` holds one run's (or one request's) sums on the host; `StepFlowStats` turns sums into
counts and means.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import StepscopeError

COLUMNS = ("fired", "bridge_before", "segment_before", "bridge_after", "segment_after")


def tally_part(fired: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The five columns of a set of (query, head) pairs: fired [...] (bool or float), masses before and after
    [..., 2] = (p(B), p(S)) -> [..., 5] in the masses' dtype."""
    return torch.cat([fired.to(before.dtype)[..., None], before, after], -1)


class Tally:
    """Sums per model layer: OEB columns [L, 5] over eligible query-heads, eligible query-heads [L], SMI fires
    [L], and for each other repair (core/interventions.py) the queries it changed [L] on its layers `extra_layers`;
    and tokens fed, forwards, prefix-cache conflicts (vLLM)."""

    def __init__(self, num_layers: int, oeb_layers: list[int], smi_layers: list[int],
                 extra_layers: dict[str, list[int]] | None = None):
        self.oeb_layers, self.smi_layers = list(oeb_layers), list(smi_layers)
        self.extra_layers = {k: list(v) for k, v in (extra_layers or {}).items()}
        self.oeb = np.zeros((num_layers, len(COLUMNS)))
        self.eligible = np.zeros(num_layers, dtype=np.int64)
        self.smi = np.zeros(num_layers, dtype=np.int64)
        self.extra = {k: np.zeros(num_layers, dtype=np.int64) for k in self.extra_layers}
        self.tokens = self.forwards = self.cache_conflicts = 0

    def to_json(self) -> dict:
        d = {"oeb_layers": self.oeb_layers, "smi_layers": self.smi_layers, "oeb": self.oeb.tolist(),
             "eligible": self.eligible.tolist(), "smi": self.smi.tolist(), "tokens": self.tokens,
             "forwards": self.forwards, "cache_conflicts": self.cache_conflicts}
        if self.extra:
            d["extra"] = {k: {"layers": self.extra_layers[k], "counts": v.tolist()} for k, v in self.extra.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> Tally:
        extra = d.get("extra") or {}
        t = cls(len(d["eligible"]), d["oeb_layers"], d["smi_layers"], {k: v["layers"] for k, v in extra.items()})
        t.oeb, t.eligible, t.smi = np.asarray(d["oeb"]), np.asarray(d["eligible"]), np.asarray(d["smi"])
        t.extra = {k: np.asarray(v["counts"], dtype=np.int64) for k, v in extra.items()}
        t.tokens, t.forwards, t.cache_conflicts = d["tokens"], d["forwards"], d.get("cache_conflicts", 0)
        return t

    def add(self, other: Tally) -> None:
        """Add another tally's counts (the same layers)."""
        self.oeb += other.oeb
        self.eligible += other.eligible
        self.smi += other.smi
        for k, v in other.extra.items():
            if k not in self.extra:
                self.extra_layers[k] = list(other.extra_layers[k])
                self.extra[k] = np.zeros_like(v)
            self.extra[k] += v
        self.tokens += other.tokens
        self.forwards += other.forwards
        self.cache_conflicts += other.cache_conflicts

    def copy_empty(self) -> Tally:
        """A tally of zeros over the same layers."""
        return Tally(len(self.eligible), self.oeb_layers, self.smi_layers, self.extra_layers)

    def to_stats(self, rows: int = 0, rows_with_thinking: int = 0) -> StepFlowStats:
        return StepFlowStats.from_sums(self.oeb_layers, self.smi_layers, self.oeb, self.eligible, self.smi,
                                       self.forwards, self.tokens, rows, rows_with_thinking,
                                       extra={k: (self.extra_layers[k], v) for k, v in self.extra.items()})


@dataclass
class StepFlowStats:
    """How often StepFlow acted, per band layer.

    OEB counts are over (query, head) pairs: `oeb_eligible` pairs had a query in thinking or summary and a
    non-empty bridge; `oeb_fires` of them were below tau_B and got projected. `bridge_mass_before/after` are
    the mean bridge probability p(B) over eligible pairs before and after OEB, `group_mass_before/after` the
    same for the query's own group S (O keeps its mass). `smi_fires` counts the query
    positions that received step momentum. `tokens`: real tokens fed to the segmenters. `rows`: batch rows
    StepFlow followed, `rows_with_thinking` of them reached a thinking segment (0 of several: the trace format
    or the prompt does not match the model, and StepFlow had nothing to act on). `interventions`: for each other
    repair the config ran (core/interventions.py), the queries it changed per layer of its own.
    """

    oeb_layers: list[int]
    smi_layers: list[int]
    oeb_fires: dict[int, int]
    oeb_eligible: dict[int, int]
    bridge_mass_before: dict[int, float]
    bridge_mass_after: dict[int, float]
    group_mass_before: dict[int, float]
    group_mass_after: dict[int, float]
    smi_fires: dict[int, int]
    forwards: int
    tokens: int
    rows: int = 0
    rows_with_thinking: int = 0
    interventions: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def total_oeb_fires(self) -> int:
        return sum(self.oeb_fires.values())

    @property
    def total_smi_fires(self) -> int:
        return sum(self.smi_fires.values())

    PER_LAYER = ("oeb_fires", "oeb_eligible", "bridge_mass_before", "bridge_mass_after", "group_mass_before",
                 "group_mass_after", "smi_fires")

    def to_json(self) -> dict:
        """The stats as JSON (a trace's meta "stepflow_stats"). The per-layer fields stay objects keyed by
        layer index, and JSON keys are strings: `{"0": 12, "1": 9}`; `from_json` turns them back into ints."""
        d = dataclasses.asdict(self)
        for k in self.PER_LAYER:
            d[k] = {str(i): v for i, v in d[k].items()}
        if self.interventions:
            d["interventions"] = {k: {str(i): v for i, v in c.items()} for k, c in self.interventions.items()}
        else:  # OEB and SMI alone: the JSON traces always held
            del d["interventions"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> StepFlowStats:
        """The stats of `to_json` (or of a trace's meta), the per-layer fields keyed by int layer index again."""
        try:
            fields = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
            for k in cls.PER_LAYER:
                fields[k] = {int(i): v for i, v in fields[k].items()}
            fields["interventions"] = {k: {int(i): int(v) for i, v in c.items()}
                                       for k, c in (fields.get("interventions") or {}).items()}
            return cls(**fields)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StepscopeError(f"not StepFlow stats ({type(e).__name__}: {e})") from None

    @classmethod
    def from_sums(cls, oeb_layers, smi_layers, sums, eligible, smi_fires, forwards: int, tokens: int, rows: int = 0,
                  rows_with_thinking: int = 0, extra: dict | None = None) -> StepFlowStats:
        """The stats of per-layer tallies: sums [L, 5] over eligible query-heads (fired, p(B), p(S) before, p(B),
        p(S) after), eligible [L] (query-heads), smi_fires [L]; masses become means over the eligible pairs.
        extra: {name: (its layers, counts [L])} of the other repairs."""
        s, n = np.asarray(sums, dtype=np.float64), np.asarray(eligible)

        def mean(col: int) -> dict[int, float]:
            return {i: float(s[i, col] / n[i]) if n[i] else 0.0 for i in oeb_layers}

        return cls(list(oeb_layers), list(smi_layers), {i: int(round(s[i, 0])) for i in oeb_layers},
                   {i: int(n[i]) for i in oeb_layers}, mean(1), mean(3), mean(2), mean(4),
                   {i: int(smi_fires[i]) for i in smi_layers}, int(forwards), int(tokens), int(rows),
                   int(rows_with_thinking),
                   {k: {i: int(c[i]) for i in layers} for k, (layers, c) in (extra or {}).items()})

    def summary(self) -> str:
        lines = [f"StepFlow: {self.forwards} forwards, {self.tokens} tokens"]
        if self.rows and not self.rows_with_thinking:
            lines.append(f"  no thinking segment in any of {self.rows} rows: OEB and SMI had nothing to act on")
        for i in self.oeb_layers:
            e = self.oeb_eligible[i]
            rate = self.oeb_fires[i] / e if e else 0.0
            lines.append(f"  OEB layer {i:>3}: fired {self.oeb_fires[i]:>9} of {e:>9} query-heads ({rate:6.1%}), "
                         f"bridge mass {self.bridge_mass_before[i]:.4f} -> {self.bridge_mass_after[i]:.4f}")
        for i in self.smi_layers:
            lines.append(f"  SMI layer {i:>3}: fired {self.smi_fires[i]:>9} times")
        for name, counts in self.interventions.items():
            for i, n in counts.items():
                lines.append(f"  {name} layer {i:>3}: changed {n:>9} queries")
        return "\n".join(lines)
