"""The evaluation run folder: run.json, the results files, the status files, merging and reading them back.

A run folder holds:
- `run.json`: the settings that decide the results (model, benchmark and its fingerprint, samples, arms and
  their StepFlow configs, decoding); resuming refuses a folder whose settings differ.
- `results.jsonl` (one process) or `results.rank<R>.jsonl` (process R of a torchrun/accelerate launch): one
  line per finished sample, appended and flushed (and fsync'ed) after every batch (`stepscope.io.JsonlLog`).
  Rank 0 merges them into `results.jsonl` when every rank is done, in the order of the work list.
- `status.rank<R>.json`: running / done / interrupted / failed, so rank 0 never waits on a dead rank.
- `summary.json`, `summary.md`: written at the end by `stepscope.evaluate.summary`.

A record is identified by its key (problem id, sample, arm); a key seen twice is kept once (the first).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from ..errors import StepscopeError
from ..io import JsonlLog, atomic_write_json, atomic_write_text, read_text_file

RUN_VERSION = 2
RESULTS = "results.jsonl"
# settings that may change between an interrupted run and its resumption (they do not change any result)
NOT_COMPARED = ("batch_size", "device", "device_map", "stepscope_version", "created", "world_size")
# run.json of version 1 predates these decoding settings; its runs decoded with these values
V1_DECODING = {"top_k": 0, "do_sample": None}

Key = tuple[str, int, str]  # (problem id, sample, arm)


def record_key(rec: dict) -> Key:
    return str(rec["problem_id"]), int(rec["sample"]), str(rec["arm"])


def upgrade_run_info(info: dict, path: Path) -> dict:
    """run.json in the current version's form (version 1 gains the decoding settings it ran with)."""
    if not isinstance(info, dict):
        raise StepscopeError(f"{path}: not a run's settings (a JSON object)")
    version = info.get("stepscope_run")
    if version == 1:
        return {**info, **V1_DECODING, "stepscope_run": RUN_VERSION}
    if version != RUN_VERSION:
        raise StepscopeError(f"{path}: run format {version!r} is not one this stepscope reads (1 or {RUN_VERSION}); "
                             f"use the stepscope version that wrote it, or another --out")
    return info


def _compare_settings(old: dict, new: dict) -> list[str]:
    keys = sorted((set(old) | set(new)) - set(NOT_COMPARED))
    return [k for k in keys if old.get(k) != new.get(k)]


