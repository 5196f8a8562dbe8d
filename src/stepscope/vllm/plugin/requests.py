"""What a vLLM request asks of StepFlow: its config (its own, or the server's default), its stats key, its salt.

A request asks through `SamplingParams.extra_args` (the OpenAI server's `vllm_xargs`):
- `"stepflow"`: a `StepFlowConfig.to_json()` dict or its JSON string; `"off"` opts out of a server default.
- `"stepflow_id"`: the key its statistics are kept under.
- `"stepflow_start"`: the first position it counts (a continuation of an earlier request under the same key).

A request that says nothing gets the process's default: the environment variable `STEPSCOPE_STEPFLOW`, a config
JSON or `@path` of a file holding one (the same in every vLLM process, which inherit the server's environment).
A bad default is refused at start-up by the plugin (register.register) with one line naming the variable.

Prefix caching: `salt(params)` is the cache salt of a request's effective config (None for a plain request); the
plugin adds it to the request's own salt in the engine core before vLLM hashes its blocks (register.register), so
requests under different configs (default, explicit, opted out) never share cached keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ...errors import StepscopeError
from ...flow.config import StepFlowConfig

EXTRA_KEY, ID_KEY = "stepflow", "stepflow_id"
START_KEY = "stepflow_start"  # positions before it were queries of an earlier request under the same id
OFF = "off"  # extra_args["stepflow"] = "off": no StepFlow, whatever the server's default
DEFAULT_ENV = "STEPSCOPE_STEPFLOW"
_defaults: dict[str, StepFlowConfig] = {}


def default_config() -> StepFlowConfig | None:
    """The server-wide default config from `STEPSCOPE_STEPFLOW` (None when unset or empty); a bad value raises
    StepscopeError naming the variable."""
    raw = os.environ.get(DEFAULT_ENV, "").strip()
    if not raw:
        return None
    got = _defaults.get(raw)
    if got is None:
        got = _defaults[raw] = _parse_default(raw)
    return got


def _parse_default(raw: str) -> StepFlowConfig:
    where = DEFAULT_ENV
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser()
        where = f"{DEFAULT_ENV}={raw}"
        try:
            raw = path.read_text()
        except OSError as e:
            raise StepscopeError(f"{where}: cannot read {path}: {e.strerror or e}") from None
    try:
        return StepFlowConfig.from_json(raw)
    except StepscopeError as e:
        raise StepscopeError(f"{where}: {e}") from None
    except (ValueError, TypeError) as e:
        raise StepscopeError(f"{where} is not a StepFlow config JSON: {e}") from None


def request_config(params) -> StepFlowConfig | None:
    """The StepFlowConfig a request runs under: `extra_args["stepflow"]` (a config's `to_json()` dict or its JSON
    string), None for `"off"`, the server default (`default_config`) when it says nothing. Bad JSON or an unknown
    key raises StepscopeError."""
    extra = getattr(params, "extra_args", None) or {}
    raw = extra.get(EXTRA_KEY)
    if raw is None:
        return default_config()
    if isinstance(raw, str) and raw.strip().lower() == OFF:
        return None
    return raw if isinstance(raw, StepFlowConfig) else StepFlowConfig.from_json(raw)


def request_key(params) -> str:
    """The key a request's stats are kept under: `extra_args["stepflow_id"]` ("" when not given)."""
    extra = getattr(params, "extra_args", None) or {}
    return str(extra.get(ID_KEY, ""))


def request_start(params) -> int:
    """`extra_args["stepflow_start"]`: the first position this request counts (a continuation of an earlier
    request with the same id, whose queries those positions were; e.g. a budget-forcing phase), 0 by default."""
    extra = getattr(params, "extra_args", None) or {}
    raw = extra.get(START_KEY, 0)
    try:
        start = int(raw)
    except (TypeError, ValueError):
        raise StepscopeError(f"extra_args[{START_KEY!r}] must be a position (an integer), got {raw!r}") from None
    if start < 0:
        raise StepscopeError(f"extra_args[{START_KEY!r}] must be >= 0, got {start}")
    return start


def cache_salt(config: StepFlowConfig | None) -> str | None:
    """The prefix-cache salt of a StepFlow config (None for plain requests): requests with the same config share
    cached keys with each other only, so a cache hit is exactly what StepFlow would have computed."""
    if config is None:
        return None
    blob = json.dumps(config.to_json(), sort_keys=True, default=str).encode()
    return "stepflow-" + hashlib.sha256(blob).hexdigest()[:16]


def salt(params) -> str | None:
    """The cache salt of the config a request runs under (None: plain, or a config that cannot be read, which
    the front end refuses before the request gets here)."""
    try:
        return cache_salt(request_config(params))
    except StepscopeError:
        return None
