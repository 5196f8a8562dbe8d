"""diagnose on real saliency results (tiny model, stepscope.saliency) and on the shared real traces."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_diagnose import assert_matches, ref_metrics

import stepscope.diagnose as dg
from stepscope.errors import StepscopeError
from stepscope.saliency.result import load_result
from stepscope.trace import Trace

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"
RESPONSE = ("Tom starts with three apples in his basket. He then buys four more apples at the shop. "
            "So I need to add three and four together. Three plus four equals seven apples in total. "
            "Let me double check that sum once more. Yes, the total is seven apples.\n</think>\n\n"
            "Tom has 3 + 4 = 7 apples.\n\nThe answer is **7**.")


@pytest.fixture(scope="module")
def saliency_result(think_tokenizer):
    from tiny import make_model

    from stepscope.saliency import step_saliency

    trace = Trace.from_text(think_tokenizer, question=QUESTION, response=RESPONSE,
                            meta={"id": "apples", "problem": QUESTION, "correct": True, "model": "writer-model"})
    return step_saliency(make_model("llama", layers=4), trace, method="reference")


def test_real_maps_match_reference_and_folder_round_trip(saliency_result, tmp_path):
    res = saliency_result
    kinds = res.trace.kinds
    assert kinds.count("thinking") >= 4 and kinds.count("summary") >= 1
    d = dg.diagnose(res)
    assert_matches(d, ref_metrics(res.maps.double().numpy(), kinds))
    assert all(v is not None for name in dg.METRICS for v in d.metrics[name])  # this trace supports them all
    assert d.meta["model"] == "LlamaForCausalLM" and d.meta["source_model"] == "writer-model"
    assert d.meta["pool"] == "mean" and d.meta["correct"] is True
    res.save(tmp_path / "r")
    loaded = load_result(tmp_path / "r")
    assert type(loaded).__name__ == "SaliencyResult"
    from_folder = dg.diagnose(tmp_path / "r")
    assert from_folder.metrics == d.metrics and from_folder.meta["path"] == str(tmp_path / "r")
    json.dumps(d.to_json(), allow_nan=False)


def test_partial_layers_use_model_layer_indices(saliency_result):
    from stepscope.saliency import SaliencyResult

    res = saliency_result
    part = SaliencyResult(maps=res.maps[[0, 3]], trace=res.trace, meta={**res.meta, "layers": [0, 3]})
    d = dg.diagnose(part)
    full = dg.diagnose(res)
    assert d.layer_ids == [0, 3] and d.model_layers == 4
    assert d.layer_groups == {"shallow": [0], "deep": [1], "deep_half": [1]}
    assert d.metrics["locality"] == [full.metrics["locality"][0], full.metrics["locality"][3]]
    assert d.scores["lock_in_score"] == full.scores["lock_in_score"]
    assert d.scores["decay_slope"] is None and "deep half" in d.reasons["decay_slope"]
    with pytest.raises(StepscopeError, match="layers"):
        dg.apply_baseline(d, dg.build_profile([full, full]))
    with pytest.raises(StepscopeError, match="different layers"):
        dg.compare([d], [full])
    bad = SaliencyResult(maps=res.maps[[0, 3]], trace=res.trace, meta={**res.meta, "layers": [0, 1, 2]})
    with pytest.raises(StepscopeError, match="3 layers but the maps have 2"):
        dg.diagnose(bad)


def test_slope_uses_model_layer_indices():
    kinds = ["question"] + ["thinking"] * 4 + ["summary"] * 2
    S = len(kinds)
    maps = np.tril(np.ones((3, S, S)))
    # summary rows: thinking share falls from 0.8 to 0.2 between model layers 6 and 10 (of 12)
    for k, share in enumerate([0.8, 0.6, 0.2]):
        for s in (5, 6):
            maps[k, s] = 0.0
            maps[k, s, 1:5] = share / 4
            maps[k, s, 5:s + 1] = (1 - share) / (s - 4)
    d = dg.diagnose_maps(maps, kinds, meta={"layers": [6, 8, 10], "num_layers": 12})
    assert d.metrics["summary_to_thinking"] == pytest.approx([0.8, 0.6, 0.2])
    assert d.scores["decay_slope"] == pytest.approx(np.polyfit([6, 8, 10], [0.8, 0.6, 0.2], 1)[0])
    assert d.layer_groups["deep"] == [2]  # model layers 9-11


def test_shared_traces_pair_across_models(traces_available, think_tokenizer):
    from conftest import shared_trace_records

    records = shared_trace_records()
    rng = np.random.default_rng(0)
    diags = []
    for rec in records:
        trace = Trace.from_text(think_tokenizer, question=rec["problem"], response=rec["response"],
                                meta={k: v for k, v in rec.items() if k != "response"})
        S = trace.num_steps
        maps = rng.random((4, S, S)) * np.tril(np.ones((S, S)))
        diags.append(dg.diagnose_maps(maps, trace.kinds, meta=trace.meta))
    correct = [d for d, r in zip(diags, records) if r["correct"]]
    wrong = [d for d, r in zip(diags, records) if not r["correct"]]
    norm = lambda text: " ".join(text.split())  # noqa: E731
    expect = {norm(r["problem"]) for r in records if r["correct"]} & {norm(r["problem"]) for r in records
                                                                          if not r["correct"]}
    assert len(expect) >= 3  # several problems were answered right by one model and wrong by another
    cmp = dg.compare(correct, wrong, n_boot=200, n_perm=200)
    assert cmp.pairing["shared_problems"] == len(expect)
    assert cmp.groups["correct"]["n"] == len(correct) and cmp.groups["wrong"]["n"] == len(wrong)
    # real traces: closed thinking, several steps: every metric is defined for most of them
    defined = sum(d.metrics["locality"][0] is not None for d in diags)
    assert defined >= len(diags) - 3
