"""The transformers engine's stats recorder: how often OEB and SMI acted, tallied on the device per layer and row.

`FlowStats` is the recorder the attention function writes to; it hands back the core's `StepFlowStats`
(core/tally.py, which names the five columns).

Tallies. Per band layer, summed over the eligible (query, head) pairs of OEB: fired, p(B) and p(S) before, p(B)
and p(S) after (five float64 columns on the device), and the number of eligible pairs (host); per SMI layer the
query positions that received step momentum (host). Each total is kept twice: for the whole run, and per row
of the batch the last fresh prefill started (rows keep their prefill index when others leave, `select_rows`).

The PyTorch block path adds its per-row sums at once (`add_rows`). The decoding paths leave theirs pending and
`flush` reduces the pending entries of many forwards in a dozen kernels: an entry of the PyTorch decode path
holds one layer's fire flags and masses (`add_decode`); an entry of the fused kernel holds one forward's stats
buffer for every OEB layer and the list of layers that wrote to it (`add_kernel_step`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..core.tally import StepFlowStats, tally_part

FLUSH_AFTER = 512  # pending decode entries reduced together at most


class _DecodeEntry(NamedTuple):
    """One OEB layer's decoding step on the PyTorch path, reduced at the next flush."""

    layer: int
    fire: torch.Tensor  # bool [B, H, 1]
    p_bs: torch.Tensor  # float32 [B, H, 2]: p(B), p(S)
    factors: torch.Tensor  # float32 [B, H, 2]: the multipliers of B and S (1 where it did not fire)
    tau_b: torch.Tensor  # float32 [B, 1]: 0 where the row's query is not eligible


class _KernelEntry(NamedTuple):
    """One forward's fused-kernel stats, reduced at the next flush."""

    layers: list[int]  # the OEB layers that ran the kernel (appended to while the forward runs)
    stats: torch.Tensor  # float32 [n_oeb, B, H, 5], zeros where a layer did not run the kernel
    qt: object  # state.QueryTensors: the eligible pairs of the forward's queries
    heads: int


