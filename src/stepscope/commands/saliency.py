"""Compute Step-Saliency maps (attention x gradient, pooled step to step) of reasoning traces.

Each TRACE file is a trace JSON (from `stepscope trace --out`) or a JSONL/JSON file of records with
question/problem and response/output fields (rebuilt with the model's tokenizer). Every trace gets its own
folder DIR/<trace id>/ holding maps.safetensors (tensor "maps", float32 [layers, steps, steps]), trace.json and
meta.json, written atomically: a failed trace leaves no folder behind. Rerunning the same command skips the
traces whose folders are finished (and says so); --overwrite recomputes them. A finished folder of another trace
or of other settings (model, dtype, method, pool, loss, layers, heads) is refused unless --overwrite. With
--name-by content a folder is DIR/<trace id>-<8 hex digits of the SHA-256 of its token ids>/, so different traces
that share an id (two runs of one question, say) never share a folder, and a rerun still finds its own.

The default method is exact and needs memory near-linear in the trace length (a 32K-token trace of a 7B model
fits one GPU); --method reference keeps every layer's T x T attention and its gradient (small inputs only).
--model is the model that wrote the traces; whatever its --dtype, saliency is accumulated in float32.

examples:
  stepscope saliency traces.jsonl --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --out sal/
  stepscope saliency t.json --out sal/ --loss summary --layers shallow,deep      # the bundled default model
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from ..wording import plural
from . import options

HELP = "compute step-to-step saliency maps of traces (exact, memory near-linear in length)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace JSON or JSONL/JSON records")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (one subfolder per trace)")
    p.add_argument("--pool", default="mean", choices=["mean", "sum"],
                   help="mean (default): mean over token pairs of two steps; sum: their total")
    p.add_argument("--loss", default="all", choices=["all", "response", "summary"],
                   help="next-token targets in the loss: all (default), thinking+summary, or summary only")
    p.add_argument("--layers", default="all",
                   help="all (default), shallow, deep, deep_half, or indices and ranges: 0,3,10-12 (negative from "
                        "the end), comma-separated")
    p.add_argument("--method", default="chunked", choices=["chunked", "reference"],
                   help="chunked (default): exact, blockwise backward; reference: brute force, small inputs only")
    p.add_argument("--heads", action="store_true", help="also save per-head maps (tensor head_maps)")
    p.add_argument("--batch-size", type=int, default=1, help="traces per forward/backward (default 1)")
    p.add_argument("--block-rows", type=options.positive_int, default=None,
                   help="query rows per backward block (default: from free memory)")
    p.add_argument("--index", type=int, default=None, help="only record N (0-based) of each JSONL file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute traces whose folders in --out are finished (default: skip them)")
    p.add_argument("--name-by", default="id", choices=["id", "content"],
                   help="folder names: id (default): the trace id; content: the id and a hash of the trace's "
                        "tokens, so different traces with one id get different folders")
    options.add_format_options(p)
    options.add_model_options(p)


def tokens_digest(token_ids: list[int]) -> str:
    """8 hex digits of the SHA-256 of a trace's token ids: its part of a --name-by content folder name."""
    return hashlib.sha256(",".join(map(str, token_ids)).encode("ascii")).hexdigest()[:8]


