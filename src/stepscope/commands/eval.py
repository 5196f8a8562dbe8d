"""Measure what StepFlow buys on a benchmark: paired arms, one JSONL line per sample, resumable, sharded.

Both arms generate every (problem, sample) with the same seed, so the comparison is paired. Results are
appended to OUT/results.jsonl batch by batch; --resume continues an interrupted run (Ctrl-C, a lost node)
without losing or repeating a sample. At the end OUT/summary.json, OUT/summary.md and OUT/summary.html hold
accuracy and pass@k (mean ± SE over problems), StepFlow minus baseline with a paired bootstrap CI and a paired
permutation p-value, the gain by the baseline's chain length with a trend test, what StepFlow did to the chain,
and what it cost in this run (tokens/s per arm, their ratio, OEB/SMI fire rates). Under torchrun / accelerate launch the work is sharded over the processes and rank 0
merges the results.

examples:
  stepscope eval --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --benchmark aime24 --out runs/r1-7b-aime24
  torchrun --nproc_per_node 8 -m stepscope.cli eval --model M --benchmark aime25 --out runs/m-aime25
  stepscope eval --benchmark gsm8k --limit 20 --n-samples 1 --max-new-tokens 512 --out runs/smol-gsm8k
  stepscope eval --resume --model M --benchmark aime24 --out runs/r1-7b-aime24    # continue, same settings
  stepscope eval --summarize --out runs/r1-7b-aime24                              # recompute the summary
  stepscope eval --table runs/*                                                   # the paper-shaped table
  stepscope eval --model M --benchmark livecodebench --start-date 2024-08-01 --end-date 2025-01-31 --out runs/lcb
"""

from __future__ import annotations

import argparse
import sys

from . import options

