"""vLLM engines for `stepscope generate --engine vllm` and `stepscope eval --engine vllm`: one engine per set of
settings per process, and data parallelism as several engine processes that split each call's questions.

`load_llm(**engine_kwargs(...))` makes an `LLM` once per process for the same settings (an engine takes a minute or
more to start; a second `stepscope.cli.main([...])` in the same process reuses it). `DataParallel(n, kwargs)`
starts n processes, each with its own engine over its own GPUs (`tensor_parallel_size` each, from
CUDA_VISIBLE_DEVICES or all visible GPUs in order); its `generate_traces` has the signature of
`stepscope.vllm.generate_traces` with the pool in place of the engine, hands each process every n-th question
(each with its own seed, so the split changes no sample) and returns the traces in question order.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence

from ...errors import StepscopeError

_ENGINES: dict[tuple, object] = {}
INSTALL_HINT = "pip install 'stepscope[vllm]' in an environment of its own (docs/vllm.md)"


def require_vllm() -> str:
    """vLLM's version, or a one-line StepscopeError when it is not installed."""
    try:
        import vllm
    except ImportError as e:
        raise StepscopeError(f"--engine vllm needs vLLM, which is not installed here ({e}); {INSTALL_HINT}") from None
    return str(getattr(vllm, "__version__", "0"))


def engine_kwargs(model: str, *, dtype: str = "auto", tensor_parallel_size: int = 1, max_model_len: int | None = None,
                  max_num_seqs: int | None = None, seed: int = 0) -> dict:
    """`LLM(...)` arguments for stepscope's runs. dtype "auto": float32 on vLLM's CPU backend, bfloat16 elsewhere
    (as the transformers engine reads it). CPU engines run eagerly (the tested path: docs/vllm.md); GPU engines
    schedule synchronously (StepFlow needs each row's newest token before the forward)."""
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    kw = {"model": model, "dtype": ("float32" if cpu else "bfloat16") if dtype == "auto" else dtype,
          "tensor_parallel_size": int(tensor_parallel_size), "seed": int(seed), "enforce_eager": cpu}
    if not cpu:
        kw["async_scheduling"] = False
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    if max_num_seqs is not None:
        kw["max_num_seqs"] = int(max_num_seqs)
    return kw


def load_llm(**kwargs):
    """`vllm.LLM(**kwargs)`, made once per process for the same arguments. StepFlow runs on vLLM's V1 model runner:
    unless the environment says otherwise, the engine is started with VLLM_USE_V2_MODEL_RUNNER=0 (where the
    environment asks for V2, StepFlow requests are refused with one line)."""
    key = tuple(sorted(kwargs.items()))
    llm = _ENGINES.get(key)
    if llm is None:
        from vllm import LLM

        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

        try:
            llm = LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as e:  # vLLM's refusals (sizes, memory, model) in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise StepscopeError(f"vLLM could not start an engine for {kwargs['model']}: {first[:300]}") from None
        _ENGINES[key] = llm
    return llm


def shutdown_engines() -> None:
    """Stop this process's engines (their engine-core processes). A process that ends without its exit handlers
    (a multiprocessing child) would otherwise leave them running."""
    for llm in _ENGINES.values():
        llm.llm_engine.engine_core.shutdown()
    _ENGINES.clear()


