"""How an OEB layer of the transformers engine runs a decoding step (one query per row): the fused Triton kernel
or the PyTorch path, under the core's kernel policy (core/kernel_policy.py) plus tuning.

`DecodePath(mode)`:
- "torch": always the PyTorch path (flow/oeb.py);
- "triton": the kernel as planned (core/kernels.py); its errors propagate;
- "auto": the kernel where it is a candidate (on CUDA when triton imports), checked once against the PyTorch
  path on the first decoding step and dropped, with a warning, if it fails or disagrees; then, for each new set
  of shapes (`path_key`: batch, heads, keys by octave), the kernel's launch variants and the PyTorch path are
  timed on the real inputs (`timer`, default `time_paths`) and the fastest decodes from then on
  (`choices()` lists them).

The first-step check compares with the PyTorch path on the same inputs upcast to float32 (so that bf16 rounding
of the scores in that path does not count against the kernel, which works in float32): within 1e-4 of the
output's largest magnitude for float32 inputs, 1e-2 for bf16/fp16 (the rounding of the output itself).
GPT-OSS's sink layers are compared with the PyTorch block path. A mismatch or an error (e.g. a Triton that
cannot compile it) of the tl.dot form first retries the broadcast form of the kernel (for the rest of this
path's life); a failure of that one switches to the PyTorch path.

Timing makes "auto"'s choice, and so the last bits of bf16 rounding, depend on the machine: pin "triton" or
"torch" for runs that must repeat bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import kernels
from ..core.kernel_policy import KernelPolicy, PathChoice, Timer, check, path_key, time_paths
from .oeb import oeb_attention
from .state import OebGeometry

__all__ = ["DecodePath", "KernelStep", "time_paths"]


@dataclass
class KernelStep:
    """The kernel's bookkeeping of one forward, shared by its OEB layers (kept in the layer geometry)."""

    tau: torch.Tensor  # float32 [B]: tau_B of each row's query
    choice: PathChoice | None  # the path timed for these shapes; None: none (pinned mode, or not timed yet)
    time_it: bool  # time the paths at this forward's first successful kernel call
    plan: kernels.DecodePlan | None = None  # checked and planned once per forward: the OEB layers share shapes
    stats: torch.Tensor | None = None  # float32 [n_oeb, B, H, 5], zeros where a layer did not run the kernel
    parts: tuple = ()  # stats[i] of each OEB layer i
    layers: list[int] = field(default_factory=list)  # the OEB layers that wrote their stats


