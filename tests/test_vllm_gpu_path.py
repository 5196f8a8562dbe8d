"""StepFlow's CUDA path inside vLLM, run here on the CPU: FlashAttention's cache layout, one layer's repair through
the fused paged kernel (Triton's interpreter) against the torch path and against CPU_ATTN's layout on the same
keys, and the CUDA backend's wiring (piecewise CUDA graphs, its sliding-window convention).

What this cannot show: vLLM's CUDA engine itself calling the backend (no GPU here; docs/vllm.md)."""

import types

import numpy as np
import pytest
from conftest import require_vllm

require_vllm()

import torch  # noqa: E402
from paged_caches import BS, cpu_vec_cache, flash_cache  # noqa: E402

from stepscope.core.tally import Tally  # noqa: E402
from stepscope.flow import StepFlowConfig  # noqa: E402
from stepscope.vllm.plugin.layer import ForwardShared, LayerSpec, apply_layer  # noqa: E402
from stepscope.vllm.plugin.paged import CpuVecLayout, FlashLayout  # noqa: E402
from stepscope.vllm.plugin.worker import Request, RowPlan  # noqa: E402


def test_flash_layout_views_and_gather_read_the_rows_back():
    torch.manual_seed(0)
    Hkv, D = 3, 8
    k1, v1 = torch.randn(Hkv, 37, D), torch.randn(Hkv, 37, D)
    k2, v2 = torch.randn(Hkv, 5, D), torch.randn(Hkv, 5, D)
    t1, t2 = torch.tensor([6, 2, 4]), torch.tensor([1, 0, 0])  # out of order; t2's unused entries point anywhere
    kv = flash_cache([((k1, v1), t1), ((k2, v2), t2)], 8, Hkv, D, torch.float32)
    kc, vc = FlashLayout.views(kv)
    assert kc.shape == (8, BS, Hkv, D) and kc.data_ptr() == kv.data_ptr()  # views, no copy
    k, v = FlashLayout.gather(kc, vc, t1, 37)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    k, v = FlashLayout.gather(kc, vc, torch.stack([t1, t2]), 5)  # batched: the first 5 keys of each row
    assert torch.equal(k[1], k2) and torch.equal(v[1], v2) and torch.equal(k[0], k1[:, :5])
    # the CPU layout of the same rows gathers the same keys
    ck, cv = CpuVecLayout.gather(*CpuVecLayout.views(cpu_vec_cache([((k1, v1), t1)], 8, Hkv, D, torch.float32)),
                                 t1, 37)
    assert torch.equal(ck, k1) and torch.equal(cv, v1)


