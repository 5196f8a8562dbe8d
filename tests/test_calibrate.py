"""stepscope calibrate on synthetic Step-Saliency results: planted lock-in and decay bands are recovered exactly,
nothing planted falls back to the paper's defaults, bad input gets one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import make_tokenizer

from stepscope import cli
from stepscope.calibration import calibrate, evidence_path, load_calibration
from stepscope.errors import StepscopeError
from stepscope.flow import StepFlowConfig
from stepscope.saliency import SaliencyResult
from stepscope.trace import Trace

L = 16  # shallow half 0-7, deep half 8-15; paper defaults: OEB 0-3, SMI 12-15
LOCK_BAND = [2, 3, 4]
DECAY_BAND = [11, 12, 13]
THINKING = ("First I read the question carefully and note every number. Then I write the main equation down. "
            "Next I solve the equation for the unknown value. After that I check the arithmetic once more. "
            "The units of the result look consistent. I also compare the result with a rough estimate. "
            "The estimate agrees with the exact answer here. So I am confident in the final value.")
RESPONSE = THINKING + "</think>\n\nThe answer is forty two.\n\nIt was checked against an estimate."


@pytest.fixture(scope="module")
def trace():
    t = Trace.from_text(make_tokenizer("think"), question="What is six times seven, as a whole number?",
                        response=RESPONSE, fmt="think")
    kinds = [s.kind for s in t.steps]
    assert kinds.count("thinking") >= 7 and kinds.count("summary") == 2
    return t


def synthetic_maps(trace: Trace, seed: int, lock: dict[int, float], decay: dict[int, float],
                   noise: float = 0.3) -> torch.Tensor:
    """Causal step maps [L, S, S]: every visible cell about 1 with log-normal noise; in layer l of `lock`,
    thinking rows put lock[l] times more on themselves and their previous step and 1/lock[l] on the question;
    in layer l of `decay`, summary rows put decay[l] times as much on the thinking."""
    rng = np.random.default_rng(seed)
    kinds = np.array([s.kind for s in trace.steps])
    S = kinds.size
    m = np.exp(rng.normal(0.0, noise, size=(L, S, S))) * np.tril(np.ones((S, S)))  # [L, S, S]
    think, q, summ = kinds == "thinking", kinds == "question", kinds == "summary"
    for layer, f in lock.items():
        for i in np.flatnonzero(think):
            m[layer, i, i] *= f
            m[layer, i, i - 1] *= f
            m[layer, i, q] /= f
    for layer, f in decay.items():
        for i in np.flatnonzero(summ):
            m[layer, i, think] *= f
    return torch.tensor(m, dtype=torch.float32)


def result(trace: Trace, maps: torch.Tensor, rid: str, correct: bool | None = None, model: str = "org/model-7b",
           layers: list[int] | None = None, num_layers: int = L, problem: str | None = None) -> SaliencyResult:
    meta_t = {**trace.meta, "id": rid, **({} if correct is None else {"correct": correct}),
              **({} if problem is None else {"problem_id": problem})}
    t = Trace(trace.token_ids, trace.text, trace.fmt, trace.segments, trace.steps, trace.token_char_ends, meta_t,
              trace.format)
    meta = {"model": model, "layers": layers if layers is not None else list(range(num_layers)),
            "num_layers": num_layers, "pool": "mean", "loss": "all", "method": "exact"}
    return SaliencyResult(maps=maps, trace=t, meta=meta)


def planted(trace, n=10, lock=4.0, decay=0.15):
    return [result(trace, synthetic_maps(trace, s, dict.fromkeys(LOCK_BAND, lock), dict.fromkeys(DECAY_BAND, decay)),
                   f"t{s}") for s in range(n)]


def test_planted_bands_are_recovered_exactly(trace, tmp_path):
    import stepscope

    cal = stepscope.calibrate(planted(trace))  # the package exports it
    assert cal.config.oeb_layers == LOCK_BAND and cal.config.smi_layers == DECAY_BAND
    ch = cal.evidence["choices"]
    assert ch["oeb_layers"]["source"] == ch["smi_layers"]["source"] == "measured"
    stand = [r["layer"] for r in ch["oeb_layers"]["per_layer"] if r["stands_out"]]
    assert stand == LOCK_BAND  # nothing else in the shallow half passes the test
    assert [r["layer"] for r in ch["smi_layers"]["per_layer"] if r["stands_out"]] == DECAY_BAND
    assert ch["smi_layers"]["decay_slope"]["falling"]
    # no model: tau_max and alpha stay at the paper's values, and the evidence says why
    assert cal.config.tau_max == 0.15 and cal.config.alpha == 0.06
    assert ch["tau_max"]["source"] == "default" and "attention x gradient" in ch["tau_max"]["reason"]
    table = cal.table()
    assert "oeb_layers  2-4" in table and "0-3" in table and "smi_layers  11-13" in table and "12-15" in table

    out = tmp_path / "stepflow.json"
    cal.save(out)
    assert json.loads(out.read_text()) == cal.config.to_json()  # the config file is exactly a StepFlowConfig
    assert StepFlowConfig.load(out) == cal.config
    ev = load_calibration(out)
    assert ev["config_file"] == "stepflow.json" and evidence_path(out).name == "stepflow.calibration.json"
    assert ev["choices"]["oeb_layers"]["value"] == LOCK_BAND
    # every per-layer entry has its statistics, NaN-free JSON
    json.dumps(ev, allow_nan=False)


def test_a_noise_layer_next_to_the_band_does_not_stretch_it(trace):
    """A weaker plant one layer past the band (effect too small to stand out) and a lone strong layer far from
    it: the band is the longest contiguous run, the lone layer is not joined to it."""
    rs = [result(trace, synthetic_maps(trace, s, {**dict.fromkeys(LOCK_BAND, 4.0), 7: 4.0}, {}), f"t{s}")
          for s in range(10)]
    cal = calibrate(rs)
    per = {r["layer"]: r for r in cal.evidence["choices"]["oeb_layers"]["per_layer"]}
    assert per[7]["stands_out"] and cal.config.oeb_layers == LOCK_BAND


def test_nothing_planted_falls_back_to_the_defaults_and_says_why(trace):
    rs = [result(trace, synthetic_maps(trace, s, {}, {}), f"t{s}") for s in range(10)]
    cal = calibrate(rs)
    ch = cal.evidence["choices"]
    assert cal.config.oeb_layers == [0, 1, 2, 3] and cal.config.smi_layers == [12, 13, 14, 15]
    assert ch["oeb_layers"]["source"] == "default" and "stands out" in ch["oeb_layers"]["reason"]
    assert ch["smi_layers"]["source"] == "default" and "paper's default" in ch["smi_layers"]["reason"]


def test_too_few_traces_fall_back(trace):
    cal = calibrate(planted(trace, n=3))
    for name in ("oeb_layers", "smi_layers"):
        c = cal.evidence["choices"][name]
        assert c["source"] == "default" and "only 3 trace(s)" in c["reason"]


def test_correct_and_wrong_traces_narrow_the_band_to_where_wrong_is_worse(trace):
    """Every trace is locked in at layers 2-4, but the wrong ones more so at 3-4 only (less at 2): the band is
    3-4, and the comparison's statistics are in the evidence."""
    rs = []
    for s in range(12):
        wrong = s % 2 == 1
        lock = {2: 3.0 if wrong else 6.0, 3: 6.0 if wrong else 3.0, 4: 6.0 if wrong else 3.0}
        rs.append(result(trace, synthetic_maps(trace, s, lock, dict.fromkeys(DECAY_BAND, 0.15)), f"t{s}",
                         correct=not wrong, problem=f"p{s // 2}"))  # 6 problems, each solved once, failed once
    cal = calibrate(rs, n_boot=200)
    oeb = cal.evidence["choices"]["oeb_layers"]
    assert cal.config.oeb_layers == [3, 4] and oeb["source"] == "measured"
    per = {r["layer"]: r for r in oeb["per_layer"]}
    assert per[2]["stands_out"] and per[2]["wrong_minus_correct"]["value"] < 0 and not per[2]["chosen"]
    assert per[3]["wrong_minus_correct"]["metrics"]["locality"]["welch_p"] < 0.05
    assert cal.evidence["comparison"]["correct"] == 6 and cal.evidence["comparison"]["wrong"] == 6


