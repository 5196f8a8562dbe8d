"""SaliencyResult: the step-to-step saliency maps of one trace, their metadata, and safe save/load of its folder.

On disk a result is a folder written atomically (a temporary folder, then a rename):
`maps.safetensors` (tensor "maps" float32 [L, S, S], and "head_maps" [L, H, S, S] when per-head maps were
asked for), `trace.json` (the Trace, as Trace.save writes it) and `meta.json`. `load_result` reads one back;
`find_results` expands the folders a command is given (result folders, or folders of them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import StepscopeError
from ..io import atomic_dir, read_text_file
from ..layers import layer_bands
from ..trace import Trace

MAPS_FILE = "maps.safetensors"
TRACE_FILE = "trace.json"
META_FILE = "meta.json"


@dataclass
class SaliencyResult:
    """Step maps of one trace.

    `maps[l, i, j]` (float32 [L, S, S]): saliency flowing from key step j into query step i at the l-th computed
    layer (model layer `meta["layers"][l]`); with pool "mean" the mean of I over the |i|*|j| token pairs (pairs
    the causal mask hides count as zero), with pool "sum" their total. `head_maps` (float32 [L, H, S, S] or None):
    the same per head, pooled the same way, so that `maps == head_maps.mean(1)`.
    """

    maps: torch.Tensor
    trace: Trace
    meta: dict = field(default_factory=dict)
    head_maps: torch.Tensor | None = None

    # -- views ---------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return int(self.maps.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.maps.shape[-1])

    @property
    def layers(self) -> list[int]:
        """The model layer index of each map."""
        return list(self.meta.get("layers", range(self.num_layers)))

    def normalized(self) -> torch.Tensor:
        """Row-normalized maps N[l, i, :] = M[l, i, :] / sum_j M[l, i, j] (a row summing to zero stays zero)."""
        total = self.maps.sum(dim=-1, keepdim=True)
        return torch.where(total > 0, self.maps / torch.where(total > 0, total, torch.ones_like(total)),
                           torch.zeros_like(self.maps))

    def layer_groups(self) -> dict[str, list[int]]:
        """Indices into `maps` of the shallow and deep layer bands of the model (`stepscope.layers.layer_bands`).

        With all layers computed that is shallow = [0, L//4) and deep = [L - L//4, L), at least one layer each.
        When only some layers were computed, each group keeps the computed layers that fall in it (maybe none).
        """
        bands = layer_bands(int(self.meta.get("num_layers", self.num_layers)))
        return {name: [i for i, layer in enumerate(self.layers) if layer in bands[name]]
                for name in ("shallow", "deep")}

    def __repr__(self) -> str:
        return (f"SaliencyResult(layers={self.num_layers}, steps={self.num_steps}, tokens={len(self.trace)}, "
                f"pool={self.meta.get('pool')!r}, loss={self.meta.get('loss')!r}, "
                f"method={self.meta.get('method')!r}, model={self.meta.get('model')!r})")

    # -- files ---------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result folder `path` atomically (an existing folder is replaced only once complete)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"maps": self.maps.detach().to(torch.float32).cpu().contiguous()}
        if self.head_maps is not None:
            tensors["head_maps"] = self.head_maps.detach().to(torch.float32).cpu().contiguous()
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / MAPS_FILE), metadata={"format": "stepscope-saliency"})
            (tmp / TRACE_FILE).write_text(json.dumps(self.trace.to_json(), ensure_ascii=False), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SaliencyResult:
        """Read a folder written by `save`; a clear error when a file is missing or inconsistent."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_dir():
            raise StepscopeError(f"{path}: no such saliency folder")
        for name in (MAPS_FILE, TRACE_FILE, META_FILE):
            if not (path / name).is_file():
                raise StepscopeError(f"{path}: {name} is missing (not a saliency result folder)")
        try:
            tensors = load_file(str(path / MAPS_FILE))
        except (SafetensorError, OSError) as e:
            raise StepscopeError(f"{path / MAPS_FILE}: cannot read ({e})") from None
        if "maps" not in tensors:
            raise StepscopeError(f"{path / MAPS_FILE}: no tensor 'maps'")
        trace = Trace.load(path / TRACE_FILE)
        try:
            meta = json.loads(read_text_file(path / META_FILE))
        except json.JSONDecodeError as e:
            raise StepscopeError(f"{path / META_FILE}: not valid JSON ({e.msg})") from None
        maps = tensors["maps"]
        if maps.ndim != 3 or maps.shape[1] != maps.shape[2] or maps.shape[1] != trace.num_steps:
            raise StepscopeError(f"{path}: maps of shape {tuple(maps.shape)} do not fit a trace of "
                                 f"{trace.num_steps} steps")
        return cls(maps=maps, trace=trace, meta=meta, head_maps=tensors.get("head_maps"))


def load_result(path: str | os.PathLike) -> SaliencyResult:
    """Read a saliency result folder (as `SaliencyResult.save` or `stepscope saliency` writes it)."""
    return SaliencyResult.load(path)


def find_results(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Result folders named by `paths`: each path is a result folder (holding maps.safetensors) or a folder of
    them (as `stepscope saliency --out DIR` writes: DIR/<trace id>/), expanded in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / MAPS_FILE).is_file():
            out.append(p)
        elif p.is_dir():
            subs = sorted(q for q in p.iterdir() if (q / MAPS_FILE).is_file())
            if not subs:
                raise StepscopeError(f"{p}: not a saliency result folder, nor a folder of them (no {MAPS_FILE})")
            out.extend(subs)
        elif p.exists():
            raise StepscopeError(f"{p} is a file, not a saliency result folder (give the folder `stepscope "
                                 "saliency --out` wrote, or a folder of them)")
        else:
            raise StepscopeError(f"{p}: no such folder")
    return out