class RunFolder:
    """One run folder on disk; `records()` follows its results files incrementally (only new whole lines)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._logs: dict[Path, JsonlLog] = {}
        self._records: dict[Key, dict] = {}

    # ------------------------------------------------------------------------------------------ run.json

    def info(self) -> dict:
        """The run's settings (run.json)."""
        path = self.path / "run.json"
        if not path.exists():
            raise StepscopeError(f"{self.path}: no run.json (not a stepscope eval folder)")
        try:
            info = json.loads(read_text_file(path))
        except json.JSONDecodeError as e:
            raise StepscopeError(f"{path}: not valid JSON ({e.msg})") from None
        return upgrade_run_info(info, path)

    def prepare(self, run_info: dict, *, resume: bool, rank: int, wait_timeout: float | None = 3600.0,
                poll: float = 1.0) -> None:
        """Rank 0 creates the folder and run.json (or checks it when resuming); other ranks wait for it and check it.

        Other ranks of a launch cannot tell "written by rank 0 a moment ago" from "left by an earlier run", so
        they always behave as if resuming: they only add samples of these very settings, which a later
        --resume counts as done; rank 0 alone refuses an existing run without --resume.
        """
        path = self.path / "run.json"
        if rank != 0:
            start = time.monotonic()
            while not path.exists():
                if wait_timeout is not None and time.monotonic() - start > wait_timeout:
                    raise StepscopeError(f"rank {rank}: rank 0 did not create {path} within {wait_timeout:.0f} s")
                time.sleep(poll)
            resume = True
        if self.check(run_info, resume=resume):
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, run_info)

    def check(self, run_info: dict, *, resume: bool) -> bool:
        """Whether these settings may run in this folder, without writing anything: True for a run to continue
        (run.json holds the same settings and `resume` is set), False for a new one; a one-line error for a
        folder that holds another run, a run without --resume, or results without run.json."""
        path = self.path / "run.json"
        if path.exists():
            try:
                old = json.loads(read_text_file(path))
            except json.JSONDecodeError:
                raise StepscopeError(f"{path} is not valid JSON; this folder cannot be resumed") from None
            if not resume:
                raise StepscopeError(f"{self.path} already holds a run; pass --resume to continue it, or choose "
                                     f"another --out")
            old = upgrade_run_info(old, path)
            diff = _compare_settings(old, run_info)
            if diff:
                shown = "; ".join(f"{k}: {old.get(k)!r} -> {run_info.get(k)!r}"[:160] for k in diff[:4])
                raise StepscopeError(f"--resume: the settings differ from {path} ({shown}); use the same settings "
                                     f"or another --out")
            return True
        if self.path.exists() and any(self.path.glob("results*.jsonl")):
            raise StepscopeError(f"{self.path} holds results but no run.json; choose another --out")
        return False

    # ------------------------------------------------------------------------------------------- results

    def results_path(self, rank: int, world: int) -> Path:
        """The results file one process appends to."""
        return self.path / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")

    def results_paths(self) -> list[Path]:
        return sorted(p for p in [self.path / RESULTS, *self.path.glob("results.rank*.jsonl")] if p.exists())

    def open_results(self, rank: int, world: int) -> JsonlLog:
        """This process's results file, opened for appending (a line cut off by a kill is removed first)."""
        return JsonlLog(self.results_path(rank, world)).open()

    def records(self) -> dict[Key, dict]:
        """Every record in the results files by key, in file order; each call reads only what was added since."""
        for p in self.results_paths():
            for rec in self._logs.setdefault(p, JsonlLog(p)).read_new():
                try:
                    key = record_key(rec)
                except (KeyError, TypeError, ValueError):
                    shown = json.dumps(rec, ensure_ascii=False)[:80]
                    raise StepscopeError(f"{p}: {shown} is not a result record; remove it or start a new run") from None
                self._records.setdefault(key, rec)
        return dict(self._records)

    def merge(self, order: list[Key]) -> int:
        """Merge results.jsonl and every results.rank<R>.jsonl into results.jsonl in the order of `order`.

        The rank files are removed after the merged file is safely in place. Returns the number of records.
        """
        records = RunFolder(self.path).records()
        rank_paths = [p for p in self.results_paths() if p.name != RESULTS]
        position = {k: i for i, k in enumerate(order)}
        extra = [k for k in records if k not in position]
        if extra:
            raise StepscopeError(f"{self.path}: {len(extra)} records belong to no (problem, sample, arm) of this run "
                                 f"(first: {extra[0]})")
        known = sorted(records, key=position.__getitem__)
        atomic_write_text(self.path / RESULTS,
                          "".join(json.dumps(records[k], ensure_ascii=False) + "\n" for k in known))
        for p in rank_paths:
            with contextlib.suppress(OSError):
                p.unlink()
        return len(known)

    # -------------------------------------------------------------------------------------------- status

    def write_status(self, rank: int, state: str, **extra) -> None:
        """Record this process's state (running / done / interrupted / failed); best effort."""
        with contextlib.suppress(OSError):
            atomic_write_json(self.path / f"status.rank{rank}.json",
                              {"rank": rank, "state": state, "time": time.time(), **extra})

    def failed_rank(self, world: int, since: float) -> str | None:
        """A failure or interruption that another rank reported during this launch (statuses older than `since`,
        rank 0's start, were left by an earlier launch and are ignored)."""
        for r in range(1, world):
            p = self.path / f"status.rank{r}.json"
            if p.exists():
                with contextlib.suppress(OSError, json.JSONDecodeError, TypeError, ValueError):
                    st = json.loads(p.read_text(encoding="utf-8"))
                    if st.get("state") in ("failed", "interrupted") and float(st.get("time", 0)) >= since:
                        return f"rank {r} {st['state']}" + (f": {st['error']}" if st.get("error") else "")
        return None


def merge_results(out: str | os.PathLike, units: list[tuple], arms: list[str]) -> int:
    """Merge a run folder's results files into results.jsonl in work-list order: `units` are its (problem,
    sample) pairs, problem-major, each run in every arm of `arms`. Returns the number of records."""
    return RunFolder(out).merge([(p.id, s, a) for p, s in units for a in arms])


def read_results(out: str | os.PathLike) -> list[dict]:
    """Every record of a run folder (merged or not), in file order."""
    return list(RunFolder(out).records().values())


def load_run(out: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(run.json, records) of a run folder."""
    folder = RunFolder(out)
    return folder.info(), list(folder.records().values())
