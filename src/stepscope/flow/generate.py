"""Batched trace generation: our own KV-cached decode loop over left-padded batches, optionally under StepFlow.

One loop serves the baseline and StepFlow arms alike, so the two are paired:

- Per-row reproducible sampling. Each row owns a CPU `torch.Generator` seeded with its seed; it draws one
  uniform number per generated token (in blocks of 64, moved to the device once per block), and the token is
  picked by inverse-CDF sampling over the filtered distribution in vocabulary order. A row's tokens therefore
  depend only on (seed, its own logits), never on which other rows share its batch; the uniforms themselves
  are the same on every device.
- The decoding settings are one `DecodeConfig` (stepscope.decoding): temperature, top-k (first), then top-p
  (the smallest set of most likely tokens holding `top_p` of the mass); greedy (argmax) when temperature == 0
  or do_sample=False.
- Per-row stop at end-of-sequence / end-of-turn tokens or at `max_new_tokens`; finished rows leave the batch
  (their KV cache rows, their sampling streams and, under StepFlow, their step state are dropped) so they stop
  costing compute.
- Budget forcing: a row that has written `max_thinking_tokens` tokens inside the thinking without closing it is
  made to write the format's end marker ("\\n</think>\\n\\n"; for harmony "<|end|><|start|>assistant<|channel|>
  final<|message|>") and then continues with the summary.
- One host round trip per generated token for the whole batch (the new tokens, as one list), used for stop
  checks, the incremental segmenter, budget forcing, streaming and progress; nothing per layer.

Under StepFlow the model's forward pre-hook feeds StepFlow's own segmenters, so this loop only runs forwards
inside `with StepFlow(...)`.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..decoding import DecodeConfig
from ..errors import StepscopeError
from ..formats import Format, end_of_turn_markers, get_format
from ..prompts import STYLES, build_prompt, forced_close_text
from ..segment import Segmenter
from ..tokens import token_bytes
from ..trace import Trace
from .config import StepFlowConfig
from .stepflow import StepFlow

__all__ = ["generate_traces", "run_config", "sample_tokens", "stop_token_ids", "response_text"]

UNIFORM_BLOCK = 64  # uniforms drawn per row at a time


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's, the tokenizer's, and the registered formats' end-of-turn
    special tokens (stepscope.formats.end_of_turn_markers)."""
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    for v in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if v is not None:
            ids.add(int(v))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []) or []) | \
        {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    for s in end_of_turn_markers():
        if s in vocab and s in special:
            ids.add(int(vocab[s]))
    return ids


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, candidates: int | None = None) -> torch.Tensor:
    """Pick one token per row by inverse-CDF sampling: logits [B, V], uniforms [B] in [0, 1) -> ids [B] int64.

    temperature scales the logits; top-k keeps the k largest (ties at the k-th value kept); top-p keeps the
    smallest set of most likely tokens whose mass reaches top_p (ties at the threshold kept). The pick walks the
    kept probabilities in vocabulary order, so a tiny change in the logits moves the pick only when the uniform
    lies within that change of a boundary.

    `candidates` (default 256 on CPU, 0 elsewhere): look for the kept set among that many most likely tokens
    first (a partial top-k instead of sorting the vocabulary), falling back to the full sort for a row whose kept
    set does not fit. Both ways give the same token for the same row; the choice is made per row, so a row's
    result never depends on its batch.
    """
    x = logits.float() / temperature  # [B, V]
    B, V = x.shape
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)  # [B, V]
    acc = torch.float32 if probs.device.type == "mps" else torch.float64
    u = uniforms.to(device=probs.device, dtype=acc).clamp(0.0, 1.0 - 1e-12)  # [B]
    if candidates is None:
        candidates = 256 if probs.device.type == "cpu" else 0
    C = candidates
    if not (0 < C < V and (top_p < 1.0 or 0 < top_k <= C)):
        return _sample_full(probs, u, top_p)
    sp, si = torch.topk(probs, C, dim=-1)  # [B, C] most likely first, and their ids
    if top_p < 1.0:
        thresh = _nucleus_threshold(sp, top_p)  # [B, 1]
        fits = thresh[:, 0] > sp[:, -1]  # nothing outside the candidates reaches the threshold
    else:
        thresh = sp.new_full((B, 1), torch.finfo(sp.dtype).tiny)
        fits = sp[:, -1] == 0  # every token top-k kept is a candidate
    pc = torch.where(sp >= thresh, sp, torch.zeros_like(sp)).to(acc)  # [B, C]
    order = torch.argsort(si, dim=-1)  # vocabulary order
    si, pc = si.gather(-1, order), pc.gather(-1, order)
    cdf = pc.cumsum(-1)  # [B, C]
    pos = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=C - 1)
    out = si.gather(-1, pos).squeeze(-1)  # [B]
    if probs.device.type == "cpu" and not bool(fits.all()):  # no device sync on CPU
        rows = (~fits).nonzero().squeeze(-1)
        out[rows] = _sample_full(probs[rows], u[rows], top_p)
    return out


