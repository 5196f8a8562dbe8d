"""Repairs beside OEB and SMI: the interface a new one implements, and the one registry every engine reads.

A repair is an `Intervention`: a name, its default layers (a band), its parameters with their defaults, and
`apply`, a pure function on one layer's attention output (before the output projection) of a set of queries:

    class Damp(Intervention):
        name, title, band, params = "damp", "damping", "deep", {"gamma": 0.1}

        def apply(self, out, queries, params):  # out [N, H, D], changed in place; which queries it changed
            hit = queries.segment == 2  # summary queries
            out[hit] *= 1.0 - params["gamma"]
            return hit

    register_intervention(Damp())

Registering it is all: `StepFlowConfig(interventions={"damp": {"gamma": 0.2, "layers": [20, 21]}})` validates
it, the transformers engine (flow/attention.py) and the vLLM plugin (vllm/layer.py) run it on its layers after
OEB and SMI, its counts reach `StepFlowStats.interventions` (per layer: queries it changed), eval gets the arms
`damp` (it alone) and `stepflow+damp` (OEB, SMI and it), and the eval summary and `StepFlowStats.summary()` show
its counts. Several run in the order of their names.

A vLLM engine runs in other processes: they find a repair registered outside stepscope through the entry-point
group `stepscope.interventions` (a module that registers it when imported) or `$STEPSCOPE_INTERVENTIONS` (a
comma-separated list of such modules), both read at the first lookup in every process.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import StepscopeError
from ..layers import BANDS, layer_bands, resolve_layers
from .geometry import segment_codes

ENV = "STEPSCOPE_INTERVENTIONS"
GROUP = "stepscope.interventions"
_NAME = re.compile(r"[a-z][a-z0-9_]*")


class Queries(NamedTuple):
    """The N queries an intervention acts on in one layer (flattened over rows), on the output's device."""

    pos: torch.Tensor  # long [N]: the query's position in its sequence (0: the first prompt token)
    t0: torch.Tensor  # long [N]: its sequence's thinking start (geometry.BIG while not known yet)
    s0: torch.Tensor  # long [N]: its summary start

    @property
    def segment(self) -> torch.Tensor:
        """long [N]: 0 question, 1 thinking, 2 summary (the tokens before the query decide, as for OEB)."""
        return segment_codes(self.pos, self.t0, self.s0)


class Intervention:
    """One repair. Subclass it, set the class attributes, implement `apply`, and `register_intervention` it."""

    name: str = ""  # lower case letters, digits and '_': the config key, the arm name, the stats key
    title: str = ""  # how summaries name it
    band: str = "deep"  # its default layers: "shallow", "deep", "deep_half" or "all"
    params: Mapping[str, float] = {}  # its parameters and their defaults

    def check(self, params: Mapping[str, float]) -> None:
        """Raise StepscopeError naming a parameter whose value the repair cannot use (every value is a finite
        number already)."""

    def apply(self, out: torch.Tensor, queries: Queries, params: Mapping[str, float]) -> torch.Tensor:
        """Change `out` [N, H, D] (the attention output of the N queries, this process's heads, the model's
        dtype) in place; return bool [N]: the queries it changed (their count is its stats)."""
        raise NotImplementedError


REGISTRY: dict[str, Intervention] = {}
_plugins_loaded = False


def register_intervention(iv: Intervention) -> Intervention:
    """Add a repair to the registry: configs, both engines, eval arms and summaries see it."""
    if not isinstance(iv, Intervention):
        raise StepscopeError(f"register_intervention takes an Intervention, got {type(iv).__name__}")
    if not _NAME.fullmatch(iv.name or "") or iv.name in ("oeb", "smi", "stepflow", "baseline"):
        raise StepscopeError(f"an intervention needs a new name of lower case letters, digits and '_', "
                             f"got {iv.name!r}")
    if iv.name in REGISTRY and REGISTRY[iv.name] is not iv:
        raise StepscopeError(f"an intervention named {iv.name!r} is already registered")
    if iv.band not in (*BANDS, "all"):
        raise StepscopeError(f"intervention {iv.name!r}: band must be one of {', '.join(BANDS)}, all")
    bad = [k for k, v in iv.params.items() if k == "layers" or not _finite(v)]
    if bad:
        raise StepscopeError(f"intervention {iv.name!r}: parameter {bad[0]!r} needs a finite default "
                             "(and 'layers' is reserved)")
    REGISTRY[iv.name] = iv
    return iv


