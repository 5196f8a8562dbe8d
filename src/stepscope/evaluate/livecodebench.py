"""LiveCodeBench rows: release files, the contest-date window, test decoding without executing anything, the prompt.

The hub dataset `livecodebench/code_generation_lite` keeps its rows in one JSONL file per release:
test.jsonl (release_v1), test2.jsonl (added in release_v2), ... test6.jsonl. `release_vN` means files 1..N,
`vN` file N alone and `vA_vB` files A..B (the dataset's own version tags). A row holds `question_title`,
`question_content`, `platform`, `question_id`, `contest_id`, `contest_date`, `starter_code`, `difficulty`,
`public_test_cases` (JSON), `private_test_cases` and `metadata` (JSON; `func_name` for call-based problems).

Private tests are JSON, or base64 of zlib of a pickle of the JSON text. The usual loaders `pickle.loads`
that downloaded data, which runs whatever the pickle asks for; here the unpickler refuses every class and
callable (`find_class` always raises), so only plain data (strings, numbers, lists, dicts) can come out.
Rows become stepscope Problems in stepscope.evaluate.benchmarks.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import pickle
import re
import zlib
from pathlib import Path

from ..errors import StepscopeError
from .code_grading import CodeTest

HUB_REPO = "livecodebench/code_generation_lite"
FILES = ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl")
DEFAULT_RELEASE = "release_v5"
MAX_DECODED = 1 << 30  # bytes a problem's private tests may decompress to
COLUMNS = ("question_content", "question_id", "public_test_cases")

# LiveCodeBench's chat prompt (lcb_runner/prompts/code_generation.py, the generic question template); the
# system message is left out, as DeepSeek recommends for R1 and its distills (everything in the user turn)
WITH_STARTER = ("You will use the following starter code to write the solution to the problem and enclose your "
                "code within delimiters.")
WITHOUT_STARTER = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
                   "test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when "
                   "the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.")


def prompt(question_content: str, starter_code: str = "") -> str:
    """The user message for one problem: the question, the format (starter code or stdin/stdout), the answer cue."""
    text = f"### Question:\n{question_content}\n\n"
    if starter_code:
        text += f"### Format: {WITH_STARTER}\n```python\n{starter_code}\n```\n\n"
    else:
        text += f"### Format: {WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"
    return text + "### Answer: (use the provided format with backticks)\n\n"


# ------------------------------------------------------------------------------------------- releases

def release_files(version: str) -> list[str]:
    """The dataset's JSONL files of a version tag: release_v1..release_v6, release_latest, vN, vA_vB."""
    v = version.strip().lower()
    if v == "release_latest":
        return list(FILES)
    m = re.fullmatch(r"release_v(\d+)", v)
    if m and 1 <= int(m.group(1)) <= len(FILES):
        return list(FILES[:int(m.group(1))])
    m = re.fullmatch(r"v(\d+)(?:_v(\d+))?", v)
    if m:
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if 1 <= a <= b <= len(FILES):
            return list(FILES[a - 1:b])
    raise StepscopeError(f"unknown LiveCodeBench release {version!r}; use release_v1..release_v{len(FILES)}, "
                         f"release_latest, v1..v{len(FILES)} or a range such as v4_v5")


def hub_files(version: str) -> list[Path]:
    """Download (or find in the Hugging Face cache) the release's JSONL files; needs huggingface_hub and a network."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise StepscopeError("livecodebench from the hub needs huggingface_hub: pip install huggingface_hub; or "
                             "pass a local file with --data-file") from None
    from ..models import hub_offline

    offline = hub_offline()  # checked first: the hub client would spend ~25 s retrying an unreachable hub
    out = []
    for name in release_files(version):
        try:
            out.append(Path(hf_hub_download(HUB_REPO, name, repo_type="dataset", local_files_only=offline)))
        except Exception as e:  # noqa: BLE001  (network, offline mode, a moved file: one clear line)
            if offline:
                raise StepscopeError(f"livecodebench: the Hugging Face hub is unreachable (offline) and {name} of "
                                     f"{HUB_REPO} is not in the local cache; pass a local copy with --data-file") \
                    from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise StepscopeError(f"livecodebench: cannot get {name} of {HUB_REPO} from the hub ({first}); pass a "
                                 f"local copy with --data-file") from None
    return out


# ---------------------------------------------------------------------------------------------- dates

def parse_date(text: str | None, what: str) -> dt.date | None:
    """A YYYY-MM-DD date (None stays None)."""
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(str(text).strip()[:10])
    except ValueError:
        raise StepscopeError(f"{what} must be a date like 2024-08-01, got {text!r}") from None


def in_window(row: dict, start: dt.date | None, end: dt.date | None, where: str) -> bool:
    """Whether the row's contest date lies in [start, end] (both inclusive, whole days)."""
    if start is None and end is None:
        return True
    day = parse_date(row.get("contest_date"), f"{where}: contest_date")
    if day is None:
        raise StepscopeError(f"{where} has no contest_date; a date window needs one")
    return (start is None or day >= start) and (end is None or day <= end)


# ---------------------------------------------------------------------------------------- test decoding

