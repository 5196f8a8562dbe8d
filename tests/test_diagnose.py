"""stepscope.diagnose: every docs/method.md §4 metric against an explicit-loop reference, nulls, scores, baselines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stepscope.diagnose as dg
from stepscope.errors import StepscopeError

TOL = 1e-9  # float64 reference vs float64 vectorized code


# ---------------------------------------------------------------- slow reference (docs/method.md §4, literally)

def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def ref_metrics(M, kinds):
    """Per-layer metrics with explicit loops over i, j; None where undefined."""
    L, S = len(M), len(kinds)
    Q = [j for j in range(S) if kinds[j] == "question"]
    T = [j for j in range(S) if kinds[j] == "thinking"]
    A = [j for j in range(S) if kinds[j] == "summary"]
    out = {name: [] for name in dg.METRICS}
    for layer in range(L):
        m = M[layer]

        def N(i, j, m=m):
            total = sum(float(m[i][k]) for k in range(S))
            return float(m[i][j]) / total

        def row_ok(i, m=m):
            return sum(float(m[i][k]) for k in range(S)) > 0

        rows = [i for i in T if len([j for j in T if j < i]) >= 3 and row_ok(i)]
        out["locality"].append(_mean([N(i, i) + N(i, i - 1) for i in rows]))
        out["question_reach"].append(_mean([sum(N(i, j) for j in Q) for i in rows]))
        out["far_reach"].append(_mean([sum(N(i, j) for j in T if j < i - 1) for i in rows]))
        srows = [s for s in A if row_ok(s)] if T else []
        out["summary_to_thinking"].append(_mean([sum(N(s, j) for j in T) for s in srows]))
        out["summary_self"].append(_mean([sum(N(s, j) for j in A) for s in srows]))
        if len(T) >= 4:
            shares = [sum(N(s, j) for j in T[-3:]) / sum(N(s, j) for j in T) for s in srows
                      if sum(N(s, j) for j in T) > 0]
            out["thinking_recency"].append(_mean(shares))
        else:
            out["thinking_recency"].append(None)
        abi = _mean([float(m[i][j]) for i in T for j in T])
        fbi = _mean([float(m[i][j]) for i in A for j in A])
        out["analysis_block_intensity"].append(abi)
        out["final_block_intensity"].append(fbi)
        out["final_heat_anomaly"].append(fbi / abi if abi and fbi is not None else None)
    return out


def ref_scores(metrics, L):
    q = max(1, L // 4)
    shallow = [v for v in metrics["locality"][:q] if v is not None]
    lock = sum(shallow) / len(shallow) if shallow else None
    h = min(L, max(2, L // 2))
    xs = [x for x in range(L - h, L) if metrics["summary_to_thinking"][x] is not None]
    slope = None
    if L >= 2 and len(xs) >= 2:
        slope = float(np.polyfit(xs, [metrics["summary_to_thinking"][x] for x in xs], 1)[0])
    deep = [v for v in metrics["summary_to_thinking"][L - q:] if v is not None]
    return {"lock_in_score": lock, "decay_slope": slope,
            "deep_summary_to_thinking": sum(deep) / len(deep) if deep else None}


def causal_maps(rng, L, S, zero_rows=()):
    M = rng.random((L, S, S)) * np.tril(np.ones((S, S)))  # [L, S, S], causal like mean pooling
    for layer, row in zero_rows:
        M[layer, row] = 0.0
    return M


def kinds_of(nq, nt, ns):
    return ["question"] * nq + ["thinking"] * nt + ["summary"] * ns


def assert_matches(d, ref):
    for name in dg.METRICS:
        got = d.metrics[name]
        for layer, (g, r) in enumerate(zip(got, ref[name])):
            if r is None:
                assert g is None, (name, layer, g)
            else:
                assert g == pytest.approx(r, rel=TOL, abs=TOL), (name, layer)
            assert (g is None) == (r is None)
        if any(v is None for v in got):
            assert name in d.reasons, name  # every null says why


# ---------------------------------------------------------------- metrics vs reference

@settings(max_examples=40, deadline=None)
@given(nq=st.integers(1, 2), nt=st.integers(0, 7), ns=st.integers(0, 3), L=st.integers(1, 9),
       seed=st.integers(0, 10_000))
def test_metrics_match_loop_reference(nq, nt, ns, L, seed):
    rng = np.random.default_rng(seed)
    kinds = kinds_of(nq, nt, ns)
    M = causal_maps(rng, L, len(kinds))
    d = dg.diagnose(M, step_kinds=kinds)
    ref = ref_metrics(M, kinds)
    assert_matches(d, ref)
    rs = ref_scores(ref, L)
    for name in dg.SCORES:
        if rs[name] is None:
            assert d.scores[name] is None and name in d.reasons
        else:
            assert d.scores[name] == pytest.approx(rs[name], rel=1e-7, abs=1e-12)
    json.dumps(d.to_json(), allow_nan=False)  # nulls are null, never NaN


def test_zero_rows_are_left_out_like_the_reference():
    rng = np.random.default_rng(1)
    kinds = kinds_of(1, 6, 3)
    # layer 0: one lock-in row zero; layer 1: every summary row zero; layer 2: all lock-in rows zero
    zero = [(0, 5), (1, 7), (1, 8), (1, 9), (2, 4), (2, 5), (2, 6)]
    M = causal_maps(rng, 4, len(kinds), zero)
    d = dg.diagnose(M, step_kinds=kinds)
    assert_matches(d, ref_metrics(M, kinds))
    assert d.metrics["locality"][2] is None and "layer 2" in d.reasons["locality"]
    assert d.metrics["summary_to_thinking"][1] is None and "layer 1" in d.reasons["summary_to_thinking"]


def test_torch_and_float32_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    kinds = kinds_of(1, 5, 2)
    M = causal_maps(rng, 3, len(kinds)).astype(np.float32)
    a = dg.diagnose(M, step_kinds=kinds)
    b = dg.diagnose(torch.from_numpy(M), step_kinds=kinds)
    assert a.metrics == b.metrics
    assert_matches(a, ref_metrics(M.astype(np.float64), kinds))


# ---------------------------------------------------------------- structure: the metrics see the patterns

def structured_maps(L, kinds, *, lock=0.0, decay=0.0, seed=0, noise=0.05):
    """Spread causal maps; `lock` in [0, 1] moves thinking rows' mass onto the diagonal and the previous step
    in the shallow quarter; `decay` moves the summary's thinking mass onto the summary in deeper layers."""
    rng = np.random.default_rng(seed)
    S = len(kinds)
    tri = np.tril(np.ones((S, S)))
    M = (1.0 + noise * rng.random((L, S, S))) * tri
    shallow = dg.layer_groups(L)["shallow"]
    for layer in range(L):
        for i, k in enumerate(kinds):
            if k == "thinking" and i >= 1 and layer in shallow:
                M[layer, i, :i - 1] *= (1 - lock)
                M[layer, i, i - 1:i + 1] *= (1 + 20 * lock)
            if k == "summary":
                frac = decay * layer / max(1, L - 1)
                think = [j for j, kk in enumerate(kinds) if kk == "thinking"]
                M[layer, i, think] *= (1 - frac)
                M[layer, i, [j for j, kk in enumerate(kinds[:i + 1]) if kk == "summary"]] *= (1 + 10 * frac)
    return M


