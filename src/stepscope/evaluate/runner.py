"""The evaluation run loop: paired arms per (problem, sample), one JSONL line per sample, resumable and sharded.

Work list: problem-major (p0 s0, p0 s1, ..., p1 s0, ...). Sample s of problem p is generated with the seed
`sample_seed(base seed, p.id, s)` in every arm, so the arms are paired sample by sample. Work units go to
rank `index % world_size`. Batches interleave the arms (batch 1 baseline, batch 1 stepflow, batch 2 ...),
so an interrupted run holds both arms of the problems it finished. The files of a run live in its run
folder (`stepscope.evaluate.runfolder`); the summary is written by `stepscope.evaluate.summary`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..cpus import usable_cpus
from ..decoding import DecodeConfig
from ..errors import StepscopeError
from ..models import num_layers as model_layers
from .benchmarks import benchmark_grader
from .code_grading import grade_code
from .cost import batch_timing, fire_counts, session_info
from .grading import DEFAULT_TIMEOUT, GRADER_ERROR, Grade, grade_choice_detail, grade_math_detail
from .problems import Benchmark, Problem
from .runfolder import RUN_VERSION, Key, RunFolder
from .summary import write_summary


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


EVAL_MAX_NEW_TOKENS = 32768  # an evaluation's default budget: long enough for the paper's benchmarks


def eval_decode(**fields) -> DecodeConfig:
    """An evaluation's DecodeConfig: the paper's sampling (temperature 0.6, top-p 0.95) and a 32768-token budget."""
    return DecodeConfig(**{"max_new_tokens": EVAL_MAX_NEW_TOKENS, **fields})


@dataclass
class EvalSettings:
    """Everything that decides a run's results (stored in run.json, the decoding settings as top-level keys).

    `decode.seed` is the base seed: sample s of problem p uses `sample_seed(decode.seed, p.id, s)` in every arm.
    """

    model: str
    benchmark: str
    n_samples: int = 1
    arms: dict[str, dict | None] = field(default_factory=lambda: {"baseline": None})  # arm -> StepFlow config
    decode: DecodeConfig = field(default_factory=eval_decode)
    prompt_style: str | None = None  # None: "r1" for math, "gpqa" for multiple choice
    dtype: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"model": self.model, "benchmark": self.benchmark, "n_samples": self.n_samples,
                "arms": self.arms, **self.decode.validate().to_json(), "prompt_style": self.prompt_style,
                "dtype": self.dtype, **self.extra}


ARMS = ("baseline", "stepflow", "oeb", "smi")


def arms_json(arm_configs: dict[str, object | None]) -> dict[str, dict | None]:
    """The JSON form of arm configs, as stored in run.json and in every record."""
    return {k: (v.to_json() if v is not None and hasattr(v, "to_json") else v) for k, v in arm_configs.items()}


def build_arms(names: list[str] | str, base=None, **knobs) -> dict[str, object | None]:
    """Arm name -> StepFlowConfig (None for plain decoding).

    "baseline": plain decoding; "stepflow": OEB and SMI; "oeb": OEB only; "smi": SMI only (the paper's
    ablation); for each registered repair R (core/interventions.py, docs/extending.md) "R": R alone and
    "stepflow+R": OEB, SMI and R, each with its default settings; "NAME=@FILE": the StepFlowConfig in FILE (as
    `stepscope calibrate` writes it), as it is, under the arm name NAME. The built-in arms start from `base` (a StepFlowConfig, e.g. --stepflow-config; default the
    paper's) with `knobs` on top: StepFlowConfig fields (tau_max, alpha, smi_window, oeb_layers, smi_layers...);
    a knob given as None keeps the base value. Knobs do not change a file's arm.
    """
    import re
    from dataclasses import replace

    from ..core.interventions import registered, repair_arm
    from ..flow import StepFlowConfig

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise StepscopeError("no arms given")
    files: dict[str, str] = {}
    for item in names:
        if "=" in item:
            name, _, spec = (x.strip() for x in item.partition("="))
            if not spec.startswith("@") or len(spec) < 2 or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) \
                    or name in ARMS or name in registered():
                raise StepscopeError(f"cannot read the arm {item!r}: write NAME=@FILE.json with a new name of "
                                     f"letters, digits, '.', '_' or '-' (not {', '.join(ARMS)})")
            files[name] = spec[1:]
    names = [n.partition("=")[0].strip() for n in names]
    repairs = registered()
    bad = [n for n in names if n not in ARMS and n not in files and repair_arm(n) is None]
    if bad:
        more = "".join(f", {r}, stepflow+{r}" for r in repairs)
        raise StepscopeError(f"unknown arm {bad[0]!r}; use a comma-separated list of {', '.join(ARMS)}{more} or "
                             "NAME=@FILE.json")
    if len(set(names)) != len(names):
        raise StepscopeError(f"an arm is named twice in {','.join(names)}")
    knobs = {k: v for k, v in knobs.items() if v is not None}
    out: dict[str, object | None] = {}
    for n in names:
        if n in files:
            out[n] = StepFlowConfig.load(files[n])
        elif n == "baseline":
            out[n] = None
        elif n in ARMS:
            out[n] = replace(base or StepFlowConfig(), **knobs, oeb=n in ("stepflow", "oeb"),
                             smi=n in ("stepflow", "smi"))
        else:  # a registered repair, alone or with OEB and SMI
            iv, both = repair_arm(n)
            out[n] = replace(base or StepFlowConfig(), **knobs, oeb=both, smi=both, interventions={iv.name: {}})
    return out


# ---------------------------------------------------------------------------------------------- records

def _char_at(trace, i: int) -> int:
    return trace.token_char_ends[i - 1] if i > 0 else 0


# what a saved trace's meta keeps of its record (--save-traces): which sample it is and how it was graded
TRACE_META = ("problem_id", "sample", "arm", "gold", "answer", "correct")


def trace_id(problem_id: str, arm: str, sample: int) -> str:
    """The id of a saved trace (--save-traces): its problem, arm and sample; `stepscope saliency` and
    `stepscope trace --out DIR` name their folders and files after it."""
    return f"{problem_id}-{arm}-s{sample}"


def make_record(problem: Problem, sample: int, seed: int, arm: str, config: dict | None, trace, grade: Grade,
                rank: int, save_trace: bool, timing: dict | None = None) -> dict:
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
        "thinking_steps": len(trace.steps_of("thinking")),
        "summary_tokens": s1 - s0,
        "stop_reason": meta.get("stop_reason"),
        "budget_forced": meta.get("budget_forced"),
        "time": meta.get("time", (meta.get("timing") or {}).get("row_seconds")),
        "stepflow_fires": fire_counts(trace),
        "timing": timing,  # the wall time of the generator call that made this sample (evaluate/cost.py)
        "rank": rank,
        "response_start": _char_at(trace, q1),
        "text": trace.text,
        **problem.record_fields(),
        **grade.record_fields(),
    }
    if save_trace:  # the saved trace names its arm and sample and carries its grade (for `compare --by-meta`)
        tj = trace.to_json()
        rec["trace"] = {**tj, "meta": {**tj["meta"], "id": trace_id(problem.id, arm, sample),
                                       **{k: rec[k] for k in TRACE_META}}}
    return rec


def grade_trace(problem: Problem, trace, timeout: float | None, code_limits: dict | None = None,
                grader: Callable | None = None) -> Grade:
    """Grade one trace with its benchmark's grader, or by the kind of its problem (`code_limits`: grade_code's
    timeout and memory_mb).

    A grading that fails inside the grader gives a wrong grade of status GRADER_ERROR naming the error, so the
    run goes on and the summary names the sample (a bug of ours, or a sandbox that could not start)."""
    try:
        if grader is not None:
            return grader(problem, trace, timeout=timeout, code_limits=code_limits or {})
        if problem.kind == "code":
            return grade_code(problem.code.tests, trace, fn_name=problem.code.fn_name, **(code_limits or {}))
        if problem.kind == "choice":
            return grade_choice_detail(problem.answer, trace)
        return grade_math_detail(problem.answer, trace, timeout=timeout)
    except Exception as e:  # noqa: BLE001  (recorded, never the end of the run)
        error = f"{type(e).__name__}: {e}"[:300]
        print(f"stepscope eval: grading {problem.id} failed inside the grader ({error}); recorded as "
              f"{GRADER_ERROR}, the run goes on", file=sys.stderr)
        n = len(problem.code.tests) if problem.kind == "code" else None
        return Grade(False, None, thinking_closed=bool(getattr(trace, "thinking_closed", False)),
                     status=GRADER_ERROR, tests=(), n_tests=n, failure={"error": error})


def grade_traces(problems: list[Problem], traces: list, timeout: float | None, settings: EvalSettings) -> list[Grade]:
    """Grade a batch with the benchmark's grader (stepscope.evaluate.benchmarks); code problems' programs run on
    several workers (each in its own sandbox)."""
    limits = {k: settings.extra[e] for k, e in (("timeout", "code_timeout"), ("memory_mb", "code_memory"))
              if settings.extra.get(e) is not None}
    grader = benchmark_grader(settings.benchmark)
    if any(p.kind == "code" for p in problems):
        with ThreadPoolExecutor(max_workers=min(usable_cpus(), len(problems))) as pool:
            return list(pool.map(lambda pt: grade_trace(pt[0], pt[1], timeout, limits, grader),
                                 zip(problems, traces)))
    return [grade_trace(p, t, timeout, grader=grader) for p, t in zip(problems, traces)]


# ----------------------------------------------------------------------------------------------- the run

GenerateFn = Callable[..., list]
Unit = tuple[Problem, int]  # (problem, sample)


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _prompt_style(settings: EvalSettings, problem: Problem) -> str:
    return settings.prompt_style or problem.prompt_style


def check_settings(settings: EvalSettings, arm_configs: dict, batch_size: int, num_layers: int | None = None) -> None:
    """Check a run's settings before anything is generated or written; with `num_layers` (the model's), also
    every arm's StepFlow layers. `run_eval` calls it with the model's count; a caller may call it earlier, from
    the model's config alone (stepscope.models.load_config), before loading the weights."""
    if batch_size < 1:
        raise StepscopeError(f"--batch-size must be at least 1, got {batch_size}")
    if settings.n_samples < 1:
        raise StepscopeError(f"--n-samples must be at least 1, got {settings.n_samples}")
    if not settings.arms:
        raise StepscopeError("no arms to run")
    if set(arm_configs) != set(settings.arms):
        raise StepscopeError("arm_configs and settings.arms name different arms")
    if num_layers is not None:
        for arm, config in arm_configs.items():
            if config is not None and hasattr(config, "resolve"):
                try:
                    config.resolve(num_layers)
                except StepscopeError as e:
                    raise StepscopeError(f"arm {arm}: {e}") from None