def _nucleus_threshold(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B, C] probabilities sorted most likely first -> [B, 1] the smallest probability the nucleus keeps."""
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
    n_keep = (before < top_p).sum(-1, keepdim=True).clamp_(min=1)  # [B, 1]
    return sorted_probs.gather(-1, n_keep - 1)


def _sample_full(probs: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """The plain way: sort the whole vocabulary for top-p, then walk the kept mass in vocabulary order."""
    V = probs.shape[-1]
    if top_p < 1.0:
        sp = torch.sort(probs, dim=-1, descending=True).values  # [B, V]
        probs = probs.masked_fill(probs < _nucleus_threshold(sp, top_p), 0.0)
    cdf = probs.to(u.dtype).cumsum(-1)  # [B, V]
    target = u[:, None] * cdf[:, -1:]  # [B, 1], strictly below the total mass
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=V - 1)


def response_text(trace: Trace) -> str:
    """What the model wrote: the text after the prompt, without a final end-of-turn token."""
    p = int(trace.meta.get("num_prompt_tokens", 0))
    T = len(trace)
    end = T - 1 if trace.meta.get("stop_reason") == "eos" else T
    a = trace.token_char_ends[p - 1] if p > 0 else 0
    b = trace.token_char_ends[end - 1] if end > 0 else 0
    return trace.text[a:max(a, b)]


# -- per-row state on the host ---------------------------------------------------------------------------------


@dataclass
class _Row:
    index: int  # position in the caller's question list
    question: str
    prompt_ids: list[int]
    seed: int
    seg: Segmenter
    gen: list[int] = field(default_factory=list)
    force: list[int] = field(default_factory=list)  # tokens still to force, in order
    thinking_tokens: int = 0  # generated tokens written inside the thinking (forced ones excluded)
    budget_forced: bool = False
    stop_reason: str | None = None
    seconds: float = 0.0  # from the batch start until the row finished
    rng: torch.Generator | None = None


class _Uniforms:
    """Per-row uniform streams, handed to the device one block of UNIFORM_BLOCK steps at a time."""

    def __init__(self, rows: list[_Row], device: torch.device):
        self.rows = rows
        self.device = device
        self.block: torch.Tensor | None = None  # [B, UNIFORM_BLOCK] float64 on device
        for r in rows:
            r.rng = torch.Generator().manual_seed(int(r.seed))

    def column(self, step: int) -> torch.Tensor:
        k = step % UNIFORM_BLOCK
        if k == 0 or self.block is None:
            host = torch.stack([torch.rand(UNIFORM_BLOCK, generator=r.rng, dtype=torch.float64) for r in self.rows])
            if self.device.type == "cuda":
                host = host.pin_memory()
            self.block = host.to(self.device, non_blocking=True)
        return self.block[:, k]  # [B]

    def select(self, keep: list[int], keep_dev: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in keep]
        if self.block is not None:
            self.block = self.block.index_select(0, keep_dev)


def _model_device(model) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _forward_kwargs(model) -> tuple[str, bool]:
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


# -- the decode loop -------------------------------------------------------------------------------------------


def _run_batch(model, rows: list[_Row], d: DecodeConfig, stop_ids: set[int], forced_ids: list[int],
               stream: Callable[[str], None] | None, tokbytes, on_row_done: Callable[[_Row], None],
               sf=None, vocab: int | None = None, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate for `rows` in place; return the batch timing. `vocab`: ids at or above it are never picked;
    `on_progress(new_tokens, rows_done)` is called after every step (stepscope.progress)."""
    device = _model_device(model)
    cache_kw, has_keep = _forward_kwargs(model)
    B = len(rows)
    P = max(len(r.prompt_ids) for r in rows)
    pad = 0
    ids = torch.full((B, P), pad, dtype=torch.long)  # [B, P], left-padded
    mask = torch.zeros((B, P), dtype=torch.long)  # [B, P]
    for i, r in enumerate(rows):
        n = len(r.prompt_ids)
        ids[i, P - n:] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, P - n:] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_(min=0)  # [B, P]
    last_pos = pos[:, -1]  # [B]
    cache = _new_cache(model)
    sampling = d.sampling
    uniforms = _Uniforms(rows, device) if sampling else None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if stream else None
    live = list(rows)
    for r in live:
        _maybe_force(r, d, forced_ids)
    t0 = time.perf_counter()
    t_first = None
    tok = None  # [B] the tokens fed next
    for step in range(d.max_new_tokens):
        kw = {cache_kw: cache, "use_cache": True}
        if step == 0:
            if has_keep:
                kw["logits_to_keep"] = 1
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
        else:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)  # [B, L + 1]
            last_pos = last_pos + 1
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=last_pos[:, None], **kw)
        logits = out.logits[:, -1, :vocab]  # [B, V]: never an id the tokenizer lacks (padded embeddings)
        if sampling:
            tok = sample_tokens(logits, uniforms.column(step), float(d.temperature), d.top_k, float(d.top_p))
        else:
            tok = logits.argmax(dim=-1)  # [B]
        forcing = [r.force[0] if r.force else -1 for r in live]
        if any(f >= 0 for f in forcing):
            f = torch.tensor(forcing, dtype=torch.long)  # [B], rare: only while a budget is being forced
            f = (f.pin_memory() if device.type == "cuda" else f).to(device, non_blocking=True)
            tok = torch.where(f >= 0, f, tok)
        host = tok.tolist()  # the one host round trip of this step
        if t_first is None:
            t_first = time.perf_counter()
        done_any = False
        for r, t in zip(live, host):
            was_forced = bool(r.force)
            if was_forced:
                r.force.pop(0)
            elif r.seg.segment == "thinking":
                r.thinking_tokens += 1
            r.gen.append(t)
            if t in stop_ids and not was_forced:
                r.stop_reason = "eos"
            else:
                r.seg.feed((t,))
                if decoder is not None:
                    piece = decoder.decode(tokbytes(t))
                    if piece:
                        stream(piece)
                if len(r.gen) >= d.max_new_tokens:
                    r.stop_reason = "length"
                else:
                    _maybe_force(r, d, forced_ids)
            if r.stop_reason is not None:
                r.seconds = time.perf_counter() - t0
                done_any = True
                on_row_done(r)
        if on_progress is not None:
            on_progress(len(host), sum(r.stop_reason is not None for r in live) if done_any else 0)
        if not done_any:
            continue
        keep = [i for i, r in enumerate(live) if r.stop_reason is None]
        if not keep:
            break
        # finished rows leave the batch: drop their cache rows and state
        keep_dev = torch.tensor(keep, dtype=torch.long, device=device)
        cache.batch_select_indices(keep_dev)
        mask = mask.index_select(0, keep_dev)
        last_pos = last_pos.index_select(0, keep_dev)
        tok = tok.index_select(0, keep_dev)
        if uniforms is not None:
            uniforms.select(keep, keep_dev)
        if sf is not None:
            sf.select_rows(keep)
        live = [live[i] for i in keep]
    if stream is not None and decoder is not None:
        rest = decoder.decode(b"", final=True)
        if rest:
            stream(rest)
    t1 = time.perf_counter()
    return {"prefill_seconds": (t_first or t1) - t0, "batch_seconds": t1 - t0, "batch_rows": B,
            "batch_prompt_tokens": P}