def test_flash_layout_reads_what_flashattentions_own_cache_update_wrote(monkeypatch):
    """vLLM's own cache-writing method of FLASH_ATTN (`FlashAttentionImpl.do_kv_cache_update`, with its view of the
    layer's kv_cache) writes a row's keys into blocks out of order; FlashLayout reads them back. The CUDA op that
    method calls, `reshape_and_cache_flash`, has no CPU build: it is replaced by its documented scatter (token i to
    key_cache[slot // block_size, slot % block_size]); the view of the cache is vLLM's."""
    import vllm.v1.attention.backends.flash_attn as fa
    from vllm.v1.attention.backend import AttentionType

    def scatter(key, value, key_cache, value_cache, slot_mapping, *args):
        bs = key_cache.shape[1]
        for i, slot in enumerate(slot_mapping.tolist()):
            key_cache[slot // bs, slot % bs] = key[i]
            value_cache[slot // bs, slot % bs] = value[i]

    monkeypatch.setattr(fa, "reshape_and_cache_flash", scatter, raising=False)  # imported on CUDA only
    Hkv, D, nb = 3, 8, 6
    impl = object.__new__(fa.FlashAttentionImpl)
    impl.attn_type, impl.head_size, impl.kv_cache_dtype = AttentionType.DECODER, D, "auto"
    layer = types.SimpleNamespace(_k_scale=None, _v_scale=None)
    kv = torch.zeros(nb, Hkv, BS, 2 * D)
    S = 2 * BS + 5
    key, val = torch.randn(S, Hkv, D), torch.randn(S, Hkv, D)
    blocks = torch.tensor([4, 1, 3])
    slots = blocks[torch.arange(S) // BS] * BS + torch.arange(S) % BS
    fa.FlashAttentionImpl.do_kv_cache_update(impl, layer, key, val, kv, slots)
    k, v = FlashLayout.gather(*FlashLayout.views(kv), blocks, S)
    assert torch.equal(k, key.transpose(0, 1)) and torch.equal(v, val.transpose(0, 1))


def _plans(lens, q_lens, t0s, s0s, smi_at, cfg, layer):
    """RowPlans of one forward: row r has lens[r] keys, its last q_lens[r] positions are this forward's queries;
    an SMI fire (position, window start, window end) where smi_at names one."""
    plans, tok0 = [], 0
    for r, (n, q, t0, s0) in enumerate(zip(lens, q_lens, t0s, s0s)):
        tally = Tally(layer + 1, [layer], [layer])
        req = Request(f"r{r}", cfg, frozenset([layer]), frozenset([layer]), None, [], [], tally)
        fires = [smi_at[r]] if r in smi_at else []
        plans.append(RowPlan(req, r, tok0, n - q, n, 0, t0, s0, fires))
        tok0 += q
    return plans, tok0


@pytest.mark.parametrize("window,sinks", [(None, False), (12, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_layer_through_the_paged_kernel_equals_the_torch_path(window, sinks, dtype):
    """apply_layer on FlashAttention's cache: decoding rows through the fused paged kernel (Triton's
    interpreter here), and the same through the torch path, and through CPU_ATTN's layout: the same outputs and
    the same counts. Rows: three decoding rows of different lengths, a prefill chunk, a decoding row with an
    SMI fire. The kernel must run here (Triton's interpreter; the test extra installs triton): the test asserts
    which path ran."""
    torch.manual_seed(3)
    H, Hkv, D, layer = 6, 2, 16, 4
    cfg = StepFlowConfig(fmt="think", alpha=0.2, tau_max=0.6)
    lens, q_lens = [40, 23, 9, 30, 26], [1, 1, 1, 5, 1]
    t0s, s0s = [3, 2, 1, 4, 2], [33, 1 << 62, 6, 1 << 62, 20]
    smi_at = {4: (25, 20, 24)}
    rng = np.random.default_rng(0)
    n_blocks = sum(-(-n // BS) for n in lens) + 3
    order = rng.permutation(n_blocks)
    tables, used = [], 0
    width = max(-(-n // BS) for n in lens)
    for n in lens:
        need = -(-n // BS)
        t = torch.full((width,), int(order[-1]))  # unused entries: a block of another row's
        t[:need] = torch.from_numpy(order[used:used + need].copy())
        tables.append(t)
        used += need
    data = [(torch.randn(Hkv, n, D).to(dtype), torch.randn(Hkv, n, D).to(dtype)) for n in lens]
    rows = list(zip(data, tables))
    meta = types.SimpleNamespace(block_table=torch.stack(tables).to(torch.int32))
    sink = torch.randn(H) if sinks else None
    N = sum(q_lens)
    query = (torch.randn(N, H, D) * 2).to(dtype)

    def run(layout, kv):
        plans, _ = _plans(lens, q_lens, t0s, s0s, smi_at, cfg, layer)
        out = torch.zeros(N, H, D, dtype=dtype)
        spec = LayerSpec(layer, layout, window, H, Hkv, D ** -0.5, sink)
        shared = ForwardShared()
        apply_layer(spec, query, kv, meta, out, plans, shared=shared)
        shared.flush()
        return out, [p.req.tally for p in plans], shared.policy

    flash = flash_cache(rows, n_blocks, Hkv, D, dtype)
    kernel_out, kernel_tallies, kernel_policy = run(FlashLayout(kernel=True), flash)
    torch_out, torch_tallies, torch_policy = run(FlashLayout(kernel=False), flash)
    cpu_out, cpu_tallies, _ = run(CpuVecLayout("vec"), cpu_vec_cache(rows, n_blocks, Hkv, D, dtype))
    # which path ran: the kernel (it passed the policy's first-use check against the torch path), and not the kernel
    assert kernel_policy.kernel_calls == 1 and kernel_policy.checked and kernel_policy.dropped is None
    assert torch_policy.kernel_calls == 0
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert not kernel_out.isnan().any()  # the NaN in unused slots and blocks is never read into a result
    if window is None:  # every query is repaired (with a window, some see no question key: nothing to bridge)
        assert (torch_out.abs().sum((1, 2)) > 0).all()
    torch.testing.assert_close(kernel_out.float(), torch_out.float(), atol=tol, rtol=tol)
    # the same float32 products over another memory layout of the same blocks: rounding only
    torch.testing.assert_close(cpu_out.float(), torch_out.float(), atol=1e-6, rtol=1e-5)
    for a, b, c in zip(kernel_tallies, torch_tallies, cpu_tallies):
        assert np.array_equal(a.eligible, b.eligible) and np.array_equal(a.smi, b.smi)
        np.testing.assert_allclose(a.oeb, b.oeb, atol=1e-3 if dtype == torch.float32 else 0.05)
        assert np.array_equal(b.oeb[:, 0], c.oeb[:, 0])  # the same fires
        np.testing.assert_allclose(b.oeb, c.oeb, atol=1e-5)
    assert sum(t.oeb[layer, 0] for t in kernel_tallies) > 0  # OEB fired somewhere: the comparison is not vacuous
    assert [t.smi[layer] for t in torch_tallies] == [0, 0, 0, 0, 1]


def test_cuda_backend_keeps_piecewise_graphs_and_reads_flashattentions_window():
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    from stepscope.vllm.plugin.backend_cuda import StepFlowFlashAttentionBackend, StepFlowFlashAttentionImpl

    builder = StepFlowFlashAttentionBackend.get_builder_cls()
    assert builder.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    assert StepFlowFlashAttentionBackend.get_name() == FlashAttentionBackend.get_name() == "FLASH_ATTN"
    impl = object.__new__(StepFlowFlashAttentionImpl)  # the window convention only, no FlashAttention runtime
    impl.sliding_window = (-1, -1)
    assert impl.stepflow_window() is None
    impl.sliding_window = (127, 0)  # FlashAttentionImpl's form of a 128-key causal window
    assert impl.stepflow_window() == 128
    assert isinstance(impl.stepflow_layout(None), FlashLayout)


def test_vllm_plugins_without_stepflow_refuses_stepflow_requests(monkeypatch):
    import vllm.envs as envs

    from stepscope.vllm.plugin.register import support_problem

    assert support_problem() is None
    monkeypatch.setattr(envs, "VLLM_PLUGINS", ["something_else"], raising=False)
    problem = support_problem()
    assert problem and "stepscope_stepflow" in problem

