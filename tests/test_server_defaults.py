"""The parts of StepFlow-in-vLLM a server user meets without an engine: the server-wide default config
(STEPSCOPE_STEPFLOW) as each request resolves it, and the stats file (STEPSCOPE_STATS_FILE) as
`stepscope vllm-stats` reads it. The engine side of both is tested through a real server in
tests/test_vllm_server.py."""

import json
import types

import numpy as np
import pytest

from stepscope.cli import main
from stepscope.errors import StepscopeError
from stepscope.flow import StepFlowConfig
from stepscope.vllm.plugin.requests import cache_salt, request_config, salt


def params(extra=None):
    return types.SimpleNamespace(extra_args=extra)


def test_a_request_that_says_nothing_gets_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv("STEPSCOPE_STEPFLOW", raising=False)
    assert request_config(params()) is None
    monkeypatch.setenv("STEPSCOPE_STEPFLOW", '{"fmt": "think", "tau_max": 0.5}')
    want = StepFlowConfig(fmt="think", tau_max=0.5)
    assert request_config(params()) == want
    assert request_config(params({"stepflow_id": "q"})) == want
    assert request_config(params({"stepflow": "off"})) is None
    assert request_config(params({"stepflow": "OFF "})) is None
    other = StepFlowConfig(fmt="think", alpha=0.1)
    assert request_config(params({"stepflow": json.dumps(other.to_json())})) == other
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(other.to_json()))
    monkeypatch.setenv("STEPSCOPE_STEPFLOW", f"@{f}")
    assert request_config(params()) == other


def test_each_config_salts_the_prefix_cache_apart(monkeypatch):
    monkeypatch.setenv("STEPSCOPE_STEPFLOW", '{"fmt": "think", "tau_max": 0.5}')
    default, off = salt(params()), salt(params({"stepflow": "off"}))
    explicit = salt(params({"stepflow": StepFlowConfig(fmt="think").to_json()}))
    same = salt(params({"stepflow": json.dumps({"tau_max": 0.5, "fmt": "think"})}))
    assert off is None and default == same == cache_salt(StepFlowConfig(fmt="think", tau_max=0.5))
    assert len({default, explicit}) == 2 and None not in (default, explicit)


@pytest.mark.parametrize("value,words", [("{not json", "STEPSCOPE_STEPFLOW"), ('{"tau": 1}', "unknown"),
                                         ("@/nonexistent/cfg.json", "cannot read")])
def test_a_bad_default_is_one_line_naming_the_variable(monkeypatch, value, words):
    monkeypatch.setenv("STEPSCOPE_STEPFLOW", value)
    with pytest.raises(StepscopeError) as e:
        request_config(params())
    msg = str(e.value)
    assert "STEPSCOPE_STEPFLOW" in msg and words in msg and "\n" not in msg


def tally(rng, layers=4, oeb=(0, 1), smi=(3,)):
    return {"oeb_layers": list(oeb), "smi_layers": list(smi),
            "oeb": rng.integers(0, 9, (layers, 5)).astype(float).tolist(),
            "eligible": rng.integers(10, 20, layers).tolist(), "smi": rng.integers(0, 3, layers).tolist(),
            "tokens": int(rng.integers(5, 50)), "forwards": int(rng.integers(1, 9)), "cache_conflicts": 0}


def line(engine, rank, request, key, final, t):
    return {"engine": engine, "rank": rank, "request": request, "stepflow_id": key, "final": final, "time": 0,
            "prompt_tokens": 7, "config": StepFlowConfig().to_json(), "tally": t}


def test_vllm_stats_merges_ranks_and_requests_by_the_documented_rule(tmp_path, capsys):
    """Two tensor-parallel ranks, a request seen twice (a snapshot, then its final line), two requests under one id:
    the command's JSON equals the rule written out by hand (OEB sums and eligible counts add over ranks, SMI fires
    and tokens are rank 0's; requests with the same id add up; a later line replaces an earlier one)."""
    rng = np.random.default_rng(0)
    t = {(r, q): tally(rng) for r in (0, 1) for q in (1, 2, 3)}
    stale = tally(rng)
    lines = [line("e", 0, 1, "a", False, stale)]
    lines += [line("e", r, q, "a" if q < 3 else "", True, t[r, q]) for q in (1, 2, 3) for r in (0, 1)]
    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.json"
    assert main(["vllm-stats", str(path), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got) == {"a", "(no id)"}
    a = got["a"]
    oeb = sum(np.array(t[r, q]["oeb"]) for r in (0, 1) for q in (1, 2))
    elig = sum(np.array(t[r, q]["eligible"]) for r in (0, 1) for q in (1, 2))
    for layer in (0, 1):
        assert a["oeb_fires"][str(layer)] == round(oeb[layer, 0])
        assert a["oeb_eligible"][str(layer)] == elig[layer]
        assert a["bridge_mass_before"][str(layer)] == pytest.approx(oeb[layer, 1] / elig[layer], rel=1e-12)
    assert a["smi_fires"]["3"] == t[0, 1]["smi"][3] + t[0, 2]["smi"][3]
    assert a["tokens"] == t[0, 1]["tokens"] + t[0, 2]["tokens"]
    assert "3 StepFlow requests (3 finished), 1 engine" in capsys.readouterr().out
    assert main(["vllm-stats", str(path), "--by-request"]) == 0
    assert "(no id) #3" in capsys.readouterr().out


def test_vllm_stats_bad_input_is_one_line(tmp_path, capsys):
    assert main(["vllm-stats", str(tmp_path / "missing.jsonl")]) == 2
    assert "STEPSCOPE_STATS_FILE" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"engine": 1}\n')
    assert main(["vllm-stats", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1 is not a StepFlow stats line" in err and len(err.strip().splitlines()) == 1