class FlowStats:
    """The recorder: OEB and SMI tallies of every band layer, in total and per row."""

    def __init__(self, num_layers: int, oeb_layers: list[int], smi_layers: list[int], device: torch.device,
                 collect: bool = True, extra_layers: dict[str, list[int]] | None = None):
        self.num_layers = num_layers
        self.oeb_layers, self.smi_layers = list(oeb_layers), list(smi_layers)
        # the other repairs (core/interventions.py): queries changed per layer, counted on the device, always
        self.extra_layers = {k: list(v) for k, v in (extra_layers or {}).items()}
        self._extra = {k: torch.zeros(num_layers, dtype=torch.int64, device=device) for k in self.extra_layers}
        self._row_extra: dict[str, torch.Tensor] = {}  # name -> int64 [B0, L]
        self.device = device
        self.collect = collect  # OEB tallies on the device (a few tiny ops per band layer); SMI counts always
        self._slot = {layer: i for i, layer in enumerate(self.oeb_layers)}
        self._sums = torch.zeros(num_layers, 5, dtype=torch.float64, device=device) if collect else None
        self._eligible = [0] * num_layers
        self._smi = [0] * num_layers
        self._decode: list[_DecodeEntry] = []
        self._kernel: list[_KernelEntry] = []
        self._layer_ids: dict[tuple, torch.Tensor] = {}
        # per row: the original index of each current row, and the same tallies per original row
        self._row_orig = np.zeros(0, dtype=np.int64)
        self._row_orig_dev: torch.Tensor | None = None
        self._row_sums: torch.Tensor | None = None  # float64 [B0, L, 5] on the device
        self._row_elig: np.ndarray | None = None  # float64 [B0, L]
        self._row_smi: np.ndarray | None = None  # int64 [B0, L]

    # -- rows -------------------------------------------------------------------------------------------------

    def start_rows(self, batch: int) -> None:
        """A fresh batch of `batch` rows: what is pending belongs to the previous rows; per-row tallies restart."""
        self.flush()
        self._row_orig = np.arange(batch, dtype=np.int64)
        self._row_orig_dev = torch.arange(batch, device=self.device)
        self._row_elig = np.zeros((batch, self.num_layers))
        self._row_smi = np.zeros((batch, self.num_layers), dtype=np.int64)
        self._row_extra = {k: torch.zeros(batch, self.num_layers, dtype=torch.int64, device=self.device)
                           for k in self.extra_layers}
        if self.collect:
            self._row_sums = torch.zeros(batch, self.num_layers, 5, dtype=torch.float64, device=self.device)

    def select_rows(self, keep: list[int], keep_dev: torch.Tensor) -> None:
        """Only these current rows go on (their original indices stay)."""
        self.flush()
        self._row_orig = self._row_orig[keep]
        self._row_orig_dev = self._row_orig_dev.index_select(0, keep_dev)

    # -- recording (the attention function) ----------------------------------------------------------------------

    def slot(self, layer: int) -> int:
        """The index of an OEB layer in the fused kernel's stats buffer."""
        return self._slot[layer]

    def add_eligible(self, layer: int, qt, heads: int) -> None:
        """Count the eligible (query, head) pairs of one OEB layer's forward (qt: state.QueryTensors)."""
        self._eligible[layer] += qt.n_eligible * heads
        if self._row_elig is not None:
            self._row_elig[self._row_orig, layer] += qt.elig_rows * heads

    def add_smi(self, layer: int, fire_rows: np.ndarray) -> None:
        """One SMI fire per entry of fire_rows (current row indices) in this layer."""
        self._smi[layer] += len(fire_rows)
        if self._row_smi is not None:
            np.add.at(self._row_smi[:, layer], self._row_orig[fire_rows], 1)

    def add_extra(self, name: str, layer: int, rows: torch.Tensor, hit: torch.Tensor) -> None:
        """A repair's changed queries in one layer: rows long [N] (current row of each query), hit bool [N]."""
        hit = hit.to(torch.int64)
        self._extra[name][layer] += hit.sum()
        self._row_extra[name][:, layer].index_add_(0, self._row_orig_dev.index_select(0, rows), hit)

    def add_rows(self, layer: int, rows: torch.Tensor) -> None:
        """One layer's sums per current row ([B, 5]: fired, p(B), p(S) before, after), into both tallies."""
        rows = rows.detach()  # (a forward with gradients: the stats never hold its graph)
        self._sums[layer] += rows.sum(0)
        self._row_sums[:, layer].index_add_(0, self._row_orig_dev, rows.to(torch.float64))

    def add_decode(self, layer: int, fire: torch.Tensor, p_bs: torch.Tensor, factors: torch.Tensor,
                   tau_b: torch.Tensor) -> None:
        """A decoding step of the PyTorch path, reduced at the next flush (its eligible pairs are counted by the
        caller)."""
        self._decode.append(_DecodeEntry(layer, fire, p_bs.detach(), factors.detach(), tau_b))

    def add_kernel_step(self, stats: torch.Tensor, layers: list[int], qt, heads: int) -> None:
        """A forward's fused-kernel stats buffer [n_oeb, B, H, 5]; `layers` (appended to by the caller as
        layers run the kernel) is read at the flush, which counts their eligible pairs too."""
        self._kernel.append(_KernelEntry(layers, stats, qt, heads))

    def before_forward(self, batch: int | None) -> None:
        """Reduce the pending entries when there are many, or when the rows are about to change."""
        if not (self._decode or self._kernel):
            return
        rows = self._kernel[0].stats.shape[1] if self._kernel else self._decode[0].fire.shape[0]
        if len(self._decode) + len(self._kernel) >= FLUSH_AFTER or batch is None or rows != batch:
            self.flush()

    def drop_pending(self) -> None:
        """Forget the pending entries unreduced (the context is closing on an error)."""
        self._decode, self._kernel = [], []

    def flush(self) -> None:
        """Reduce the decoding paths' pending entries into the tallies in a dozen kernels."""
        decode, kernel = self._decode, self._kernel
        self._decode, self._kernel = [], []
        if not (decode or kernel) or self._sums is None:
            return
        for e in kernel:
            for layer in e.layers:
                self.add_eligible(layer, e.qt, e.heads)
        if decode:
            layers = tuple(e.layer for e in decode)
            fire = torch.stack([e.fire for e in decode]).to(torch.float32)  # [n, B, H, 1]
            p_bs = torch.stack([e.p_bs for e in decode])  # [n, B, H, 2]
            fac = torch.stack([e.factors for e in decode])  # [n, B, H, 2]
            el = (torch.stack([e.tau_b[:, :1] for e in decode]) > 0).to(torch.float32)[:, :, None]  # [n, B, 1, 1]
            self._add_parts(layers, (tally_part(fire[..., 0], p_bs, fac * p_bs) * el).sum(2))  # [n, B, 5]
        if kernel:  # every OEB layer's slot, zeros where a layer did not run the kernel
            self._add_parts(tuple(self.oeb_layers), torch.stack([e.stats for e in kernel]).sum((0, 3)))

    def _add_parts(self, layers: tuple, part: torch.Tensor) -> None:
        """part [n, B, 5] of these n layers (repeats allowed) into the totals and the per-row tallies."""
        idx = self._layer_ids.get(layers)
        if idx is None:
            idx = self._layer_ids[layers] = torch.tensor(layers, device=self.device)
        part = part.to(torch.float64)
        self._sums.index_add_(0, idx, part.sum(1))
        # per row: flat (original row, layer) index; every pending entry has the current rows (the pending
        # entries are flushed before rows change)
        n_layers = self._row_sums.shape[1]
        flat = (self._row_orig_dev[None, :] * n_layers + idx[:, None]).reshape(-1)
        self._row_sums.view(-1, 5).index_add_(0, flat, part.reshape(-1, 5))

    # -- reading --------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Zero every tally (the rows stay)."""
        if self._sums is not None:
            self._sums.zero_()
        self._decode, self._kernel = [], []
        self._smi = [0] * self.num_layers
        self._eligible = [0] * self.num_layers
        for t in (*self._extra.values(), *self._row_extra.values()):
            t.zero_()
        if self._row_sums is not None:
            self._row_sums.zero_()
        if self._row_elig is not None:
            self._row_elig[:] = 0
            self._row_smi[:] = 0

    def totals(self, forwards: int, tokens: int, rows: int, rows_with_thinking: int) -> StepFlowStats:
        """The tallies so far (reading them synchronizes with the device once)."""
        self.flush()
        s = self._sums.cpu().numpy() if self._sums is not None else np.zeros((self.num_layers, 5))
        return StepFlowStats.from_sums(self.oeb_layers, self.smi_layers, s, self._eligible, self._smi, forwards,
                                       tokens, rows, rows_with_thinking, extra=self._extra_counts(self._extra))

    def row(self, row: int, forwards: int, tokens: int, with_thinking: bool) -> StepFlowStats:
        """The tallies of one row of the last fresh batch, by its index in that batch."""
        self.flush()
        s = self._row_sums[row].cpu().numpy() if self._row_sums is not None else np.zeros((self.num_layers, 5))
        return StepFlowStats.from_sums(self.oeb_layers, self.smi_layers, s, self._row_elig[row], self._row_smi[row],
                                       forwards, tokens, 1, int(with_thinking),
                                       extra=self._extra_counts({k: v[row] for k, v in self._row_extra.items()}))

    def _extra_counts(self, counts: dict[str, torch.Tensor]) -> dict:
        return {k: (self.extra_layers[k], v.cpu().numpy()) for k, v in counts.items()}