def run_info(settings: EvalSettings, benchmark: Benchmark, batch_size: int, world: int) -> dict:
    """The run.json of a run: its settings, the benchmark's source and fingerprint, and how it was launched."""
    from .. import __version__

    return {"stepscope_run": RUN_VERSION, "stepscope_version": __version__, **settings.to_json(),
            "benchmark_source": benchmark.source, "benchmark_fingerprint": benchmark.fingerprint(),
            "n_problems": len(benchmark), "batch_size": batch_size, "world_size": world, "created": time.time()}


def _generate(generate_fn: GenerateFn, model, tokenizer, todo: list[Unit], arm: str, config,
              settings: EvalSettings, batch_size: int, on_progress=None) -> list:
    """One trace per unit of `todo` in one arm, in order (one generator call per prompt style); `on_progress`
    goes to a generator that takes it (stepscope.progress)."""
    from ..progress import accepts

    hook = {"on_progress": on_progress} if on_progress is not None and accepts(generate_fn, "on_progress") else {}
    seeds = [sample_seed(settings.decode.seed, p.id, s) for p, s in todo]
    traces: list = [None] * len(todo)
    for style in sorted({_prompt_style(settings, p) for p, _ in todo}):  # normally one style per benchmark
        sel = [i for i, (p, _) in enumerate(todo) if _prompt_style(settings, p) == style]
        got = generate_fn(
            model, tokenizer, [todo[i][0].prompt_text() for i in sel], decode=settings.decode, stepflow=config,
            seeds=[seeds[i] for i in sel], batch_size=batch_size, prompt_style=style, progress=False,
            metas=[{"id": todo[i][0].id, "sample": todo[i][1], "arm": arm} for i in sel], **hook)
        if len(got) != len(sel):
            raise StepscopeError(f"the generator returned {len(got)} traces for {len(sel)} prompts")
        for i, trace in zip(sel, got):
            traces[i] = trace
    return traces