KINDS = kinds_of(1, 10, 3)


def test_locked_in_map_scores_higher_than_spread():
    L = 8
    locked = dg.diagnose(structured_maps(L, KINDS, lock=0.9), step_kinds=KINDS)
    spread = dg.diagnose(structured_maps(L, KINDS, lock=0.0), step_kinds=KINDS)
    assert locked.scores["lock_in_score"] > spread.scores["lock_in_score"] + 0.3
    for layer in dg.layer_groups(L)["shallow"]:
        assert locked.metrics["locality"][layer] > spread.metrics["locality"][layer]
        assert locked.metrics["question_reach"][layer] < spread.metrics["question_reach"][layer]
        assert locked.metrics["far_reach"][layer] < spread.metrics["far_reach"][layer]


def test_decaying_map_has_negative_slope_and_self_heat():
    L = 8
    decayed = dg.diagnose(structured_maps(L, KINDS, decay=0.9), step_kinds=KINDS)
    flat = dg.diagnose(structured_maps(L, KINDS, decay=0.0), step_kinds=KINDS)
    assert decayed.scores["decay_slope"] < -0.02
    assert abs(flat.scores["decay_slope"]) < 0.005
    last = L - 1
    assert decayed.metrics["summary_self"][last] > flat.metrics["summary_self"][last]
    assert decayed.metrics["final_heat_anomaly"][last] > flat.metrics["final_heat_anomaly"][last]


def test_pure_local_map_has_locality_one():
    S = len(KINDS)
    M = np.zeros((2, S, S))
    for i in range(S):
        M[:, i, i] = 1.0
        if i:
            M[:, i, i - 1] = 1.0
    d = dg.diagnose(M, step_kinds=KINDS)
    assert d.metrics["locality"] == [pytest.approx(1.0)] * 2
    assert d.metrics["question_reach"] == [0.0, 0.0] and d.metrics["far_reach"] == [0.0, 0.0]


