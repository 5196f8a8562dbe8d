"""Generate reasoning traces, with StepFlow (default) or without, and save them as JSONL.

A single question (positional or --question) streams its answer to the terminal as it is written. A file of
problems (--input, JSONL with a question/problem/prompt field and an optional id) runs in batches with a progress
bar. --out FILE.jsonl gets one JSON object per line: id, question, response, trace (stepscope trace JSON), meta.
Lines are appended and flushed after every finished batch, so an interrupted run keeps what it finished;
rerunning the same command resumes (ids already in the file are skipped, a cut-off last line is dropped). A
single question's id is derived from its text (q-<12 hex digits of its SHA-256>), so several single questions
can share one --out. A file written with other settings, or holding another question under an id of the input,
is refused unless --overwrite. When the run completes the file is rewritten (atomically): the input's questions
in input order, then the file's other records as they were.

examples:
  stepscope generate "What is the sum of the first 10 odd numbers?"
  stepscope generate --input problems.jsonl --out traces.jsonl --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
  stepscope generate --input problems.jsonl --no-stepflow --temperature 0 --max-thinking-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..prompts import STYLES
from ..wording import plural
from . import options

HELP = "generate reasoning traces with or without StepFlow (a question, or a JSONL file of problems)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question_pos", nargs="?", metavar="QUESTION", default=None, help="the question to answer")
    p.add_argument("--question", default=None, help="the question to answer (same as the positional argument)")
    p.add_argument("--input", default=None, metavar="FILE.jsonl",
                   help="problems, one JSON object a line: question/problem/prompt and an optional id")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="where to write the traces (default with --input: <input>.traces.jsonl; a single "
                        "question is only streamed unless --out is given)")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming it")
    options.add_model_options(p)
    options.add_engine_options(p)
    options.add_stepflow_options(p)
    d = options.add_decoding_options(
        p, seed_help="base seed; question i (0-based, in input order) samples with seed + i")
    d.add_argument("--prompt-style", default="r1", choices=list(STYLES),
                   help="r1: ask for step-by-step reasoning and a \\boxed{} answer (default); gpqa: the option "
                        "letter in \\boxed{}; plain: the question alone")
    d.add_argument("--system", default=None, help="a system prompt")
    options.add_format_options(d)
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary lines")


def read_problems(path: str) -> list[tuple[str, str]]:
    """(id, question) of every record of a JSONL file of problems."""
    from ..errors import StepscopeError
    from ..io import QUESTION_KEYS, read_jsonl

    recs = read_jsonl(path)
    if not recs:
        raise StepscopeError(f"{path}: no problems in the file")
    out, seen = [], set()
    for i, rec in enumerate(recs):
        q = next((rec[k] for k in QUESTION_KEYS if isinstance(rec.get(k), str) and rec[k].strip()), None)
        if q is None:
            raise StepscopeError(f"{path}: record {i + 1} has no question text ({'/'.join(QUESTION_KEYS)})")
        rid = str(rec["id"]) if rec.get("id") is not None else str(i)
        if rid in seen:
            raise StepscopeError(f"{path}: id {rid!r} appears twice")
        seen.add(rid)
        out.append((rid, q))
    return out


def question_id(question: str) -> str:
    """The id of a single question: derived from its text, so different questions never share one."""
    import hashlib

    return "q-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]


def _check_same_questions(out: Path, done: dict[str, dict], problems: list[tuple[str, str]]) -> None:
    """Resuming skips the ids in `out`: refuse one whose record holds another question than the input's."""
    from ..errors import StepscopeError

    for rid, q in problems:
        have = done.get(rid, {}).get("question")
        if rid in done and have != q:
            shown = " ".join(str(have).split())[:40]
            raise StepscopeError(f"{out} holds another question under id {rid!r} ({shown!r}...); pass --overwrite "
                                 "or another --out")


def _existing(out: Path, config: dict) -> dict[str, dict]:
    """Records already in `out` by id; a cut-off last line is removed; other settings are an error."""
    from ..errors import StepscopeError
    from ..io import JsonlLog

    log = JsonlLog(out)
    log.repair()
    recs = log.read()
    want = json.loads(json.dumps(config))
    done: dict[str, dict] = {}
    for r in recs:
        if "id" not in r or not isinstance(r.get("meta"), dict):
            raise StepscopeError(f"{out} is not an output of stepscope generate; pass --overwrite or another --out")
        have = r["meta"].get("config")
        if have != want:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            raise StepscopeError(f"{out} was written with other settings ({', '.join(diff)}); "
                                 "pass --overwrite or another --out")
        done[str(r["id"])] = r
    return done


def _record(rid: str, trace) -> dict:
    from ..flow.generate import response_text

    return {"id": rid, "question": trace.meta.get("question"), "response": response_text(trace),
            "trace": trace.to_json(), "meta": trace.meta}


def _interrupted(out: Path | None, finished: int, total: int) -> str:
    """What an interrupted run says: what it kept and how to continue."""
    if out is None:
        return "stepscope generate: interrupted; nothing was saved (pass --out FILE.jsonl to keep the traces)"
    if not finished:
        return f"stepscope generate: interrupted before the first batch finished; nothing was saved to {out}"
    return (f"stepscope generate: interrupted; {finished} of {total} traces are in {out}; run the same command "
            "again to continue (the finished ones are skipped)")


