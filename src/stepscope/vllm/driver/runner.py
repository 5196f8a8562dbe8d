"""`generate_traces` on a vLLM engine: the same prompts, Trace records and meta as the transformers engine's
`stepscope.flow.generate_traces`, with vLLM's continuous batching, paged cache and tensor parallelism.

Sampling is vLLM's, seeded per request (`SamplingParams.seed` = the row's seed), so the plain and StepFlow arms
of a run are paired sample by sample, but a row's sampled tokens are not the transformers engine's for the same
seed (greedy rows are). The run's config records `engine` ("vllm") and `engine_version`. StepFlow requests
carry a per-config `cache_salt`.

Budget forcing (`max_thinking_tokens`) runs in phases. A row's request asks for at most as many tokens as can
be written before its thinking reaches the budget; when it stops there with its thinking still open, the
format's end marker is appended as the transformers engine forces it, and the row continues as a new request
whose prompt holds everything so far. StepFlow stays exact across phases: the new request's segmenter is fed
the same tokens, and StepFlow acts on a prefill of thinking and summary tokens exactly as on decoding them
(docs/method.md §5), so its keys (computed again, or reused from the salted prefix cache) are the ones the first
request computed. Its stats count only positions the earlier phases did not (`extra_args["stepflow_start"]`),
and all phases of a row count under one key.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

from ...core.support import attention_problem
from ...decoding import DecodeConfig
from ...errors import StepscopeError
from ...flow.config import StepFlowConfig
from ...flow.generate import run_config as hf_run_config
from ...flow.generate import stop_token_ids
from ...formats import Format, get_format
from ...prompts import build_prompt, forced_close_text
from ...segment import Segmenter
from ...tokens import token_bytes
from ...trace import Trace
from ..plugin.register import vllm_version
from ..plugin.requests import START_KEY
from .client import collect_stats, prompt, sampling_params


def _engine_model(llm) -> SimpleNamespace:
    """What `run_config` and `stop_token_ids` read of a model, taken from the vLLM engine's model config."""
    mc = llm.llm_engine.model_config
    try:
        from transformers import GenerationConfig

        gc = GenerationConfig.from_pretrained(mc.model)
    except Exception:  # noqa: BLE001 - a model folder without generation_config.json
        gc = None
    return SimpleNamespace(name_or_path=str(mc.model), config=SimpleNamespace(_name_or_path=str(mc.model)),
                           dtype=str(mc.dtype), generation_config=gc)


def run_config(llm, tokenizer, *, decode: DecodeConfig | None = None, stepflow: StepFlowConfig | None = None,
               prompt_style: str = "r1", system: str | None = None, fmt: str | Format = "auto",
               **decoding) -> dict:
    """The JSON settings `generate_traces` records in each trace's meta["config"]: the transformers engine's
    (`stepscope.flow.generate.run_config`) and the engine with its version."""
    config = hf_run_config(_engine_model(llm), tokenizer, decode=decode, stepflow=stepflow,
                           prompt_style=prompt_style, system=system, fmt=fmt, **decoding)
    config.update({"engine": "vllm", "engine_version": vllm_version()})
    return config


