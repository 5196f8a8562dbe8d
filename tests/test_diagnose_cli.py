"""The diagnose, compare and report commands on result folders (synthetic maps, real traces and result files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_diagnose import structured_maps

from stepscope.cli import main
from stepscope.trace import Trace

THINK = " ".join(f"Step number {k} works out one more part of the sum carefully." for k in range(8))


def _write(folder, tokenizer, *, lock=0.0, seed=0, problem="What is 2+2?", correct=True, L=8):
    from stepscope.saliency import SaliencyResult

    trace = Trace.from_text(tokenizer, question=problem, response=THINK + "\n</think>\n\nThe answer is 4, "
                            "as computed.\n\nFinal answer: 4.",
                            meta={"id": folder.name, "problem": problem, "correct": correct})
    maps = structured_maps(L, trace.kinds, lock=lock, seed=seed, noise=0.3).astype(np.float32)
    SaliencyResult(maps=torch.from_numpy(maps), trace=trace,
                   meta={"model": "tiny", "pool": "mean", "layers": list(range(L)), "num_layers": L}).save(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, think_tokenizer):
    root = tmp_path_factory.mktemp("sal")
    ok = [_write(root / "ok" / f"ok{k}", think_tokenizer, seed=k, problem=f"problem {k}") for k in range(6)]
    bad = [_write(root / "bad" / f"bad{k}", think_tokenizer, seed=50 + k, lock=0.6, problem=f"problem {k}",
                  correct=False) for k in range(4)]
    return root, ok, bad


def test_diagnose_writes_json_prints_table_and_profiles(folders, tmp_path, capsys):
    root, ok, bad = folders
    prof = tmp_path / "profile.json"
    assert main(["diagnose", str(root / "ok"), "--save-profile", str(prof)]) == 0
    out = capsys.readouterr()
    assert "layer band" in out.out and "lock_in_score=" in out.out and "no verdict" in out.out
    assert "saved a baseline profile of 6 traces" in out.err and "6 marked correct" in out.err
    d = json.loads((ok[0] / "diagnosis.json").read_text())
    assert d["stepscope_diagnosis"] == 1 and d["verdict"] is None and len(d["metrics"]["locality"]) == 8
    assert json.loads(prof.read_text())["n_traces"] == 6

    assert main(["diagnose", str(bad[0]), str(ok[0]), "--baseline", str(prof), "--summary-only"]) == 0
    out = capsys.readouterr().out
    assert "layer band" not in out
    lines = out.strip().splitlines()
    assert "shallow lock-in beyond the baseline" in lines[1]  # bad0
    d = json.loads((bad[0] / "diagnosis.json").read_text())
    assert d["verdict"]["shallow_lock_in"]["status"] == "flagged" and d["score_flags"]["lock_in_score"] is True


def test_diagnose_errors_are_one_line(folders, tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stepscope diagnose: error:") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["diagnose", str(tmp_path / "empty")]) == 2
    assert "not a saliency result folder" in capsys.readouterr().err
    bad_profile = tmp_path / "p.json"
    bad_profile.write_text("{")
    assert main(["diagnose", str(folders[1][0]), "--baseline", str(bad_profile), "--no-write"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_compare_writes_json_summary_and_figures(folders, tmp_path, capsys):
    root, ok, bad = folders
    out = tmp_path / "cmp"
    assert main(["compare", "--correct", str(root / "ok"), "--wrong", *map(str, bad), "--out", str(out),
                 "--n-boot", "500", "--n-perm", "500"]) == 0
    text = capsys.readouterr().out
    assert "4 problems in both groups" in text and "locality" in text
    cmp = json.loads((out / "comparison.json").read_text())
    assert cmp["groups"]["correct"]["n"] == 6 and cmp["groups"]["wrong"]["n"] == 4
    assert cmp["metrics"]["locality"][0]["welch"]["p_holm"] < 0.05
    assert cmp["metrics"]["locality"][0]["paired"]["n_pairs"] == 4
    for name in ("metrics_by_layer.png", "metrics_by_layer.svg", "scores.png", "scores.svg", "summary.txt"):
        assert (out / name).stat().st_size > 0
    # split by meta "correct" gives the same groups
    out2 = tmp_path / "cmp2"
    assert main(["compare", "--by-meta", str(root / "ok"), str(root / "bad"), "--out", str(out2),
                 "--n-boot", "500", "--n-perm", "500", "--no-figures"]) == 0
    cmp2 = json.loads((out2 / "comparison.json").read_text())
    assert cmp2["metrics"]["locality"] == cmp["metrics"]["locality"]
    assert not (out2 / "scores.png").exists()


def test_compare_needs_both_groups(folders, tmp_path, capsys):
    root, ok, _ = folders
    assert main(["compare", "--correct", str(ok[0]), "--out", str(tmp_path / "x")]) == 2
    assert "both groups" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_report_command(folders, tmp_path, capsys):
    root, ok, bad = folders
    page = tmp_path / "r.html"
    assert main(["report", str(ok[0]), str(bad[0]), "--out", str(page), "--layers", "0-2,7"]) == 0
    assert "wrote" in capsys.readouterr().out
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>") and 'id="stepscope-data"' in text
    from test_report import payload_of

    data = payload_of(text)
    assert [r["label"] for r in data["results"]] == ["ok0", "bad0"]
    assert [x["layer"] for x in data["results"][0]["layers"]] == [0, 1, 2, 7]
    assert main(["report", str(bad[0]), "--out", str(page), "--figures", str(tmp_path / "figs")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        f"bad0_{kind}.png" for kind in ("layers", "metrics"))
    assert main(["report", str(ok[0]), "--out", str(tmp_path / "r.txt")]) == 2
    assert ".html" in capsys.readouterr().err