def run(args: argparse.Namespace) -> int:
    from ..errors import StepscopeError

    decode = options.decode_config(args)
    if args.question is not None and args.question_pos is not None:
        raise StepscopeError("give the question once (positional or --question)")
    question = args.question if args.question is not None else args.question_pos
    if (question is None) == (args.input is None):
        raise StepscopeError("give a question or --input FILE.jsonl (one of the two)")
    if question is not None:
        if not question.strip():
            raise StepscopeError("the question is empty")
        problems = [(question_id(question), question)]
    else:
        problems = read_problems(args.input)
    out = Path(args.out) if args.out else (Path(args.input).with_suffix(".traces.jsonl") if args.input else None)
    if out is not None:
        from ..io import check_writable

        check_writable(out, "--out")
    sf_config = options.stepflow_config(args)
    fmt = options.format_arg(args)
    if sf_config is not None:  # the layers against the model's config, before the weights load
        layers = options.model_layers(args)
        options.check_stepflow_layers(args, layers)
        sf_config.resolve(layers)

    import torch  # noqa: F401  (heavy imports from here on)

    from ..io import JsonlLog, atomic_write_text

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    engine = options.load_engine(args, stepflow=sf_config is not None)
    model, tokenizer = engine.model, engine.tokenizer
    settings = dict(decode=decode, stepflow=sf_config, prompt_style=args.prompt_style, system=args.system, fmt=fmt)
    config = engine.run_config(**settings)
    done: dict[str, dict] = {}
    if out is not None and out.exists() and not args.overwrite:
        done = _existing(out, config)
        _check_same_questions(out, done, problems)
    todo = [(i, rid, q) for i, (rid, q) in enumerate(problems) if rid not in done]
    say = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not todo:
        say(f"all {len(problems)} questions are already in {out} (pass --overwrite to redo them)")
        return 0
    arm = "StepFlow" if sf_config is not None else "plain decoding"
    say(f"stepscope generate: {getattr(model, 'name_or_path', args.model)} on {engine.where}, {arm}, "
        f"{plural(len(todo), 'question')}" + (f", resuming {out} ({len(done)} done)" if done else ""))
    from ..progress import TokenProgress, plan_warning

    warn = plan_warning(len(todo), decode.max_new_tokens, engine.where, plural(len(todo), "question"))
    if warn:
        say(f"stepscope generate: warning: {warn}")

    single = question is not None
    log = None
    created = False  # this run made the file: a failure before any trace is saved leaves nothing behind
    if out is not None:
        created = not out.exists()
        log = JsonlLog(out).open(truncate=args.overwrite)

    saved = [0]

    def save(traces) -> None:  # appended and flushed after every finished batch
        if log is not None:
            saved[0] += log.append(_record(t.meta["id"], t) for t in traces)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    own = engine.name == "transformers"  # its decode loop streams and has a choice of OEB kernels
    bar = None
    if own and not args.quiet and not single:  # traces finished, and tokens and tokens/s inside a batch
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="trace", desc="generate", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        extra = dict(stream=stream if single else None, flow_kernel=args.flow_kernel) if own else {}
        if bar is not None:
            extra["on_progress"] = TokenProgress(bar, count_rows=True)
        traces = engine.generate_fn(model, tokenizer, [q for _, _, q in todo],
                                    seeds=[decode.seed + i for i, _, _ in todo],
                                    metas=[{"id": rid} for _, rid, _ in todo], batch_size=args.batch_size,
                                    progress=not args.quiet and not single and not own, on_batch=save, **extra,
                                    **settings)
    except BaseException as e:
        if log is not None:
            log.close()
            if created and out.stat().st_size == 0:
                out.unlink()
        if isinstance(e, KeyboardInterrupt):
            print(file=sys.stderr)
            print(_interrupted(out, len(done) + saved[0], len(problems)), file=sys.stderr, flush=True)
            return 130
        raise
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if single:
        if not own:  # written at once
            from ..flow.generate import response_text

            sys.stdout.write(response_text(traces[0]))
        sys.stdout.write("\n")
        sys.stdout.flush()
    if out is not None:  # the finished file: the input's questions in input order, then the file's others
        by_id = dict(done)
        by_id.update({t.meta["id"]: _record(t.meta["id"], t) for t in traces})
        order = [rid for rid, _ in problems] + [rid for rid in done if rid not in dict(problems)]
        atomic_write_text(out, "".join(json.dumps(by_id[rid], ensure_ascii=False) + "\n"
                                       for rid in order if rid in by_id))
    new_tokens = sum(t.meta["num_new_tokens"] for t in traces)
    closed = sum(bool(t.meta.get("thinking_closed")) for t in traces)
    forced = sum(bool(t.meta.get("budget_forced")) for t in traces)
    say(f"{plural(len(traces), 'trace')}, {plural(new_tokens, 'new token')} in {seconds:.1f} s "
        f"({new_tokens / max(seconds, 1e-9):.1f} tokens/s); the thinking closed in {closed} of {len(traces)} "
        f"({forced} by budget forcing)" + (f"; saved to {out}" if out is not None else ""))
    if single and sf_config is not None and "stepflow_stats" in traces[0].meta:
        st = traces[0].meta["stepflow_stats"]
        oeb = sum(st.get("oeb_fires", {}).values())
        elig = sum(st.get("oeb_eligible", {}).values())
        smi = sum(st.get("smi_fires", {}).values())
        say(f"StepFlow: OEB fired on {oeb:,} of {plural(elig, 'query-head')}, SMI fired {plural(smi, 'time')}")
    return 0
