"""LiveCodeBench loading: local rows in the dataset's format, releases, the date window, the restricted unpickler."""

import base64
import json
import os
import pickle
import zlib
from pathlib import Path

import pytest

from stepscope.errors import StepscopeError
from stepscope.evaluate import load_benchmark
from stepscope.evaluate.code_grading import CodeTest, extract_code
from stepscope.evaluate.livecodebench import plain_unpickle, prompt, release_files


def encode_private(tests: list[dict]) -> str:
    """The dataset's encoding of private tests: base64 of zlib of a pickle of the JSON text."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("ascii")


def stdio_row(qid="abc301_a", date="2024-08-10T00:00:00", difficulty="easy", platform="atcoder", **kw) -> dict:
    row = {
        "question_title": "Add", "question_content": "Read A and B; print A+B.", "platform": platform,
        "question_id": qid, "contest_id": qid.split("_")[0], "contest_date": date, "starter_code": "",
        "difficulty": difficulty,
        "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
        "private_test_cases": encode_private([{"input": "5 7\n", "output": "12\n", "testtype": "stdin"},
                                              {"input": "-1 1\n", "output": "0\n", "testtype": "stdin"}]),
        "metadata": "{}",
    }
    row.update(kw)
    return row


def call_row(qid="3000", date="2024-12-01T00:00:00", **kw) -> dict:
    row = {
        "question_title": "Two Sum", "question_content": "Return indices of two numbers adding to target.",
        "platform": "leetcode", "question_id": qid, "contest_id": "weekly-contest-400", "contest_date": date,
        "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
        "difficulty": "medium",
        "public_test_cases": json.dumps([{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]",
                                          "testtype": "functional"}]),
        "private_test_cases": encode_private([{"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"}]),
        "metadata": json.dumps({"func_name": "twoSum"}),
    }
    row.update(kw)
    return row


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_local_rows_become_code_problems(tmp_path):
    f = write_rows(tmp_path / "lcb.jsonl", [stdio_row(), call_row()])
    bench = load_benchmark("livecodebench", data_file=f)
    assert bench.name == "livecodebench" and bench.kind == "code" and len(bench) == 2
    a, b = bench.problems
    assert a.id == "abc301_a" and b.id == "3000"  # the question_ids, as they are
    assert a.kind == b.kind == "code" and a.prompt_style == "plain"
    assert a.code.fn_name is None and b.code.fn_name == "twoSum"
    assert a.code.tests == (CodeTest("1 2\n", "3\n"), CodeTest("5 7\n", "12\n"), CodeTest("-1 1\n", "0\n"))
    assert b.code.tests == (CodeTest("[2, 7, 11, 15]\n9", "[0, 1]"), CodeTest("[3, 3]\n6", "[0, 1]"))
    assert a.meta["difficulty"] == "easy" and a.meta["platform"] == "atcoder"
    assert b.meta["difficulty"] == "medium" and b.meta["platform"] == "leetcode"
    assert "Read A and B" in a.prompt_text() and "stdin" in a.prompt_text() and "# YOUR CODE HERE" in a.prompt_text()
    assert b.code.starter_code in b.prompt_text() and "starter code" in b.prompt_text()
    # the same file read as a path (no benchmark name) gives the same problems
    again = load_benchmark(str(f))
    assert [p.id for p in again.problems] == ["abc301_a", "3000"] and again.fingerprint() == bench.fingerprint()


def test_prompt_is_livecodebench_generic_template():
    assert prompt("Q?", "") == (
        "### Question:\nQ?\n\n### Format: Read the inputs from stdin solve the problem and write the answer to "
        "stdout (do not directly test on the sample inputs). Enclose your code within delimiters as follows. "
        "Ensure that when the python program runs, it reads the inputs, runs the algorithm and writes output to "
        "STDOUT.\n```python\n# YOUR CODE HERE\n```\n\n### Answer: (use the provided format with backticks)\n\n")
    assert prompt("Q?", "class Solution: pass") == (
        "### Question:\nQ?\n\n### Format: You will use the following starter code to write the solution to the "
        "problem and enclose your code within delimiters.\n```python\nclass Solution: pass\n```\n\n"
        "### Answer: (use the provided format with backticks)\n\n")


def test_fingerprint_covers_the_tests(tmp_path):
    f1 = write_rows(tmp_path / "a.jsonl", [stdio_row()])
    other = stdio_row(private_test_cases=encode_private([{"input": "5 7\n", "output": "13\n", "testtype": "stdin"}]))
    f2 = write_rows(tmp_path / "b.jsonl", [other])
    b1 = load_benchmark("livecodebench", data_file=f1)
    b2 = load_benchmark("livecodebench", data_file=f2)
    assert b1.problems[0].question == b2.problems[0].question
    assert b1.fingerprint() != b2.fingerprint()
    assert load_benchmark("livecodebench", data_file=f1).fingerprint() == b1.fingerprint()


def test_date_window_inclusive(tmp_path):
    rows = [stdio_row("a_1", "2024-07-31T00:00:00"), stdio_row("a_2", "2024-08-01T00:00:00"),
            stdio_row("a_3", "2025-01-31T12:00:00"), stdio_row("a_4", "2025-02-01T00:00:00")]
    f = write_rows(tmp_path / "lcb.jsonl", rows)
    bench = load_benchmark("livecodebench", data_file=f, start_date="2024-08-01", end_date="2025-01-31")
    assert [p.id for p in bench.problems] == ["a_2", "a_3"]
    assert "2024-08-01" in bench.source and "2025-01-31" in bench.source
    assert [p.id for p in load_benchmark("livecodebench", data_file=f, start_date="2025-01-01").problems] == \
        ["a_3", "a_4"]
    with pytest.raises(StepscopeError, match="start-date"):
        load_benchmark("livecodebench", data_file=f, start_date="2025-02-01", end_date="2024-01-01")
    with pytest.raises(StepscopeError, match="date like"):
        load_benchmark("livecodebench", data_file=f, start_date="August")
    with pytest.raises(StepscopeError, match="no problems"):
        load_benchmark("livecodebench", data_file=f, start_date="2030-01-01")
    with pytest.raises(StepscopeError, match="livecodebench only"):
        load_benchmark("gsm8k", start_date="2024-01-01")


def test_release_files():
    assert release_files("release_v1") == ["test.jsonl"]
    assert release_files("release_v5") == ["test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl"]
    assert release_files("release_latest")[-1] == "test6.jsonl" and len(release_files("release_v6")) == 6
    assert release_files("v4_v5") == ["test4.jsonl", "test5.jsonl"] and release_files("v2") == ["test2.jsonl"]
    for bad in ("release_v7", "v5_v4", "v0", "latest"):
        with pytest.raises(StepscopeError, match="unknown LiveCodeBench release"):
            release_files(bad)


class Hostile:
    """A pickle payload whose loading would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = base64.b64encode(zlib.compress(pickle.dumps([Hostile(marker)]))).decode("ascii")
    f = write_rows(tmp_path / "lcb.jsonl", [stdio_row(), stdio_row("evil_1", private_test_cases=payload)])
    with pytest.raises(StepscopeError) as e:
        load_benchmark("livecodebench", data_file=f)
    msg = str(e.value)
    assert "\n" not in msg and "evil_1" in msg and "refused" in msg and "system" in msg
    assert not marker.exists()
    # the same pickle through pickle.loads would have run the command: the marker shows the test can fail
    pickle.loads(zlib.decompress(base64.b64decode(payload)))
    assert marker.exists()


