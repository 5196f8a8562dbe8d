"""Generate reasoning traces, with StepFlow (default) or without, and save them as JSONL.

A single question (positional or --question) streams its answer to the terminal as it is written. A file of
problems (--input, JSONL with a question/problem/prompt field and an optional id) runs in batches with a progress
bar. --out FILE.jsonl gets one JSON object per line: id, question, response, trace (stepscope trace JSON), meta.
Lines are appended and flushed after every finished batch, so an interrupted run keeps what it finished;
rerunning the same command resumes (ids already in the file are skipped, a cut-off last line is dropped). A
file written with other settings is refused unless --overwrite. When the run completes the file is rewritten
(atomically) in input order.

examples:
  stepscope generate "What is the sum of the first 10 odd numbers?"
  stepscope generate --input problems.jsonl --out traces.jsonl --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
  stepscope generate --input problems.jsonl --no-stepflow --temperature 0 --max-thinking-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HELP = "generate reasoning traces with or without StepFlow (a question, or a JSONL file of problems)"
QUESTION_FIELDS = ("question", "problem", "prompt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question_pos", nargs="?", metavar="QUESTION", default=None, help="the question to answer")
    p.add_argument("--question", default=None, help="the question to answer (same as the positional argument)")
    p.add_argument("--input", default=None, metavar="FILE.jsonl",
                   help="problems, one JSON object a line: question/problem/prompt and an optional id")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="where to write the traces (default with --input: <input>.traces.jsonl; a single "
                        "question is only streamed unless --out is given)")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming it")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="hub id or local folder (default: the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                   help="attention implementation StepFlow wraps (default sdpa; pass eager for GPT-OSS)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    f = p.add_argument_group("StepFlow (paper defaults: OEB on the bottom quarter of layers, SMI on the top quarter)")
    f.add_argument("--stepflow", action=argparse.BooleanOptionalAction, default=True,
                   help="apply StepFlow while generating (default: on)")
    f.add_argument("--tau-max", type=float, default=None, help="OEB bridge target cap (default 0.15)")
    f.add_argument("--alpha", type=float, default=None, help="SMI strength (default 0.06)")
    f.add_argument("--oeb-layers", default=None, metavar="LAYERS",
                   help="OEB layers, e.g. 0-6 or 0,1,2 (ranges inclusive; negative counts from the end)")
    f.add_argument("--smi-layers", default=None, metavar="LAYERS", help="SMI layers, e.g. 21-27, or --smi-layers=-7--1 for the last seven")
    f.add_argument("--smi-window", default=None, metavar="W",
                   help="SMI averages the last W tokens of the finished step (default 4), or 'step' for all")
    f.add_argument("--no-oeb", action="store_true", help="turn the Odds-Equal Bridge off")
    f.add_argument("--no-smi", action="store_true", help="turn Step Momentum Injection off")
    f.add_argument("--flow-kernel", choices=["auto", "triton", "torch"], default=None,
                   help="how OEB layers decode: auto (default, or $STEPSCOPE_FLOW_KERNEL) times the fused Triton "
                        "kernel against the PyTorch path on CUDA and uses the faster; triton or torch pin one "
                        "(bit-for-bit repeatable runs)")
    d = p.add_argument_group("decoding")
    d.add_argument("--max-new-tokens", type=int, default=1024, help="tokens to generate at most (default 1024)")
    d.add_argument("--max-thinking-tokens", type=int, default=None,
                   help="budget forcing: close the thinking with its end marker after this many thinking tokens")
    d.add_argument("--temperature", type=float, default=0.6, help="0 means greedy (default 0.6)")
    d.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    d.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: all)")
    d.add_argument("--seed", type=int, default=0,
                   help="base seed; question i (0-based, in input order) samples with seed + i (default 0)")
    d.add_argument("--batch-size", type=int, default=8, help="rows decoded together (default 8)")
    d.add_argument("--prompt-style", default="r1", choices=["r1", "plain", "gpqa"],
                   help="r1: ask for step-by-step reasoning and a \\boxed{} answer (default); gpqa: the option "
                        "letter in \\boxed{}; plain: the question alone")
    d.add_argument("--system", default=None, help="a system prompt")
    d.add_argument("--fmt", default="auto", choices=["auto", "think", "harmony"],
                   help="thinking format (default: detect from the chat template)")
    d.add_argument("--markers", nargs=2, metavar=("START", "END"), default=None,
                   help="custom thinking start and end strings")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary lines")


def parse_layers(spec: str) -> list[int]:
    """'0-6' -> [0..6], '0,1,2' -> [0, 1, 2], '-4--1' -> [-4..-1]; ranges are inclusive."""
    from ..errors import StepscopeError

    out: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        if re.fullmatch(r"-?\d+", item):
            out.append(int(item))
            continue
        m = re.fullmatch(r"(-?\d+)-(-?\d+)", item)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise StepscopeError(f"bad layer list {spec!r}: use numbers and inclusive ranges like 0-6,8")
        out.extend(range(int(m.group(1)), int(m.group(2)) + 1))
    if not out:
        raise StepscopeError(f"bad layer list {spec!r}")
    return out


def stepflow_config(args: argparse.Namespace):
    """The StepFlowConfig the arguments ask for, or None with --no-stepflow."""
    from ..errors import StepscopeError

    knobs = {"--tau-max": args.tau_max, "--alpha": args.alpha, "--oeb-layers": args.oeb_layers,
             "--smi-layers": args.smi_layers, "--smi-window": args.smi_window,
             "--no-oeb": args.no_oeb or None, "--no-smi": args.no_smi or None, "--flow-kernel": args.flow_kernel}
    if not args.stepflow:
        given = [k for k, v in knobs.items() if v is not None]
        if given:
            raise StepscopeError(f"{', '.join(given)} given with --no-stepflow")
        return None
    if args.no_oeb and args.no_smi:
        raise StepscopeError("--no-oeb and --no-smi turn everything off: use --no-stepflow")
    from ..flow.config import StepFlowConfig

    kw: dict = {"oeb": not args.no_oeb, "smi": not args.no_smi}
    if args.tau_max is not None:
        kw["tau_max"] = args.tau_max
    if args.alpha is not None:
        kw["alpha"] = args.alpha
    if args.oeb_layers is not None:
        kw["oeb_layers"] = parse_layers(args.oeb_layers)
    if args.smi_layers is not None:
        kw["smi_layers"] = parse_layers(args.smi_layers)
    if args.smi_window is not None:
        kw["smi_window"] = args.smi_window
    return StepFlowConfig(**kw)


def read_problems(path: str) -> list[tuple[str, str]]:
    """(id, question) of every record of a JSONL file of problems."""
    from ..errors import StepscopeError
    from ..io import read_jsonl

    recs = read_jsonl(path)
    if not recs:
        raise StepscopeError(f"{path}: no problems in the file")
    out, seen = [], set()
    for i, rec in enumerate(recs):
        q = next((rec[k] for k in QUESTION_FIELDS if isinstance(rec.get(k), str) and rec[k].strip()), None)
        if q is None:
            raise StepscopeError(f"{path}: record {i + 1} has no question, problem or prompt text")
        rid = str(rec["id"]) if rec.get("id") is not None else str(i)
        if rid in seen:
            raise StepscopeError(f"{path}: id {rid!r} appears twice")
        seen.add(rid)
        out.append((rid, q))
    return out


def _check(args: argparse.Namespace) -> None:
    from ..errors import StepscopeError

    if args.max_new_tokens < 1:
        raise StepscopeError("--max-new-tokens must be at least 1")
    if args.max_thinking_tokens is not None and args.max_thinking_tokens < 0:
        raise StepscopeError("--max-thinking-tokens must be >= 0")
    if args.temperature < 0:
        raise StepscopeError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        raise StepscopeError("--top-p must be in (0, 1]")
    if args.top_k < 0:
        raise StepscopeError("--top-k must be >= 0")
    if args.batch_size < 1:
        raise StepscopeError("--batch-size must be at least 1")


def _existing(out: Path, config: dict) -> dict[str, dict]:
    """Records already in `out` by id; a cut-off last line is dropped; other settings are an error."""
    from ..errors import StepscopeError
    from ..io import atomic_write_text, read_jsonl, read_text_file

    recs = read_jsonl(out, tolerate_truncated_last=True)
    text = read_text_file(out)
    if (text and not text.endswith("\n")) or len(recs) != sum(1 for x in text.split("\n") if x.strip()):
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
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


def run(args: argparse.Namespace) -> int:
    from ..errors import StepscopeError

    _check(args)
    if args.question is not None and args.question_pos is not None:
        raise StepscopeError("give the question once (positional or --question)")
    question = args.question if args.question is not None else args.question_pos
    if (question is None) == (args.input is None):
        raise StepscopeError("give a question or --input FILE.jsonl (one of the two)")
    if question is not None:
        if not question.strip():
            raise StepscopeError("the question is empty")
        problems = [("0", question)]
    else:
        problems = read_problems(args.input)
    out = Path(args.out) if args.out else (Path(args.input).with_suffix(".traces.jsonl") if args.input else None)
    if out is not None and out.is_dir():
        raise StepscopeError(f"{out} is a folder; --out needs a .jsonl file")
    sf_config = stepflow_config(args)
    fmt = "auto"
    if args.markers:
        from ..formats import markers_format

        fmt = markers_format(*args.markers)
    elif args.fmt != "auto":
        fmt = args.fmt

    import torch  # noqa: F401  (heavy imports from here on)

    from ..flow.generate import generate_traces, run_config
    from ..io import atomic_write_text
    from ..models import load_model

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn,
                                  trust_remote_code=args.trust_remote_code)
    settings = dict(stepflow=sf_config, max_new_tokens=args.max_new_tokens,
                    max_thinking_tokens=args.max_thinking_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, prompt_style=args.prompt_style, system=args.system, fmt=fmt)
    config = run_config(model, tokenizer, **settings)
    done: dict[str, dict] = {}
    if out is not None and out.exists() and not args.overwrite:
        done = _existing(out, config)
    todo = [(i, rid, q) for i, (rid, q) in enumerate(problems) if rid not in done]
    say = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not todo:
        say(f"all {len(problems)} questions are already in {out} (pass --overwrite to redo them)")
        return 0
    arm = "StepFlow" if sf_config is not None else "plain decoding"
    say(f"stepscope generate: {getattr(model, 'name_or_path', args.model)} on {model.device}, {arm}, "
        f"{len(todo)} question(s)" + (f", resuming {out} ({len(done)} done)" if done else ""))

    single = question is not None
    fh = None
    created = False  # this run made the file: a failure before any trace is saved leaves nothing behind
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        created = not out.exists()
        fh = open(out, "w" if args.overwrite or created else "a", encoding="utf-8")

    def save(traces) -> None:
        if fh is None:
            return
        fh.write("".join(json.dumps(_record(t.meta["id"], t), ensure_ascii=False) + "\n" for t in traces))
        fh.flush()
        import os

        os.fsync(fh.fileno())

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        traces = generate_traces(model, tokenizer, [q for _, _, q in todo], seeds=[args.seed + i for i, _, _ in todo],
                                 metas=[{"id": rid} for _, rid, _ in todo], batch_size=args.batch_size,
                                 progress=not args.quiet and not single, stream=stream if single else None,
                                 on_batch=save, flow_kernel=args.flow_kernel, **settings)
    except BaseException:
        if fh is not None:
            fh.close()
            if created and out.stat().st_size == 0:
                out.unlink()
        raise
    finally:
        if fh is not None:
            fh.close()
    seconds = time.perf_counter() - t0
    if single:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if out is not None:  # the finished file, in input order
        by_id = dict(done)
        by_id.update({t.meta["id"]: _record(t.meta["id"], t) for t in traces})
        atomic_write_text(out, "".join(json.dumps(by_id[rid], ensure_ascii=False) + "\n"
                                       for rid, _ in problems if rid in by_id))
    new_tokens = sum(t.meta["num_new_tokens"] for t in traces)
    closed = sum(bool(t.meta.get("thinking_closed")) for t in traces)
    forced = sum(bool(t.meta.get("budget_forced")) for t in traces)
    say(f"{len(traces)} trace(s), {new_tokens} new tokens in {seconds:.1f} s ({new_tokens / max(seconds, 1e-9):.1f} "
        f"tokens/s); thinking closed in {closed}, budget-forced in {forced}"
        + (f"; saved to {out}" if out is not None else ""))
    if single and sf_config is not None and "stepflow_stats" in traces[0].meta:
        st = traces[0].meta["stepflow_stats"]
        oeb = sum(st.get("oeb_fires", {}).values())
        elig = sum(st.get("oeb_eligible", {}).values())
        smi = sum(st.get("smi_fires", {}).values())
        say(f"StepFlow: OEB fired on {oeb} of {elig} query-heads, SMI fired {smi} times")
    return 0