def test_cli_writes_config_and_evidence_and_prints_the_table(trace, tmp_path, capsys):
    sal = tmp_path / "sal"
    for r in planted(trace):
        r.save(sal / r.trace.meta["id"])
    out = tmp_path / "cfg" / "stepflow.json"
    assert cli.main(["calibrate", str(sal), "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "paper" in shown and "2-4" in shown and "11-13" in shown
    assert StepFlowConfig.load(out).oeb_layers == LOCK_BAND
    assert load_calibration(out)["traces"]["n"] == 10


def _err(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("stepscope calibrate: error: ")
    return err


def test_bad_input_gets_one_line(trace, tmp_path, capsys):
    out = tmp_path / "stepflow.json"
    (tmp_path / "empty").mkdir()
    err = _err(capsys, ["calibrate", str(tmp_path / "empty"), "--out", str(out)])
    assert "not a saliency result folder" in err

    mixed = tmp_path / "mixed"
    rs = planted(trace, n=4)
    rs[3].meta["model"] = "org/other-model"
    for r in rs:
        r.save(mixed / r.trace.meta["id"])
    assert "different models" in _err(capsys, ["calibrate", str(mixed), "--out", str(out)])

    part = tmp_path / "part"
    keep = [0, 1, 2, 3, 12, 13, 14, 15]
    for r in planted(trace, n=4):
        result(trace, r.maps[keep], r.trace.meta["id"], layers=keep).save(part / r.trace.meta["id"])
    err = _err(capsys, ["calibrate", str(part), "--out", str(out)])
    assert "computed on layers 0-3, 12-15 of 16" in err and "--layers all" in err
    assert not out.exists() and not evidence_path(out).exists()  # nothing half-written

    page = tmp_path / "r.html"
    assert cli.main(["report", str(part / "t0"), "--out", str(page), "--calibration", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "stepflow.calibration.json: no such calibration file" in err and not page.exists()


def test_model_that_is_not_the_results_model_is_refused(trace):
    from tiny import make_model

    tok = make_tokenizer("think")
    model = make_model("llama", vocab_size=len(tok), layers=L)
    with pytest.raises(StepscopeError, match="calibrate with the model the saliency was computed on"):
        calibrate(planted(trace, n=4), model=model, tokenizer=tok)


def test_report_shows_the_calibration_escaped(trace, tmp_path):
    evil = "org/<script>alert(1)</script>"
    sal = tmp_path / "sal"
    rs = planted(trace, n=10)
    for r in rs:
        r.meta["model"] = evil
        r.save(sal / r.trace.meta["id"])
    out = tmp_path / "stepflow.json"
    assert cli.main(["calibrate", str(sal), "--out", str(out)]) == 0
    page = tmp_path / "r.html"
    assert cli.main(["report", str(sal / "t0"), "--out", str(page), "--calibration", str(out)]) == 0
    text = page.read_text()
    assert "StepFlow calibration" in text and 'src="data:image/png;base64,' in text
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<td>oeb_layers</td><td>2-4</td><td>0-3</td><td>measured</td>" in text
    assert "<td>smi_layers</td><td>11-13</td><td>12-15</td><td>measured</td>" in text


def test_calibration_figure_shades_the_chosen_and_default_bands(trace):
    from matplotlib.patches import Polygon, Rectangle

    from stepscope.report.calibration import calibration_figure

    cal = calibrate(planted(trace)).to_json()
    fig = calibration_figure(cal)
    oeb_ax, smi_ax = fig.axes[:2]

    def spans(ax, hatched):
        out = []
        for p in ax.patches:
            if isinstance(p, Polygon | Rectangle) and bool(p.get_hatch()) == hatched:
                xs = p.get_xy()[:, 0] if isinstance(p, Polygon) else [p.get_x(), p.get_x() + p.get_width()]
                out.append((float(min(xs)), float(max(xs))))
        return out

    assert spans(oeb_ax, False) == [(1.5, 4.5)] and spans(oeb_ax, True) == [(-0.5, 3.5)]
    assert spans(smi_ax, False) == [(10.5, 13.5)] and spans(smi_ax, True) == [(11.5, 15.5)]
