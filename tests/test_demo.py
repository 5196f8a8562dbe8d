"""The demo on the bundled model, small: the one-time model conversion is timed and reported apart."""

import json

import pytest


@pytest.mark.slow
def test_demo_reports_the_one_time_conversion_apart(tmp_path, monkeypatch, capsys):
    from stepscope.demo import DemoSettings, run_demo
    from stepscope.models import default_model_ready

    monkeypatch.setenv("STEPSCOPE_CACHE", str(tmp_path / "cache"))  # a fresh cache: the model is converted
    assert not default_model_ready()
    settings = DemoSettings(problems=1, max_thinking_tokens=8, max_new_tokens=12)
    summary = run_demo(tmp_path / "out", settings)
    err = capsys.readouterr().err
    conv = summary["seconds"]["model_conversion"]
    assert conv is not None and conv > 0
    assert "converted in" in err and "not counted" in err
    assert default_model_ready()
    # the method's own time does not include the conversion
    parts = summary["seconds"]
    assert parts["total"] >= parts["generate_baseline"] + parts["generate_stepflow"] + parts["saliency"] - 0.5
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["seconds"]["model_conversion"] == pytest.approx(conv, abs=0.01)
    assert (tmp_path / "out" / "report.html").exists()