# ---------------------------------------------------------------- nulls with reasons

def test_too_few_thinking_steps_and_no_summary_are_null_with_reasons():
    rng = np.random.default_rng(3)
    kinds = kinds_of(1, 3, 0)
    d = dg.diagnose(causal_maps(rng, 4, len(kinds)), step_kinds=kinds)
    for name in dg.LOCK_IN_METRICS + dg.DECAY_METRICS:
        assert d.metrics[name] == [None] * 4
    assert "3 thinking steps" in d.reasons["locality"]
    assert "no summary" in d.reasons["summary_to_thinking"]
    assert d.scores == {"lock_in_score": None, "decay_slope": None, "deep_summary_to_thinking": None}
    assert d.metrics["analysis_block_intensity"][0] is not None
    assert d.metrics["final_heat_anomaly"] == [None] * 4


def test_recency_needs_four_thinking_steps():
    rng = np.random.default_rng(4)
    kinds = kinds_of(1, 3, 2)
    d = dg.diagnose(causal_maps(rng, 2, len(kinds)), step_kinds=kinds)
    assert d.metrics["thinking_recency"] == [None, None]
    assert "4 thinking steps" in d.reasons["thinking_recency"]
    assert d.metrics["summary_to_thinking"][0] is not None


def test_single_layer_has_no_slope():
    rng = np.random.default_rng(5)
    d = dg.diagnose(causal_maps(rng, 1, len(KINDS)), step_kinds=KINDS)
    assert d.scores["decay_slope"] is None and "2 layers" in d.reasons["decay_slope"]
    assert d.scores["lock_in_score"] == d.metrics["locality"][0]


@pytest.mark.parametrize("maps,kinds,msg", [
    (np.zeros((2, 3, 4)), ["question"] * 3, "shape"),
    (np.zeros((2, 3, 3)), ["question"] * 2, "3 steps"),
    (np.zeros((2, 3, 3)), ["question", "summary", "thinking"], "order"),
    (np.zeros((2, 3, 3)), ["question", "answer", "summary"], "unknown"),
    (np.full((2, 3, 3), np.nan), ["question"] * 3, "NaN"),
    (-np.ones((2, 3, 3)), ["question"] * 3, "negative"),
])
def test_bad_inputs_raise_one_line_errors(maps, kinds, msg):
    with pytest.raises(StepscopeError, match=msg) as e:
        dg.diagnose(maps, step_kinds=kinds)
    assert "\n" not in str(e.value)


def test_bare_maps_need_kinds():
    with pytest.raises(StepscopeError, match="step_kinds"):
        dg.diagnose(np.zeros((1, 2, 2)))


# ---------------------------------------------------------------- baseline profiles, flags, verdicts

def _profile(L=8, n=12):
    return dg.build_profile([dg.diagnose(structured_maps(L, KINDS, seed=s, noise=0.3), step_kinds=KINDS,
                                         ) for s in range(n)])


def test_profile_is_per_layer_mean_and_std():
    diags = [dg.diagnose(structured_maps(4, KINDS, seed=s, noise=0.3), step_kinds=KINDS) for s in range(5)]
    p = dg.build_profile(diags)
    for layer in range(4):
        vals = [d.metrics["locality"][layer] for d in diags]
        assert p.metrics["locality"]["mean"][layer] == pytest.approx(np.mean(vals))
        assert p.metrics["locality"]["std"][layer] == pytest.approx(np.std(vals, ddof=1))
        assert p.metrics["locality"]["n"][layer] == 5
    assert p.scores["lock_in_score"]["n"] == 5


def test_baseline_flags_lock_in_and_decay(tmp_path):
    p = _profile()
    p.save(tmp_path / "profile.json")
    loaded = dg.Profile.load(tmp_path / "profile.json")
    assert loaded.to_json() == p.to_json()
    normal = dg.diagnose(structured_maps(8, KINDS, seed=99, noise=0.3), baseline=loaded, step_kinds=KINDS)
    assert normal.verdict["shallow_lock_in"]["status"] == "not flagged"
    assert normal.verdict["deep_decay"]["status"] == "not flagged"
    assert normal.verdict["summary"] == "within the baseline"

    locked = dg.diagnose(structured_maps(8, KINDS, seed=98, noise=0.3, lock=0.8), baseline=p, step_kinds=KINDS)
    assert locked.verdict["shallow_lock_in"]["status"] == "flagged"
    assert locked.score_flags["lock_in_score"] is True and locked.score_z["lock_in_score"] > 2
    assert locked.flags["locality"][0] is True and locked.flags["question_reach"][0] is True
    assert locked.verdict["deep_decay"]["status"] == "not flagged"
    assert locked.verdict["summary"].startswith("shallow lock-in")

    decayed = dg.diagnose(structured_maps(8, KINDS, seed=97, noise=0.3, decay=0.9), baseline=p, step_kinds=KINDS)
    assert decayed.verdict["deep_decay"]["status"] == "flagged"
    assert decayed.flags["summary_to_thinking"][7] is True
    assert decayed.verdict["shallow_lock_in"]["status"] == "not flagged"
    # z is exactly (x - mean) / std
    layer = 7
    z = (decayed.metrics["summary_self"][layer] - p.metrics["summary_self"]["mean"][layer]) \
        / p.metrics["summary_self"]["std"][layer]
    assert decayed.z["summary_self"][layer] == pytest.approx(z)
    # high-is-good directions are never flagged however high
    assert decayed.flags["analysis_block_intensity"] == [False] * 8 or \
        all(f is False for f in decayed.flags["analysis_block_intensity"])