class _Progress:
    """A progress bar over samples with each arm's running accuracy and, inside a batch, its tokens, tokens/s
    and finished rows (`tokens`, the generator's on_progress hook; nothing when off)."""

    def __init__(self, on: bool, total: int, desc: str, arms: list[str]) -> None:
        from ..progress import TokenProgress

        self.correct = dict.fromkeys(arms, 0)
        self.count = dict.fromkeys(arms, 0)
        self.bar = None
        if on:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="sample", desc=desc, dynamic_ncols=True, smoothing=0.1)
        self.tokens = TokenProgress(self.bar, extra=self.accuracy) if on else None

    def accuracy(self) -> str:
        return ", ".join(f"{a} {100 * self.correct[a] / n:.1f}%" for a, n in self.count.items() if n)

    def update(self, arm: str, records: list[dict]) -> None:
        self.correct[arm] += sum(r["correct"] for r in records)
        self.count[arm] += len(records)
        if self.bar is not None:
            self.bar.update(len(records))
            self.bar.set_postfix_str(self.accuracy())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_eval(model, tokenizer, benchmark: Benchmark, settings: EvalSettings, out: str | os.PathLike, *,
             arm_configs: dict[str, object | None] | None = None, batch_size: int = 8, resume: bool = False,
             progress: bool = True, generate_fn: GenerateFn | None = None, grade_timeout: float | None = DEFAULT_TIMEOUT,
             save_traces: bool = False, rank: int | None = None, world_size: int | None = None,
             poll_seconds: float = 2.0, wait_timeout: float | None = None,
             summary_options: dict | None = None) -> dict | None:
    """Run every (problem, sample) of `benchmark` in every arm, append the records, and summarize.

    `arm_configs`: arm name -> the StepFlowConfig object handed to `generate_fn` (None: plain decoding);
    defaults to `settings.arms` as given. `generate_fn` defaults to `stepscope.flow.generate_traces`.
    `summary_options`: keyword arguments of `summarize` (length_bins, length_by...).
    Returns the summary (on rank 0; other ranks return None after finishing their share).
    """
    started = time.time()
    env_rank, env_world = dist_env()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    arm_configs = dict(settings.arms) if arm_configs is None else arm_configs
    model_config = getattr(model, "config", None)  # a transformers model's (another engine checks its own)
    check_settings(settings, arm_configs, batch_size,
                   num_layers=None if model_config is None else model_layers(model_config))
    if generate_fn is None:
        from ..flow import generate_traces as generate_fn  # noqa: N813

    folder = RunFolder(out)
    folder.prepare(run_info(settings, benchmark, batch_size, world), resume=resume, rank=rank,
                   poll=min(poll_seconds, 1.0), wait_timeout=3600.0 if wait_timeout is None else wait_timeout)
    arms = list(settings.arms)
    units = [(p, s) for p in benchmark.problems for s in range(settings.n_samples)]  # problem-major
    mine = [u for i, u in enumerate(units) if i % world == rank]

    def generate(todo: list[Unit], arm: str, on_progress=None) -> list:
        return _generate(generate_fn, model, tokenizer, todo, arm, arm_configs[arm], settings, batch_size,
                         on_progress)

    session = session_info(model, settings.extra.get("engine"), settings.extra.get("engine_version"))
    _run_share(folder, mine, arms, settings, generate, rank=rank, world=world, batch_size=batch_size,
               grade_timeout=grade_timeout, save_traces=save_traces, session=session,
               progress_desc=f"{benchmark.name} ({', '.join(arms)})" if progress and rank == 0 else None)
    if rank != 0:
        return None
    expected = [(p.id, s, a) for p, s in units for a in arms]
    _wait_for_all(folder, set(expected), world, poll_seconds, wait_timeout, started)
    folder.merge(expected)
    return write_summary(folder.path, **(summary_options or {}))


