"""Read the StepFlow statistics a vLLM server wrote (docs/vllm.md, statistics for server users).

A vLLM server started with STEPSCOPE_STATS_FILE=PATH in its environment appends one JSON line per StepFlow
request to PATH, from every tensor-parallel rank. This command merges them as `stepscope.vllm.collect_stats`
does: per request, OEB counts summed over ranks (each holds some of the heads), SMI fires and tokens per
position; requests with the same stepflow_id added up, requests sent without one listed under "(no id)".

examples:
  stepscope vllm-stats stepflow_stats.jsonl
  stepscope vllm-stats stepflow_stats.jsonl --by-request --json stats.json
"""

from __future__ import annotations

import argparse

HELP = "StepFlow statistics of a vLLM server's requests, from its STEPSCOPE_STATS_FILE"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the server's STEPSCOPE_STATS_FILE")
    p.add_argument("--by-request", action="store_true", help="one entry per request instead of per stepflow_id")
    p.add_argument("--json", metavar="OUT.json", help="also write the statistics as JSON")


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write_json, check_writable
    from ..vllm.plugin.stats_file import by_key, read_lines, requests, to_stats

    if args.json:
        check_writable(args.json, "--json")
    reqs = requests(read_lines(args.file))
    if args.by_request:
        entries = {f"{r['stepflow_id'] or '(no id)'} #{r['request']}"
                   + ("" if r["final"] else " (running)"): to_stats(r["tally"]) for r in reqs}
    else:
        entries = {k or "(no id)": v for k, v in by_key(reqs).items()}
    engines = len({r["engine"] for r in reqs})
    print(f"{args.file}: {len(reqs)} StepFlow request{'s' * (len(reqs) != 1)}"
          f" ({sum(r['final'] for r in reqs)} finished), {engines} engine{'s' * (engines != 1)}")
    for key, stats in entries.items():
        print(f"\n{key}\n{stats.summary()}")
    if args.json:
        atomic_write_json(args.json, {k: v.to_json() for k, v in entries.items()})
    return 0
