"""StepFlowConfig: every knob of StepFlow (docs/method.md §5) with the paper's defaults, and a JSON round trip.

Defaults (paper Table 8): Odds-Equal Bridge on the bottom quarter of layers `[0, L//4)`, Step Momentum
Injection on the top quarter `[L - L//4, L)` (at least one layer each), `tau_max = 0.15`, `alpha = 0.06`, and
an SMI window of the last 4 tokens of the step just completed (`smi_window="step"`: the whole step).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..core.interventions import normalize as normalize_interventions
from ..errors import StepscopeError
from ..formats import FORMATS, Format
from ..io import config_fields
from ..layers import layer_bands, resolve_layers


@dataclass
class StepFlowConfig:
    """StepFlow settings.

    `oeb_layers` / `smi_layers`: layer indices (negative ones count from the end), or None for the default
    bands. `fmt` / `markers` tell the step segmenter how thinking is marked ("auto" reads the tokenizer's chat
    template). `collect_stats` accumulates firing counts and bridge masses on the device (a few tiny ops per
    band layer); turn it off for the last bit of speed. `interventions`: registered repairs to run beside OEB and
    SMI, by name, each with its settings (`{"name": {"layers": [...], "param": value}}`; docs/extending.md);
    stored with every parameter's value spelled out.
    """

    oeb_layers: list[int] | None = None
    smi_layers: list[int] | None = None
    tau_max: float = 0.15
    alpha: float = 0.06
    smi_window: int | str = 4
    oeb: bool = True
    smi: bool = True
    fmt: str | Format = "auto"
    markers: tuple[str, str] | None = None
    collect_stats: bool = True
    interventions: dict[str, dict] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.fmt, Format):  # keep the config JSON-able: a registered format by its name, another
            if FORMATS.get(self.fmt.name) == self.fmt:  # Format by its markers
                self.fmt = self.fmt.name
            else:
                self.markers, self.fmt = (self.fmt.think_start, self.fmt.think_end), "markers"
        if self.fmt not in ("auto", *FORMATS, "markers"):
            raise StepscopeError(f"fmt must be auto, {', '.join(FORMATS)} or markers, got {self.fmt!r}")
        if self.markers is not None:
            if len(self.markers) != 2 or not all(isinstance(m, str) and m for m in self.markers):
                raise StepscopeError("markers must be two non-empty strings (start, end)")
            self.markers = (self.markers[0], self.markers[1])
        for name in ("oeb_layers", "smi_layers"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                    raise StepscopeError(f"{name} must be a list of layer indices, got {v!r}")
                setattr(self, name, [int(i) for i in v])
        if not isinstance(self.tau_max, (int, float)) or not math.isfinite(self.tau_max) \
                or not 0.0 <= self.tau_max < 1.0:
            raise StepscopeError(f"tau_max must be in [0, 1), got {self.tau_max!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise StepscopeError(f"alpha must be a finite number, got {self.alpha!r}")
        w = self.smi_window
        if isinstance(w, str) and w.isdigit():
            w = int(w)
        if isinstance(w, bool) or not (w == "step" or (isinstance(w, int) and w >= 1)):
            raise StepscopeError(f"smi_window must be a positive integer or 'step', got {self.smi_window!r}")
        self.smi_window = w
        self.interventions = normalize_interventions(self.interventions)

    # -- layers ---------------------------------------------------------------------------------------------

    def resolve(self, num_layers: int) -> tuple[list[int], list[int]]:
        """(oeb_layers, smi_layers) as sorted concrete indices for a model of `num_layers` layers.

        A band that is switched off (`oeb=False` / `smi=False`) or given as an empty list is empty; None is the
        default band (`stepscope.layers.layer_bands`: the shallow quarter for OEB, the deep quarter for SMI).
        """
        bands = layer_bands(num_layers)

        def pick(given: list[int] | None, band: str, name: str) -> list[int]:
            if given is not None and not given:
                return []
            return resolve_layers(given, num_layers, what=name, default=bands[band])

        oeb = pick(self.oeb_layers, "shallow", "oeb_layers") if self.oeb else []
        smi = pick(self.smi_layers, "deep", "smi_layers") if self.smi else []
        return oeb, smi

    # -- JSON -----------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        d = asdict(self)
        d["markers"] = list(self.markers) if self.markers else None
        if d["interventions"] is None:  # a config of OEB and SMI alone keeps the JSON (and salts) it always had
            del d["interventions"]
        return d

    @classmethod
    def from_json(cls, d: dict | str) -> StepFlowConfig:
        d = config_fields(d, cls, "StepFlow config")
        if d.get("markers") is not None:
            d["markers"] = tuple(d["markers"])
        return cls(**d)

    @classmethod
    def load(cls, path) -> StepFlowConfig:
        """Read a config file (the JSON of `to_json`, as `stepscope calibrate --out` writes it); a one-line error
        naming the file when it is missing or not a StepFlow config."""
        from ..io import read_text_file

        text = read_text_file(path)
        try:
            return cls.from_json(text)
        except StepscopeError as e:
            raise StepscopeError(f"{path}: {e}") from None
