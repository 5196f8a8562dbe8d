"""StepFlow: the test-time repair (METHOD.md §5) as a context manager around any transformers causal LM.

    with StepFlow(model, tokenizer) as flow:
        out = model.generate(**inputs, max_new_tokens=512)
    print(flow.stats.summary())

How it hooks the model (DESIGN.md, "How the model is hooked"):
- On enter it registers an attention function wrapping the model's own implementation (sdpa, eager or flash)
  and that implementation's mask function, under "stepscope_flow_<impl>", and switches every config of the
  model to it (`config._attn_implementation_internal`, the field `set_attn_implementation` writes, so that
  no weight or module changes). Each attention module gets a `_stepscope_flow` attribute pointing here.
- A forward pre-hook on the base model sees every forward's input_ids, attention mask and cache length. It
  copies the new token ids (with their mask columns) to the host once per forward, the only device-to-host
  transfer, feeds each row's incremental segmenter, and uploads the rows' state in one host-to-device copy.
  In a decoding step (one new token per row) the feeding waits until the first SMI layer (or the end of the
  forward: a forward hook), so that the device already runs the layers before it while the host segments:
  a token's segment and its OEB groups depend only on the tokens before it; only its SMI fire needs it fed.
  For the same reason the forward hook of a forward with a cache prepares (and uploads) the state of the next
  decoding step while the device still runs this one; the next pre-hook takes it if that forward is one new
  token per row right after, and builds its own otherwise.
  A forward with no cache, or an empty one, starts fresh rows; a cache whose length does not match what
  StepFlow has seen is an error (beam search, which reorders cache rows, is not supported).
- On exit, also after an exception, it restores the original implementation names, removes the hooks and the
  module attributes. The registered names stay registered (harmless, and another StepFlow may use them), so
  the model is bit-identical to before.

Supported: Llama, Qwen2, Qwen3, Mistral, GPT-OSS (sinks, sliding windows) and any model whose attention goes
through transformers' AttentionInterface; greedy and sampling generation, left-padded batches, the dynamic
KV cache (default), plain forwards with or without a cache.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import StepscopeError
from ..formats import Format, get_format
from ..models import model_configs, restore_attn_implementations, swap_attn_implementations
from ..segment import Segmenter
from ..tokens import token_bytes
from .attention import PREFIX, register
from .config import StepFlowConfig
from .state import NEG, ForwardState, KeyState, RowTracker, build_forward_state


@dataclass
class StepFlowStats:
    """How often StepFlow acted, per band layer.

    OEB counts are over (query, head) pairs: `oeb_eligible` pairs had a query in thinking or summary and a
    non-empty bridge; `oeb_fires` of them were below tau_B and got projected. `bridge_mass_before/after` are
    the mean bridge probability p(B) over eligible pairs before and after OEB, `group_mass_before/after` the
    same for the query's own group S (O keeps its mass). `smi_fires` counts the query
    positions that received step momentum. `tokens`: real tokens fed to the segmenters.
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

    @property
    def total_oeb_fires(self) -> int:
        return sum(self.oeb_fires.values())

    @property
    def total_smi_fires(self) -> int:
        return sum(self.smi_fires.values())

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("oeb_fires", "oeb_eligible", "bridge_mass_before", "bridge_mass_after", "group_mass_before",
                  "group_mass_after", "smi_fires"):
            d[k] = {str(i): v for i, v in d[k].items()}
        return d

    def summary(self) -> str:
        lines = [f"StepFlow: {self.forwards} forwards, {self.tokens} tokens"]
        for i in self.oeb_layers:
            e = self.oeb_eligible[i]
            rate = self.oeb_fires[i] / e if e else 0.0
            lines.append(f"  OEB layer {i:>3}: fired {self.oeb_fires[i]:>9} of {e:>9} query-heads ({rate:6.1%}), "
                         f"bridge mass {self.bridge_mass_before[i]:.4f} -> {self.bridge_mass_after[i]:.4f}")
        for i in self.smi_layers:
            lines.append(f"  SMI layer {i:>3}: fired {self.smi_fires[i]:>9} times")
        return "\n".join(lines)


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and "Attention" in type(m).__name__
            and hasattr(m, "config")]