def _maybe_force(r: _Row, d: DecodeConfig, forced_ids: list[int]) -> None:
    """Start budget forcing once the row has spent its thinking budget without closing the thinking."""
    if (d.max_thinking_tokens is not None and not r.budget_forced and r.seg.segment == "thinking"
            and r.thinking_tokens >= d.max_thinking_tokens):
        r.force = list(forced_ids)
        r.budget_forced = True


def _decode_config(fn: str, decode: DecodeConfig | None, fields: dict) -> DecodeConfig:
    """`decode`, or the DecodeConfig its fields given as keyword arguments build (one or the other)."""
    names = {f.name for f in dataclasses.fields(DecodeConfig)}
    for k in fields:
        if k not in names:
            raise TypeError(f"{fn}() got an unexpected keyword argument {k!r}")
    if decode is None:
        return DecodeConfig(**fields)
    if fields:
        raise StepscopeError(f"give decode= or its fields as keyword arguments ({', '.join(fields)}), not both")
    if not isinstance(decode, DecodeConfig):
        raise StepscopeError(f"decode must be a DecodeConfig, got {type(decode).__name__}")
    return decode.validate()


def _prepare(model, tokenizer, d: DecodeConfig, *, stepflow: StepFlowConfig | None, prompt_style: str,
             system: str | None, fmt: str | Format):
    """Check the settings; return (format, stepflow config, the run's JSON config)."""
    if prompt_style not in STYLES:
        raise StepscopeError(f"unknown prompt style {prompt_style!r}; use one of {', '.join(STYLES)}")
    if stepflow is not None and not isinstance(stepflow, StepFlowConfig):
        raise StepscopeError(f"stepflow must be a StepFlowConfig or None, got {type(stepflow).__name__}")
    f = get_format(fmt, tokenizer)
    if stepflow is not None and stepflow.fmt == "auto" and stepflow.markers is None:
        # StepFlow's segmenters see the format the prompts were built in (also when `fmt` names one), and the
        # recorded config says which
        stepflow = replace(stepflow, fmt=f)
    # the base seed is no run setting here: every row records its own seed in its meta
    decoding = {k: v for k, v in d.to_json().items() if k != "seed"}
    config = {"model": str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")),
              "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""), "fmt": f.to_json(),
              "prompt_style": prompt_style, "system": system, **decoding, "do_sample": d.sampling,
              "stepflow": stepflow.to_json() if stepflow is not None else None}
    return f, stepflow, config