class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that admits plain data only: every class, function and extension code is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id")


def plain_unpickle(data: bytes):
    """Unpickle `data` without calling anything: only strings, bytes, numbers, lists, tuples, dicts, sets."""
    return _PlainUnpickler(io.BytesIO(data)).load()


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, MAX_DECODED + 1)
    if len(out) > MAX_DECODED or d.unconsumed_tail:
        raise ValueError(f"decompresses to more than {MAX_DECODED >> 20} MiB")
    return out


def decode_tests(value, where: str) -> list[dict]:
    """Test cases from a row's field: a JSON list, or base64 → zlib → pickle of one (see the module docstring)."""
    if value is None or value == "":
        return []
    obj = value
    if isinstance(value, str):
        try:
            obj = json.loads(value)
        except ValueError:
            try:
                obj = plain_unpickle(_inflate(base64.b64decode(value.encode("ascii"), validate=False)))
            except pickle.UnpicklingError as e:
                raise StepscopeError(f"{where}: refused the encoded test cases ({e}); only plain data is "
                                     f"accepted") from None
            except Exception as e:  # noqa: BLE001  (broken or hostile bytes: one clear line, nothing run)
                raise StepscopeError(f"{where}: the test cases are neither JSON nor base64/zlib/pickle data "
                                     f"({type(e).__name__}: {str(e)[:80]})") from None
            if isinstance(obj, (bytes, str)):
                try:
                    obj = json.loads(obj)
                except ValueError:
                    raise StepscopeError(f"{where}: the decoded test cases are not JSON") from None
    if not isinstance(obj, list) or not all(isinstance(t, dict) for t in obj):
        raise StepscopeError(f"{where}: the test cases must be a list of objects")
    for i, t in enumerate(obj):
        if not isinstance(t.get("input"), str) or not isinstance(t.get("output"), str):
            raise StepscopeError(f"{where}: test {i} needs string 'input' and 'output'")
    return obj


# ------------------------------------------------------------------------------------------------ rows

def is_livecodebench_row(row) -> bool:
    return isinstance(row, dict) and all(k in row for k in COLUMNS)


def parse_row(row: dict, where: str) -> dict:
    """The fields of one row: id, title, content, platform, difficulty, contest_date, contest_id, starter_code,
    fn_name, tests (public then private, as CodeTests)."""
    if not is_livecodebench_row(row):
        raise StepscopeError(f"{where} is not a LiveCodeBench row (needs {', '.join(COLUMNS)})")
    qid = str(row["question_id"]).strip()
    where = f"{where} ({qid})"
    meta = row.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except ValueError:
            raise StepscopeError(f"{where}: metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise StepscopeError(f"{where}: metadata must be a JSON object")
    fn_name = meta.get("func_name") or None
    raw = decode_tests(row.get("public_test_cases"), f"{where} public tests") + \
        decode_tests(row.get("private_test_cases"), f"{where} private tests")
    if not raw:
        raise StepscopeError(f"{where} has no test cases")
    kinds = {str(t.get("testtype", "functional" if fn_name else "stdin")) for t in raw}
    if kinds - {"stdin", "functional"} or len(kinds) > 1:
        raise StepscopeError(f"{where}: mixed or unknown test types {sorted(kinds)}")
    if kinds == {"functional"} and not fn_name:
        raise StepscopeError(f"{where}: call-based tests but no func_name in metadata")
    if kinds == {"stdin"}:
        fn_name = None
    content = str(row["question_content"]).strip()
    if not content:
        raise StepscopeError(f"{where}: empty question_content")
    return {"id": qid, "title": str(row.get("question_title") or ""), "content": content,
            "platform": str(row.get("platform") or ""), "difficulty": str(row.get("difficulty") or ""),
            "contest_date": str(row.get("contest_date") or ""), "contest_id": str(row.get("contest_id") or ""),
            "starter_code": str(row.get("starter_code") or ""), "fn_name": fn_name,
            "tests": tuple(CodeTest(t["input"], t["output"]) for t in raw)}


def read_jsonl_rows(paths: list[Path], start: dt.date | None, end: dt.date | None) -> list[dict]:
    """Parsed rows of JSONL files, one at a time (only rows in the date window are decoded and kept)."""
    out = []
    for path in paths:
        try:
            f = open(path, encoding="utf-8")
        except FileNotFoundError:
            raise StepscopeError(f"{path}: no such file") from None
        with f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name}: line {n}"
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise StepscopeError(f"{where} is not valid JSON ({str(e)[:60]})") from None
                if not is_livecodebench_row(row):
                    raise StepscopeError(f"{where} is not a LiveCodeBench row (needs {', '.join(COLUMNS)})")
                if in_window(row, start, end, where):
                    out.append(parse_row(row, where))
    return out


def select_rows(rows: list[dict], start: dt.date | None, end: dt.date | None, name: str) -> list[dict]:
    """Parsed rows of already-read rows (a JSON, CSV or parquet file), in the date window."""
    return [parse_row(r, f"{name}: row {i}") for i, r in enumerate(rows)
            if in_window(r, start, end, f"{name}: row {i}")]
