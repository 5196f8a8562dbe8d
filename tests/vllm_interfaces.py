"""The shape of every vLLM interface the stepscope plugin uses, read from vLLM's source with `ast` (so the same
reading works on an installed vLLM and on an unpacked wheel that cannot be installed here).

`shape(root)` gives, per interface, what stepscope depends on: a function's parameter names, a class's methods
with their parameter names, a dataclass's or class's fields, an enum's members. tests/vllm_interfaces.json holds
the shape the plugin is written for (read from vLLM 0.32.0 and 0.33.0, which agree); tests/test_vllm_runners.py
fails when the installed vLLM's differs. Regenerate after checking the plugin against a new vLLM:
`python tests/vllm_interfaces.py [VLLM_PACKAGE_DIR] > tests/vllm_interfaces.json`.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

# (file under the vllm package, dotted name in it, what to read: "params", "methods:a,b", "fields:a,b",
#  "members:a,b", "assigned:a,b" (attributes its __init__ assigns), "calls:method.callee" (whether the class's
#  method calls self.callee), "exists")
USED = [
    ("v1/sample/logits_processor/interface.py", "LogitsProcessor",
     "methods:__init__,apply,update_state,is_argmax_invariant,validate_params"),
    ("v1/sample/logits_processor/interface.py", "BatchUpdate", "fields:batch_size,removed,added,moved"),
    ("v1/sample/logits_processor/interface.py", "MoveDirectionality", "members:UNIDIRECTIONAL,SWAP"),
    ("v1/sample/logits_processor/__init__.py", "build_logitsprocs", "params"),
    ("v1/worker/gpu/sample/logits_processor/interface.py", "LogitsProcessor",
     "methods:__init__,add_request,apply,apply_staged_writes,validate_params"),
    ("v1/worker/gpu/sample/logits_processor/interface.py", "LogitsContext",
     "fields:expanded_idx_mapping,idx_mapping,idx_mapping_np,expanded_local_pos,input_ids,pos,"
     "seq_lens_upper_bound_np"),
    ("v1/worker/gpu/sample/logits_processor/loader.py", "build_custom_logits_processors", "params"),
    ("v1/worker/gpu/sample/logits_processor/loader.py", "build_custom_logits_processors_params_validator",
     "params"),
    ("v1/attention/backends/registry.py", "register_backend", "params"),
    ("v1/attention/backends/registry.py", "AttentionBackendEnum", "members:CPU_ATTN,FLASH_ATTN"),
    ("v1/attention/backend.py", "AttentionType", "members:DECODER"),
    ("v1/attention/backend.py", "AttentionCGSupport", "members:NEVER"),
    ("v1/attention/backend.py", "AttentionMetadataBuilder", "methods:get_cudagraph_support"),
    ("v1/attention/backend.py", "AttentionBackend", "fields:forward_includes_kv_cache_update"),
    ("v1/attention/backends/cpu_attn.py", "CPUAttentionBackend", "methods:get_impl_cls"),
    ("v1/attention/backends/cpu_attn.py", "CPUAttentionBackendImpl", "methods:__init__,forward"),
    ("v1/attention/backends/cpu_attn.py", "CPUAttentionBackendImpl",
     "assigned:num_heads,num_kv_heads,scale,sliding_window,sinks,attn_type"),
    ("v1/attention/backends/cpu_attn.py", "CPUAttentionMetadata",
     "fields:num_actual_tokens,query_start_loc,seq_lens,block_table"),
    ("v1/attention/backends/cpu_attn.py", "_get_attn_isa", "params"),
    ("v1/attention/backends/flash_attn.py", "FlashAttentionBackend", "methods:get_impl_cls,get_builder_cls"),
    ("v1/attention/backends/flash_attn.py", "FlashAttentionImpl", "methods:__init__,forward"),
    ("v1/attention/backends/flash_attn.py", "FlashAttentionImpl",
     "assigned:num_heads,num_kv_heads,scale,sliding_window,sinks,attn_type"),
    ("v1/attention/backends/flash_attn.py", "FlashAttentionMetadata",
     "fields:num_actual_tokens,query_start_loc,seq_lens,block_table"),
    ("v1/attention/backends/flash_attn.py", "FlashAttentionMetadataBuilder", "methods:get_cudagraph_support"),
    ("v1/core/kv_cache_utils.py", "get_request_block_hasher", "exists"),  # wrapped with *args, **kwargs
    ("v1/engine/core.py", "get_request_block_hasher", "exists"),  # imported by name: the plugin wraps it there
    ("v1/request.py", "Request", "assigned:block_hashes,cache_salt,sampling_params"),
    ("v1/worker/worker_base.py", "WorkerBase", "exists"),
    # the request lifecycle: the plugin wraps the hook; _update_states calls it for every finished request, with the
    # request's CachedRequestState, whose output list is the one the logits processor received
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner", "methods:_on_request_state_removed,_update_states"),
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner", "calls:_update_states._on_request_state_removed"),
    ("v1/worker/gpu_input_batch.py", "CachedRequestState", "fields:output_token_ids"),
    ("config/vllm.py", "VllmConfig", "methods:use_v2_model_runner"),
    ("config/vllm.py", "VllmConfig", "fields:instance_id,model_config,scheduler_config"),
    ("config/scheduler.py", "SchedulerConfig", "fields:async_scheduling"),
    ("forward_context.py", "get_forward_context", "params"),
    ("model_executor/models/utils.py", "extract_layer_index", "params"),
    ("envs.py", "environment_variables", "members:VLLM_PLUGINS,VLLM_USE_V2_MODEL_RUNNER"),
]


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    names += ["*" + a.vararg.arg] if a.vararg else []
    names += [x.arg for x in a.kwonlyargs]
    names += ["**" + a.kwarg.arg] if a.kwarg else []
    return names


def _find(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, ast.ImportFrom) and any((al.asname or al.name) == name for al in node.names):
            return node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
    return None


def _class_names(cls: ast.ClassDef) -> set[str]:
    """Names a class body defines: fields (annotated or assigned) and members."""
    out = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return out


def _read(root: Path, path: str, name: str, what: str):
    tree = ast.parse((root / path).read_text())
    node = _find(tree, name)
    if node is None:
        return None
    kind, _, wanted = what.partition(":")
    names = [w for w in wanted.split(",") if w]
    if kind == "exists":
        return True
    if kind == "params":
        return _params(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if kind == "methods":
        defs = {n.name: n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        return {m: (_params(defs[m]) if m in defs else None) for m in names}
    if kind in ("fields", "members"):
        if isinstance(node, ast.ClassDef):
            have = _class_names(node)
        else:  # a module-level dict (envs.environment_variables): its string keys
            value = node.value
            have = {k.value for k in getattr(value, "keys", []) if isinstance(k, ast.Constant)}
        return {m: m in have for m in names}
    if kind == "calls":
        method, _, callee = wanted.partition(".")
        fn = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method), None)
        return fn is not None and any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                                      and n.func.attr == callee for n in ast.walk(fn))
    if kind == "assigned":
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        have = {t.attr for n in ast.walk(init or node) for t in getattr(n, "targets", [getattr(n, "target", None)])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
        return {m: m in have for m in names}
    raise ValueError(what)


def shape(root: str | Path) -> dict:
    """{"path::name::what": what vLLM's source at `root` (the vllm package folder) has}."""
    root = Path(root)
    return {f"{p}::{n}::{w}": _read(root, p, n, w) for p, n, w in USED}


def installed_root() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("vllm").origin).parent


if __name__ == "__main__":
    json.dump(shape(sys.argv[1] if len(sys.argv) > 1 else installed_root()), sys.stdout, indent=1)
    sys.stdout.write("\n")
