"""The evaluation run loop: paired arms per (problem, sample), one JSONL line per sample, resumable and sharded.

A run folder holds:
- `run.json`: the settings that decide the results (model, benchmark and its fingerprint, samples, arms and
  their StepFlow configs, decoding); `--resume` refuses a folder whose settings differ.
- `results.jsonl` (one process) or `results.rank<R>.jsonl` (process R of a torchrun/accelerate launch): one
  line per finished sample, appended and flushed (and fsync'ed) after every batch. Rank 0 merges them into
  `results.jsonl` when every rank is done, in the order of the work list.
- `status.rank<R>.json`: running / done / interrupted / failed, so rank 0 never waits on a dead rank.
- `summary.json`, `summary.md`: written by rank 0 at the end (see stepscope.evaluate.report).

Work list: problem-major (p0 s0, p0 s1, ..., p1 s0, ...). Sample s of problem p is generated with the seed
`sample_seed(base seed, p.id, s)` in every arm, so the arms are paired sample by sample. Work units go to
rank `index % world_size`. Batches interleave the arms (batch 1 baseline, batch 1 stepflow, batch 2 ...),
so an interrupted run holds both arms of the problems it finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StepscopeError
from ..io import atomic_write_json, read_text_file
from .benchmarks import Benchmark, Problem
from .grading import DEFAULT_TIMEOUT, Grade, grade_choice_detail, grade_math_detail

RUN_VERSION = 1
RESULTS = "results.jsonl"
# settings that may change between an interrupted run and its resumption (they do not change any result)
NOT_COMPARED = ("batch_size", "device", "device_map", "stepscope_version", "created", "world_size")


def sample_seed(base_seed: int, problem_id: str, sample: int) -> int:
    """The sampling seed of one (problem, sample): the same in every arm, independent of batching and sharding."""
    digest = hashlib.sha256(f"{base_seed}:{problem_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def dist_env() -> tuple[int, int]:
    """(rank, world_size) from the launcher's environment (torchrun and accelerate set RANK and WORLD_SIZE)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise StepscopeError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise StepscopeError(f"bad RANK={rank} for WORLD_SIZE={world}")
    return rank, world


@dataclass
class EvalSettings:
    """Everything that decides a run's results (stored in run.json)."""

    model: str
    benchmark: str
    n_samples: int = 1
    arms: dict[str, dict | None] = field(default_factory=lambda: {"baseline": None})  # arm -> StepFlow config
    max_new_tokens: int = 32768
    max_thinking_tokens: int | None = None
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    prompt_style: str | None = None  # None: "r1" for math, "gpqa" for multiple choice
    dtype: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"model": self.model, "benchmark": self.benchmark, "n_samples": self.n_samples,
                "arms": self.arms, "max_new_tokens": self.max_new_tokens,
                "max_thinking_tokens": self.max_thinking_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "prompt_style": self.prompt_style, "dtype": self.dtype,
                **self.extra}


ARMS = ("baseline", "stepflow", "oeb", "smi")
# the paper's protocol (METHOD.md §6): samples per problem
PAPER_SAMPLES = {"aime24": 16, "aime25": 16, "amc23": 16, "gpqa-diamond": 8, "math500": 1, "math500-mmath": 1,
                 "gsm8k": 1}


def arms_json(arm_configs: dict[str, object | None]) -> dict[str, dict | None]:
    """The JSON form of arm configs, as stored in run.json and in every record."""
    return {k: (v.to_json() if v is not None and hasattr(v, "to_json") else v) for k, v in arm_configs.items()}


def build_arms(names: list[str] | str, **knobs) -> dict[str, object | None]:
    """Arm name -> StepFlowConfig (None for plain decoding).

    "baseline": plain decoding; "stepflow": OEB and SMI; "oeb": OEB only; "smi": SMI only (the paper's
    ablation). `knobs` are StepFlowConfig fields (tau_max, alpha, smi_window, oeb_layers, smi_layers...); a
    knob given as None keeps the default.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise StepscopeError("no arms given")
    bad = [n for n in names if n not in ARMS]
    if bad:
        raise StepscopeError(f"unknown arm {bad[0]!r}; use a comma-separated list of {', '.join(ARMS)}")
    if len(set(names)) != len(names):
        raise StepscopeError(f"an arm is named twice in {','.join(names)}")
    knobs = {k: v for k, v in knobs.items() if v is not None}
    out: dict[str, object | None] = {}
    for n in names:
        if n == "baseline":
            out[n] = None
            continue
        from ..flow import StepFlowConfig

        out[n] = StepFlowConfig(**knobs, oeb=n in ("stepflow", "oeb"), smi=n in ("stepflow", "smi"))
    return out


# ------------------------------------------------------------------------------------------ results files

def results_file(out: Path, rank: int, world: int) -> Path:
    return out / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")


def repair_jsonl(path: Path) -> int:
    """Cut a truncated last line (a write that a kill interrupted); returns how many bytes were cut."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        # find the last newline by scanning back in blocks
        pos, block = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        return size - keep