def _run_share(folder: RunFolder, mine: list[Unit], arms: list[str], settings: EvalSettings,
               generate: Callable[..., list], *, rank: int, world: int, batch_size: int,
               grade_timeout: float | None, save_traces: bool, progress_desc: str | None, session: dict) -> None:
    """Generate, grade and append every sample of this process's units not yet in the folder, batch by batch,
    arms interleaved, each record with the wall time of its generator call; the status file says how it ended."""
    done = set(folder.records())
    pending = [u for u in mine if any((u[0].id, u[1], a) not in done for a in arms)]
    bar = _Progress(progress_desc is not None, sum((p.id, s, a) not in done for p, s in pending for a in arms),
                    progress_desc or "", arms)
    folder.write_status(rank, "running", session=session)
    calls = 0
    try:
        with folder.open_results(rank, world) as results:
            for batch in _batches(pending, batch_size):
                for arm in arms:
                    todo = [(p, s) for p, s in batch if (p.id, s, arm) not in done]
                    if not todo:
                        continue
                    if bar.tokens is not None:
                        bar.tokens.start_batch(len(todo))
                    t0 = time.perf_counter()
                    traces = generate(todo, arm, bar.tokens)
                    timing = batch_timing(session, rank, calls, time.perf_counter() - t0, len(todo))
                    calls += 1
                    grades = grade_traces([p for p, _ in todo], traces, grade_timeout, settings)
                    records = [make_record(p, s, sample_seed(settings.decode.seed, p.id, s), arm, settings.arms[arm],
                                           trace, g, rank, save_traces, timing)
                               for (p, s), trace, g in zip(todo, traces, grades)]
                    results.append(records)
                    done.update((p.id, s, arm) for p, s in todo)
                    bar.update(arm, records)
    except KeyboardInterrupt:
        folder.write_status(rank, "interrupted")
        raise
    except BaseException as e:
        folder.write_status(rank, "failed", error=f"{type(e).__name__}: {e}"[:500])
        raise
    finally:
        bar.close()
    folder.write_status(rank, "done")


def _wait_for_all(folder: RunFolder, expected: set[Key], world: int, poll: float, timeout: float | None,
                  started: float) -> None:
    """Rank 0 waits until every expected record is in some results file (a file barrier)."""
    start = time.monotonic()
    while True:
        missing = expected - set(folder.records())
        if not missing:
            return
        if world == 1:
            raise StepscopeError(f"{len(missing)} samples are missing after the run; resume with --resume")
        failed = folder.failed_rank(world, started)
        if failed:
            raise StepscopeError(f"{failed}; {len(missing)} samples missing; rerun with --resume")
        if timeout is not None and time.monotonic() - start > timeout:
            raise StepscopeError(f"timed out waiting for the other ranks ({len(missing)} samples missing)")
        time.sleep(poll)
