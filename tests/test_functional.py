"""The pure OEB/SMI functions and the layer-spec parser against slow, obviously-correct references."""

import pytest
import torch
from references import reference_oeb

from stepscope.core.geometry import bridge_target
from stepscope.core.oeb import key_groups, oeb_factors, oeb_reweight
from stepscope.core.smi import smi_window, step_momentum
from stepscope.errors import StepscopeError
from stepscope.layers import layer_bands, parse_layers, resolve_layers


@pytest.mark.parametrize("use_sink", [False, True])
def test_oeb_reweight_equals_the_logit_shift_reference(use_sink):
    """The probability form (key_groups + oeb_reweight), 40 rows of one query and 3 heads at once: each row's
    keys in segments question/thinking/summary, its B and S two of them, its probabilities a softmax (with a
    sink logit whose mass belongs to O)."""
    g = torch.Generator().manual_seed(1)
    Bn, H, K, D = 40, 3, 11, 4
    codes = torch.randint(0, 3, (Bn, K), generator=g)
    gidx = torch.tensor([[0, 1], [1, 2]])[torch.randint(0, 2, (Bn,), generator=g)]  # thinking or summary query
    nb = (codes == gidx[:, :1]).sum(1)
    ns = (codes == gidx[:, 1:]).sum(1)
    tau = torch.tensor([bridge_target(int(a), int(b), 0.15 if i % 2 else 0.6)
                        for i, (a, b) in enumerate(zip(nb, ns))], dtype=torch.float32)
    z = torch.randn(Bn, H, K, generator=g) * 3
    v = torch.randn(Bn, K, D, generator=g)
    sink = torch.randn(H, generator=g) * 2 if use_sink else None
    logits = z if sink is None else torch.cat([z, sink.view(1, H, 1).expand(Bn, H, 1)], -1)
    p = torch.softmax(logits, -1)[..., :K]
    onehot = torch.nn.functional.one_hot(codes, 3).to(torch.float32)
    p2, fired, before, factors = oeb_reweight(p, *key_groups(onehot, gidx, tau))
    out = torch.bmm(p2, v)  # [Bn, H, D]
    n_fired = 0
    for b in range(Bn):
        groups = [0 if c == gidx[b, 0] else 1 if c == gidx[b, 1] else 2 for c in codes[b].tolist()]
        for h in range(H):
            ref, ref_fired, _, _ = reference_oeb(z[b, h].tolist(), v[b].tolist(), groups, float(tau[b]),
                                                 None if sink is None else float(sink[h]))
            assert bool(fired[b, h, 0]) == ref_fired
            torch.testing.assert_close(out[b, h], torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=1e-5)
            if ref_fired:
                assert float(before[b, h, 0] * factors[b, h, 0]) == pytest.approx(float(tau[b]), abs=1e-6)
            else:
                assert factors[b, h].tolist() == [1.0, 1.0]
            n_fired += ref_fired
    assert 0 < n_fired < Bn * H


def test_oeb_factors_edges():
    pb = torch.tensor([0.0, 0.05, 0.2, 0.05])
    ps = torch.tensor([0.5, 0.5, 0.5, 0.0])
    tau = torch.tensor([0.1, 0.1, 0.1, 0.1])
    fb, fs, fired = oeb_factors(pb, ps, tau)
    assert fired.tolist() == [False, True, False, False]  # p(B)=0; fires; above target; tau_S <= 0
    assert fb.tolist()[1] == pytest.approx(2.0) and fs.tolist()[1] == pytest.approx(0.45 / 0.5)
    assert fb[[0, 2, 3]].tolist() == [1.0, 1.0, 1.0]


def test_bridge_target():
    assert bridge_target(0, 5, 0.15) == 0.0
    assert bridge_target(1, 99, 0.5) == pytest.approx(0.1)
    assert bridge_target(50, 50, 0.15) == 0.15
    t = bridge_target(torch.tensor([0, 1, 50]), torch.tensor([5, 99, 50]), 0.15)
    assert t.tolist() == pytest.approx([0.0, 0.1, 0.15])


def test_smi_pieces():
    assert smi_window(10, 20, 4) == (16, 20)
    assert smi_window(10, 12, 4) == (10, 12)
    assert smi_window(10, 20, "step") == (10, 20)
    v = torch.arange(12.0).view(1, 4, 3)
    torch.testing.assert_close(step_momentum(v, 0.5), 0.5 * torch.tensor([[4.5, 5.5, 6.5]]))


def test_layer_bands_match_the_method():
    for L in range(1, 70):
        b = layer_bands(L)
        q = max(1, L // 4)
        assert list(b["shallow"]) == list(range(min(q, L)))
        assert list(b["deep"]) == list(range(max(0, L - q), L))
        assert len(b["deep_half"]) == min(L, max(2, L // 2)) and b["deep_half"][-1] == L - 1
    assert list(layer_bands(30)["shallow"]) == list(range(7))


def test_parse_layers_rules():
    assert parse_layers("all", 8) is None and parse_layers("", 8) is None and parse_layers(None, 8) is None
    assert parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert parse_layers("-2--1", 8) == [6, 7]
    assert parse_layers("-2--1") == [-2, -1]  # without the model: kept as written
    assert parse_layers("shallow,deep", 8) == [0, 1, 6, 7]
    assert parse_layers("3,1,3", 8) == [1, 3]
    assert parse_layers([0, -1], 8) == [0, 7]
    assert parse_layers("0--1", 8) == list(range(8))  # with the model, mixed ends resolve
    for bad, needle in [("5-2", "backwards"), ("-1--3", "backwards"), ("x", "cannot read"),
                        ("9", "out of range"), ("-9", "out of range"), (",", "no layers")]:
        with pytest.raises(StepscopeError, match=needle):
            parse_layers(bad, 8)
    with pytest.raises(StepscopeError, match="same way"):
        parse_layers("0--1")
    with pytest.raises(StepscopeError, match="needs the model"):
        parse_layers("shallow")
    with pytest.raises(StepscopeError, match="--oeb-layers"):
        parse_layers("40", 30, what="--oeb-layers")


def test_resolve_layers():
    assert resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers(None, 8, default=range(0, 2)) == [0, 1]
    assert resolve_layers([-1, 0, 0], 4) == [0, 3]
    with pytest.raises(StepscopeError, match="out of range"):
        resolve_layers([4], 4)
    with pytest.raises(StepscopeError, match="no layers"):
        resolve_layers([], 4)
