"""StepFlow's per-request statistics in a JSONL file, for users of a vLLM server (no Python access to the engine).

With `STEPSCOPE_STATS_FILE=PATH` in the server's environment, every vLLM worker process (each tensor-parallel
rank) appends one JSON line per StepFlow request when the request leaves the batch (`"final": true`), and a
snapshot line of each request still in its batch when the engine has been idle for a moment (a server that
finished its last requests has written them within a second, before vLLM tells the worker they are gone). Each
line carries its request's whole tally so far, so a later line of the same request replaces an earlier one.

Reading (`read`, `stepscope vllm-stats PATH`): the last line of each (engine, rank, request) counts; a request's
ranks are merged as `collect_stats` merges them (stats.merge_ranks: OEB sums and eligible counts add up over
ranks, each of which holds some of the heads; SMI fires, tokens and forwards are per position, rank 0's); requests
under the same `stepflow_id` add up, those without one are listed under "" (and one by one with `by_request`).

Lines are written with one `write` each on a file opened for appending, so lines of several processes do not
interleave within a line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from ...core.tally import Tally
from ...errors import StepscopeError
from .stats import merge_rank_tallies, to_stats

__all__ = ["STATS_ENV", "StatsWriter", "by_key", "read", "read_lines", "requests", "stats_path", "to_stats"]

STATS_ENV = "STEPSCOPE_STATS_FILE"
log = logging.getLogger("stepscope.vllm")


def stats_path() -> str | None:
    """The stats file this process appends to (STEPSCOPE_STATS_FILE), None when unset."""
    return os.environ.get(STATS_ENV) or None


def append_lines(path: str, records: list[dict]) -> None:
    """Append each record as one JSON line, one `os.write` per line (O_APPEND)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for r in records:
            os.write(fd, (json.dumps(r, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)


class StatsWriter:
    """One worker process's writer (owned by worker.Worker, made at its first StepFlow request when the variable
    is set). `write` appends lines; a daemon thread appends `source()` (the worker's snapshot lines, read under
    the worker's `lock`) once the engine has been idle for `idle` seconds since `touch` (the end of a forward)."""

    def __init__(self, path: str, engine: str, rank: int, lock, source, idle: float = 0.5) -> None:
        self.path, self.engine, self.rank = path, engine, rank
        self.lock, self.source, self.idle = lock, source, idle
        self.last = time.monotonic()
        self.pending = False  # a forward ran since the last snapshot
        self.errors: set[str] = set()
        threading.Thread(target=self._run, name="stepscope-stats", daemon=True).start()

    @classmethod
    def for_engine(cls, vllm_config, lock, source) -> StatsWriter:
        from vllm.distributed import get_tensor_model_parallel_rank

        try:
            rank = int(get_tensor_model_parallel_rank())
        except Exception:  # noqa: BLE001 - no tensor-parallel group in this process: one rank
            rank = 0
        return cls(stats_path(), str(vllm_config.instance_id), rank, lock, source)

    def line(self, seq: int, key: str, final: bool, tally: dict, prompt_tokens: int, config: dict) -> dict:
        """One line: the request `seq` (the engine's count of StepFlow requests, the same on every rank) with its
        tally (core.tally.Tally.to_json) on this rank."""
        return {"engine": self.engine, "rank": self.rank, "request": seq, "stepflow_id": key, "final": final,
                "time": round(time.time(), 3), "prompt_tokens": prompt_tokens, "config": config, "tally": tally}

    def write(self, lines: list[dict]) -> None:
        """Append lines; a file that cannot be written is logged (once per error), never raised into vLLM."""
        if lines:
            try:
                append_lines(self.path, lines)
            except OSError as e:
                if str(e) not in self.errors:
                    self.errors.add(str(e))
                    log.warning("stepscope: cannot write StepFlow stats to %s: %s", self.path, e)

    def touch(self) -> None:
        """A forward has just run (called under the worker's lock)."""
        self.last = time.monotonic()
        self.pending = True

    def _run(self) -> None:
        while True:
            time.sleep(self.idle / 2)
            with self.lock:
                if self.pending and time.monotonic() - self.last >= self.idle:
                    self.pending = False
                    self.write(self.source())


def read_lines(path: str | Path) -> list[dict]:
    """Every line of a stats file; a file that is not one gets a one-line StepscopeError."""
    p = Path(path)
    if not p.exists():
        raise StepscopeError(f"{p}: no such stats file (set {STATS_ENV} in the vLLM server's environment)")
    if p.is_dir():
        raise StepscopeError(f"{p} is a folder, not a StepFlow stats file")
    out = []
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                line["tally"]["oeb"]
            except (ValueError, KeyError, TypeError):
                if not raw.endswith(b"\n"):  # a line still being written: the writer finishes it
                    break
                raise StepscopeError(f"{p}:{n} is not a StepFlow stats line") from None
            out.append(line)
    return out


def requests(lines: list[dict]) -> list[dict]:
    """One entry per request, its ranks merged: {"engine", "request", "stepflow_id", "final", "prompt_tokens",
    "config", "ranks", "tally"}, in the order the requests were first seen."""
    last: dict[tuple, dict] = {}
    for line in lines:
        last[(line["engine"], line["rank"], line["request"])] = line  # a later line replaces an earlier one
    by_req: dict[tuple, dict[int, dict]] = {}
    for (engine, rank, seq), line in last.items():
        by_req.setdefault((engine, seq), {})[rank] = line
    out = []
    for (engine, seq), ranks in by_req.items():
        first = ranks[min(ranks)]
        out.append({"engine": engine, "request": seq, "stepflow_id": first["stepflow_id"],
                    "final": all(r["final"] for r in ranks.values()), "prompt_tokens": first["prompt_tokens"],
                    "config": first["config"], "ranks": len(ranks),
                    "tally": merge_rank_tallies([ranks[r]["tally"] for r in sorted(ranks)])})
    return out


def by_key(reqs: list[dict]) -> dict:
    """{stepflow_id: StepFlowStats} over requests (`requests`), those with the same id added up, as
    `stepscope.vllm.collect_stats` gives them for the same requests."""
    tallies: dict[str, Tally] = {}
    for r in reqs:
        t = Tally.from_json(r["tally"])
        acc = tallies.get(r["stepflow_id"])
        if acc is None:
            acc = tallies[r["stepflow_id"]] = t.copy_empty()
        acc.add(t)
    return {k: t.to_stats() for k, t in tallies.items()}


def read(path: str | Path) -> dict:
    """`by_key` of every request in a stats file."""
    return by_key(requests(read_lines(path)))
