"""step_saliency: Step-Saliency maps of traces (docs/method.md §3), chunked (near-linear memory) or reference.

The loss (what dLoss/dA differentiates) is a mean next-token cross-entropy per trace. Position p predicts token
p + 1, so a trace of T tokens has the T - 1 targets 1..T-1:

- "all": every target 1..T-1 (as the released code does);
- "response": targets in the thinking and summary segments, t >= segments["thinking"][0] (the first thinking
  token is predicted from the thinking start marker, which belongs to the question);
- "summary": targets in the summary segment; a trace with an empty summary is an error.

A batch of traces is right-padded; each trace's loss is its own mean and the batch loss is their sum, so every
trace gets exactly the gradients (and maps) it gets alone: padding sits after every real token, the causal mask
keeps it out of the real tokens' attention, and it carries no loss.

How the chunked method runs (see attention.py for the attention function itself):
1. the model's attention implementation is switched to the registered "stepscope_saliency" function for the
   duration (every config object in the model, restored exactly afterwards, also on error); the model is put in
   eval mode and its parameters get requires_grad=False (both restored);
2. the input embeddings are a leaf that requires grad, so the backward reaches every layer;
3. every decoder layer runs under torch.utils.checkpoint (use_reentrant=False) by a forward wrapper on the
   layer instance (removed afterwards): memory holds one hidden state per layer plus one layer's activations;
4. the loss is computed in chunks of positions, each checkpointed, so [T, vocab] logits never exist at once;
5. torch.autograd.grad(loss, inputs_embeds) runs the backward; each layer's attention backward pools its map.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import StepscopeError
from ..layers import parse_layers, resolve_layers
from ..models import attn_implementation
from ..trace import Trace
from .attention import ATTN_NAME, SaliencyRun, active_run, register
from .memory import Measure, model_shape
from .result import SaliencyResult

POOLS = ("mean", "sum")
LOSSES = ("all", "response", "summary")
METHODS = ("chunked", "reference")


class SaliencyError(StepscopeError):
    """A saliency computation cannot run or produced unusable numbers."""


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------


def loss_targets(trace: Trace, loss: str) -> tuple[int, int]:
    """The range [t0, T) of target token positions whose prediction enters the loss (t0 >= 1)."""
    T = len(trace)
    if loss == "all":
        t0 = 1
    elif loss == "response":
        t0 = max(1, trace.segments["thinking"][0])
        if t0 >= T:
            raise SaliencyError("loss 'response' needs thinking or summary tokens, and this trace is all question"
                                f"{_trace_name(trace)}")
    elif loss == "summary":
        t0 = max(1, trace.segments["summary"][0])
        if t0 >= T:
            raise SaliencyError(f"loss 'summary' needs a summary, and this trace has none{_trace_name(trace)} "
                                "(its thinking never closed?); use loss='all' or 'response'")
    else:
        raise SaliencyError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if T < 2:
        raise SaliencyError(f"a trace needs at least 2 tokens for a next-token loss{_trace_name(trace)}")
    return t0, T


def _trace_name(trace: Trace) -> str:
    return f" (trace {trace.id})" if trace.id is not None else ""


def _trace_label(trace: Trace) -> str:
    return f"trace {trace.id}" if trace.id is not None else "a trace"


def max_positions(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    v = getattr(cfg, "max_position_embeddings", None)
    return int(v) if v else None


def model_name(model) -> str:
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return str(name) if name else type(model).__name__


def _versions() -> dict:
    import transformers

    from .. import __version__

    return {"torch": torch.__version__, "transformers": transformers.__version__, "stepscope": __version__}


def _check_traces(model, traces: Sequence[Trace], loss: str) -> None:
    limit = max_positions(model)
    vocab = model_shape(model)["vocab"]
    for tr in traces:
        if not isinstance(tr, Trace):
            raise SaliencyError(f"expected a Trace, got {type(tr).__name__}")
        if limit is not None and len(tr) > limit:
            raise SaliencyError(f"{_trace_label(tr)} has {len(tr)} tokens, more than the model's context of "
                                f"{limit} (max_position_embeddings)")
        if tr.token_ids and (max(tr.token_ids) >= vocab or min(tr.token_ids) < 0):
            raise SaliencyError(f"{_trace_label(tr)} holds token ids outside the model's vocabulary of {vocab}"
                                " (was it made with another tokenizer?)")
        loss_targets(tr, loss)


# ---------------------------------------------------------------------------------------------------------------
# the model, prepared for the duration and restored exactly
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen_eval(model) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; each module's mode and flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated decoder blocks: transformers' GradientCheckpointingLayer instances, else the longest ModuleList."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()
    layers = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def checkpointed_layers(model, enable: bool = True) -> Iterator[int]:
    """Run every decoder layer under torch.utils.checkpoint (non-reentrant) while grad is on; yields the count."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model) if enable else []
    wrapped = []
    try:
        for layer in layers:
            had = "forward" in vars(layer)
            orig = layer.forward

            def fwd(*args, __orig=orig, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(__orig, *args, use_reentrant=False, **kwargs)
                return __orig(*args, **kwargs)

            layer.forward = fwd
            wrapped.append((layer, had, orig))
        yield len(layers)
    finally:
        for layer, had, orig in wrapped:
            if had:
                layer.forward = orig
            else:
                del layer.forward


def _decoder(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        dec = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if dec is None or dec is model:
        raise SaliencyError(f"cannot find the decoder inside {type(model).__name__}; use method='reference'")
    return dec


def _logits_fn(model):
    """hidden [B, n, hidden] -> logits [B, n, vocab] (float32, or float64 for a float64 model), as the model's own
    forward computes them."""
    head = model.get_output_embeddings()
    if head is None:
        raise SaliencyError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)  # Cohere multiplies
    divide = getattr(cfg, "logits_scaling", None)  # Granite divides

    def fn(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        if divide:
            logits = logits / divide
        if logits.dtype != torch.float64:
            logits = logits.float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return fn


_LOGITS_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_logits(model, decoder, logits_fn, ids: torch.Tensor) -> None:
    """Refuse models whose logits are not lm_head(decoder(x)) up to the post-processing _logits_fn knows.

    One short forward (<= 16 tokens) per model, dtype and device; the verdict is remembered.
    """
    key = (str(next(model.parameters()).dtype), str(ids.device))
    if _LOGITS_CHECKED.get(model) == key:
        return
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.double()
        ours = logits_fn(decoder(input_ids=ids, use_cache=False)[0]).double()
    dtype = next(model.parameters()).dtype
    if not bool(torch.isfinite(full).all()):
        raise SaliencyError(f"the model's logits are not finite{_float32_hint(dtype)}")
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    if full.shape != ours.shape or not torch.allclose(full, ours, rtol=tol, atol=tol * float(full.abs().max())):
        raise SaliencyError(f"{type(model).__name__}: its logits are not its output head applied to its decoder's "
                            "hidden states (unknown post-processing); use method='reference'")
    _LOGITS_CHECKED[model] = key


# ---------------------------------------------------------------------------------------------------------------
# the chunked method
# ---------------------------------------------------------------------------------------------------------------


def _pad_batch(traces: Sequence[Trace], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    T = max(len(t) for t in traces)
    ids = torch.zeros(len(traces), T, dtype=torch.long)
    mask = torch.zeros(len(traces), T, dtype=torch.long)
    for b, tr in enumerate(traces):
        ids[b, :len(tr)] = torch.tensor(tr.token_ids, dtype=torch.long)
        mask[b, :len(tr)] = 1
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def _loss_weights(traces: Sequence[Trace], loss: str, T: int) -> torch.Tensor:
    """w[b, p]: weight of the prediction at position p (target p + 1); each trace's weights sum to 1."""
    w = torch.zeros(len(traces), T, dtype=torch.float64)
    for b, tr in enumerate(traces):
        t0, t1 = loss_targets(tr, loss)
        w[b, t0 - 1:t1 - 1] = 1.0 / (t1 - t0)
    return w


def _chunked_loss(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, logits_fn,
                  budget_bytes: int) -> torch.Tensor:
    """sum_b sum_p w[b, p] * CE(logits[b, p], ids[b, p + 1]), a checkpointed chunk of positions at a time.

    hidden [B, T, hidden]; ids [B, T]; weights [B, T] (zero at p = T - 1).
    """
    from torch.utils.checkpoint import checkpoint

    B, T, _ = hidden.shape
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # [B, T]; the last column has weight 0
    weights = weights.to(hidden.device)
    active = weights.sum(dim=0).cpu().numpy() > 0  # [T] positions that enter the loss (one host copy)
    if not active.any():
        raise SaliencyError("no position enters the loss")
    first, last = int(np.argmax(active)), int(len(active) - np.argmax(active[::-1]))
    with torch.no_grad():
        vocab = logits_fn(hidden[:1, :1].detach()).shape[-1]
    rows = max(16, int(budget_bytes // max(B * vocab * 4 * 3, 1)))

    def chunk(h, tgt, w):
        logits = logits_fn(h)  # [B, n, vocab] float32 (float64)
        ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none")  # [B * n]
        return (ce * w.flatten().to(ce.dtype)).sum()

    total = None
    for c0 in range(first, last, rows):
        c1 = min(last, c0 + rows)
        part = checkpoint(chunk, hidden[:, c0:c1], targets[:, c0:c1], weights[:, c0:c1], use_reentrant=False)
        total = part if total is None else total + part
    return total


def _finish_maps(sums: torch.Tensor, trace: Trace, pool: str) -> torch.Tensor:
    """Crop a trace's summed maps to its steps and apply the pooling divisor. sums [..., S_max, S_max]."""
    S = trace.num_steps
    m = sums[..., :S, :S].cpu()
    if pool == "mean":
        n = torch.tensor([s.num_tokens for s in trace.steps], dtype=m.dtype)
        m = m / (n[:, None] * n[None, :])
    return m


def _float32_hint(dtype: torch.dtype) -> str:
    if dtype in (torch.float32, torch.float64):
        return " (numeric overflow even in float32: check the model's weights)"
    return f" (numeric overflow in {str(dtype).replace('torch.', '')}); run the model in float32 (--dtype float32)"


def _check_finite(maps: torch.Tensor, trace: Trace, dtype: torch.dtype, layers: list[int]) -> None:
    bad = ~torch.isfinite(maps).flatten(1).all(dim=1)
    if bool(bad.any()):
        layer = layers[int(torch.nonzero(bad)[0])]
        raise SaliencyError(f"non-finite saliency at layer {layer}{_trace_name(trace)}{_float32_hint(dtype)}")


def _chunked_batch(model, traces: Sequence[Trace], loss: str, pool: str, layers: list[int], heads: bool,
                   block_rows: int | None, checkpoint: bool, progress) -> tuple[list, list, int]:
    device = model.get_input_embeddings().weight.device
    ids, attn_mask = _pad_batch(traces, device)
    B, T = ids.shape
    weights = _loss_weights(traces, loss, T)
    run = SaliencyRun(step_ids=[tr.step_ids() for tr in traces], num_steps=max(t.num_steps for t in traces),
                      layer_slot={layer: i for i, layer in enumerate(layers)}, heads=heads, block_rows=block_rows,
                      on_layer_done=progress)
    decoder = _decoder(model)
    logits_fn = _logits_fn(model)
    _check_logits(model, decoder, logits_fn, ids[:1, :min(16, len(traces[0]))])
    num_layers = model_shape(model)["layers"]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        loss_budget = max(64 * 2**20, free // 8)
    else:
        loss_budget = 256 * 2**20
    register()
    with attn_implementation(model, ATTN_NAME), checkpointed_layers(model, checkpoint), active_run(run):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # [B, T, hidden]
        position_ids = torch.arange(T, device=device).unsqueeze(0).expand(B, T)
        out = decoder(inputs_embeds=embeds, attention_mask=attn_mask, position_ids=position_ids, use_cache=False)
        hidden = out[0]  # [B, T, hidden]
        if not run.reached:
            raise SaliencyError(f"{type(model).__name__}: no attention layer called the registered "
                                f"'{ATTN_NAME}' function (its attention does not use transformers' "
                                "AttentionInterface); use method='reference'")
        missing = [layer for layer in layers if layer not in run.reached]
        if missing:
            raise SaliencyError(f"{type(model).__name__}: layers {missing[:8]} never called the registered "
                                f"attention function (of {num_layers}); use method='reference'")
        total = _chunked_loss(hidden, ids, weights, logits_fn, loss_budget)
        if not bool(torch.isfinite(total)):
            raise SaliencyError(f"the loss is not finite ({float(total)}){_float32_hint(next(model.parameters()).dtype)}")
        run.phase = "backward"
        torch.autograd.grad(total, embeds)
    if run.maps is None:
        raise SaliencyError("the backward pass never reached the attention function")
    maps = [run.maps[b] for b in range(B)]  # each [Ls, S_max, S_max]
    head_maps = [run.head_maps[b] for b in range(B)] if run.head_maps is not None else [None] * B
    return maps, head_maps, run.block_rows_used


# ---------------------------------------------------------------------------------------------------------------
# the public function
# ---------------------------------------------------------------------------------------------------------------


def step_saliency(model, trace_or_traces: Trace | Sequence[Trace], pool: str = "mean", loss: str = "all",
                  layers: Sequence[int] | int | str | None = None, method: str = "chunked", heads: bool = False,
                  batch_size: int = 1, block_rows: int | None = None, checkpoint: bool = True,
                  progress: bool = False) -> SaliencyResult | list[SaliencyResult]:
    """Step-Saliency maps (docs/method.md §3) of one trace (-> SaliencyResult) or several (-> list, same order).

    - `pool`: "mean" (mean of I over the |i|*|j| token pairs of two steps, causally masked pairs counting as
      zero) or "sum" (their total).
    - `loss`: "all" | "response" | "summary": which next-token targets enter the mean cross-entropy (see the
      module docstring for the exact positions).
    - `layers`: model layer indices (negative from the end) or a layer spec (`stepscope.layers`: "shallow,deep",
      "0-3"; default all); maps[l] belongs to layer `meta["layers"][l]`.
    - `method`: "chunked" (exact, memory near-linear in T; needs the model's attention to go through
      transformers' AttentionInterface) or "reference" (eager attention keeping every layer's T x T
      probabilities and their gradients; for small inputs and tests).
    - `heads`: also keep per-head maps (`result.head_maps`, [L, H, S, S]).
    - `batch_size`: traces per forward/backward (chunked); a batch gives each trace the same maps as alone.
    - `block_rows`: query rows per backward block (default: chosen from free memory).
    - `checkpoint`: activation checkpointing per decoder layer (chunked; default on).
    - `progress`: a tqdm bar per batch, one tick per layer finished in the backward.
    Saliency is computed in float32 (float64 for a float64 model) whatever the model's dtype.
    """
    single = isinstance(trace_or_traces, Trace)
    traces = [trace_or_traces] if single else list(trace_or_traces)
    if not traces:
        raise SaliencyError("no traces given")
    if pool not in POOLS:
        raise SaliencyError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
    if method not in METHODS:
        raise SaliencyError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise SaliencyError("batch_size must be at least 1")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise SaliencyError(f"block_rows must be a positive integer or None, got {block_rows!r}")
    _check_traces(model, traces, loss)
    shape = model_shape(model)
    try:
        layer_list = resolve_layers(parse_layers(layers, shape["layers"]), shape["layers"])
    except StepscopeError as e:
        raise SaliencyError(str(e)) from None
    dtype = next(model.parameters()).dtype
    device = model.get_input_embeddings().weight.device
    results: list[SaliencyResult] = []
    step = 1 if method == "reference" else batch_size
    for start in range(0, len(traces), step):
        batch = traces[start:start + step]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            name = batch[0].id if len(batch) == 1 and batch[0].id is not None else f"traces {start}-{start + len(batch) - 1}"
            bar = tqdm(total=len(layer_list), desc=f"saliency {name}", unit="layer", leave=False)
        # gradients are needed even when the caller is under torch.no_grad() or torch.inference_mode()
        with Measure(device) as meas, frozen_eval(model), torch.inference_mode(False), torch.enable_grad():
            if method == "reference":
                from .reference import reference_saliency

                m, hm = reference_saliency(model, batch[0], loss=loss, pool=pool, layers=layer_list, heads=heads)
                maps_list, head_list, rows_used = [m], [hm], 0
            else:
                tick = (lambda _layer, _bar=bar: _bar.update(1)) if bar is not None else None
                maps_list, head_list, rows_used = _chunked_batch(model, batch, loss, pool, layer_list, heads,
                                                                 block_rows, checkpoint, tick)
        if bar is not None:
            bar.close()
        for tr, m, hm in zip(batch, maps_list, head_list):
            if method == "chunked":
                m = _finish_maps(m, tr, pool)
                hm = _finish_maps(hm, tr, pool) if hm is not None else None
            m = m.to(torch.float32)
            hm = hm.to(torch.float32) if hm is not None else None
            _check_finite(m, tr, dtype, layer_list)
            t0, t1 = loss_targets(tr, loss)
            meta = {
                "model": model_name(model), "method": method, "pool": pool, "loss": loss,
                "loss_targets": [t0, t1], "dtype": str(dtype).replace("torch.", ""),
                "compute_dtype": "float64" if dtype == torch.float64 else "float32",
                "device": str(device), "layers": layer_list, "num_layers": shape["layers"],
                "num_heads": shape["heads"], "num_steps": tr.num_steps, "T": len(tr),
                "batch_size": len(batch), "time_s": round(meas.time_s / len(batch), 4),
                "peak_memory_bytes": meas.peak_bytes, "peak_memory_kind": meas.kind,
                "block_rows": rows_used or None, "checkpoint": bool(checkpoint and method == "chunked"),
                "trace_id": tr.id, "versions": _versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            results.append(SaliencyResult(maps=m, trace=tr, meta=meta, head_maps=hm))
    return results[0] if single else results