class StepFlow:
    """Odds-Equal Bridge and Step Momentum Injection on a transformers model, per batch row, as a context.

    `StepFlow(model, tokenizer, config=None, *, kernel=None, **overrides)`: `config` is a StepFlowConfig (paper
    defaults when None); keyword overrides replace its fields (`StepFlow(model, tok, alpha=0.1)`). Inside the
    `with` block, `model.generate(...)` and `model(...)` apply StepFlow; `stats` reports how often it acted.

    `kernel` picks how an OEB layer runs a decoding step (one query per row): "auto" (default; also read from
    `$STEPSCOPE_FLOW_KERNEL`) uses the fused Triton kernel on CUDA when triton imports, checked once against
    the PyTorch path on the first step and dropped (with a warning) if it fails or disagrees, then, for each
    new set of shapes (batch, heads, keys by octave), times the kernel's launch variants against the PyTorch
    path on the real inputs and uses the fastest (`decode_paths` lists the choices); "triton" insists on the
    kernel as planned (errors propagate); "torch" always uses the PyTorch path. Timing makes "auto"'s choice,
    and so the last bits of bf16 rounding, depend on the machine: pin "triton" or "torch" for runs that must
    repeat bit for bit. Prefill and every other layer are the same either way. This is an implementation
    choice, not a setting of the method, so it is not in the config.
    """

    def __init__(self, model, tokenizer, config: StepFlowConfig | None = None, *, kernel: str | None = None,
                 **overrides):
        config = config or StepFlowConfig()
        if overrides:
            try:
                config = dataclasses.replace(config, **overrides)
            except TypeError as e:
                raise StepscopeError(f"unknown StepFlow option: {e}") from None
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.oeb_layers, self.smi_layers = config.resolve(self.num_layers)
        self._oeb_set = frozenset(self.oeb_layers)
        self._oeb_pos = {layer: i for i, layer in enumerate(self.oeb_layers)}
        self._smi_set = frozenset(self.smi_layers)
        if tokenizer is None:
            raise StepscopeError("StepFlow needs the model's tokenizer to find the thinking steps")
        self.format: Format = get_format(config.fmt, tokenizer, markers=config.markers)
        self._tokbytes = token_bytes(tokenizer)
        self.device = next(model.parameters()).device
        self.kernel = kernel or os.environ.get("STEPSCOPE_FLOW_KERNEL") or "auto"
        if self.kernel not in ("auto", "triton", "torch"):
            raise StepscopeError(f"kernel must be auto, triton or torch, got {self.kernel!r}")
        from .kernels import available

        if self.kernel == "triton" and not available(self.device):
            raise StepscopeError(f"kernel='triton' needs triton and a CUDA device; the model is on {self.device}")
        # None: not checked yet (auto); True: in use; False: the PyTorch path
        self._fused: bool | None = {"triton": True, "torch": False}.get(
            self.kernel, None if self.device.type == "cuda" and available(self.device) else False)
        self._kernel_dot: bool | None = None  # the kernel's product form (None: kernels.USE_DOT); False after
        # the tl.dot form failed on this machine
        # kernel="auto": the decoding path timed fastest for each set of shapes (attention.path_key ->
        # attention.PathChoice); None: no timing (kernel="triton" or "torch")
        self._paths: dict | None = {} if self.kernel == "auto" else None
        # most scores (floats) one OEB block may hold: 128 MiB on a GPU, 16 MiB on a CPU (cache friendly)
        self.block_elems = (1 << 25) if self.device.type == "cuda" else (1 << 22)
        self._active = False
        self._saved: list[tuple[object, str, object]] = []
        self._modules: list[torch.nn.Module] = []
        self._hook = None
        self._post_hook = None
        self._fwd: ForwardState | None = None
        self._unfed: np.ndarray | None = None  # host ids [B, 1] of a decoding step not yet fed to the segmenters
        self._next: ForwardState | None = None  # the next decoding step's state, prepared after the last forward
        self._rows: list[RowTracker] | None = None
        self._keys: KeyState | None = None
        self._total = 0
        self._stats: torch.Tensor | None = None
        self._smi_fires = [0] * self.num_layers
        self._forwards = 0
        self._tokens = 0
        self._eligible = [0] * self.num_layers
        # constants of the decode path (attention.py): firing thresholds, and (p_B, p_S) -> (0, p_B + p_S)
        self._thresholds = torch.tensor([1.0, 0.0], device=self.device)
        self._sum_s = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]], device=self.device)
        self._pending: list[tuple] = []  # decode-path stats of the last forward, reduced at the next one
        self._layer_ids: dict[tuple, torch.Tensor] = {}
        # per row of the current batch (reset by each fresh prefill; rows keep their prefill index when others
        # leave): original index of each current row, and the same counts as the totals, per row
        self._row_orig = np.zeros(0, dtype=np.int64)
        self._row_orig_dev: torch.Tensor | None = None
        self._row_stats: torch.Tensor | None = None  # float64 [B0, L, 5] on the device
        self._row_elig: np.ndarray | None = None  # float64 [B0, L]
        self._row_smi: np.ndarray | None = None  # int64 [B0, L]
        self._row_trackers: list[RowTracker] = []
        if config.collect_stats:
            self._stats = torch.zeros(self.num_layers, 5, dtype=torch.float64, device=self.device)

    # -- context ----------------------------------------------------------------------------------------------

    def __enter__(self) -> StepFlow:
        if self._active:
            raise StepscopeError("this StepFlow is already active")
        if getattr(self.model, "_stepscope_flow_open", False):
            raise StepscopeError("a StepFlow context is already open on this model")
        devices = {p.device for p in self.model.parameters()}
        if len(devices) > 1:
            raise StepscopeError(f"StepFlow needs the model on one device; its weights are on "
                                 f"{', '.join(sorted(str(d) for d in devices))} (a device_map over several "
                                 "devices is not supported yet)")
        impls = {c._attn_implementation for c in model_configs(self.model)}
        if any(isinstance(i, str) and i.startswith(PREFIX) for i in impls):
            raise StepscopeError("the model already runs a StepFlow attention function")
        names = {}
        for impl in impls:
            if impl is None:
                continue
            names[impl] = register(impl)
        modules = _attention_modules(self.model)
        if not modules:
            raise StepscopeError("no attention layers with a layer index were found in this model")
        base = getattr(self.model, "base_model", self.model)
        try:
            self._saved = swap_attn_implementations(self.model, lambda impl: names.get(impl, impl))
            for m in modules:
                m._stepscope_flow = self
                self._modules.append(m)
            self._hook = base.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            self._post_hook = base.register_forward_hook(self._post_forward, with_kwargs=True)
            self.model._stepscope_flow_open = True
        except BaseException:
            self._restore()
            raise
        self._active = True
        self._fwd = None
        self._rows = None
        self._total = 0
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        try:
            if self._unfed is not None:
                self._feed_deferred()
            self._flush_stats()
        except Exception:  # never let bookkeeping mask the error that ended the context
            self._pending = []
            self._unfed = None
        restore_attn_implementations(self._saved)
        self._saved = []
        for m in self._modules:
            if "_stepscope_flow" in m.__dict__:
                del m.__dict__["_stepscope_flow"]
        self._modules = []
        for h in (self._hook, self._post_hook):
            if h is not None:
                h.remove()
        self._hook = self._post_hook = None
        if self.model.__dict__.get("_stepscope_flow_open"):
            del self.model.__dict__["_stepscope_flow_open"]
        self._fwd = self._next = None
        self._active = False

    # -- per forward --------------------------------------------------------------------------------------

    def _disable_fused(self, why: str) -> None:
        warnings.warn(f"StepFlow: {why}; using the PyTorch path for the rest of this StepFlow", RuntimeWarning,
                      stacklevel=4)
        self._fused = False

    def _count_eligible(self, layer: int, qt, heads: int) -> None:
        self._eligible[layer] += qt.n_eligible * heads
        if self._row_elig is not None:
            self._row_elig[self._row_orig, layer] += qt.elig_rows * heads

    def _count_smi(self, layer: int, fire_rows: np.ndarray) -> None:
        self._smi_fires[layer] += len(fire_rows)
        if self._row_smi is not None:
            np.add.at(self._row_smi[:, layer], self._row_orig[fire_rows], 1)

    def _add_rows(self, layer: int, rows: torch.Tensor) -> None:
        """Stats of one layer per current row ([B, 5]: fired, p(B), p(S) before, after), into both tallies."""
        rows = rows.detach()  # (a forward with gradients: the stats never hold its graph)
        self._stats[layer] += rows.sum(0)
        self._row_stats[:, layer].index_add_(0, self._row_orig_dev, rows.to(torch.float64))

    def _flush_stats(self) -> None:
        """Reduce the decode path's per-layer stats of the last forwards in a dozen kernels. An entry is either
        (layer, fire, p_bs, factors, tau_b) from the PyTorch path or ("fused", layers, stats [n_oeb, B, H, 5],
        query tensors, heads) from one forward of the kernel (its eligible pairs are counted here too)."""
        pend, self._pending = self._pending, []
        if not pend or self._stats is None:
            return
        fused = [e for e in pend if e[0] == "fused"]
        for _, layers, _, qt, heads in fused:
            for layer in layers:
                self._count_eligible(layer, qt, heads)
        for group in ([e for e in pend if e[0] != "fused"], fused):
            if not group:
                continue
            if group[0][0] == "fused":  # every OEB layer's slot, zeros where a layer did not run the kernel
                layers = tuple(self.oeb_layers)
                part = torch.stack([e[2] for e in group]).sum((0, 3))  # [n_oeb, B, 5]
            else:
                layers = tuple(e[0] for e in group)
                fire = torch.stack([e[1] for e in group]).to(torch.float32)  # [n, B, H, 1]
                p_bs = torch.stack([e[2] for e in group])  # [n, B, H, 2]
                fac = torch.stack([e[3] for e in group])  # [n, B, H, 2]
                el = (torch.stack([e[4][:, :1] for e in group]) > 0).to(torch.float32)[:, :, None]  # [n, B, 1, 1]
                part = (torch.cat([fire, p_bs, fac * p_bs], -1) * el).sum(2)  # [n, B, 5]
            idx = self._layer_ids.get(layers)
            if idx is None:
                idx = self._layer_ids[layers] = torch.tensor(layers, device=self.device)
            part = part.to(torch.float64)
            self._stats.index_add_(0, idx, part.sum(1))
            # per row: flat (original row, layer) index; every pending entry has the current rows (the
            # pending list is flushed before rows change)
            n_layers = self._row_stats.shape[1]
            flat = (self._row_orig_dev[None, :] * n_layers + idx[:, None]).reshape(-1)
            self._row_stats.view(-1, 5).index_add_(0, flat, part.reshape(-1, 5))

    def _pending_rows(self) -> int:
        e = self._pending[0]
        return e[2].shape[1] if e[0] == "fused" else e[1].shape[0]

    def _feed(self, ids_h: np.ndarray, spans: list[tuple[int, int]]) -> list[list[tuple[int, int, int]]]:
        """Feed each row's new real tokens (columns spans[b] of ids_h) to its segmenter; its SMI fires."""
        fires = []
        for b, tr in enumerate(self._rows):
            a, e = spans[b]
            if e > a:
                fires.append(tr.feed(ids_h[b, a:e].tolist()))
                self._tokens += e - a
            else:
                fires.append([])
        return fires

    def _feed_deferred(self) -> None:
        """Feed the decoding token the pre-hook held back and add its SMI fires to the forward's state."""
        ids_h, self._unfed = self._unfed, None
        fires = self._feed(ids_h, [(0, 1)] * len(self._rows))
        if any(fires):
            self._fwd.add_fires(self._rows, fires)

    def _post_forward(self, module, args, kwargs, output):
        if self._unfed is not None:  # no SMI layer ran: feed at the end of the forward
            self._feed_deferred()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self._rows is not None and self._fwd is not None:
            # generation goes on with one token per row, most likely: prepare that step's state now, while the
            # device still computes this one, so that the next pre-hook only copies the token ids (`_pre_forward`
            # takes it when the next forward is that step, and drops it otherwise)
            self._next = self._build_state(self._total, 1, [[] for _ in self._rows], None, hi=self._total + 1)

    def _pre_forward(self, module, args, kwargs):
        if self._unfed is not None:  # the last forward stopped early (an exception): its token still counts
            self._feed_deferred()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self._pending and (len(self._pending) >= 512 or ids is None or self._pending_rows() != ids.shape[0]):
            self._flush_stats()  # stats of many forwards are reduced together
        if ids is None:
            raise StepscopeError("StepFlow needs input_ids: a forward with inputs_embeds alone cannot be segmented")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask2 = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        B, Q = ids.shape
        # the one device-to-host copy of this forward: new token ids and their mask columns
        both = ids if mask2 is None else torch.cat([ids, mask2[:, -Q:].to(ids.dtype)], dim=1)
        host = both.cpu().numpy()
        ids_h = host[:, :Q]
        if past == 0:
            self._rows = None
            self._next = None
        elif self._rows is None or len(self._rows) != B or past != self._total:
            seen = 0 if self._rows is None else self._total
            raise StepscopeError(f"StepFlow lost track of the cache: it holds {past} tokens of {B} rows, StepFlow "
                                 f"has seen {seen}; start from an empty cache (beam search and reused caches are "
                                 "not supported)")
        new_pad = None
        if self._rows is None:  # a fresh sequence: find each row's real tokens
            self._flush_stats()  # what is pending belongs to the previous rows
            rows = []
            for b in range(B):
                if mask2 is None:
                    lo, hi = 0, Q
                else:
                    m = host[b, Q:] != 0
                    n = int(m.sum())
                    lo = int(np.argmax(m)) if n else Q
                    hi = lo + n
                    if n and not m[lo:hi].all():
                        raise StepscopeError("StepFlow needs each row's real tokens to be contiguous "
                                             "(left or right padding)")
                tr = RowTracker(Segmenter(self.tokenizer, self.format, tokbytes=self._tokbytes), lo,
                                self.config.smi_window)
                tr.hi = hi
                rows.append(tr)
            self._rows = rows
            self._row_trackers = list(rows)
            self._row_orig = np.arange(B, dtype=np.int64)
            self._row_orig_dev = torch.arange(B, device=self.device)
            self._row_elig = np.zeros((B, self.num_layers))
            self._row_smi = np.zeros((B, self.num_layers), dtype=np.int64)
            if self._stats is not None:
                self._row_stats = torch.zeros(B, self.num_layers, 5, dtype=torch.float64, device=self.device)
            self._keys = KeyState(B, self.device, max(256, 2 * Q),
                                  with_seg=self._fused is not False and bool(self.oeb_layers))
            spans = [(tr.lo, tr.hi) for tr in rows]
            if mask2 is not None:
                new_pad = np.where(host[:, Q:] != 0, 0.0, NEG).astype(np.float32)
        else:
            if (mask2 is not None and not (host[:, Q:] != 0).all()) or any(tr.hi != past for tr in self._rows):
                raise StepscopeError("StepFlow cannot follow padding after a row's real tokens "
                                     "(continue right-padded rows, or mask new tokens)")
            spans = [(0, Q)] * B
            for tr in self._rows:
                tr.hi = past + Q
            nxt, self._next = self._next, None
            if Q == 1 and nxt is not None and nxt.past == past:  # the state the last forward prepared
                self._unfed = ids_h
                self._total = past + 1
                self._forwards += 1
                self._fwd = nxt
                return None
        if Q == 1 and past > 0:
            # decoding: the segmenters take this token later, at the first SMI layer or at the end of the forward
            # (`_feed_deferred`), while the device runs the layers before. Only SMI needs it: a token's segment
            # and its OEB groups follow from the tokens before it, the boundaries the segmenters hold now.
            self._unfed = ids_h
            fires = [[] for _ in range(B)]
        else:
            fires = self._feed(ids_h, spans)
        self._total = past + Q
        self._forwards += 1
        self._fwd = self._build_state(past, Q, fires, new_pad)
        return None

    def _build_state(self, past: int, Q: int, fires: list, new_pad: np.ndarray | None, hi: int | None = None
                     ) -> ForwardState:
        """The device state of a forward of Q new tokens per row after `past`; hi: every row's kv end after it
        (None: each row's own)."""
        return build_forward_state(self._rows, self._keys, past, Q, fires, new_pad, self.device,
                                   self.config.tau_max, float(self.config.alpha), bool(self.oeb_layers),
                                   hi=hi)

    def select_rows(self, keep: list[int]) -> None:
        """Keep only these rows, in this order: call it together with `cache.batch_select_indices(keep)` when a
        decode loop drops finished rows from the batch (the sequence axis, and so each row's offsets, stay)."""
        if self._rows is None:
            raise StepscopeError("select_rows: StepFlow has no rows yet")
        if any(not 0 <= i < len(self._rows) for i in keep):
            raise StepscopeError(f"select_rows: row index out of range 0..{len(self._rows) - 1}")
        if self._unfed is not None:
            self._feed_deferred()
        self._flush_stats()
        self._next = None
        self._rows = [self._rows[i] for i in keep]
        keep_dev = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._keys.select(keep_dev)
        self._row_orig = self._row_orig[keep]
        self._row_orig_dev = self._row_orig_dev.index_select(0, keep_dev)
        self._fwd = None

    # -- results ------------------------------------------------------------------------------------------

    @property
    def segmenters(self) -> list[Segmenter]:
        """Each row's segmenter as of the last forward (read them, do not feed them)."""
        return [tr.seg for tr in (self._rows or [])]

    def reset_stats(self) -> None:
        if self._stats is not None:
            self._stats.zero_()
        self._pending = []
        self._smi_fires = [0] * self.num_layers
        self._eligible = [0] * self.num_layers
        self._forwards = self._tokens = 0
        if self._row_stats is not None:
            self._row_stats.zero_()
        if self._row_elig is not None:
            self._row_elig[:] = 0
            self._row_smi[:] = 0

    @property
    def decode_paths(self) -> list[dict]:
        """kernel="auto" on CUDA: how the OEB layers decode, per set of shapes timed so far. Each entry: batch,
        heads, kv_heads, head_dim, dtype, sinks, keys (the range of key counts it holds for), path ("triton" or
        "torch"), block_k and num_warps (the kernel's), and times_us (median µs per call of each candidate)."""
        out = []
        for (B, H, Hkv, D, dtype, sinks, octave), c in (self._paths or {}).items():
            out.append({"batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "dtype": str(dtype).split(".")[-1],
                        "sinks": sinks, "keys": [1 << (octave - 1), (1 << octave) - 1], "path": c.path,
                        "block_k": c.block_k, "num_warps": c.num_warps,
                        "times_us": {k: round(v, 2) for k, v in c.times_us.items()}})
        return out

    @property
    def stats(self) -> StepFlowStats:
        """Counts so far (reading them synchronizes with the device once)."""
        self._flush_stats()
        s = self._stats.cpu().numpy() if self._stats is not None else np.zeros((self.num_layers, 5))
        return self._make_stats(s, self._eligible, self._smi_fires, self._forwards, self._tokens)

    def row_stats(self, row: int) -> StepFlowStats:
        """The counts of one row of the last batch StepFlow started (its index in that prefill, also after
        other rows left with `select_rows`): the same fields as `stats`, for that row alone. `forwards` counts
        the forwards since the last `reset_stats`, `tokens` that row's real tokens."""
        if not 0 <= row < len(self._row_trackers):
            raise StepscopeError(f"row_stats: row {row} out of range (the last batch had "
                                 f"{len(self._row_trackers)} rows)")
        self._flush_stats()
        s = self._row_stats[row].cpu().numpy() if self._row_stats is not None else np.zeros((self.num_layers, 5))
        return self._make_stats(s, self._row_elig[row], self._row_smi[row], self._forwards,
                                self._row_trackers[row].seg.num_tokens)

    def _make_stats(self, s: np.ndarray, n, smi_fires, forwards: int, tokens: int) -> StepFlowStats:
        # columns of s, summed over eligible query-heads: fired, p(B), p(S) before, p(B), p(S) after
        fires = {i: int(round(s[i, 0])) for i in self.oeb_layers}
        elig = {i: int(n[i]) for i in self.oeb_layers}
        before = {i: float(s[i, 1] / n[i]) if n[i] else 0.0 for i in self.oeb_layers}
        after = {i: float(s[i, 3] / n[i]) if n[i] else 0.0 for i in self.oeb_layers}
        g_before = {i: float(s[i, 2] / n[i]) if n[i] else 0.0 for i in self.oeb_layers}
        g_after = {i: float(s[i, 4] / n[i]) if n[i] else 0.0 for i in self.oeb_layers}
        smi = {i: int(smi_fires[i]) for i in self.smi_layers}
        return StepFlowStats(list(self.oeb_layers), list(self.smi_layers), fires, elig, before, after, g_before,
                             g_after, smi, forwards, tokens)