def test_no_baseline_means_no_verdict_and_layer_mismatch_is_an_error():
    d = dg.diagnose(structured_maps(4, KINDS), step_kinds=KINDS)
    assert d.verdict is None and d.z is None and "no verdict" in d.table()
    with pytest.raises(StepscopeError, match="layers"):
        dg.diagnose(structured_maps(4, KINDS), baseline=_profile(L=8, n=3), step_kinds=KINDS)


def test_unassessable_verdict_when_trace_lacks_the_rows():
    p = _profile()
    kinds = kinds_of(1, 2, 0)
    d = dg.diagnose(causal_maps(np.random.default_rng(0), 8, len(kinds)), baseline=p, step_kinds=kinds)
    assert d.verdict["shallow_lock_in"]["status"] == "not assessable"
    assert d.verdict["deep_decay"]["status"] == "not assessable"
    assert d.verdict["summary"] == "not assessable against this baseline"


def test_diagnosis_json_round_trip_and_table(tmp_path):
    d = dg.diagnose(structured_maps(8, KINDS, lock=0.8), baseline=_profile(), step_kinds=KINDS)
    d.save(tmp_path / "d.json")
    back = dg.Diagnosis.from_json(json.loads((tmp_path / "d.json").read_text()))
    assert back.to_json() == d.to_json()
    text = d.table()
    assert "!" in text and "lock_in_score=" in text and "verdict: shallow lock-in" in text
    with pytest.raises(StepscopeError):
        dg.Diagnosis.from_json({"metrics": {}})
    with pytest.raises(StepscopeError):
        dg.Profile.from_json({"stepscope_profile": 1, "num_layers": 3, "metrics": {}, "scores": {}})


def test_layer_groups():
    assert dg.layer_groups(30) == {"shallow": list(range(7)), "deep": list(range(23, 30)),
                                   "deep_half": list(range(15, 30))}
    assert dg.layer_groups(2) == {"shallow": [0], "deep": [1], "deep_half": [0, 1]}
    assert dg.layer_groups(1) == {"shallow": [0], "deep": [0], "deep_half": [0]}


def test_problem_key():
    a = dg.problem_key({"id": "x-qwq", "problem": "What is  2+2?\n"})
    b = dg.problem_key({"id": "x-r1", "problem": "What is 2+2?"})
    assert a == b and a.startswith("text:")
    assert dg.problem_key({"problem_id": 7, "problem": "zzz"}) == "7"
    assert dg.problem_key({"id": "abc"}) == "id:abc"
    assert dg.problem_key({}) is None
    assert math.isfinite(len(a))


def test_package_is_callable_and_never_shadowed():
    """`stepscope.diagnose` is the package whatever was imported first, and calling it diagnoses; importing it
    stays light (numpy only, no torch)."""
    import subprocess
    import sys
    import types

    import stepscope
    from stepscope import diagnose

    assert isinstance(stepscope.diagnose, types.ModuleType) and diagnose is dg is stepscope.diagnose
    M = structured_maps(4, KINDS)
    assert stepscope.diagnose(M, step_kinds=KINDS).to_json() == dg.diagnose(M, step_kinds=KINDS).to_json()
    code = ("import sys, types, numpy as np; import stepscope; from stepscope import diagnose; "
            "import stepscope.diagnose as dg; from stepscope.diagnose import diagnose as f, compare, build_profile; "
            "assert diagnose is dg is stepscope.diagnose and isinstance(dg, types.ModuleType) and callable(f); "
            "kinds = ['question'] + ['thinking'] * 4 + ['summary']; m = np.tril(np.ones((2, 6, 6))); "
            "assert stepscope.diagnose(m, step_kinds=kinds).scores == f(m, step_kinds=kinds).scores; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
