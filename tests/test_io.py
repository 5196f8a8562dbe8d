"""stepscope.io: the resumable JSONL log (repair of a cut-off line, incremental reading, appending)."""

import json

import pytest

from stepscope.errors import StepscopeError
from stepscope.io import JsonlLog, read_jsonl


def test_repair_cuts_only_a_cut_off_last_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert JsonlLog(p).repair() == len(b'{"c": ')
    assert p.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert JsonlLog(p).repair() == 0
    p.write_bytes(b'{"c": no newline at all')
    JsonlLog(p).repair()
    assert p.read_bytes() == b""
    assert JsonlLog(tmp_path / "absent.jsonl").repair() == 0
    big = b"".join(json.dumps({"i": i, "pad": "x" * 300}).encode() + b"\n" for i in range(400))  # > one 64 KiB block
    p.write_bytes(big + b'{"i": 400, "pad": "' + b"y" * 70_000)  # a cut-off line longer than the block
    assert JsonlLog(p).repair() == 70_000 + len(b'{"i": 400, "pad": "')
    assert p.read_bytes() == big


def test_read_new_returns_whole_lines_once(tmp_path):
    p = tmp_path / "log.jsonl"
    log = JsonlLog(p)
    assert log.read_new() == []  # no file yet
    p.write_bytes(b'{"a": 1}\n\n{"b": 2}\n{"c": ')
    assert log.read_new() == [{"a": 1}, {"b": 2}]
    assert log.read_new() == []  # the partial line waits for its end
    with open(p, "ab") as f:
        f.write(b'3}\n{"d": 4}\n')
    assert log.read_new() == [{"c": 3}, {"d": 4}]
    assert log.read() == [{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}]


def test_append_after_a_cut_off_line_loses_and_repeats_nothing(tmp_path):
    p = tmp_path / "log.jsonl"
    with JsonlLog(p).open() as log:
        assert log.append([{"id": 1, "text": "ü"}, {"id": 2}]) == 2
        assert log.append([]) == 0
    assert p.read_text(encoding="utf-8") == '{"id": 1, "text": "ü"}\n{"id": 2}\n'  # whole lines, no escaping
    with open(p, "a", encoding="utf-8") as f:
        f.write('{"id": 3, "te')  # a write cut by a kill
    with JsonlLog(p).open() as log:
        log.append([{"id": 3}])
    assert read_jsonl(p) == [{"id": 1, "text": "ü"}, {"id": 2}, {"id": 3}]
    with JsonlLog(p).open(truncate=True) as log:
        log.append([{"id": 9}])
    assert JsonlLog(p).read() == [{"id": 9}]
    with pytest.raises(StepscopeError, match="open the log"):
        JsonlLog(p).append([{"id": 1}])


def test_bad_lines_name_their_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"a": 1}\n{oops\n{"b": 2}\n')
    for read in (JsonlLog(p).read, lambda: read_jsonl(p)):
        with pytest.raises(StepscopeError, match=r"line 2 is not valid JSON"):
            read()
    p.write_bytes(b'{"a": 1}\n[1, 2]\n')
    with pytest.raises(StepscopeError, match=r"line 2 is not a JSON object"):
        JsonlLog(p).read()
    p.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(StepscopeError, match=r"line 2 is not valid UTF-8"):
        JsonlLog(p).read()