def registered() -> dict[str, Intervention]:
    """Every registered repair by name (the plugins loaded first)."""
    _load_plugins()
    return dict(sorted(REGISTRY.items()))


def get_intervention(name: str) -> Intervention:
    iv = registered().get(name)
    if iv is None:
        known = ", ".join(REGISTRY) or "none"
        raise StepscopeError(f"unknown intervention {name!r} (registered: {known}; see docs/extending.md)")
    return iv


def repair_arm(arm: str) -> tuple[Intervention, bool] | None:
    """The registered repair an eval arm names ("R": it alone, "stepflow+R": with OEB and SMI) and whether OEB and
    SMI run with it; None for any other arm name."""
    iv = registered().get(arm.removeprefix("stepflow+"))
    return None if iv is None else (iv, arm.startswith("stepflow+"))


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib
    from importlib.metadata import entry_points

    for mod in [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise StepscopeError(f"${ENV}: cannot import {mod!r} ({e})") from None
    for ep in entry_points(group=GROUP):
        ep.load()


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def normalize(spec) -> dict[str, dict] | None:
    """A config's `interventions` checked and made explicit: {name: {"layers": [...] or None, param: float}}
    with every parameter's default filled in (None or empty: None)."""
    if not spec:
        return None
    if not isinstance(spec, Mapping):
        raise StepscopeError(f"interventions must map names to their settings, got {spec!r}")
    out = {}
    for name in sorted(spec):
        iv = get_intervention(name)
        given = spec[name] if spec[name] is not None else {}
        if not isinstance(given, Mapping):
            raise StepscopeError(f"intervention {name!r}: its settings must be an object, got {given!r}")
        unknown = [k for k in given if k != "layers" and k not in iv.params]
        if unknown:
            raise StepscopeError(f"intervention {name!r} has no parameter {unknown[0]!r} (its parameters: "
                                 f"layers, {', '.join(iv.params) or 'none'})")
        layers = given.get("layers")
        if layers is not None and (isinstance(layers, (int, str)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise StepscopeError(f"intervention {name!r}: layers must be a list of layer indices, got {layers!r}")
        params = {}
        for k, default in iv.params.items():
            v = given.get(k, default)
            if not _finite(v):
                raise StepscopeError(f"intervention {name!r}: {k} must be a finite number, got {v!r}")
            params[k] = float(v)
        iv.check(params)
        out[name] = {"layers": None if layers is None else [int(i) for i in layers], **params}
    return out


@dataclass(frozen=True)
class Active:
    """A repair as one config runs it on one model: its concrete layers and parameter values."""

    iv: Intervention
    layers: frozenset[int]
    values: tuple[tuple[str, float], ...]

    @property
    def name(self) -> str:
        return self.iv.name

    @property
    def params(self) -> dict[str, float]:
        return dict(self.values)


def resolve(spec: dict[str, dict] | None, num_layers: int) -> tuple[Active, ...]:
    """The repairs of a normalized `interventions` for a model of `num_layers` layers, in the order they run."""
    out = []
    for name, settings in (normalize(spec) or {}).items():
        iv = get_intervention(name)
        given = settings["layers"]
        if given is not None and not given:
            continue
        default = range(num_layers) if iv.band == "all" else layer_bands(num_layers)[iv.band]
        layers = resolve_layers(given, num_layers, what=f"intervention {name!r} layers", default=default)
        values = tuple((k, v) for k, v in settings.items() if k != "layers")
        out.append(Active(iv, frozenset(layers), values))
    return tuple(out)


def run(active: Active, out: torch.Tensor, queries: Queries) -> torch.Tensor:
    """`active.iv.apply` with its parameters, its answer checked: bool [N]."""
    hit = active.iv.apply(out, queries, active.params)
    if not isinstance(hit, torch.Tensor) or hit.dtype != torch.bool or hit.shape != queries.pos.shape:
        raise StepscopeError(f"intervention {active.name!r}: apply must return a bool tensor of shape "
                             f"{tuple(queries.pos.shape)}")
    return hit
