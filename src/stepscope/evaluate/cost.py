"""What an evaluation's generation cost, as the run measured it: the session and machine each batch ran on, the
wall time of every (batch, arm), StepFlow's fire counts per sample, and the per-arm throughput summary.

Each record carries `timing`: {"batch": an id shared by the samples one generator call produced, "seconds": that
call's wall time, "rows": its samples, "session": {"id", "machine", "device", "engine"}}. A session is one launch
of one process (a resume starts a new one); `machine` is a fingerprint of the host and its accelerators, so a run
resumed elsewhere shows two. The arms run the same batches one after the other (runner.py), so their times are
measured side by side. Records written before timing was recorded have no `timing`: their cost is unavailable.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import uuid
from collections import defaultdict

from ..cpus import usable_cpus


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _accelerators() -> list[str]:
    """The names of the CUDA devices this process sees (only when torch is already imported: a stand-in
    generator runs without torch, and asking would load it)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken driver must not stop a run; the fingerprint just lacks it
        pass
    return []


def _model_device(model) -> str | None:
    """The device of a transformers model's first parameter, e.g. "cuda:0" (None for another engine)."""
    try:
        return str(next(model.parameters()).device)
    except (AttributeError, StopIteration, TypeError):
        return None


def session_info(model=None, engine: str | None = None, engine_version: str | None = None) -> dict:
    """This process's session: a fresh id, the machine's fingerprint, the device it generates on, the engine."""
    gpus = _accelerators()
    host = {"node": platform.node(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "arch": platform.machine(),
            "gpus": gpus}
    machine = hashlib.sha256(json.dumps(host, sort_keys=True).encode()).hexdigest()[:12]
    where = _model_device(model)
    if where is not None and where.startswith("cuda") and gpus:
        index = int(where.split(":")[1]) if ":" in where else 0
        device = f"{where} ({gpus[index] if index < len(gpus) else gpus[0]})"
    elif where is not None and where != "cpu":
        device = where
    elif gpus and where is None:  # an engine that places the model itself (vLLM)
        device = f"{len(gpus)} x {gpus[0]}"
    else:
        device = f"cpu ({_cpu_model()}, {usable_cpus()} usable cores)"
    if engine is None:
        engine = "transformers"
    if engine_version is None and engine == "transformers" and "transformers" in sys.modules:
        engine_version = getattr(sys.modules["transformers"], "__version__", None)
    return {"id": uuid.uuid4().hex[:12], "machine": machine, "device": device,
            "engine": engine if engine_version is None else f"{engine} {engine_version}"}


def batch_timing(session: dict, rank: int, number: int, seconds: float, rows: int) -> dict:
    """The `timing` of every record of one generator call (the module docstring)."""
    return {"batch": f"{session['id']}-r{rank}-b{number}", "seconds": round(float(seconds), 6), "rows": int(rows),
            "session": session}


def fire_counts(trace) -> dict | None:
    """A sample's StepFlow fire counts from its trace's meta (None for plain decoding): OEB fires and eligible
    (query, head) pairs, SMI fires (query positions that received momentum), and the number of SMI layers."""
    st = (getattr(trace, "meta", None) or {}).get("stepflow_stats")
    if not st:
        return None
    out = {"oeb_fires": int(sum((st.get("oeb_fires") or {}).values())),
           "oeb_eligible": int(sum((st.get("oeb_eligible") or {}).values())),
           "smi_fires": int(sum((st.get("smi_fires") or {}).values())),
           "smi_layers": len(st.get("smi_layers") or [])}
    if st.get("interventions"):  # the other repairs (core/interventions.py): queries changed, over their layers
        out["interventions"] = {k: int(sum(c.values())) for k, c in st["interventions"].items()}
    return out


def _fire_rates(recs: list[dict]) -> dict:
    """OEB: fired share of the eligible (query, head) pairs; SMI: share of (thinking token, SMI layer) positions
    that received momentum. None when a record lacks its counts (plain decoding, or an older run)."""
    fires = [r.get("stepflow_fires") for r in recs]
    if not fires or any(f is None for f in fires):
        return {"oeb_fire_rate": None, "smi_fire_rate": None}
    eligible = sum(f["oeb_eligible"] for f in fires)
    positions = sum(f["smi_layers"] * int(r.get("thinking_tokens") or 0) for f, r in zip(fires, recs))
    out = {"oeb_fire_rate": sum(f["oeb_fires"] for f in fires) / eligible if eligible else None,
           "smi_fire_rate": sum(f["smi_fires"] for f in fires) / positions if positions else None}
    names = sorted({k for f in fires for k in f.get("interventions", {})})
    if names:  # the other repairs: queries they changed per sample
        out["changed_per_sample"] = {k: sum(f.get("interventions", {}).get(k, 0) for f in fires) / len(fires)
                                     for k in names}
    return out


def cost_summary(records: list[dict], arms: list[str], reference: str = "baseline") -> dict:
    """Per arm: generation seconds (each batch counted once), new tokens, tokens/s and seconds per sample, OEB and
    SMI fire rates; each arm's throughput over the reference's; the sessions (machine, device, engine) the
    records ran in, and whether the arms' numbers are comparable (every timed batch on one machine)."""
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_arm[r["arm"]].append(r)
    sessions: dict[str, dict] = {}
    out: dict = {"arms": {}, "ratios": {}, "reference": reference}
    for a in arms:
        recs = by_arm.get(a, [])
        timed = [r for r in recs if isinstance(r.get("timing"), dict) and "seconds" in r["timing"]]
        row: dict = {"samples": len(recs), "timed_samples": len(timed), **_fire_rates(recs)}
        if recs and len(timed) == len(recs):
            batches = {r["timing"]["batch"]: float(r["timing"]["seconds"]) for r in timed}
            seconds = sum(batches.values())
            tokens = sum(int(r.get("new_tokens") or 0) for r in timed)
            row.update(seconds=seconds, batches=len(batches), new_tokens=tokens,
                       tokens_per_second=tokens / seconds if seconds > 0 else None,
                       seconds_per_sample=seconds / len(timed))
            for r in timed:
                s = r["timing"].get("session") or {}
                sessions.setdefault(str(s.get("id")), s)
        else:
            row.update(seconds=None, batches=None, new_tokens=None, tokens_per_second=None, seconds_per_sample=None)
        out["arms"][a] = row
    machines = sorted({str(s.get("machine")) for s in sessions.values()})
    out["sessions"] = list(sessions.values())
    out["machines"] = len(machines)
    timed_all = all(out["arms"][a]["seconds"] is not None for a in arms)
    out["available"] = timed_all
    out["comparable"] = timed_all and len(machines) == 1
    if not timed_all:
        out["note"] = "unavailable: some samples were generated without timing (a run written before it was recorded)"
    elif len(machines) > 1:
        out["note"] = (f"not comparable: the run was resumed on another machine ({len(machines)} machines: "
                       + "; ".join(sorted({str(s.get('device')) for s in sessions.values()})) + ")")
    ref = out["arms"].get(reference, {})
    for a in arms:
        if a == reference:
            continue
        mine = out["arms"][a]
        tput = (mine["tokens_per_second"] / ref["tokens_per_second"]
                if mine.get("tokens_per_second") and ref.get("tokens_per_second") else None)
        per_sample = (mine["seconds_per_sample"] / ref["seconds_per_sample"]
                      if mine.get("seconds_per_sample") and ref.get("seconds_per_sample") else None)
        out["ratios"][a] = {"throughput": tput, "time_per_sample": per_sample, "comparable": out["comparable"]}
    return out