def test_plain_unpickler_admits_plain_data_only():
    data = {"a": [1, 2.5, "x", None, True], "b": (1, 2), "c": {3, 4}, "d": b"raw"}
    assert plain_unpickle(pickle.dumps(data)) == data
    for obj in (CodeTest("1", "2"), Path("/tmp"), print):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            plain_unpickle(pickle.dumps(obj))


def test_bad_rows_fail_with_one_line(tmp_path):
    cases = {
        "neither JSON nor base64": stdio_row(private_test_cases="%%% not base64 %%%"),
        "func_name": call_row(metadata="{}"),
        "no test cases": stdio_row(public_test_cases="[]", private_test_cases=""),
        "input": stdio_row(public_test_cases=json.dumps([{"input": 1, "output": "2"}])),
    }
    for needle, row in cases.items():
        f = write_rows(tmp_path / "bad.jsonl", [row])
        with pytest.raises(StepscopeError, match=needle) as e:
            load_benchmark("livecodebench", data_file=f)
        assert "\n" not in str(e.value)
    f = write_rows(tmp_path / "dup.jsonl", [stdio_row(), stdio_row()])
    with pytest.raises(StepscopeError, match="duplicate question_id"):
        load_benchmark("livecodebench", data_file=f)
    g = tmp_path / "math.jsonl"
    g.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n", encoding="utf-8")
    with pytest.raises(StepscopeError, match="not a LiveCodeBench row"):
        load_benchmark("livecodebench", data_file=g)


def test_plain_json_private_tests_and_json_file(tmp_path):
    row = stdio_row(private_test_cases=json.dumps([{"input": "2 2\n", "output": "4\n", "testtype": "stdin"}]))
    f = tmp_path / "lcb.json"
    f.write_text(json.dumps([row]), encoding="utf-8")
    bench = load_benchmark("livecodebench", data_file=f)
    assert bench.problems[0].code.tests[-1] == CodeTest("2 2\n", "4\n")


def test_extract_code_takes_the_last_python_block():
    s = "Idea.\n```python\nprint(1)\n```\nBetter:\n```py\nprint(2)\n```\n```text\nnot code\n```\n"
    assert extract_code(s) == "print(2)\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\nprint(3)\n```\nOutput:\n```\n3\n```\n") == "print(3)\n"  # not its output
    assert extract_code("```\nprint(1)\n```\n```\nprint(2)\n```\n") == "print(2)\n"
    assert extract_code("no code here") is None
    assert extract_code("```python\nunclosed") is None
    assert extract_code("```cpp\nint main(){}\n```") is None