def device_groups(n: int, per_engine: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each of n engines of `per_engine` GPUs (None each where there are no GPUs)."""
    import torch

    if not torch.cuda.is_available():
        return [None] * n
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < n * per_engine:
        raise StepscopeError(f"{n} engines of {per_engine} GPU(s) each need {n * per_engine} GPUs; "
                             f"{len(ids)} are visible")
    return [",".join(ids[i * per_engine:(i + 1) * per_engine]) for i in range(n)]


def _serve(conn, kwargs: dict, devices: str | None, tokenizer_name: str, trust_remote_code: bool) -> None:
    """One engine process of a DataParallel pool: answers ("config", settings) and ("generate", questions,
    settings) until ("stop",)."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        from ...models import load_tokenizer

        llm = load_llm(**kwargs)
        tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=trust_remote_code)
        conn.send(("ok", None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
        shutdown_engines()
        return
    try:
        _answer_jobs(conn, llm, tokenizer)
    finally:
        shutdown_engines()


def _answer_jobs(conn, llm, tokenizer) -> None:
    from .runner import generate_traces, run_config

    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent is gone
            return
        if msg[0] == "stop":
            return
        try:
            if msg[0] == "config":
                conn.send(("ok", run_config(llm, tokenizer, **msg[1])))
            else:
                traces = generate_traces(llm, tokenizer, msg[1], progress=False, **msg[2])
                conn.send(("ok", [t.to_json() for t in traces]))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}" if not isinstance(e, StepscopeError) else str(e)))


class DataParallel:
    """n vLLM engine processes; `generate_traces(tokenizer, questions, ...)` splits the questions between them."""

    def __init__(self, n: int, kwargs: dict, tokenizer_name: str, trust_remote_code: bool = False) -> None:
        if n < 2:
            raise StepscopeError(f"data parallelism needs at least 2 engines, got {n}")
        ctx = mp.get_context("spawn")
        self.n = n
        self.conns, self.procs = [], []
        for devices in device_groups(n, int(kwargs.get("tensor_parallel_size", 1))):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child, kwargs, devices, tokenizer_name, trust_remote_code),
                            daemon=False)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        atexit.register(self.close)
        for i in range(n):
            self._answer(i)

    def _answer(self, i: int):
        try:
            status, value = self.conns[i].recv()
        except EOFError:
            raise StepscopeError(f"vLLM engine process {i} of {self.n} died") from None
        if status != "ok":
            raise StepscopeError(f"vLLM engine process {i} of {self.n}: {value}")
        return value

    def run_config(self, **settings) -> dict:
        self.conns[0].send(("config", settings))
        return self._answer(0)

    def generate_traces(self, tokenizer, questions: Sequence[str], *, seeds: Sequence[int] | None = None,
                        metas: Sequence[dict | None] | None = None, progress: bool = True,
                        on_batch: Callable[[list], None] | None = None, **settings) -> list:
        from multiprocessing.connection import wait

        from ...trace import Trace

        questions = list(questions)
        n = len(questions)
        if seeds is None:  # the single engine's default, fixed before the split
            from ...decoding import DecodeConfig

            base = (settings.get("decode") or DecodeConfig(**{k: v for k, v in settings.items()
                                                              if k in DecodeConfig.__dataclass_fields__})).seed
            seeds = [base + i for i in range(n)]
        shares = [list(range(i, n, self.n)) for i in range(self.n)]
        busy = {}
        for w, idx in enumerate(shares):
            if idx:
                self.conns[w].send(("generate", [questions[i] for i in idx],
                                    {**settings, "seeds": [seeds[i] for i in idx],
                                     "metas": None if metas is None else [metas[i] for i in idx]}))
                busy[self.conns[w]] = w
        out: list = [None] * n
        failed: StepscopeError | None = None
        while busy:  # every busy engine answers, also after one failed (no stale answer is left behind)
            for conn in wait(list(busy)):
                w = busy.pop(conn)
                try:
                    got = [Trace.from_json(t) for t in self._answer(w)]
                except StepscopeError as e:
                    failed = failed or e
                    continue
                for i, t in zip(shares[w], got):
                    out[i] = t
                if on_batch is not None and failed is None:
                    on_batch(got)
        if failed is not None:
            raise failed
        return out

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
        self.conns, self.procs = [], []


def pool_generate_traces(pool: DataParallel, tokenizer, questions, **kwargs) -> list:
    """`generate_fn` of a pool: `stepscope.vllm.generate_traces`'s signature, the pool in place of the engine."""
    kwargs.pop("on_progress", None)  # a callback does not cross into the engine processes
    return pool.generate_traces(tokenizer, questions, **kwargs)