class DecodePath(KernelPolicy):
    """The decoding path of a StepFlow's OEB layers: the core's KernelPolicy (mode, first-step check, fallback)
    with the transformers engine's retry of the broadcast form and its timed choice.

    `DecodePath(mode="auto", *, timer=time_paths, tune=True, off_cuda=False)`: `timer(runs, device)` returns
    the median µs per call of each named candidate; `tune=False` keeps "auto" to the first-step check (no
    timing). "auto" tries the kernel on CUDA when triton imports; `off_cuda=True` also where Triton runs
    without CUDA (its interpreter on a CPU, TRITON_INTERPRET=1), as the tests do.
    """

    def __init__(self, mode: str = "auto", *, timer: Timer | None = None, tune: bool = True,
                 off_cuda: bool = False):
        super().__init__(mode, off_cuda=off_cuda)
        self.timer = timer or time_paths
        self.tune = tune and mode == "auto"
        self._choices: dict[tuple, PathChoice] = {}

    def choices(self) -> list[dict]:
        """kernel="auto": how the OEB layers decode, per set of shapes timed so far. Each entry: batch, heads,
        kv_heads, head_dim, dtype, sinks, keys (the range of key counts it holds for), path ("triton" or
        "torch"), block_k and num_warps (the kernel's), and times_us (median µs per call of each candidate)."""
        out = []
        for (B, H, Hkv, D, dtype, sinks, octave), c in self._choices.items():
            out.append({"batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "dtype": str(dtype).split(".")[-1],
                        "sinks": sinks, "keys": [1 << (octave - 1), (1 << octave) - 1], "path": c.path,
                        "block_k": c.block_k, "num_warps": c.num_warps,
                        "times_us": {k: round(v, 2) for k, v in c.times_us.items()}})
        return out

    # -- one OEB layer's decoding step -------------------------------------------------------------------------

    def decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geo: OebGeometry,
               scaling: float, sinks: torch.Tensor | None, layer: int, stats=None) -> torch.Tensor | None:
        """The layer's output [B, 1, H, Dv] by the kernel, or None when the PyTorch path must run it (the
        timed choice, or the kernel was just dropped). `stats`: the FlowStats recorder, or None."""
        H = query.shape[1]
        qt = geo.qt
        kseg = geo.decode.kseg
        step = geo.decode.kernel
        if step is None:  # the first OEB layer of this forward
            step = geo.decode.kernel = self._start(query, key, sinks, qt, stats)
        if step.choice is not None and step.choice.path == "torch":
            return None
        part = step.parts[stats.slot(layer)] if step.parts else None
        while True:
            try:
                plan = step.plan
                if plan is None or plan.H != H:
                    over = {} if step.choice is None else {"block_k": step.choice.block_k,
                                                           "num_warps": step.choice.num_warps}
                    plan = step.plan = kernels.plan_decode(query, key, value, kseg, qt.qgroups, step.tau, sinks,
                                                           part, dot=self.dot, **over)
                out = kernels.oeb_decode(query, key, value, kseg, qt.qgroups, step.tau, scaling, sinks, part,
                                         plan=plan)
                why = None
            except Exception as e:  # noqa: BLE001 - any failure of an optional kernel means: use another path
                if self.mode == "triton" and not (step.plan is not None and step.plan.dot):
                    raise
                why = f"the fused decoding kernel failed ({type(e).__name__}: {str(e)[:200]})"
            if why is None and not self.checked:  # first use under "auto": check it against PyTorch's
                why = check(out, _reference(query, key, value, geo, scaling, sinks))
            if why is None:
                self.checked = True
                self.kernel_calls += 1
                break
            if step.plan is not None and step.plan.dot:  # the tl.dot form failed here: the broadcast form, once
                self.dot = False
                step.plan = None
                continue
            self.drop(why, stacklevel=6)
            return None
        if step.time_it:  # "auto", shapes not timed yet
            step.time_it = False
            step.choice = self._choices[path_key(query, key, sinks)] = self._tune(query, key, value, geo, scaling,
                                                                                  sinks, plan)
            if step.choice.path == "torch":
                if part is not None:
                    part.zero_()  # this layer's stats come from the PyTorch path
                return None
            step.plan = None  # the next OEB layer plans the chosen variant
        if part is not None:
            step.layers.append(layer)  # counted (eligible pairs, stats) at the next flush
        return out

    def _start(self, query: torch.Tensor, key: torch.Tensor, sinks, qt, stats) -> KernelStep:
        """A forward's kernel bookkeeping: the rows' targets as [B], the timed choice for these shapes, and one
        zeroed stats buffer for every OEB layer (a layer that does not run the kernel keeps zeros), reduced
        with the other forwards' at the next flush."""
        B, H = query.shape[0], query.shape[1]
        choice = self._choices.get(path_key(query, key, sinks)) if self.tune else None
        capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()  # no timing inside a capture
        step = KernelStep(qt.tau_b.view(B), choice, self.tune and choice is None and not capturing)
        if stats is not None:
            step.stats = torch.zeros(len(stats.oeb_layers), B, H, 5, dtype=torch.float32, device=query.device)
            step.parts = step.stats.unbind(0)
            stats.add_kernel_step(step.stats, step.layers, qt, H)
        return step

    def _tune(self, query, key, value, geo: OebGeometry, scaling: float, sinks, plan) -> PathChoice:
        """Time the kernel as planned, two more launch variants of its tl.dot form (twice the warps; half or, at
        the smallest block, twice the keys per block), and the PyTorch path, on this layer's inputs; return the
        fastest. A variant that fails or differs from the PyTorch path (`check`) is left out. Nothing here
        writes stats."""
        qt, tau, kseg = geo.qt, geo.decode.kernel.tau, geo.decode.kseg
        ref = _reference(query, key, value, geo, scaling, sinks)
        variants = [(plan.BK, plan.num_warps)]
        if plan.dot:
            variants += [(plan.BK, 8 if plan.num_warps < 8 else 4),
                         (plan.BK // 2 if plan.BK > 16 else 32, plan.num_warps)]
        runs, params = {}, {}
        for bk, warps in variants:
            name = f"triton bk{bk} w{warps}" + ("" if plan.dot else " broadcast")
            try:
                p = kernels.plan_decode(query, key, value, kseg, qt.qgroups, tau, sinks, dot=plan.dot,
                                        block_k=bk, num_warps=warps)

                def run(p=p):
                    return kernels.oeb_decode(query, key, value, kseg, qt.qgroups, tau, scaling, sinks, plan=p)

                if check(run(), ref) is not None:
                    continue
            except Exception:  # noqa: BLE001 - a variant this machine cannot run is not a candidate
                continue
            runs[name], params[name] = run, (bk, warps)
        runs["torch"] = lambda: _reference(query, key, value, geo, scaling, sinks, upcast=False)
        times = self.timer(runs, query.device)
        best = min(times, key=times.get)
        if best == "torch":
            return PathChoice("torch", None, None, times)
        return PathChoice("triton", *params[best], times)


def _reference(query, key, value, geo: OebGeometry, scaling: float, sinks, upcast: bool = True) -> torch.Tensor:
    """The PyTorch path's output for the same decoding step (in float32 with `upcast`), recording no stats."""
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    return oeb_attention(query, key, value, geo, scaling, sinks, block_elems=1 << 22)
