"""Turn reasoning outputs into stepscope traces: exact tokens, segments and steps.

Inputs: a trace JSON (from this command), a JSONL/JSON file of records with question/problem and
response/output fields (lm-eval samples and chat `messages` records work too), or a plain text file holding the
whole trace as the model saw it. Prints the steps (kind, tokens, first words) and, with --out, writes trace JSON:
one file for one trace, a .jsonl file of traces, or a folder with one <id>.json per trace.

examples:
  stepscope trace results.jsonl --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --index 3 --out t.json
  stepscope trace results.jsonl --out traces/             # the bundled default model's tokenizer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import options

HELP = "turn reasoning outputs (JSONL records, text, trace JSON) into traces with exact steps"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILE", help="trace JSON, JSONL/JSON records, or plain text")
    p.add_argument("--index", type=int, default=None, help="only record N (0-based) of each JSONL file")
    options.add_format_options(p)
    p.add_argument("--question", default=None, help="for a plain text file: the question it answers")
    p.add_argument("--split-question", action="store_true", help="split the question into sentences too")
    p.add_argument("--no-strict", action="store_true",
                   help="accept a response whose tokens do not decode back to exactly the same text")
    p.add_argument("--out", default=None,
                   help="write traces: FILE.json (one trace), FILE.jsonl, or a folder (one <id>.json each)")
    p.add_argument("--table", action="store_true", help="print the step table of every trace, not only one")
    options.add_model_options(p, tokenizer_only=True)  # its tokenizer and chat template rebuild the tokens


def run(args: argparse.Namespace) -> int:
    from ..errors import StepscopeError
    from ..io import atomic_dir, atomic_write_text, check_writable
    from ..trace import load_traces

    fmt = options.format_arg(args)
    if args.out:
        check_writable(args.out, "--out", folder=Path(args.out).suffix not in (".json", ".jsonl"))
    # trace JSON needs no tokenizer, but a --model that was named is loaded (and so checked) all the same
    needs_tokenizer = args.model != "default" or any(not options.is_trace_json(f) for f in args.inputs)
    tokenizer = options.load_tokenizer(args) if needs_tokenizer else None
    traces, rebuilt = [], []
    for f in args.inputs:
        got = load_traces(f, tokenizer, index=args.index, fmt=fmt, question=args.question, strict=not args.no_strict)
        traces.extend(got)
        if not options.is_trace_json(f):
            rebuilt.extend(got)
    options.warn_other_model(args, rebuilt, tokenizer)
    if args.split_question and tokenizer is not None:
        from ..trace import Trace

        traces = [Trace.from_ids(tokenizer, t.token_ids, fmt=t.format or t.fmt, meta=t.meta, split_question=True)
                  for t in traces]
    if len(traces) == 1 or args.table:
        for t in traces:
            if t.id:
                print(f"== {t.id}")
            print(t.table())
    else:
        print(f"{'id':<44} {'tokens':>7} {'steps':>6} {'think':>6} {'summ':>5}  closed")
        for t in traces:
            print(f"{(t.id or '-')[:44]:<44} {len(t):>7} {t.num_steps:>6} {len(t.steps_of('thinking')):>6} "
                  f"{len(t.steps_of('summary')):>5}  {'yes' if t.thinking_closed else 'NO'}")
        print(f"{len(traces)} traces")
    for t in traces:
        for note in t.meta.get("notes", []):
            print(f"note: {t.id or 'trace'}: {note}")
    if args.out:
        out = Path(args.out)
        if out.suffix == ".json":
            if len(traces) != 1:
                raise StepscopeError(f"--out {out} is one JSON file but there are {len(traces)} traces; "
                                     "use a .jsonl file or a folder")
            traces[0].save(out)
        elif out.suffix == ".jsonl":
            atomic_write_text(out, "".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in traces))
        else:
            with atomic_dir(out) as tmp:
                used: set[str] = set()
                for i, t in enumerate(traces):
                    name = options.safe_name(t.id or f"trace-{i}")
                    while name in used:
                        name += f"-{i}"
                    used.add(name)
                    t.save(tmp / f"{name}.json")
        print(f"wrote {len(traces)} trace{'s' if len(traces) != 1 else ''} to {out}")
    return 0
