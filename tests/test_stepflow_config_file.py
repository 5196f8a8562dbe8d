"""A StepFlow config file (as `stepscope calibrate` writes it) wherever a StepFlow config is taken:
StepFlowConfig.load, `generate --stepflow-config`, `eval --stepflow-config` and `eval --arms NAME=@FILE`, vLLM
requests."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from stepscope import cli
from stepscope.errors import StepscopeError
from stepscope.evaluate.runner import build_arms
from stepscope.flow import StepFlowConfig

CAL = StepFlowConfig(oeb_layers=[2, 3, 4], smi_layers=[20, 21], tau_max=0.31)


@pytest.fixture
def cal_file(tmp_path):
    p = tmp_path / "stepflow.json"
    p.write_text(json.dumps(CAL.to_json()))
    return p


def test_load_reads_the_file_and_names_it_in_errors(tmp_path, cal_file):
    assert StepFlowConfig.load(cal_file) == CAL
    bad = tmp_path / "bad.json"
    bad.write_text('{"oeb_layers": [1], "tau": 0.2}')
    with pytest.raises(StepscopeError, match=r"bad.json: unknown StepFlow config key\(s\): tau"):
        StepFlowConfig.load(bad)
    with pytest.raises(StepscopeError, match="no such file"):
        StepFlowConfig.load(tmp_path / "missing.json")


def test_arms_from_files_next_to_built_in_ones(cal_file, tmp_path):
    arms = build_arms(f"baseline,stepflow,calibrated=@{cal_file}", tau_max=0.2)
    assert list(arms) == ["baseline", "stepflow", "calibrated"]
    assert arms["baseline"] is None
    assert arms["calibrated"] == CAL  # a file's arm is taken as it is: knobs do not change it
    assert arms["stepflow"] == StepFlowConfig(tau_max=0.2)
    # --stepflow-config is the base of the built-in arms; each arm sets which interventions are on
    based = build_arms("stepflow,oeb", base=CAL)
    assert based["stepflow"] == CAL and based["oeb"] == StepFlowConfig(**{**CAL.to_json(), "smi": False,
                                                                           "markers": None})
    other = tmp_path / "b.json"
    other.write_text(json.dumps(StepFlowConfig(alpha=0.1).to_json()))
    two = build_arms(f"a=@{cal_file},b=@{other}")
    assert two["a"] == CAL and two["b"].alpha == 0.1


@pytest.mark.parametrize("arms,message", [
    ("baseline,calibrated=stepflow.json", "write NAME=@FILE.json"),
    ("baseline,stepflow=@{f}", "not baseline, stepflow, oeb, smi"),
    ("baseline,cal=@{f},cal=@{f}", "named twice"),
    ("baseline,cal=@missing.json", "missing.json: no such file"),
    ("baseline,calibrated", "unknown arm 'calibrated'"),
])
def test_bad_arms_get_one_line_before_anything_loads(arms, message, cal_file, tmp_path, capsys):
    argv = ["eval", "--benchmark", "gsm8k", "--out", str(tmp_path / "run"), "--arms", arms.format(f=cal_file)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not (tmp_path / "run").exists()


def test_a_config_whose_layers_the_model_lacks_is_refused_before_the_weights_load(tmp_path, capsys):
    f = tmp_path / "big.json"
    f.write_text(json.dumps(StepFlowConfig(oeb_layers=[40]).to_json()))
    assert cli.main(["eval", "--benchmark", "gsm8k", "--out", str(tmp_path / "run"),
                     "--arms", f"baseline,big=@{f}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "arm big: oeb_layers: 40 is out of range (the model has 30 layers)" in err
    assert not (tmp_path / "run").exists()
    assert cli.main(["generate", "What is 2 + 3?", "--stepflow-config", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "40 is out of range (the model has 30 layers)" in err
    assert cli.main(["generate", "What is 2 + 3?", "--stepflow-config", str(f), "--no-stepflow"]) == 2
    assert "--stepflow-config given with --no-stepflow" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_runs_the_file_config_with_knobs_on_top(cal_file, tmp_path):
    out = tmp_path / "t.jsonl"
    assert cli.main(["generate", "What is 2 + 3?", "--stepflow-config", str(cal_file), "--tau-max", "0.25",
                     "--max-new-tokens", "4", "--temperature", "0", "--out", str(out), "--quiet"]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    sf = rec["meta"]["config"]["stepflow"]
    assert sf["oeb_layers"] == [2, 3, 4] and sf["smi_layers"] == [20, 21] and sf["tau_max"] == 0.25


def test_vllm_request_and_server_default_take_the_file_as_it_is(cal_file, monkeypatch):
    from stepscope.vllm.plugin.requests import DEFAULT_ENV, default_config, request_config

    params = SimpleNamespace(extra_args={"stepflow": json.loads(cal_file.read_text())})
    assert request_config(params) == CAL
    monkeypatch.setenv(DEFAULT_ENV, f"@{cal_file}")  # the server-wide default: STEPSCOPE_STEPFLOW=@stepflow.json
    assert default_config() == CAL and request_config(SimpleNamespace(extra_args={})) == CAL