def _finished(folder: Path, trace, want: dict) -> bool:
    """Whether `folder` already holds the saliency of `trace` computed with the settings `want` (then a rerun
    skips it); a finished folder of another trace or of other settings is an error, not silently replaced."""
    from ..errors import StepscopeError
    from ..saliency.result import MAPS_FILE, load_result

    if not (folder / MAPS_FILE).is_file():
        return False
    done = load_result(folder)
    if done.trace.token_ids != trace.token_ids:
        raise StepscopeError(f"{folder} holds the saliency of another trace with this id; pass --name-by content "
                             "to keep both, --overwrite to replace it, or another --out")
    got = {**{k: done.meta.get(k) for k in want}, "heads": done.head_maps is not None}
    diff = [f"{k} {got[k]!r} -> {want[k]!r}"[:80] for k in want if got[k] != want[k]]
    if diff:
        raise StepscopeError(f"{folder} was computed with other settings ({'; '.join(diff)}); pass --overwrite to "
                             "recompute it, or another --out")
    return True


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import StepscopeError
    from ..io import check_writable, first_char
    from ..layers import parse_layers
    from ..saliency import SaliencyResult, estimate_memory, step_saliency
    from ..saliency.core import _check_traces, max_positions
    from ..saliency.memory import format_bytes, model_shape
    from ..trace import load_traces

    if args.batch_size < 1:
        raise StepscopeError("--batch-size must be at least 1")
    for f in args.traces:
        if not Path(f).is_file():
            raise StepscopeError(f"{f}: no such file")
        if first_char(f) not in ("{", "["):
            raise StepscopeError(f"{f}: not JSON or JSONL (saliency reads trace JSON or JSONL records); for a "
                                 f"plain-text trace run `stepscope trace {f} --out t.json` first")
    check_writable(args.out, "--out", folder=True)
    fmt = options.format_arg(args)
    model, tokenizer = options.load_model(args)
    traces, rebuilt = [], []
    for f in args.traces:
        # records are rebuilt with the model's tokenizer; trace JSON is checked against it (ids spell the text)
        got = load_traces(f, tokenizer, index=args.index, fmt=fmt)
        traces.extend(got)
        if not options.is_trace_json(f):
            rebuilt.extend(got)
    options.warn_other_model(args, rebuilt, tokenizer)
    if not traces:
        raise StepscopeError("no traces in the given files")
    shape = model_shape(model)
    layers = parse_layers(args.layers, shape["layers"], what="--layers")
    _check_traces(model, traces, args.loss)  # every trace checked before any work

    names: list[str] = []
    used: set[str] = set()
    for i, tr in enumerate(traces):
        base = options.safe_name(tr.id) if tr.id else f"trace-{i}"
        if args.name_by == "content":
            base = f"{base[:91]}-{tokens_digest(tr.token_ids)}"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        names.append(name)

    out = Path(args.out)
    if not args.overwrite:  # a rerun skips what is finished
        want = {"model": str(args.model), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "method": args.method, "pool": args.pool, "loss": args.loss,
                "layers": list(range(shape["layers"])) if layers is None else list(layers), "heads": args.heads}
        done = [_finished(out / name, tr, want) for name, tr in zip(names, traces)]
        for name, d in zip(names, done):
            if d:
                print(f"{name}: already done, skipped -> {out / name}")
        if any(done):
            print(f"skipped {plural(sum(done), 'finished trace')} in {out} (pass --overwrite to recompute them)", flush=True)
        traces = [tr for tr, d in zip(traces, done) if not d]
        names = [name for name, d in zip(names, done) if not d]
        if not traces:
            return 0

    device = model.get_input_embeddings().weight.device
    T_max = max(len(t) for t in traces)
    S_max = max(t.num_steps for t in traces)
    est = estimate_memory(model, T_max, batch=args.batch_size, num_steps=S_max, method=args.method,
                          heads=args.heads)["total"]
    ref = estimate_memory(model, T_max, batch=1, num_steps=S_max, method="reference")["total"]
    limit = max_positions(model)
    print(f"model {args.model}: {shape['layers']} layers, {shape['heads']} heads, "
          f"{str(next(model.parameters()).dtype).replace('torch.', '')} on {device}"
          + (f", context {limit}" if limit else ""))
    line = (f"{plural(len(traces), 'trace')}, longest {T_max} tokens / {S_max} steps; memory estimate "
            f"~{format_bytes(est)} ({args.method})")
    if args.method == "chunked":
        line += f"; the brute-force reference would need ~{format_bytes(ref)}"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        line += f"; GPU has {format_bytes(total)}"
        if est > total:
            line += "  WARNING: may not fit"
    print(line, flush=True)

    t_all = time.perf_counter()
    for start in range(0, len(traces), args.batch_size):
        batch = traces[start:start + args.batch_size]
        results = step_saliency(model, batch, pool=args.pool, loss=args.loss, layers=layers, method=args.method,
                                heads=args.heads, batch_size=args.batch_size, block_rows=args.block_rows,
                                progress=not args.no_progress and sys.stderr.isatty())
        for j, res in enumerate(results):
            res: SaliencyResult
            res.meta["model"] = str(args.model)
            folder = out / names[start + j]
            res.save(folder)
            print(f"{names[start + j]}: {len(res.trace)} tokens, {res.num_steps} steps, {res.num_layers} layers, "
                  f"{res.meta['time_s']:.1f} s, peak {format_bytes(res.meta['peak_memory_bytes'])} -> {folder}",
                  flush=True)
    print(f"done: {plural(len(traces), 'trace')} in {time.perf_counter() - t_all:.1f} s -> {out}")
    return 0
