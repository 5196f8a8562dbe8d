"""`generate_traces` on a vLLM engine: the same prompts, Trace records and meta as the transformers engine's
`stepscope.flow.generate_traces`, with vLLM's continuous batching, paged cache and tensor parallelism.

Differences, by design: sampling is vLLM's, seeded per request (`SamplingParams.seed` = the row's seed), so
the plain and StepFlow arms of a run are paired sample by sample, but a row's tokens are not the transformers
engine's for the same seed; budget forcing (`max_thinking_tokens`) is not available here. The run's config
records `engine` ("vllm") and `engine_version`. StepFlow requests carry a per-config `cache_salt`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace

from ..decoding import DecodeConfig
from ..errors import StepscopeError
from ..flow.config import StepFlowConfig
from ..flow.generate import run_config, stop_token_ids
from ..formats import get_format
from ..prompts import build_prompt
from ..segment import Segmenter
from ..tokens import token_bytes
from ..trace import Trace
from . import collect_stats, prompt, sampling_params
from .plugin import vllm_version


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


def _thinking_tokens(tokenizer, fmt, prompt_ids: list[int], gen: list[int], tb, eos: bool) -> int:
    """Generated tokens written inside the thinking (as the transformers engine counts them)."""
    seg = Segmenter(tokenizer, fmt, tokbytes=tb)
    seg.feed(prompt_ids)
    n = 0
    for t in gen[:-1] if eos else gen:
        n += seg.segment == "thinking"
        seg.feed((t,))
    return n + (eos and seg.segment == "thinking")


def generate_traces(llm, tokenizer, questions: Sequence[str], *, decode: DecodeConfig | None = None,
                    stepflow: StepFlowConfig | None = None, seeds: Sequence[int] | None = None,
                    batch_size: int | None = None, prompt_style: str = "r1", system: str | None = None,
                    fmt="auto", progress: bool = True, metas: Sequence[dict | None] | None = None,
                    on_batch: Callable[[list[Trace]], None] | None = None, **decoding) -> list[Trace]:
    """One trace per question from the vLLM engine `llm`, in the order of `questions`.

    Arguments as `stepscope.flow.generate_traces`; `batch_size`: questions handed to vLLM at a time (None: all;
    vLLM batches them itself), each chunk's traces passed to `on_batch` (for saving and resuming)."""
    d = decode if decode is not None else DecodeConfig(**decoding)
    if decode is not None and decoding:
        raise StepscopeError(f"give decode= or its fields as keyword arguments ({', '.join(decoding)}), not both")
    d.validate()
    if d.max_thinking_tokens is not None:
        raise StepscopeError("max_thinking_tokens (budget forcing) is not available with the vLLM engine")
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
    model = _engine_model(llm)
    f = get_format(fmt, tokenizer)
    if stepflow is not None and stepflow.fmt == "auto" and stepflow.markers is None:
        stepflow = replace(stepflow, fmt=f)
    config = run_config(model, tokenizer, decode=d, stepflow=stepflow, prompt_style=prompt_style, system=system,
                        fmt=f)
    config.update({"engine": "vllm", "engine_version": vllm_version()})
    stops = sorted(stop_token_ids(model, tokenizer))
    tb = token_bytes(tokenizer)
    run = uuid.uuid4().hex[:12]
    prompts = [build_prompt(tokenizer, q, style=prompt_style, system=system, fmt=f)[1] for q in questions]
    step = batch_size or max(1, n)
    results: list[Trace | None] = [None] * n
    for a in range(0, n, step):
        idx = list(range(a, min(n, a + step)))
        keys = [f"{run}-{i}" for i in idx]
        params = [sampling_params(stepflow, k, max_tokens=d.max_new_tokens,
                                  temperature=d.temperature if d.sampling else 0.0, top_p=d.top_p if d.sampling
                                  else 1.0, top_k=d.top_k if d.sampling else 0, seed=seeds[i],
                                  stop_token_ids=stops, ignore_eos=False, skip_special_tokens=False)
                  for i, k in zip(idx, keys)]
        t0 = time.perf_counter()
        outs = llm.generate([prompt(prompts[i], stepflow) for i in idx], params, use_tqdm=progress)
        seconds = time.perf_counter() - t0
        stats = collect_stats(llm, keys=keys, clear=True) if stepflow is not None else {}
        done = []
        for i, k, o in zip(idx, keys, outs):
            c = o.outputs[0]
            gen = list(c.token_ids)
            eos = c.finish_reason == "stop"
            meta = dict((metas[i] or {}) if metas is not None else {})
            meta.update({
                "question": questions[i], "seed": seeds[i], "num_prompt_tokens": len(prompts[i]),
                "num_new_tokens": len(gen), "stop_reason": "eos" if eos else "length", "budget_forced": False,
                "thinking_tokens": _thinking_tokens(tokenizer, f, prompts[i], gen, tb, eos),
                "timing": {"batch_seconds": seconds, "batch_rows": len(idx)}, "config": config,
            })
            if k in stats:
                meta["stepflow_stats"] = stats[k].to_json()
            trace = Trace.from_ids(tokenizer, prompts[i] + gen, fmt=f, meta=meta)
            results[i] = trace
            done.append(trace)
        if on_batch is not None:
            on_batch(done)
    return results  # type: ignore[return-value]
