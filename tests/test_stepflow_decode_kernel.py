"""StepFlow's decoding path with the fused Triton kernel: kernel choice, the first-use check against the PyTorch
path and the fallback, the timing of the paths under kernel="auto", and gradients (the kernel has none).

Every case decodes forced tokens and compares the logits with StepFlow's own teacher-forced forward (tolerance
1e-5 on float32 logits), as test_stepflow_decode.py does; the kernel runs on CPU through Triton's interpreter.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import has_module
from test_stepflow import TOL, Force, build, prompt_and_continuation, teacher_forced
from transformers import DynamicCache, LogitsProcessorList

from stepscope.errors import StepscopeError
from stepscope.flow import StepFlow, StepFlowConfig
from stepscope.flow.decode_path import DecodePath, time_paths

# conftest sets TRITON_INTERPRET=1; CI installs triton (the test extra) and sets STEPSCOPE_REQUIRE_TRITON
KERNELS = ["torch", "triton"] if has_module("triton", "TRITON", "the test extra installs it") else ["torch"]


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
@pytest.mark.parametrize("fault", [None, "raise", "wrong", "dot_raises", "dot_wrong"])
def test_auto_kernel_is_checked_once_and_dropped_when_it_fails(fault, monkeypatch):
    """kernel="auto" (as on CUDA): the first decoding step compares the fused kernel with the PyTorch path. A
    good kernel stays in use; when its tl.dot form raises or disagrees, its broadcast form is tried (no
    warning when that one is good); a kernel whose both forms raise or disagree is dropped with a warning. The
    logits are right in every case."""
    from stepscope.core import kernels

    model, tok = build("llama", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 0)
    real = kernels.oeb_decode
    calls = []

    def faulty(*a, **k):
        dot = k["plan"].dot
        calls.append(dot)
        bad = fault in ("raise", "wrong") or (fault or "").startswith("dot_") and dot
        if bad and fault.endswith("raise"):
            raise RuntimeError("triton compile error (simulated)")
        out = real(*a, **k)
        return out + 1e-2 if bad else out

    monkeypatch.setattr(kernels, "oeb_decode", faulty)
    n = 12
    with torch.no_grad():
        want = teacher_forced(model, tok, cfg, p + c[:n])[len(p) - 1:len(p) - 1 + n]
        # kernel="auto" as on a CUDA device with triton, the check alone: no timing of the paths
        # (test_auto_times_the_paths_... does that)
        flow = StepFlow(model, tok, cfg, kernel=DecodePath("auto", tune=False, off_cuda=True))
        assert flow.decode_path.uses_kernel and not flow.decode_path.checked
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with flow:
                out = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, output_logits=True, return_dict_in_generate=True,
                                     logits_processor=LogitsProcessorList([Force([c], len(p))]), pad_token_id=0)
    raw = torch.stack(out.logits, dim=1)[0]
    assert (raw - want).abs().max().item() < TOL
    msgs = [str(w.message) for w in caught if "fused decoding kernel" in str(w.message)]
    path = flow.decode_path
    if fault is None:
        assert path.uses_kernel and path.checked and not msgs and len(calls) == 2 * (n - 1)  # every step, both
        assert all(calls) and path.dot  # the tl.dot form throughout
    elif fault.startswith("dot_"):  # the dot form once, then the broadcast form for the rest
        assert path.uses_kernel and path.checked and not msgs and calls == [True] + [False] * (2 * (n - 1))
        assert not path.dot
    else:  # both forms tried once, then the PyTorch path
        assert not path.uses_kernel and len(msgs) == 1 and calls == [True, False]
        assert ("failed" if fault == "raise" else "differs") in msgs[0]


def test_kernel_choice_is_checked():
    model, tok = build("llama", "think")
    with pytest.raises(StepscopeError, match="kernel must be"):
        StepFlow(model, tok, kernel="cuda")
    if "triton" in KERNELS:
        import os

        old = os.environ.pop("TRITON_INTERPRET", None)
        try:  # on a CPU without the interpreter, the kernel cannot run
            with pytest.raises(StepscopeError, match="needs triton and a CUDA device"):
                StepFlow(model, tok, kernel="triton")
        finally:
            if old is not None:
                os.environ["TRITON_INTERPRET"] = old
    assert StepFlow(model, tok).decode_path.uses_kernel is False  # auto on a CPU: the PyTorch path


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
def test_auto_kernel_check_keeps_a_good_kernel_in_bfloat16():
    """In bf16 the PyTorch path rounds its scores to bf16; the first-step check compares the kernel with that
    path in float32, so a correct kernel is kept (no false fallback) even with sharp attention."""
    model, tok = build("qwen2", "think")
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:  # sharp attention, as trained models have: large scores
            layer.self_attn.q_proj.weight.mul_(8.0)
    p, c = prompt_and_continuation(tok, "think", 1)
    p = p + c[:40]  # decoding deep inside the thinking, where the bridge is small
    flow = StepFlow(model, tok, StepFlowConfig(tau_max=0.6, fmt="think"),
                    kernel=DecodePath("auto", tune=False, off_cuda=True))  # the check alone, no timing
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with flow:
            model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=4, min_new_tokens=4,
                           pad_token_id=0)
    assert flow.decode_path.uses_kernel and flow.decode_path.checked and flow.stats.total_oeb_fires > 0


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
def test_decoding_step_with_gradients_takes_the_differentiable_path():
    """The fused kernel has no backward: a decoding step that needs gradients (here through the OEB layers'
    projections) must take the PyTorch path, whose gradients equal kernel="torch"'s."""
    model, tok = build("llama", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 0)
    p = p + c[:12]  # the last prompt token in thinking, so OEB acts on the decoding step
    grads = {}
    for kernel in ("torch", "triton"):
        model.zero_grad()
        cache = DynamicCache()
        with StepFlow(model, tok, cfg, kernel=kernel) as flow:
            with torch.no_grad():
                model(input_ids=torch.tensor([p]), past_key_values=cache, use_cache=True)
            out = model(input_ids=torch.tensor([c[12:13]]), past_key_values=cache, use_cache=True)
            out.logits.float().pow(2).sum().backward()
        assert flow.stats.oeb_eligible[0] > 0
        g = model.model.layers[0].self_attn.q_proj.weight.grad
        assert g is not None and g.abs().sum() > 0
        grads[kernel] = g.clone()
    assert torch.allclose(grads["torch"], grads["triton"], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
@pytest.mark.parametrize("arch,fam,winner", [("llama", "think", "torch"), ("llama", "think", "triton bk32 w4"),
                                             ("llama", "think", "triton bk64 w4"),
                                             ("gptoss", "harmony", "torch")])
def test_auto_times_the_paths_and_uses_the_fastest(arch, fam, winner, monkeypatch):
    """kernel="auto" times, once per set of shapes, the kernel as planned, two launch variants and the PyTorch
    path, and decodes with the fastest (the timer is faked here so that `winner` wins). The logits stay exact,
    the stats equal kernel="torch"'s (nothing counted twice), and after the timing only the winner runs."""
    from stepscope.core import kernels

    model, tok = build(arch, fam)
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt=fam)
    p, c = prompt_and_continuation(tok, fam, 0)
    n = 12
    timed: list[list[str]] = []

    def fake_timer(runs, device):
        timed.append(sorted(runs))
        return {name: (1.0 if name == winner else 2.0) for name in runs}

    real = kernels.oeb_decode
    blocks = []

    def spy(*a, **k):
        blocks.append((k["plan"].BK, k["plan"].num_warps))
        return real(*a, **k)

    monkeypatch.setattr(kernels, "oeb_decode", spy)
    gen = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, output_logits=True,
               return_dict_in_generate=True, logits_processor=LogitsProcessorList([Force([c], len(p))]),
               pad_token_id=0)
    with torch.no_grad():
        want = teacher_forced(model, tok, cfg, p + c[:n])[len(p) - 1:len(p) - 1 + n]
        with StepFlow(model, tok, cfg, kernel="torch") as ref_flow:
            model.generate(input_ids=torch.tensor([p]), **gen)
        # kernel="auto" as on a CUDA device with triton, its timer faked
        flow = StepFlow(model, tok, cfg, kernel=DecodePath("auto", timer=fake_timer, off_cuda=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with flow:
                out = model.generate(input_ids=torch.tensor([p]), **gen)
    raw = torch.stack(out.logits, dim=1)[0]
    assert (raw - want).abs().max().item() < TOL
    paths = flow.decode_paths
    assert paths and len(timed) == len(paths)  # timed once per set of shapes (keys by octave)
    if arch == "llama":  # tl.dot form: as planned (64 keys, 4 warps), 8 warps, 32 keys per block
        assert timed[0] == ["torch", "triton bk32 w4", "triton bk64 w4", "triton bk64 w8"]
    sinks = arch == "gptoss"
    for e in paths:
        assert e["path"] == ("torch" if winner == "torch" else "triton") and e["sinks"] is sinks
        assert e["keys"][0] <= len(p) + n and e["batch"] == 1 and set(e["times_us"]) == set(timed[0])
    per_tune = len(timed[0])  # the kernel as planned, then each variant once for its check
    if winner == "torch":  # no kernel call after the timing
        assert len(blocks) == len(paths) * per_tune
    else:
        bk, warps = int(winner.split()[1][2:]), int(winner.split()[2][1:])
        assert paths[0]["block_k"] == bk and paths[0]["num_warps"] == warps
        assert blocks[-1] == (bk, warps)  # the winner decodes the rest
        assert len(blocks) > len(paths) * per_tune
    got, ref = flow.stats, ref_flow.stats
    assert got.oeb_eligible == ref.oeb_eligible and got.oeb_fires == ref.oeb_fires
    assert got.total_oeb_fires > 0
    for layer in cfg.oeb_layers:
        assert got.bridge_mass_after[layer] == pytest.approx(ref.bridge_mass_after[layer], abs=1e-5)


def test_time_paths_times_every_candidate():
    """The timer calls each candidate once untimed, then rounds x reps times, and ranks a slow one last."""
    import time

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.002)

    t = time_paths({"fast": fast, "slow": slow}, torch.device("cpu"), reps=3, rounds=2)
    assert calls == {"fast": 7, "slow": 7}
    assert 0 <= t["fast"] < t["slow"] and t["slow"] >= 2000.0  # µs


@pytest.mark.skipif("triton" not in KERNELS, reason="needs triton (the test extra installs it)")
def test_auto_timing_runs_every_candidate_for_real():
    """The real timer (one round of one call, to stay quick under the interpreter) runs every candidate,
    the PyTorch path included, on the layer's real inputs; whatever wins, the logits stay exact."""
    got = []

    def quick(runs, device, **kw):
        calls = {name: 0 for name in runs}

        def counted(name, fn):
            def run():
                calls[name] += 1
                return fn()
            return run

        t = time_paths({name: counted(name, fn) for name, fn in runs.items()}, device, reps=1, rounds=1)
        got.append((t, calls))
        return t

    model, tok = build("qwen2", "think")
    cfg = StepFlowConfig(tau_max=0.6, alpha=0.5, oeb_layers=[0, 1], smi_layers=[2, 3], fmt="think")
    p, c = prompt_and_continuation(tok, "think", 1)
    n = 6
    with torch.no_grad():
        want = teacher_forced(model, tok, cfg, p + c[:n])[len(p) - 1:len(p) - 1 + n]
        flow = StepFlow(model, tok, cfg, kernel=DecodePath("auto", timer=quick, off_cuda=True))
        with flow:
            out = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([Force([c], len(p))]))
    assert (torch.stack(out.logits, dim=1)[0] - want).abs().max().item() < TOL
    assert got and all(len(t) == 4 and min(t.values()) > 0 for t, _ in got)
    assert all(set(calls.values()) == {2} for _, calls in got)  # the untimed call and the timed one, each
    assert [e["times_us"] for e in flow.decode_paths] == [{k: round(v, 2) for k, v in t.items()} for t, _ in got]