def phase_seed(seed: int, phase: int) -> int:
    """The vLLM seed of a row's budget-forcing phase (phase 0: the row's seed)."""
    if phase == 0:
        return int(seed)
    digest = hashlib.sha256(f"{seed}:phase{phase}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


@dataclass
class _Row:
    """One question's generation across its phases, counted as the transformers engine counts it."""

    index: int
    key: str
    prompt_ids: list[int]
    seg: Segmenter
    gen: list[int] = field(default_factory=list)
    thinking_tokens: int = 0  # generated tokens written inside the thinking (forced ones excluded)
    budget_forced: bool = False
    stop_reason: str | None = None
    phases: int = 0
    counted: int = 0  # positions [0, counted) were queries of an earlier phase (StepFlow counted them)

    def accept(self, tokens: list[int], stops: set[int]) -> None:
        for t in tokens:
            if self.seg.segment == "thinking":
                self.thinking_tokens += 1
            self.gen.append(t)
            if t in stops:
                self.stop_reason = "eos"
                return
            self.seg.feed((t,))

    def force(self, forced: list[int], budget: int | None, max_new: int) -> None:
        """Budget forcing: the end marker once the thinking has spent its budget without closing."""
        if budget is None or self.budget_forced or self.seg.segment != "thinking" or self.thinking_tokens < budget:
            return
        self.budget_forced = True
        for t in forced[:max_new - len(self.gen)]:
            self.gen.append(t)
            self.seg.feed((t,))

    def next_tokens(self, budget: int | None, max_new: int) -> int:
        """Tokens the next request may write: the rest, or only up to where the thinking could reach the budget."""
        left = max_new - len(self.gen)
        if budget is None or self.budget_forced:
            return left
        return min(left, max(1, budget - self.thinking_tokens))


def generate_traces(llm, tokenizer, questions: Sequence[str], *, decode: DecodeConfig | None = None,
                    stepflow: StepFlowConfig | None = None, seeds: Sequence[int] | None = None,
                    batch_size: int | None = None, prompt_style: str = "r1", system: str | None = None,
                    fmt="auto", progress: bool = True, metas: Sequence[dict | None] | None = None,
                    on_batch: Callable[[list[Trace]], None] | None = None,
                    on_progress: Callable[[int, int], None] | None = None, **decoding) -> list[Trace]:
    """One trace per question from the vLLM engine `llm`, in the order of `questions`.

    Arguments as `stepscope.flow.generate_traces`; `batch_size`: questions handed to vLLM at a time (None: all;
    vLLM batches them itself), each chunk's traces passed to `on_batch` (for saving and resuming);
    `on_progress(new_tokens, rows_done)` is called after every vLLM call."""
    d = decode if decode is not None else DecodeConfig(**decoding)
    if decode is not None and decoding:
        raise StepscopeError(f"give decode= or its fields as keyword arguments ({', '.join(decoding)}), not both")
    d.validate()
    questions = list(questions)
    n = len(questions)
    seeds = [d.seed + i for i in range(n)] if seeds is None else [int(x) for x in seeds]
    if len(seeds) != n:
        raise StepscopeError(f"got {len(seeds)} seeds for {n} questions")
    if metas is not None and len(metas) != n:
        raise StepscopeError(f"got {len(metas)} metas for {n} questions")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise StepscopeError(f"question {i} is empty or not a string")
    if stepflow is not None:
        problem = attention_problem(llm.llm_engine.model_config.hf_config)
        if problem:
            raise StepscopeError(problem)
    f = get_format(fmt, tokenizer)
    if stepflow is not None and stepflow.fmt == "auto" and stepflow.markers is None:
        stepflow = replace(stepflow, fmt=f)
    config = run_config(llm, tokenizer, decode=d, stepflow=stepflow, prompt_style=prompt_style, system=system,
                        fmt=f)
    stops = stop_token_ids(_engine_model(llm), tokenizer)
    forced = list(tokenizer(forced_close_text(f), add_special_tokens=False)["input_ids"])
    max_len = int(llm.llm_engine.model_config.max_model_len)
    tb = token_bytes(tokenizer)
    run = uuid.uuid4().hex[:12]
    step = batch_size or max(1, n)
    results: list[Trace | None] = [None] * n
    for a in range(0, n, step):
        rows = []
        for i in range(a, min(n, a + step)):
            pids = build_prompt(tokenizer, questions[i], style=prompt_style, system=system, fmt=f)[1]
            seg = Segmenter(tokenizer, f, tokbytes=tb)
            seg.feed(pids)
            rows.append(_Row(i, f"{run}-{i}", pids, seg))
        t0 = time.perf_counter()
        _run_phases(llm, rows, d, stepflow, seeds, stops, forced, max_len, progress, on_progress)
        seconds = time.perf_counter() - t0
        stats = collect_stats(llm, keys=[r.key for r in rows], clear=True) if stepflow is not None else {}
        done = []
        for r in rows:
            meta = dict((metas[r.index] or {}) if metas is not None else {})
            meta.update({
                "question": questions[r.index], "seed": seeds[r.index], "num_prompt_tokens": len(r.prompt_ids),
                "num_new_tokens": len(r.gen), "stop_reason": r.stop_reason or "length",
                "budget_forced": r.budget_forced, "thinking_tokens": r.thinking_tokens,
                "timing": {"batch_seconds": seconds, "batch_rows": len(rows), "phases": r.phases}, "config": config,
            })
            if r.key in stats:
                meta["stepflow_stats"] = stats[r.key].to_json()
            trace = Trace.from_ids(tokenizer, r.prompt_ids + r.gen, fmt=f, meta=meta)
            results[r.index] = trace
            done.append(trace)
        if on_batch is not None:
            on_batch(done)
    return results  # type: ignore[return-value]


def _run_phases(llm, rows: list[_Row], d: DecodeConfig, stepflow: StepFlowConfig | None, seeds: list[int],
                stops: set[int], forced: list[int], max_len: int, progress: bool,
                on_progress: Callable[[int, int], None] | None = None) -> None:
    """Generate every row to its end: one vLLM call per budget-forcing phase (one in all without a budget)."""
    budget = d.max_thinking_tokens
    live = list(rows)
    for r in live:
        r.force(forced, budget, d.max_new_tokens)  # a budget of 0 closes a thinking the prompt opened

    def going(r: _Row) -> bool:  # the row asks for more tokens
        return r.stop_reason is None and len(r.gen) < d.max_new_tokens and len(r.prompt_ids) + len(r.gen) < max_len

    while live:
        live = [r for r in live if going(r)]
        if not live:
            return
        params, prompts = [], []
        for r in live:
            extra = {START_KEY: r.counted} if stepflow is not None and r.counted else None
            params.append(sampling_params(
                stepflow, r.key, max_tokens=r.next_tokens(budget, d.max_new_tokens),
                temperature=d.temperature if d.sampling else 0.0, top_p=d.top_p if d.sampling else 1.0,
                top_k=d.top_k if d.sampling else 0, seed=phase_seed(seeds[r.index], r.phases),
                stop_token_ids=sorted(stops), ignore_eos=False, skip_special_tokens=False, extra_args=extra))
            prompts.append(prompt(r.prompt_ids + r.gen, stepflow))
        outs = llm.generate(prompts, params, use_tqdm=progress)
        before = sum(len(r.gen) for r in live)
        for r, o in zip(live, outs):
            c = o.outputs[0]
            r.phases += 1
            r.accept(list(c.token_ids), stops)
            if c.finish_reason == "stop" and r.stop_reason is None:  # an end of sequence vLLM knows of itself
                r.stop_reason = "eos"
            r.counted = len(r.prompt_ids) + len(r.gen) - 1  # the last token was written, never a query
            if r.stop_reason is None:
                r.force(forced, budget, d.max_new_tokens)
        if on_progress is not None:
            on_progress(sum(len(r.gen) for r in live) - before, sum(not going(r) for r in live))
