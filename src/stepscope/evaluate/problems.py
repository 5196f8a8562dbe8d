"""Problems as data: a Problem (math, multiple choice or code), a Benchmark (a named list of them and their
source), and the reading of rows (a local JSONL, JSON, CSV or parquet file, or a loader's rows) into problems.

Rows: one problem per row with a question (any of `stepscope.io.QUESTION_KEYS`: `question`/`problem`/...)
and an answer (`answer`/`Answer`/`ground_truth`/...; a GSM8K-style "... #### 42" keeps what follows ####), and
for multiple choice either `choices` (a list, with the answer as a letter or as the text of one choice),
columns `A`, `B`, `C`, `D`, or the GPQA columns `Correct Answer` and `Incorrect Answer 1..3`. GPQA options are
shuffled per problem, deterministically from (seed, problem id): the gold letter is uniform over A-D across
problems and the same for every run with the same seed. Problem ids are the row's own id (`id` column and
friends) where it has one, else its position.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StepscopeError
from ..io import QUESTION_KEYS, read_text_file

if TYPE_CHECKING:  # the code grader (and its sandbox) is imported where code is graded, not to read problems
    from .code_grading import CodeTest

LETTERS = "ABCDEFGHIJ"

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
            from .livecodebench import prompt

            return prompt(self.question, self.code.starter_code)
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