def _key(rec: dict) -> tuple[str, int, str]:
    return str(rec["problem_id"]), int(rec["sample"]), str(rec["arm"])


class ResultFiles:
    """Reads the records of a run folder's results files incrementally (only new complete lines each time)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.offsets: dict[Path, int] = {}
        self.records: dict[tuple[str, int, str], dict] = {}

    def paths(self) -> list[Path]:
        return sorted(p for p in [self.out / RESULTS, *self.out.glob("results.rank*.jsonl")] if p.exists())

    def scan(self, keep_records: bool = True) -> dict[tuple[str, int, str], dict]:
        for p in self.paths():
            off = self.offsets.get(p, 0)
            with open(p, "rb") as f:
                f.seek(off)
                data = f.read()
            end = data.rfind(b"\n")
            if end < 0:
                continue  # nothing complete yet (a partial last line is read again next time)
            for n, line in enumerate(data[:end].split(b"\n")):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    k = _key(rec)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise StepscopeError(f"{p}: a line near byte {off} (+{n} lines) is not a result record; "
                                         f"remove it or start a new run") from None
                self.records.setdefault(k, rec if keep_records else {})
            self.offsets[p] = off + end + 1
        return self.records


# ------------------------------------------------------------------------------------------- run folder

def _compare_settings(old: dict, new: dict) -> list[str]:
    keys = sorted((set(old) | set(new)) - set(NOT_COMPARED))
    return [k for k in keys if old.get(k) != new.get(k)]


def prepare_run_folder(out: Path, run_info: dict, *, resume: bool, rank: int,
                       wait_timeout: float | None = 3600.0, poll: float = 1.0) -> None:
    """Rank 0 creates the folder and run.json (or checks it when resuming); other ranks wait for it and check it.

    Other ranks of a launch cannot tell "written by rank 0 a moment ago" from "left by an earlier run", so
    they always behave as if resuming: they only add samples of these very settings, which a later
    --resume counts as done; rank 0 alone refuses an existing run without --resume.
    """
    path = out / "run.json"
    if rank != 0:
        start = time.monotonic()
        while not path.exists():
            if wait_timeout is not None and time.monotonic() - start > wait_timeout:
                raise StepscopeError(f"rank {rank}: rank 0 did not create {path} within {wait_timeout:.0f} s")
            time.sleep(poll)
        resume = True
    if path.exists():
        try:
            old = json.loads(read_text_file(path))
        except json.JSONDecodeError:
            raise StepscopeError(f"{path} is not valid JSON; this folder cannot be resumed") from None
        if not resume:
            raise StepscopeError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        diff = _compare_settings(old, run_info)
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {run_info.get(k)!r}"[:160] for k in diff[:4])
            raise StepscopeError(f"--resume: the settings differ from {path} ({shown}); use the same settings or "
                                 f"another --out")
        return
    if out.exists() and any(out.glob("results*.jsonl")):
        raise StepscopeError(f"{out} holds results but no run.json; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, run_info)


def _write_status(out: Path, rank: int, state: str, **extra) -> None:
    with contextlib.suppress(OSError):
        atomic_write_json(out / f"status.rank{rank}.json", {"rank": rank, "state": state, "time": time.time(),
                                                            **extra})


def _other_rank_failed(out: Path, world: int, since: float) -> str | None:
    """A failure or interruption that another rank reported during this launch (statuses older than `since`,
    rank 0's start, were left by an earlier launch and are ignored)."""
    for r in range(1, world):
        p = out / f"status.rank{r}.json"
        if p.exists():
            with contextlib.suppress(OSError, json.JSONDecodeError, TypeError, ValueError):
                st = json.loads(p.read_text(encoding="utf-8"))
                if st.get("state") in ("failed", "interrupted") and float(st.get("time", 0)) >= since:
                    return f"rank {r} {st['state']}" + (f": {st['error']}" if st.get("error") else "")
    return None


# ---------------------------------------------------------------------------------------------- records

def _char_at(trace, i: int) -> int:
    return trace.token_char_ends[i - 1] if i > 0 else 0


def make_record(problem: Problem, sample: int, seed: int, arm: str, config: dict | None, trace, grade: Grade,
                rank: int, save_trace: bool) -> dict:
    q0, q1 = trace.segments["question"]
    t0, t1 = trace.segments["thinking"]
    s0, s1 = trace.segments["summary"]
    meta = trace.meta or {}
    rec = {
        "problem_id": problem.id,
        "sample": sample,
        "seed": seed,
        "arm": arm,
        "config": config,
        "gold": problem.answer,
        "answer": grade.answer,
        "correct": bool(grade.correct),
        "thinking_closed": bool(grade.thinking_closed),
        "grade_timed_out": bool(grade.timed_out),
        "prompt_tokens": q1 - q0,
        "new_tokens": int(meta.get("num_new_tokens", len(trace.token_ids) - (q1 - q0))),
        "thinking_tokens": t1 - t0,
        "summary_tokens": s1 - s0,
        "stop_reason": meta.get("stop_reason"),
        "budget_forced": meta.get("budget_forced"),
        "time": meta.get("time", (meta.get("timing") or {}).get("row_seconds")),
        "rank": rank,
        "response_start": _char_at(trace, q1),
        "text": trace.text,
    }
    if save_trace:
        rec["trace"] = trace.to_json()
    return rec


def grade_trace(problem: Problem, trace, timeout: float | None) -> Grade:
    if problem.kind == "choice":
        return grade_choice_detail(problem.answer, trace)
    return grade_math_detail(problem.answer, trace, timeout=timeout)


# ----------------------------------------------------------------------------------------------- the run

GenerateFn = Callable[..., list]


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_eval(model, tokenizer, benchmark: Benchmark, settings: EvalSettings, out: str | os.PathLike, *,
             arm_configs: dict[str, object | None] | None = None, batch_size: int = 8, resume: bool = False,
             progress: bool = True, generate_fn: GenerateFn | None = None, grade_timeout: float | None = DEFAULT_TIMEOUT,
             save_traces: bool = False, rank: int | None = None, world_size: int | None = None,
             poll_seconds: float = 2.0, wait_timeout: float | None = None) -> dict | None:
    """Run every (problem, sample) of `benchmark` in every arm, append the records, and summarize.

    `arm_configs`: arm name -> the StepFlowConfig object handed to `generate_fn` (None: plain decoding);
    defaults to `settings.arms` as given. `generate_fn` defaults to `stepscope.flow.generate_traces`.
    Returns the summary (on rank 0; other ranks return None after finishing their share).
    """
    out = Path(out)
    started = time.time()
    env_rank, env_world = dist_env()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    if batch_size < 1:
        raise StepscopeError(f"--batch-size must be at least 1, got {batch_size}")
    if settings.n_samples < 1:
        raise StepscopeError(f"--n-samples must be at least 1, got {settings.n_samples}")
    if not settings.arms:
        raise StepscopeError("no arms to run")
    arm_configs = dict(settings.arms) if arm_configs is None else arm_configs
    if set(arm_configs) != set(settings.arms):
        raise StepscopeError("arm_configs and settings.arms name different arms")
    if generate_fn is None:
        try:
            from ..flow import generate_traces as generate_fn  # noqa: N813
        except ImportError:
            from ..flow.generate import generate_traces as generate_fn  # noqa: N813
    from .. import __version__

    run_info = {"stepscope_run": RUN_VERSION, "stepscope_version": __version__, **settings.to_json(), "benchmark_source": benchmark.source,
                "benchmark_fingerprint": benchmark.fingerprint(), "n_problems": len(benchmark),
                "batch_size": batch_size, "world_size": world, "created": time.time()}
    prepare_run_folder(out, run_info, resume=resume, rank=rank, poll=min(poll_seconds, 1.0),
                       wait_timeout=3600.0 if wait_timeout is None else wait_timeout)

    units = [(p, s) for p in benchmark.problems for s in range(settings.n_samples)]  # problem-major
    arms = list(settings.arms)
    mine = [u for i, u in enumerate(units) if i % world == rank]
    own = results_file(out, rank, world)
    repair_jsonl(own)
    files = ResultFiles(out)
    done = set(files.scan(keep_records=False))
    pending = [u for u in mine if any((u[0].id, u[1], a) not in done for a in arms)]
    n_todo = sum((u[0].id, u[1], a) not in done for u in pending for a in arms)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_todo, unit="sample", desc=f"{benchmark.name} ({', '.join(arms)})", dynamic_ncols=True,
                   smoothing=0.1)
    correct = dict.fromkeys(arms, 0)
    count = dict.fromkeys(arms, 0)
    _write_status(out, rank, "running")
    try:
        with open(own, "a", encoding="utf-8") as f:
            for batch in _batches(pending, batch_size):
                for arm in arms:
                    todo = [(p, s) for p, s in batch if (p.id, s, arm) not in done]
                    if not todo:
                        continue
                    seeds = [sample_seed(settings.seed, p.id, s) for p, s in todo]
                    styles = {settings.prompt_style or ("gpqa" if p.kind == "choice" else "r1") for p, _ in todo}
                    traces: list = []
                    for style in sorted(styles):  # one call per prompt style (one style per benchmark normally)
                        sel = [i for i, (p, _) in enumerate(todo)
                               if (settings.prompt_style or ("gpqa" if p.kind == "choice" else "r1")) == style]
                        got = generate_fn(
                            model, tokenizer, [todo[i][0].prompt_text() for i in sel], stepflow=arm_configs[arm],
                            max_new_tokens=settings.max_new_tokens, max_thinking_tokens=settings.max_thinking_tokens,
                            temperature=settings.temperature, top_p=settings.top_p, seeds=[seeds[i] for i in sel],
                            batch_size=batch_size, prompt_style=style, progress=False,
                            metas=[{"id": todo[i][0].id, "sample": todo[i][1], "arm": arm} for i in sel])
                        if len(got) != len(sel):
                            raise StepscopeError(f"the generator returned {len(got)} traces for {len(sel)} prompts")
                        traces.extend(zip(sel, got))
                    traces.sort(key=lambda x: x[0])
                    lines = []
                    for (i, trace), seed in zip(traces, seeds):
                        p, s = todo[i]
                        g = grade_trace(p, trace, grade_timeout)
                        cfg = settings.arms[arm]
                        lines.append(json.dumps(make_record(p, s, seed, arm, cfg, trace, g, rank, save_traces),
                                                ensure_ascii=False))
                        correct[arm] += int(g.correct)
                        count[arm] += 1
                        done.add((p.id, s, arm))
                    f.write("\n".join(lines) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    if bar is not None:
                        bar.update(len(lines))
                        bar.set_postfix({a: f"{100 * correct[a] / count[a]:.1f}%" for a in arms if count[a]})
    except KeyboardInterrupt:
        _write_status(out, rank, "interrupted")
        raise
    except BaseException as e:
        _write_status(out, rank, "failed", error=f"{type(e).__name__}: {e}"[:500])
        raise
    finally:
        if bar is not None:
            bar.close()
    _write_status(out, rank, "done")
    if rank != 0:
        return None
    expected = {(p.id, s, a) for p, s in units for a in arms}
    _wait_for_all(out, files, expected, world, poll_seconds, wait_timeout, started)
    merge_results(out, units, arms)
    from .report import write_summary

    return write_summary(out)


def _wait_for_all(out: Path, files: ResultFiles, expected: set, world: int, poll: float,
                  timeout: float | None, started: float) -> None:
    """Rank 0 waits until every expected record is in some results file (a file barrier)."""
    start = time.monotonic()
    while True:
        have = set(files.scan(keep_records=False))
        missing = expected - have
        if not missing:
            return
        if world == 1:
            raise StepscopeError(f"{len(missing)} samples are missing after the run; resume with --resume")
        failed = _other_rank_failed(out, world, started)
        if failed:
            raise StepscopeError(f"{failed}; {len(missing)} samples missing; rerun with --resume")
        if timeout is not None and time.monotonic() - start > timeout:
            raise StepscopeError(f"timed out waiting for the other ranks ({len(missing)} samples missing)")
        time.sleep(poll)


def merge_results(out: Path, units: list[tuple[Problem, int]], arms: list[str]) -> int:
    """Merge results.jsonl and every results.rank<R>.jsonl into results.jsonl in work-list order.

    A record seen twice (possible only after manual copying) is kept once. The rank files are removed after
    the merged file is safely in place. Returns the number of records.
    """
    files = ResultFiles(out)
    rank_paths = [p for p in files.paths() if p.name != RESULTS]
    records = files.scan()
    order: dict[tuple[str, int, str], int] = {}
    for p, s in units:
        for a in arms:
            order[(p.id, s, a)] = len(order)
    known = [k for k in records if k in order]
    extra = [k for k in records if k not in order]
    if extra:
        raise StepscopeError(f"{out}: {len(extra)} records belong to no (problem, sample, arm) of this run "
                             f"(first: {extra[0]})")
    known.sort(key=order.__getitem__)
    text = "".join(json.dumps(records[k], ensure_ascii=False) + "\n" for k in known)
    from ..io import atomic_write_text

    atomic_write_text(out / RESULTS, text)
    for p in rank_paths:
        with contextlib.suppress(OSError):
            p.unlink()
    return len(known)


def read_results(out: str | os.PathLike) -> list[dict]:
    """Every record of a run folder (merged or not), in file order."""
    return list(ResultFiles(Path(out)).scan().values())
