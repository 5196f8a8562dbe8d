"""The one kernel policy: when a fused Triton kernel replaces StepFlow's PyTorch form, in every engine.

`KernelPolicy(mode)`, one per StepFlow context (transformers) or per vLLM worker process:
- "torch": always the PyTorch form;
- "triton": the kernel wherever a caller offers it; its errors propagate;
- "auto" (default; `$STEPSCOPE_FLOW_KERNEL` sets another): the kernel where it can run (CUDA with triton; with
  `off_cuda`, also Triton's interpreter on a CPU, TRITON_INTERPRET=1), checked at its first use against the
  PyTorch form on the same inputs (`check`) and dropped for the rest of the policy's life, with a warning, if it
  fails or disagrees.

`run(kernel, reference)` is the whole policy for an engine that has one kernel call per layer (vLLM's paged
decoding rows). The transformers engine's `flow.decode_path.DecodePath` is a KernelPolicy that also retries the
kernel's broadcast form and times the kernel's launch variants against the PyTorch form per set of shapes
(tuning: `time_paths`, `PathChoice`). `kernel_calls` counts the kernel's successful calls, `dropped` says why
the kernel was dropped (None while it is in use): tests assert which path ran.

The first-use check compares with the PyTorch form computed in float32 (so that bf16 rounding in that form does
not count against the kernel, which works in float32): within 1e-4 of the output's largest magnitude for float32
inputs, 1e-2 for bf16/fp16 (the rounding of the output itself).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..errors import StepscopeError
from . import kernels

MODES = ("auto", "triton", "torch")
Timer = Callable[[dict[str, Callable[[], object]], torch.device], dict[str, float]]


class PathChoice(NamedTuple):
    """kernel="auto": the decoding path an OEB layer uses for one set of shapes, the fastest by the timer."""

    path: str  # "triton" or "torch"
    block_k: int | None  # the kernel's launch parameters (None for "torch")
    num_warps: int | None
    times_us: dict  # every candidate that passed its check -> median µs per call


def path_key(query: torch.Tensor, key: torch.Tensor, sinks) -> tuple:
    """The shapes a decoding-path choice holds for: batch, heads, kv heads, head dim, dtype, sinks, and the
    number of keys by octave (the choice is timed again at 1,024, 2,048, 4,096 ... keys)."""
    B, H, _, D = query.shape
    return B, H, key.shape[1], D, query.dtype, sinks is not None, int(key.shape[2]).bit_length()


def time_paths(runs: dict[str, Callable[[], object]], device: torch.device, reps: int = 5, rounds: int = 3
               ) -> dict[str, float]:
    """Median wall-clock µs per call of each function: one untimed call each (compilation), then `rounds`
    interleaved rounds of `reps` back-to-back calls, the device synchronized around each batch of calls. Wall
    time, so that a path's host launch overhead counts as much as its device time."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for fn in runs.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / reps * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def check(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when the kernel's output is within tolerance of the PyTorch path's float32 output, else why not."""
    tol = (1e-4 if out.dtype == torch.float32 else 1e-2) * max(1.0, ref.abs().max().item())
    err = (out.float() - ref.float()).abs().max().item()
    if not err <= tol:
        return f"the fused decoding kernel differs from the PyTorch path by {err:.3g} (tolerance {tol:.3g})"
    return None


def default_mode() -> str:
    """The mode when a caller gives none: `$STEPSCOPE_FLOW_KERNEL`, else "auto"."""
    return os.environ.get("STEPSCOPE_FLOW_KERNEL") or "auto"


class KernelPolicy:
    """Mode, first-use check and fallback of a fused kernel (see the module docstring)."""

    def __init__(self, mode: str | None = None, *, off_cuda: bool = False):
        mode = mode or default_mode()
        if mode not in MODES:
            raise StepscopeError(f"kernel must be auto, triton or torch, got {mode!r}")
        self.mode = mode
        self.off_cuda = off_cuda
        self.uses_kernel = mode == "triton"  # calls go to the kernel (set by `attach` for auto)
        self.checked = mode != "auto"  # the kernel passed the first-use check (or needs none)
        self.dot = kernels.USE_DOT  # the kernel's product form; False after the tl.dot form failed here
        self.kernel_calls = 0
        self.dropped: str | None = None
        self.device: torch.device | None = None  # set by `attach`

    def attach(self, device: torch.device) -> KernelPolicy:
        """Bind to the device the tensors live on: "triton" needs the kernel to run there; "auto" decides
        whether to try it."""
        self.device = torch.device(device)
        ok = kernels.available(device)
        if self.mode == "triton" and not ok:
            raise StepscopeError(f"kernel='triton' needs triton and a CUDA device; the model is on {device}")
        if self.mode == "auto":
            self.uses_kernel = ok and (torch.device(device).type == "cuda" or self.off_cuda)
        return self

    def drop(self, why: str, stacklevel: int = 3) -> None:
        """Stop using the kernel, with a warning saying why."""
        warnings.warn(f"StepFlow: {why}; using the PyTorch path for the rest of this StepFlow", RuntimeWarning,
                      stacklevel=stacklevel)
        self.uses_kernel = False
        self.dropped = why

    def run(self, kernel: Callable[[], object], reference: Callable[[], torch.Tensor],
            output: Callable[[object], torch.Tensor] = lambda r: r) -> object | None:
        """The kernel's result, or None when the PyTorch form must run (the kernel is not in use, or was just
        dropped). At the first call under "auto", `output(result)` is checked against `reference()` (the
        PyTorch form's output in float32)."""
        if not self.uses_kernel:
            return None
        try:
            got = kernel()
            why = None
        except Exception as e:  # noqa: BLE001 - any failure of an optional kernel means: use the PyTorch form
            if self.mode == "triton":
                raise
            why = f"the fused decoding kernel failed ({type(e).__name__}: {str(e)[:200]})"
        if why is None and not self.checked:
            why = check(output(got), reference())
        if why is not None:
            self.drop(why, stacklevel=4)
            return None
        self.checked = True
        self.kernel_calls += 1
        return got
