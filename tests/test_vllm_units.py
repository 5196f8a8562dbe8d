"""StepFlow-in-vLLM pieces without an engine: the paged cache layout against vLLM's own cache writer, the
OEB/SMI row functions against a dense softmax reference, and the batch bookkeeping of added, removed and moved
requests."""

import math
import os

import pytest
from conftest import require_vllm

require_vllm()

import torch  # noqa: E402

from stepscope.core.oeb import oeb_rows  # noqa: E402
from stepscope.core.smi import smi_delta  # noqa: E402
from stepscope.errors import StepscopeError  # noqa: E402
from stepscope.flow import StepFlowConfig  # noqa: E402
from stepscope.vllm.plugin.paged import CpuVecLayout  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_reads_what_vllms_cache_writer_wrote(dtype):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    bs, D, Hkv, nb = 32, 64, 3, 6
    isa = _get_attn_isa(dtype, bs, D)
    if isa != "vec":  # bfloat16 on a CPU with AMX: vLLM's other layout, which StepFlow refuses in one line
        assert dtype == torch.bfloat16 and isa == "amx"
        with pytest.raises(StepscopeError, match="'amx'"):
            CpuVecLayout(isa).check()
        return
    kv = torch.zeros(nb, Hkv, bs, 2 * D, dtype=dtype)
    kc, vc = CpuVecLayout.views(kv)
    S = 2 * bs + 7
    key, val = torch.randn(S, Hkv, D).to(dtype), torch.randn(S, Hkv, D).to(dtype)
    blocks = torch.tensor([4, 1, 3])  # a row's blocks, out of order in the pool
    slots = blocks[torch.arange(S) // bs] * bs + torch.arange(S) % bs
    ops.cpu_attn_reshape_and_cache(key, val, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    k, v = CpuVecLayout.gather(kc, vc, blocks, S)
    assert torch.equal(k, key.transpose(0, 1)) and torch.equal(v, val.transpose(0, 1))


def _dense_reference(q, k, v, qpos, t0, s0, tau_max, scale, window=None, sinks=None):
    """Per query and head, in float64 loops: softmax over visible keys (and the sink), then the KL projection of
    docs/method.md §5 written directly on the probabilities."""
    Q, H, D = q.shape
    Hkv, S, _ = k.shape
    out = torch.zeros(Q, H, D, dtype=torch.float64)
    fired = torch.zeros(Q, H, dtype=torch.bool)
    for i in range(Q):
        p_ = int(qpos[i])
        seg = int(p_ >= t0) + int(p_ >= s0)
        lo = max(0, p_ - window + 1) if window else 0
        keys = list(range(lo, p_ + 1))
        kseg = [int(j >= t0) + int(j >= s0) for j in range(S)]
        bseg = 1 if seg == 2 else 0
        B = [j for j in keys if kseg[j] == bseg] if seg else []
        Sg = [j for j in keys if kseg[j] == seg] if seg else []
        tau = min(math.sqrt(len(B) / (len(B) + len(Sg))), tau_max) if B else 0.0
        for h in range(H):
            kh = h // (H // Hkv)
            z = {j: float(q[i, h].double() @ k[kh, j].double()) * scale for j in keys}
            zs = list(z.values()) + ([float(sinks[h])] if sinks is not None else [])
            m = max(zs)
            tot = sum(math.exp(x - m) for x in zs)
            p = {j: math.exp(z[j] - m) / tot for j in keys}
            pb, ps = sum(p[j] for j in B), sum(p[j] for j in Sg)
            tau_s = pb + ps - tau
            if tau > 0 and 0 < pb < tau and tau_s > 0:
                fired[i, h] = True
                for j in B:
                    p[j] *= tau / pb
                for j in Sg:
                    p[j] *= tau_s / ps
            out[i, h] = sum(p[j] * v[kh, j].double() for j in keys)
    return out, fired


@pytest.mark.parametrize("window,with_sinks", [(None, False), (5, False), (None, True)])
def test_oeb_rows_match_the_dense_reference(window, with_sinks):
    import numpy as np

    from stepscope.core.geometry import query_geometry

    torch.manual_seed(0)
    H, Hkv, D, S, Q = 4, 2, 8, 14, 9
    t0, s0, tau_max, scale = 4, 11, 0.5, 0.35
    q, k, v = torch.randn(Q, H, D) * 2, torch.randn(Hkv, S, D), torch.randn(Hkv, S, D)
    sinks = torch.randn(H) if with_sinks else None
    pos0 = S - Q
    one = np.zeros(1, dtype=np.int64)
    g, t, _ = query_geometry(one, one + S, one + t0, one + s0, pos0, Q, window, tau_max)
    qpos = torch.arange(pos0, S)
    codes = (torch.arange(S) >= t0).long() + (torch.arange(S) >= s0).long()
    out, fired, before, after = oeb_rows(q, k, v, qpos, torch.from_numpy(g[0]), torch.from_numpy(t[0]), codes,
                                         scale, window, sinks)
    ref, ref_fired = _dense_reference(q, k, v, qpos, t0, s0, tau_max, scale, window, sinks)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.equal(fired, ref_fired) and fired.any() and not fired.all()


def test_smi_delta_is_alpha_times_the_window_mean():
    v = torch.randn(2, 10, 4)
    d = smi_delta(v, 3, 7, 8, 0.06, n_rep=3)
    assert torch.allclose(d, 0.06 * v[:, 3:7].mean(1).repeat_interleave(3, 0))
    d = smi_delta(v, 3, 7, 8, 0.06, n_rep=1, window=4)  # sees keys 5..8: only 5, 6 of the window
    assert torch.allclose(d, 0.06 * v[:, 5:7].mean(1))
    assert smi_delta(v, 3, 5, 9, 0.06, n_rep=1, window=4) is None


class _Params:
    def __init__(self, extra=None):
        self.extra_args = extra


def test_batch_updates_keep_each_request_on_its_row():
    from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality

    from stepscope.vllm.plugin.worker import Worker

    w = Worker()
    w.backend = True
    made = []
    w._new_request = lambda key, cfg, prompt, output: made.append(key) or type(
        "R", (), {"key": key, "output": output, "prompt": prompt})()
    cfg = StepFlowConfig().to_json()
    outs = [[], [], [], []]
    w.update(BatchUpdate(3, removed=[], moved=[], added=[
        (0, _Params({"stepflow": cfg, "stepflow_id": "a"}), [1], outs[0]), (1, _Params(), [1], outs[1]),
        (2, _Params({"stepflow": cfg, "stepflow_id": "c"}), [1], outs[2])]))
    assert {i: r.key for i, r in w.rows.items()} == {0: "a", 2: "c"}
    w.update(BatchUpdate(3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert {i: r.key for i, r in w.rows.items()} == {0: "c", 2: "a"}
    w.update(BatchUpdate(2, removed=[1], added=[], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert {i: r.key for i, r in w.rows.items()} == {0: "c", 1: "a"}
    # a request vLLM takes out of the batch and brings back (same output list) keeps its state
    w.update(BatchUpdate(1, removed=[1], added=[], moved=[]))
    parked = [r for r in w.parked.values() if r.key == "a"]
    assert len(parked) == 1 and 1 not in w.rows
    w.update(BatchUpdate(2, removed=[], moved=[],
                         added=[(1, _Params({"stepflow": cfg, "stepflow_id": "a"}), [1], outs[0])]))
    assert w.rows[1] is parked[0] and made == ["a", "c"]
    # a slot taken by a new request: the old occupant leaves the batch
    w.update(BatchUpdate(2, removed=[], moved=[], added=[(0, _Params(), [1], outs[3])]))
    assert 0 not in w.rows and [r.key for r in w.rows.values()] == ["a"]


def test_stepflow_request_without_the_backend_is_stopped_not_decoded():
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    from stepscope.vllm.plugin.worker import Worker

    w = Worker()
    w.update(BatchUpdate(2, removed=[], moved=[],
                         added=[(0, _Params(), [1], []), (1, _Params({"stepflow": StepFlowConfig().to_json()}), [1], [])]))
    assert w.refused_rows() == [1] and not w.rows


def test_a_request_whose_config_this_process_cannot_read_is_stopped_not_raised():
    """A config the front end accepted but this worker cannot read (a repair not registered in this process) stops
    the request at its first token; it never raises inside the engine."""
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    from stepscope.vllm.plugin.worker import Worker

    w = Worker()
    w.backend = True
    cfg = {**StepFlowConfig().to_json(), "interventions": {"not_registered_here": {}}}
    w.update(BatchUpdate(2, removed=[], moved=[], added=[(0, _Params(), [1], []), (1, _Params({"stepflow": cfg}), [1], [])]))
    assert w.refused_rows() == [1] and not w.rows


@pytest.mark.parametrize("layout", ["cpu", "flash"])
@pytest.mark.parametrize("window,with_sinks", [(None, False), (12, True)])
def test_decoding_rows_over_their_cache_blocks_match_the_dense_reference(layout, window, with_sinks):
    """oeb_decode_blocks over rows of different lengths, their blocks out of order in the pool, every slot they do
    not hold filled with large finite garbage: each row's output and fires equal the dense reference on its
    own keys (and oeb_rows on them), in CPU_ATTN's and FlashAttention's layouts."""
    import numpy as np
    from paged_caches import BS, cpu_vec_cache, flash_cache

    from stepscope.core.geometry import hidden_keys, query_geometry, segment_onehot
    from stepscope.core.oeb import key_groups, oeb_decode_blocks
    from stepscope.vllm.plugin.paged import FlashLayout

    torch.manual_seed(1)
    H, Hkv, D, tau_max, scale = 6, 2, 8, 0.6, 0.35
    lens, t0s, s0s = [37, 20, 9], [3, 10, 2], [30, 1 << 62, 5]
    R, n = len(lens), -(-max(lens) // BS)
    tables = torch.tensor([[5, 0, 7], [2, 6, 3], [4, 1, 1]])  # unused entries point at other rows' blocks
    data = [(torch.randn(Hkv, m, D), torch.randn(Hkv, m, D)) for m in lens]
    rows = [(kv, tables[r]) for r, kv in enumerate(data)]
    if layout == "cpu":
        kv, lay = cpu_vec_cache(rows, 8, Hkv, D, torch.float32, fill=30.0), CpuVecLayout("vec")
    else:
        kv, lay = flash_cache(rows, 8, Hkv, D, torch.float32, fill=30.0), FlashLayout(kernel=False)
    q = torch.randn(R, H, D) * 2
    sinks = torch.randn(H) if with_sinks else None
    gidx, tau = [], []
    for m, t0, s0 in zip(lens, t0s, s0s):
        one = np.zeros(1, dtype=np.int64)
        g, t, _ = query_geometry(one, one + m, one + t0, one + s0, m - 1, 1, window, tau_max)
        gidx.append(torch.from_numpy(g[0][0]))
        tau.append(float(t[0][0]))
    assert min(tau) > 0  # every row's query is eligible: the comparison covers the bridge
    slots = torch.arange(n * BS)
    codes = torch.stack([(slots >= t0).long() + (slots >= s0).long() for t0, s0 in zip(t0s, s0s)])
    qpos = torch.tensor(lens)[:, None] - 1
    keys_t, values = lay.blocks(kv, tables[:, :n].reshape(-1))
    out, fired, before, factors = oeb_decode_blocks(q, keys_t, values, hidden_keys(qpos, slots, window),
                                                    key_groups(segment_onehot(codes), torch.stack(gidx),
                                                               torch.tensor(tau)), scale, sinks)
    any_fired = False
    for r, ((k, v), m) in enumerate(zip(data, lens)):
        ref, ref_fired = _dense_reference(q[r:r + 1], k, v, [m - 1], t0s[r], s0s[r], tau_max, scale, window, sinks)
        assert torch.allclose(out[r].double(), ref[0], atol=1e-5)
        assert torch.equal(fired[r, :, 0], ref_fired[0])
        one = oeb_rows(q[r:r + 1], k, v, qpos[r], gidx[r][None], torch.tensor(tau[r:r + 1]), codes[r, :m], scale,
                       window, sinks)
        assert torch.allclose(out[r], one[0][0], atol=1e-6) and torch.equal(fired[r, :, 0], one[1][0])
        assert torch.allclose(before[r], one[2][0], atol=1e-6)
        assert torch.allclose(before[r] * factors[r], one[3][0], atol=1e-6)
        any_fired |= bool(ref_fired.any())
    assert any_fired


@pytest.mark.parametrize("window", [None, 9])
def test_a_layer_repairs_each_row_by_its_own_config(window):
    """One layer, a batch of rows with different configs: decoding rows with three tau_max, a row whose OEB
    layers leave this layer out, a prefill chunk. Each repaired row equals the dense reference with its own
    tau_max; the others keep the backend's output. A batch of eligible decoding rows only is every token of the
    forward: the layer's work says so (the backend then skips its own kernel), and every token gets written."""
    import types

    from paged_caches import BS, cpu_vec_cache

    from stepscope.core.tally import Tally
    from stepscope.vllm.plugin.layer import ForwardShared, LayerSpec, apply_layer
    from stepscope.vllm.plugin.worker import Request, RowPlan

    torch.manual_seed(4)
    H, Hkv, D, layer, scale = 6, 2, 8, 3, 0.4
    taus = [0.3, 0.6, 0.9, 0.6, 0.6]
    oeb_here = [True, True, True, False, True]
    lens, q_lens = [30, 21, 40, 25, 19], [1, 1, 1, 1, 4]  # the decoding rows see question keys in the window
    t0s, s0s = [25, 15, 2, 3, 5], [1 << 62, 1 << 62, 33, 1 << 62, 1 << 62]
    n_max = -(-max(lens) // BS)
    tables = torch.arange(len(lens) * n_max).view(len(lens), n_max).flip(1)  # blocks out of order
    data = [(torch.randn(Hkv, m, D), torch.randn(Hkv, m, D)) for m in lens]
    kv = cpu_vec_cache(list(zip(data, tables)), len(lens) * n_max, Hkv, D, torch.float32)
    meta = types.SimpleNamespace(block_table=tables.to(torch.int32))
    spec = LayerSpec(layer, CpuVecLayout("vec"), window, H, Hkv, scale)

    def plans_of(rows):
        plans, tok0 = [], 0
        for r in rows:
            cfg = StepFlowConfig(fmt="think", tau_max=taus[r])
            oeb = frozenset([layer] if oeb_here[r] else [layer + 1])
            req = Request(f"r{r}", cfg, oeb, frozenset(), None, [], [], Tally(layer + 2, sorted(oeb), []))
            plans.append(RowPlan(req, r, tok0, lens[r] - q_lens[r], lens[r], 0, t0s[r], s0s[r], []))
            tok0 += q_lens[r]
        return plans, tok0

    plans, N = plans_of(range(len(lens)))
    query = torch.randn(N, H, D)
    # the backend's own output: plain attention (the reference with tau_max 0 never bridges)
    plain = torch.cat([_dense_reference(query[p.tok0:p.tok0 + p.q_len], *data[p.index], range(p.pos0, p.seq_len),
                                        t0s[p.index], s0s[p.index], 0.0, scale, window)[0] for p in plans]).float()
    out = plain.clone()
    shared = ForwardShared()
    work = shared.layer_work(spec, plans, meta.block_table, BS, N)
    assert not work.covers  # a row left alone and a prefill row: the backend's output is needed
    apply_layer(spec, query, kv, meta, out, plans, shared=shared, work=work)
    shared.flush()
    for rp in plans:
        r, rows = rp.index, slice(rp.tok0, rp.tok0 + rp.q_len)
        if not oeb_here[r]:
            assert torch.equal(out[rows], plain[rows])
            assert rp.req.tally.eligible.sum() == 0
            continue
        k, v = data[r]
        ref, _ = _dense_reference(query[rows], k, v, range(rp.pos0, rp.seq_len), t0s[r], s0s[r], taus[r], scale,
                                  window)
        torch.testing.assert_close(out[rows].double(), ref, atol=1e-5, rtol=1e-5)
        def has_bridge(q, t0=t0s[r], s0=s0s[r]):  # a question (thinking) key the thinking (summary) query sees
            lo = max(0, q - window + 1) if window else 0
            b_lo, b_hi = (t0, s0) if q >= s0 else (0, t0)
            return q >= t0 and min(b_hi, q + 1) > max(b_lo, lo)

        assert rp.req.tally.eligible[layer] == H * sum(map(has_bridge, range(rp.pos0, rp.seq_len)))

    decoding = [r for r in range(len(lens)) if oeb_here[r] and q_lens[r] == 1]
    first = {p.index: p.tok0 for p in plans}
    plans, N = plans_of(decoding)
    q2 = torch.cat([query[first[r]:first[r] + 1] for r in decoding])
    out = torch.full((N, H, D), float("nan"))
    shared = ForwardShared()
    work = shared.layer_work(spec, plans, meta.block_table, BS, N)
    assert work.covers
    apply_layer(spec, q2, kv, meta, out, plans, shared=shared, work=work)
    assert not out.isnan().any()
    torch.testing.assert_close(out, torch.cat([out_r for out_r in (
        _dense_reference(q2[i:i + 1], *data[r], [lens[r] - 1], t0s[r], s0s[r], taus[r], scale, window)[0]
        for i, r in enumerate(decoding))]).float(), atol=1e-5, rtol=1e-5)


def test_vllm_logging_mid_run_reaches_no_closed_capture_file(tmp_path):
    """vLLM's logging in a test run: configured under one test's capture (capsys), then logging in a
    later test (as an engine a module fixture shuts down does) prints no "--- Logging error ---" (conftest.py
    runs the tests with VLLM_CONFIGURE_LOGGING=0, so vLLM logs through the root logger pytest captures)."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_a.py").write_text(
        "def test_configures_vllm_under_capsys(capsys):\n    from vllm.config.logging import LoggingConfig\n"
        "    from vllm.logger import configure_logging_if_needed\n\n"
        "    configure_logging_if_needed(LoggingConfig())  # as LLM(...) and the engine's config do\n",
        encoding="utf-8")
    (tmp_path / "test_b.py").write_text(
        "import logging\n\ndef test_logs_later():\n    for i in range(3):\n"
        "        logging.getLogger('vllm.engine').warning('engine %d shutting down', i)\n", encoding="utf-8")
    tests = str(Path(__file__).resolve().parent)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CONFIGURE_LOGGING"}
    env["PYTHONPATH"] = os.pathsep.join([tests, env.get("PYTHONPATH", "")])
    # -s: what is printed outside a test's capture (the engines' background threads, between tests) is seen
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "conftest", "-c", os.devnull, "--rootdir",
                        str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    both = p.stdout + p.stderr
    assert p.returncode == 0 and "2 passed" in p.stdout, both
    assert "Logging error" not in both and "closed file" not in both, both
