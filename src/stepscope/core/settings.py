"""A StepFlow config resolved for one model: the one typed record of what the engines read of it per forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .interventions import Active
from .interventions import resolve as resolve_interventions

if TYPE_CHECKING:
    from ..flow.config import StepFlowConfig


@dataclass(frozen=True)
class FlowSettings:
    """`StepFlowConfig.resolve` for a model of `num_layers` layers, with the knobs of docs/method.md §5 as the
    engines use them (floats, concrete layer sets)."""

    num_layers: int
    oeb_layers: tuple[int, ...]  # sorted; empty when OEB is off
    smi_layers: tuple[int, ...]
    tau_max: float
    alpha: float
    smi_window: int | str  # tokens, or "step"
    extra: tuple[Active, ...] = ()  # the registered repairs beside OEB and SMI (core/interventions.py), in order

    @classmethod
    def resolve(cls, config: StepFlowConfig, num_layers: int) -> FlowSettings:
        oeb, smi = config.resolve(num_layers)
        return cls(int(num_layers), tuple(oeb), tuple(smi), float(config.tau_max), float(config.alpha),
                   config.smi_window, resolve_interventions(config.interventions, num_layers))

    @property
    def oeb(self) -> frozenset[int]:
        return frozenset(self.oeb_layers)

    @property
    def smi(self) -> frozenset[int]:
        return frozenset(self.smi_layers)

    @property
    def extra_by_name(self) -> dict[str, list[int]]:
        """Each other repair's layers, sorted, by its name (what the stats tallies are kept over)."""
        return {a.name: sorted(a.layers) for a in self.extra}

    @property
    def extra_layers(self) -> frozenset[int]:
        """Layers where some repair beside OEB and SMI acts."""
        return frozenset().union(*(a.layers for a in self.extra))