HELP = "run StepFlow against the baseline on a benchmark (paired, resumable, sharded) with statistics"
# the library's default budget (stepscope.evaluate.runner.EVAL_MAX_NEW_TOKENS), not imported: --help stays instant
MAX_NEW_TOKENS = 32768


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluate.benchmarks import SPECS, benchmark_help

    p.epilog = "benchmarks (--benchmark NAME):\n" + benchmark_help()
    p.add_argument("--benchmark", default=None,
                   help=f"{', '.join(SPECS)} (listed below), or a local .jsonl/.json/.csv/.parquet file")
    p.add_argument("--data-file", default=None, help="read the named benchmark from this local file instead")
    c = p.add_argument_group("LiveCodeBench (--benchmark livecodebench)")
    c.add_argument("--release-version", default=None,
                   help="release_v1..release_v6, release_latest, vN or a range like v4_v5 (default release_v5)")
    c.add_argument("--start-date", default=None, help="keep problems of contests on or after this date (YYYY-MM-DD)")
    c.add_argument("--end-date", default=None, help="keep problems of contests on or before this date (YYYY-MM-DD)")
    c.add_argument("--code-timeout", type=float, default=None,
                   help="wall and CPU seconds per test of a sandboxed program (default 6)")
    c.add_argument("--code-memory", type=int, default=None, help="address-space limit of a program in MiB (default 4096)")
    p.add_argument("--out", default=None, help="run folder (created; with --resume, continued)")
    p.add_argument("--n-samples", type=int, default=None,
                   help="samples per problem (default: the benchmark's paper protocol, listed below; 1 for a file)")
    p.add_argument("--arms", default="baseline,stepflow",
                   help="comma-separated arms: baseline, stepflow, oeb (OEB only), smi (SMI only), R and stepflow+R "
                        "for each registered repair R (docs/extending.md), and NAME=@FILE.json (a StepFlow config "
                        "file, e.g. calibrated=@stepflow.json from `stepscope calibrate`)")
    p.add_argument("--limit", type=int, default=None, help="only the first K problems")
    p.add_argument("--prompt-style", default=None, choices=["r1", "gpqa", "plain"],
                   help="default: r1 for math (answer in \\boxed{}), gpqa for multiple choice")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (refused if its settings differ); starts it if absent")
    options.add_model_options(p)
    options.add_engine_options(p)
    p.add_argument("--device-map", default=None,
                   help="'auto' spreads a model too large for one GPU over all GPUs (one process, --arms baseline "
                        "only: StepFlow needs the model on one device)")
    options.add_decoding_options(p, max_new_tokens=MAX_NEW_TOKENS,
                                 seed_help="base seed; a sample's seed = f(seed, problem id, sample)")
    options.add_stepflow_options(p, switches=False)
    o = p.add_argument_group("output")
    o.add_argument("--grade-timeout", type=float, default=10.0, help="seconds per math-verify call (default 10)")
    o.add_argument("--save-traces", action="store_true",
                   help="also store each sample's full trace (token ids, steps) in its record, its meta naming "
                        "the problem, arm and sample and their grade: `stepscope saliency OUT/results.jsonl` "
                        "reads them, `stepscope compare --by-meta` splits them into correct and wrong")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--summarize", action="store_true",
                   help="only (re)write summary.json/.md/.html of --out from its results (no generation)")
    o.add_argument("--table", nargs="+", metavar="RUN_DIR", default=None,
                   help="print the paper-shaped table (models x benchmarks) of finished run folders, then each "
                        "run's gain by chain length and StepFlow's measured cost")
    o.add_argument("--length-bins", default="3", metavar="N|EDGES",
                   help="gain by chain length: N quantile bins of the baseline's thinking length (default 3: "
                        "tertiles), or ascending edges such as 200,800")
    o.add_argument("--length-by", default="steps", choices=["steps", "tokens"],
                   help="the baseline's thinking length that bins the problems (default steps)")


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import StepscopeError
    from ..evaluate.chain import parse_bins
    from ..evaluate.runfolder import load_run
    from ..evaluate.summary import headline_table, markdown, paper_table, summarize, write_summary

    for a, b in (("--table", "--summarize"), ("--table", "--resume"), ("--summarize", "--resume"),
                 ("--device", "--device-map")):
        if getattr(args, a[2:].replace("-", "_")) and getattr(args, b[2:].replace("-", "_")):
            raise StepscopeError(f"{a} and {b} contradict each other: give one")
    shape = {"length_bins": parse_bins(args.length_bins), "length_by": args.length_by}
    if args.table:
        summaries = []
        for d in args.table:
            info, records = load_run(d)
            summaries.append(summarize(records, info, **shape))
        print(paper_table(summaries, labels=args.table) + "\n" + headline_table(summaries, labels=args.table), end="")
        return 0
    if not args.out:
        raise StepscopeError("--out is required (the run folder)")
    from ..io import check_writable

    check_writable(args.out, "--out", folder=True)
    if args.summarize:
        s = write_summary(args.out, **shape)
        print(markdown(s), end="")
        return 0
    if not args.benchmark:
        raise StepscopeError("--benchmark is required (or --summarize / --table)")

    from ..evaluate.benchmarks import load_benchmark, paper_samples
    from ..evaluate.runfolder import RunFolder
    from ..evaluate.runner import (
        EvalSettings,
        arms_json,
        build_arms,
        check_settings,
        dist_env,
        run_eval,
        run_info,
    )

    rank, world = dist_env()
    if args.device_map and world > 1:
        raise StepscopeError("--device-map spreads one model over all GPUs; run it in a single process")
    if args.engine == "vllm" and world > 1:
        raise StepscopeError("--engine vllm runs in one process: use --data-parallel-size N instead of a launcher")
    decode = options.decode_config(args)
    arm_configs = build_arms(args.arms, base=options.stepflow_base(args), **options.stepflow_knobs(args))
    flow_arms = [a for a, c in arm_configs.items() if c is not None]
    if args.device_map and flow_arms:  # StepFlow needs the model on one device (docs/stepflow.md)
        raise StepscopeError(f"--device-map spreads the model over several devices, which StepFlow does not "
                             f"support (arms {', '.join(flow_arms)}): use --arms baseline, or --engine vllm "
                             "--tensor-parallel-size N")
    bench = load_benchmark(args.benchmark, data_file=args.data_file, seed=decode.seed, limit=args.limit,
                           release_version=args.release_version, start_date=args.start_date, end_date=args.end_date)
    n_samples = args.n_samples if args.n_samples is not None else paper_samples(bench.name)
    extra = {"limit": args.limit, "data_file": args.data_file}
    if bench.kind == "code":  # what decides a code grade goes into run.json
        from ..evaluate.sandbox import Limits

        lim = Limits(timeout=args.code_timeout or Limits.timeout, memory_mb=args.code_memory or Limits.memory_mb)
        extra.update(code_timeout=lim.timeout, code_memory=lim.memory_mb, release_version=args.release_version,
                     start_date=args.start_date, end_date=args.end_date)
    elif args.code_timeout is not None or args.code_memory is not None:
        raise StepscopeError("--code-timeout and --code-memory apply to code benchmarks (livecodebench) only")
    if args.engine == "vllm":  # run.json: the engine decides the samples
        from ..vllm.driver.engine import require_vllm

        extra.update(engine="vllm", engine_version=require_vllm())
    settings = EvalSettings(model=args.model, benchmark=bench.name, n_samples=n_samples, arms=arms_json(arm_configs),
                            decode=decode, prompt_style=args.prompt_style, dtype=args.dtype, extra=extra)
    # everything is checked before the weights load and anything is written: a bad setting leaves no trace
    layers = options.model_layers(args)
    options.check_stepflow_layers(args, layers)
    check_settings(settings, arm_configs, args.batch_size, num_layers=layers)
    if rank == 0:
        RunFolder(args.out).check(run_info(settings, bench, args.batch_size, world), resume=args.resume)

    import torch

    if args.engine == "transformers" and args.device is None and not args.device_map and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))  # one GPU per process
        args.device = f"cuda:{local % torch.cuda.device_count()}" if world > 1 else "cuda"
    if rank == 0:  # before the weights load: a run too large for the device can be stopped at once
        from ..progress import plan_warning

        device = "cuda" if args.engine == "vllm" or args.device_map else args.device or "cpu"
        from ..wording import plural

        warn = plan_warning(len(bench) * n_samples * len(arm_configs), decode.max_new_tokens, device,
                            f"{plural(len(bench), 'problem')} x {plural(n_samples, 'sample')} x "
                            f"{plural(len(arm_configs), 'arm')}")
        if warn:
            print(f"stepscope eval: warning: {warn}", file=sys.stderr, flush=True)
    engine = options.load_engine(args, stepflow=any(c is not None for c in arm_configs.values()),
                                 device_map=args.device_map)
    if rank == 0:
        from ..wording import plural

        print(f"stepscope eval: {bench.name} ({plural(len(bench), 'problem')} from {bench.source}), "
              f"{plural(n_samples, 'sample')}, arms {', '.join(arm_configs)}, up to {decode.max_new_tokens} new tokens each, {world} process(es) "
              f"-> {args.out}", file=sys.stderr)
    try:
        summary = run_eval(engine.model, engine.tokenizer, bench, settings, args.out, arm_configs=arm_configs,
                           batch_size=args.batch_size, resume=args.resume, progress=not args.no_progress,
                           grade_timeout=args.grade_timeout, save_traces=args.save_traces,
                           generate_fn=engine.generate_fn, summary_options=shape)
    except KeyboardInterrupt:
        print(f"stepscope eval: interrupted; finished samples are in {args.out}; continue with the same command "
              f"and --resume", file=sys.stderr)
        return 130
    if summary is not None:
        print(markdown(summary), end="")
    return 0
