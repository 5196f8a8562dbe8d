"""StepFlow's attention function: the Odds-Equal Bridge and Step Momentum Injection inside the attention registry.

`register(orig)` registers, under the name "stepscope_flow_<orig>", an attention function that wraps the
implementation `orig` the user chose (sdpa, eager, flash_attention_*), together with `orig`'s mask function
(without it transformers hands the function no mask, even for a left-padded batch). The function reads what a
running StepFlow binds to each attention module (`module._stepscope_flow`, a `FlowBinding`, set while a
StepFlow context is open; absent, it is the wrapped implementation, untouched). The wrapped implementation is
looked up at every call (eager: the module's own modeling file's `eager_attention_forward`), so that a patch
another library puts on it, or takes off, is seen at once.

Per layer (`flow_attention`):
- outside the OEB and SMI bands, or when this forward has nothing to do there (no thinking/summary query, no
  SMI fire), the wrapped implementation runs untouched;
- OEB layers compute attention themselves (flow/oeb.py); a decoding step may go to the fused Triton kernel
  instead (flow/decode_path.py);
- SMI layers add alpha * (mean value vector of the previous step's last w tokens, per kv head, shared by the
  query heads of a GQA group) to the attention output of the query at each fire position, before o_proj;
- then the other repairs of the config (core/interventions.py) change the attention output of the forward's real
  queries on their layers, in their order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..core.interventions import Active, run
from ..core.smi import smi_inject
from ..errors import StepscopeError
from .decode_path import DecodePath
from .flow_stats import FlowStats
from .oeb import oeb_attention
from .rows import Rows
from .state import ForwardState

PREFIX = "stepscope_flow_"
SUPPORTED = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")


class FlowBinding(NamedTuple):
    """What the attention function needs of a running StepFlow (one per StepFlow, bound to every attention
    module while its context is open)."""

    rows: Rows  # the forward being run, and the decoding token held back from the segmenters
    stats: FlowStats
    path: DecodePath
    oeb: frozenset[int]  # the OEB layers
    smi: frozenset[int]  # the SMI layers
    block_elems: int  # most scores one OEB block may hold
    extra: tuple[Active, ...] = ()  # the other repairs, in the order they run
    extra_layers: frozenset[int] = frozenset()  # the layers where one of them acts


def registered_name(orig: str) -> str:
    return PREFIX + orig


def original_function(orig: str, module) -> Callable:
    """The implementation `orig` as it is now: eager from the module's own modeling file (GPT-OSS's handles
    sinks; the standard one for a modeling file without its own), anything else from the registry."""
    if orig == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[orig]


def register(orig: str) -> str:
    """Register the StepFlow attention and mask functions wrapping `orig`; return the registered name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if orig not in SUPPORTED:
        raise StepscopeError(f"StepFlow wraps sdpa, eager or flash attention; this model uses {orig!r} "
                             "(load it with attn_implementation='sdpa')")
    name = registered_name(orig)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(orig)
    if mask_fn is None:
        raise StepscopeError(f"transformers has no mask function for {orig!r}")
    AttentionInterface.register(name, _make_flow_attention(orig))
    AttentionMaskInterface.register(name, mask_fn)
    return name


def _make_flow_attention(orig: str) -> Callable:
    def stepscope_flow_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                 **kwargs):
        bound = getattr(module, "_stepscope_flow", None)
        fn = original_function(orig, module)
        fs = None if bound is None else bound.rows.forward
        if fs is None:
            return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return flow_attention(fn, module, query, key, value, attention_mask, scaling, dropout, kwargs, fs, bound)

    stepscope_flow_attention.__name__ = f"stepscope_flow_attention_{orig}"
    return stepscope_flow_attention


def flow_attention(fn: Callable, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, scaling, dropout, kwargs: dict, fs: ForwardState, bound: FlowBinding):
    """One layer. query [B, H, Q, D], key/value [B, Hkv, K, D]; returns ([B, Q, H, D], weights or None)."""
    layer = module.layer_idx
    do_oeb = fs.any_oeb and layer in bound.oeb
    if layer in bound.smi and bound.rows.has_pending:  # the first SMI layer of a decoding step
        bound.rows.feed_pending()
    do_smi = fs.num_fires > 0 and layer in bound.smi
    if not (do_oeb or do_smi):
        out = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return out if layer not in bound.extra_layers else (_extra(out[0], layer, fs, bound), out[1])
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    window = int(window) if window else None
    mask4 = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 else None
    geo = fs.layer(key.shape[-2], window, mask4, do_oeb)
    if key.shape[-2] > fs.total:  # a static cache: slots after the tokens seen so far are empty
        key, value = key[:, :, :fs.total], value[:, :, :fs.total]
    stats = bound.stats if bound.stats.collect else None
    weights = None
    if do_oeb:
        sinks = kwargs.get("s_aux", getattr(module, "sinks", None))
        scaling = scaling if scaling is not None else module.scaling
        dropout = dropout if module.training else 0.0
        out = None
        og = geo.oeb
        if query.shape[2] == 1 and og.decode is not None and og.decode.kseg is not None and bound.path.uses_kernel and not dropout and not (
                torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
            # (the kernel has no backward: a decoding step that needs gradients takes the PyTorch path)
            out = bound.path.decode(query, key, value, og, scaling, sinks, layer, stats)
        if out is None:
            out = oeb_attention(query, key, value, og, scaling, sinks, block_elems=bound.block_elems,
                                stats=stats, layer=layer, dropout=dropout)
    else:
        out, weights = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if do_smi:
        kidx, weight = fs.smi_keys(geo, key.shape[-2], window)
        ft = fs.fire_tensors
        out = smi_inject(out, value, ft.fires, ft.pairs[0], kidx, weight, fs.num_fires)
        bound.stats.add_smi(layer, fs.fires.fire_b)
    if layer in bound.extra_layers:
        out = _extra(out, layer, fs, bound)
    return out, weights


def _extra(out: torch.Tensor, layer: int, fs: ForwardState, bound: FlowBinding) -> torch.Tensor:
    """The other repairs of this layer on the forward's real queries: out [B, Q, H, D] -> a new [B, Q, H, D]."""
    got = fs.real_queries()
    if got is None:
        return out
    rows, cols, queries = got
    sel = out[rows, cols]  # [N, H, D]
    for a in bound.extra:
        if layer in a.layers:
            bound.stats.add_extra(a.name, layer, rows, run(a, sel, queries))
    return out.index_put((rows, cols), sel)

