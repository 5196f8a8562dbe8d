"""StepFlow: the test-time repair (docs/method.md §5) as a context manager around any transformers causal LM.

    with StepFlow(model, tokenizer) as flow:
        out = model.generate(**inputs, max_new_tokens=512)
    print(flow.stats.summary())

How it hooks the model (through transformers' own extension points, never by editing model classes):
- On enter it registers an attention function wrapping the model's own implementation (sdpa, eager or flash)
  and that implementation's mask function, under "stepscope_flow_<impl>", and switches every config of the
  model to it (`config._attn_implementation_internal`, the field `set_attn_implementation` writes, so that
  no weight or module changes). Each attention module gets a `_stepscope_flow` attribute: the `FlowBinding`
  the attention function reads (flow/attention.py).
- A forward pre-hook on the base model sees every forward's input_ids, attention mask and cache length. It
  copies the new token ids (with their mask columns) to the host once per forward, the only device-to-host
  transfer, and hands them to the row tracker (flow/rows.py), which feeds each row's incremental segmenter and
  uploads the rows' state in one host-to-device copy (flow/state.py). A forward hook feeds a decoding step's
  token if no SMI layer did, and prepares the next decoding step's state.
- On exit, also after an exception, it restores the original implementation names, removes the hooks and the
  module attributes. The registered names stay registered (harmless, and another StepFlow may use them), so
  the model is bit-identical to before.

The parts: `Rows` (rows, segmenters, each forward's state), `FlowStats` (what OEB and SMI did), `DecodePath`
(how an OEB layer runs a decoding step). This module only wires them to the model.

Supported: Llama, Qwen2, Qwen3, Mistral, GPT-OSS (sinks, sliding windows) and any model whose attention goes
through transformers' AttentionInterface; greedy and sampling generation, left-padded batches, the dynamic
KV cache (default), plain forwards with or without a cache.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch

from ..core.settings import FlowSettings
from ..core.support import attention_problem
from ..core.tally import StepFlowStats
from ..errors import StepscopeError
from ..formats import Format, get_format
from ..models import model_configs, restore_attn_implementations, swap_attn_implementations
from ..segment import Segmenter
from .attention import PREFIX, FlowBinding, register
from .config import StepFlowConfig
from .decode_path import DecodePath
from .flow_stats import FlowStats
from .rows import Rows

__all__ = ["StepFlow", "StepFlowStats"]


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and "Attention" in type(m).__name__
            and hasattr(m, "config")]


class StepFlow:
    """Odds-Equal Bridge and Step Momentum Injection on a transformers model, per batch row, as a context.

    `StepFlow(model, tokenizer, config=None, *, kernel=None, **overrides)`: `config` is a StepFlowConfig (paper
    defaults when None); keyword overrides replace its fields (`StepFlow(model, tok, alpha=0.1)`). Inside the
    `with` block, `model.generate(...)` and `model(...)` apply StepFlow; `stats` reports how often it acted.
    `fmt="auto"` reads the trace format from the chat template as generation does (`formats.get_format`): a
    template without thinking markers is harmony when the vocabulary has "<|channel|>", else "think".

    `kernel` picks how an OEB layer runs a decoding step (one query per row): "auto" (default; also read from
    `$STEPSCOPE_FLOW_KERNEL`) uses the fused Triton kernel on CUDA when triton imports, checked once against
    the PyTorch path on the first step and dropped (with a warning) if it fails or disagrees, then, for each
    new set of shapes (batch, heads, keys by octave), times the kernel's launch variants against the PyTorch
    path on the real inputs and uses the fastest (`decode_paths` lists the choices); "triton" insists on the
    kernel as planned (errors propagate); "torch" always uses the PyTorch path. A `DecodePath` object may be
    given instead (its timer, or "auto" without timing). Timing makes "auto"'s choice, and so the last bits of
    bf16 rounding, depend on the machine: pin "triton" or "torch" for runs that must repeat bit for bit.
    Prefill and every other layer are the same either way. This is an implementation choice, not a setting of
    the method, so it is not in the config.
    """

    def __init__(self, model, tokenizer, config: StepFlowConfig | None = None, *,
                 kernel: str | DecodePath | None = None, **overrides):
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
        problem = attention_problem(model.config)
        if problem:
            raise StepscopeError(problem)
        self.settings = FlowSettings.resolve(config, int(text_cfg.num_hidden_layers))
        if tokenizer is None:
            raise StepscopeError("StepFlow needs the model's tokenizer to find the thinking steps")
        self.format: Format = get_format(config.fmt, tokenizer, markers=config.markers)
        self.device = next(model.parameters()).device
        path = kernel if isinstance(kernel, DecodePath) else \
            DecodePath(kernel or os.environ.get("STEPSCOPE_FLOW_KERNEL") or "auto")
        self.decode_path = path.attach(self.device)
        self.kernel = path.mode
        s = self.settings
        self.recorder = FlowStats(s.num_layers, list(s.oeb_layers), list(s.smi_layers), self.device,
                                  collect=config.collect_stats,
                                  extra_layers=s.extra_by_name)
        self.rows = Rows(tokenizer, self.format, s, device=self.device)
        # most scores (floats) one OEB block may hold: 128 MiB on a GPU, 16 MiB on a CPU (cache friendly)
        block_elems = (1 << 25) if self.device.type == "cuda" else (1 << 22)
        self._binding = FlowBinding(self.rows, self.recorder, self.decode_path, s.oeb, s.smi, block_elems, s.extra,
                                    s.extra_layers)
        self._active = False
        self._saved: list[tuple[object, str, object]] = []
        self._modules: list[torch.nn.Module] = []
        self._hooks: list = []

    @property
    def num_layers(self) -> int:
        return self.settings.num_layers

    @property
    def oeb_layers(self) -> list[int]:
        """The OEB layers of this model (the config resolved)."""
        return list(self.settings.oeb_layers)

    @property
    def smi_layers(self) -> list[int]:
        return list(self.settings.smi_layers)

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
        names = {impl: register(impl) for impl in impls if impl is not None}
        modules = _attention_modules(self.model)
        if not modules:
            raise StepscopeError("no attention layers with a layer index were found in this model")
        base = getattr(self.model, "base_model", self.model)
        try:
            self._saved = swap_attn_implementations(self.model, lambda impl: names.get(impl, impl))
            for m in modules:
                m._stepscope_flow = self._binding
                self._modules.append(m)
            self._hooks = [base.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                           base.register_forward_hook(self._post_forward, with_kwargs=True)]
            self.model._stepscope_flow_open = True
        except BaseException:
            self._restore()
            raise
        self._active = True
        self.rows.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        if exc_type is None and self.rows.saw_rows and not self.rows.saw_thinking:
            f = self.format
            warnings.warn(f"StepFlow: no row reached a thinking segment (format {f.name!r}, thinking starts "
                          f"after {f.think_start!r}), so OEB and SMI had nothing to act on; check the prompt "
                          "or pass fmt/markers", RuntimeWarning, stacklevel=2)
        return False

    def _restore(self) -> None:
        try:
            self.rows.close()
            self.recorder.flush()
        except Exception:  # never let bookkeeping mask the error that ended the context
            self.recorder.drop_pending()
        restore_attn_implementations(self._saved)
        self._saved = []
        for m in self._modules:
            if "_stepscope_flow" in m.__dict__:
                del m.__dict__["_stepscope_flow"]
        self._modules = []
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.model.__dict__.get("_stepscope_flow_open"):
            del self.model.__dict__["_stepscope_flow_open"]
        self._active = False

    # -- per forward --------------------------------------------------------------------------------------

    def _pre_forward(self, module, args, kwargs):
        self.rows.feed_pending()  # the last forward stopped early (an exception): its token still counts
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.recorder.before_forward(None if ids is None else ids.shape[0])
        if ids is None:
            raise StepscopeError("StepFlow needs input_ids: a forward with inputs_embeds alone cannot be segmented")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask2 = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        Q = ids.shape[1]
        # the one device-to-host copy of this forward: new token ids and their mask columns
        both = ids if mask2 is None else torch.cat([ids, mask2[:, -Q:].to(ids.dtype)], dim=1)
        host = both.cpu().numpy()
        kernel_keys = self.decode_path.uses_kernel and bool(self.settings.oeb_layers)
        if self.rows.begin(host, Q, past, mask2 is not None, kernel_keys):
            self.recorder.start_rows(host.shape[0])
        return None

    def _post_forward(self, module, args, kwargs, output):
        self.rows.feed_pending()  # no SMI layer ran: feed at the end of the forward
        if kwargs.get("cache", kwargs.get("past_key_values")) is not None:
            # generation goes on with one token per row, most likely: prepare that step's state now
            self.rows.prepare_next()

    def select_rows(self, keep: list[int]) -> None:
        """Keep only these rows, in this order: call it together with `cache.batch_select_indices(keep)` when a
        decode loop drops finished rows from the batch (the sequence axis, and so each row's offsets, stay)."""
        keep_dev = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.rows.select(keep, keep_dev)
        self.recorder.select_rows(keep, keep_dev)

    # -- results ------------------------------------------------------------------------------------------

    @property
    def segmenters(self) -> list[Segmenter]:
        """Each row's segmenter as of the last forward (read them, do not feed them)."""
        return self.rows.segmenters

    def reset_stats(self) -> None:
        self.recorder.reset()
        self.rows.reset_counts()

    @property
    def decode_paths(self) -> list[dict]:
        """kernel="auto" on CUDA: how the OEB layers decode, per set of shapes timed so far (`DecodePath.choices`)."""
        return self.decode_path.choices()

    @property
    def stats(self) -> StepFlowStats:
        """Counts so far (reading them synchronizes with the device once)."""
        r = self.rows
        return self.recorder.totals(r.forwards, r.tokens, r.rows_started, r.rows_with_thinking)

    def row_stats(self, row: int) -> StepFlowStats:
        """The counts of one row of the last batch StepFlow started (its index in that prefill, also after
        other rows left with `select_rows`): the same fields as `stats`, for that row alone. `forwards` counts
        the forwards since the last `reset_stats`, `tokens` that row's real tokens."""
        if not 0 <= row < self.rows.batch_size:
            raise StepscopeError(f"row_stats: row {row} out of range (the last batch had "
                                 f"{self.rows.batch_size} rows)")
        tr = self.rows.batch_row(row)
        return self.recorder.row(row, self.rows.forwards, tr.seg.num_tokens, tr.saw_thinking)