def run_config(model, tokenizer, *, decode: DecodeConfig | None = None, stepflow: StepFlowConfig | None = None,
               prompt_style: str = "r1", system: str | None = None, fmt: str | Format = "auto",
               **decoding) -> dict:
    """The JSON settings `generate_traces` records in each trace's meta["config"] for these arguments."""
    d = _decode_config("run_config", decode, decoding)
    return _prepare(model, tokenizer, d, stepflow=stepflow, prompt_style=prompt_style, system=system, fmt=fmt)[2]


def generate_traces(model, tokenizer, questions: Sequence[str], *, decode: DecodeConfig | None = None,
                    stepflow: StepFlowConfig | None = None, seeds: Sequence[int] | None = None,
                    batch_size: int = 8, prompt_style: str = "r1", system: str | None = None,
                    fmt: str | Format = "auto", progress: bool = True,
                    stream: Callable[[str], None] | None = None, metas: Sequence[dict | None] | None = None,
                    on_batch: Callable[[list[Trace]], None] | None = None,
                    flow_kernel: str | None = None, on_progress: Callable[[int, int], None] | None = None,
                    **decoding) -> list[Trace]:
    """Generate one reasoning trace per question, in batches; return them in the order of `questions`.

    `decode`: the DecodeConfig (default DecodeConfig()); its fields may instead be given as keyword arguments
    (`max_new_tokens=40, temperature=0`), not both. `stepflow`: a StepFlowConfig to generate under StepFlow, or
    None for the plain model. `seeds`: one int per question (default decode.seed + 0, 1, 2, ...): a row's
    sample depends only on its seed and its logits. `stream`: a callback receiving the text of a single
    question's answer as it is written. `metas`: extra meta per question (e.g. its id). `on_batch`: called with
    each finished batch's traces (in the order they finished batches), e.g. to save them. `flow_kernel`:
    StepFlow's `kernel` ("auto", "triton" or "torch"; None: $STEPSCOPE_FLOW_KERNEL or "auto"). `on_progress`:
    called after every decode step with (new tokens, rows finished in it), e.g. a stepscope.progress.TokenProgress.
    Each trace's meta holds question, seed, num_prompt_tokens, num_new_tokens, stop_reason ("eos"|"length"),
    budget_forced, thinking_tokens, thinking_closed, timing and config.
    """
    d = _decode_config("generate_traces", decode, decoding)
    questions = list(questions)
    n = len(questions)
    if n == 0:
        return []
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise StepscopeError(f"question {i} is empty or not a string")
    seeds = [int(d.seed) + i for i in range(n)] if seeds is None else [int(x) for x in seeds]
    if len(seeds) != n:
        raise StepscopeError(f"got {len(seeds)} seeds for {n} questions")
    if metas is not None and len(metas) != n:
        raise StepscopeError(f"got {len(metas)} metas for {n} questions")
    if stream is not None and n != 1:
        raise StepscopeError("streaming works for a single question")
    if batch_size < 1:
        raise StepscopeError(f"batch_size must be at least 1, got {batch_size}")
    f, stepflow, config = _prepare(model, tokenizer, d, stepflow=stepflow, prompt_style=prompt_style,
                                   system=system, fmt=fmt)
    forced_ids = list(tokenizer(forced_close_text(f), add_special_tokens=False)["input_ids"])
    stop_ids = stop_token_ids(model, tokenizer)
    tb = token_bytes(tokenizer)

    rows = []
    for i, q in enumerate(questions):
        _, pids = build_prompt(tokenizer, q, style=prompt_style, system=system, fmt=f)
        seg = Segmenter(tokenizer, f, tokbytes=tb)
        seg.feed(pids)
        rows.append(_Row(i, q, pids, seeds[i], seg))
    # longest prompts first: less padding per batch, and memory trouble shows at once
    order = sorted(range(n), key=lambda i: -len(rows[i].prompt_ids))
    batches = [[rows[i] for i in order[a:a + batch_size]] for a in range(0, n, batch_size)]

    bar = None
    if progress and stream is None and n > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="trace", desc="generate", file=sys.stderr, dynamic_ncols=True)

    def on_row_done(r: _Row) -> None:
        if bar is not None:
            bar.update(1)

    ctx = StepFlow(model, tokenizer, stepflow, kernel=flow_kernel) if stepflow is not None \
        else contextlib.nullcontext()
    results: list[Trace | None] = [None] * n
    try:
        with ctx as sf, torch.inference_mode():
            for batch in batches:
                if sf is not None:
                    sf.reset_stats()  # totals per batch (each trace gets its own row's counts)
                timing = _run_batch(model, batch, d, stop_ids, forced_ids, stream, tb, on_row_done, sf,
                                    vocab=len(tokenizer), on_progress=on_progress)
                done = []
                for i, r in enumerate(batch):  # row i of the batch's prefill
                    meta = dict((metas[r.index] or {}) if metas is not None else {})
                    meta.update({
                        "question": r.question, "seed": r.seed, "num_prompt_tokens": len(r.prompt_ids),
                        "num_new_tokens": len(r.gen), "stop_reason": r.stop_reason or "length",
                        "budget_forced": r.budget_forced, "thinking_tokens": r.thinking_tokens,
                        "timing": {**timing, "row_seconds": r.seconds}, "config": config,
                    })
                    if sf is not None:  # this row's own counts
                        meta["stepflow_stats"] = sf.row_stats(i).to_json()
                    trace = Trace.from_ids(tokenizer, r.prompt_ids + r.gen, fmt=f, meta=meta)
                    results[r.index] = trace
                    done.append(trace)
                if on_batch is not None:
                    on_batch(done)
    finally:
        if bar is not None:
            bar.close()
    return results  # type: ignore[return-value]
