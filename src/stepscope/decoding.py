"""DecodeConfig: every decoding setting of a generation run (like transformers' GenerationConfig), checked.

One object holds what decides which tokens a row writes: the token budget, budget forcing, the sampling
filters and the base seed. `generate_traces`, the CLI and the evaluation all take it; `validate()` is the one
place its values are checked, with a one-line error that names the bad field.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from .errors import StepscopeError
from .io import config_fields


class DecodeConfigError(StepscopeError):
    """A bad decoding setting: `field` names it, `problem` says what is wrong with its value."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy integers too


@dataclass
class DecodeConfig:
    """How a generation run decodes.

    `max_new_tokens`: tokens each row writes at most. `max_thinking_tokens`: budget forcing; a row that has
    written this many tokens inside the thinking without closing it is made to write the format's end marker
    (None: no limit). `temperature`, `top_k` (0: off), `top_p` (1: off): the sampling filters, applied in that
    order. `do_sample`: None means sample iff temperature > 0; False is greedy (argmax). `seed`: the base
    seed; row i of a run samples with `seed + i` unless the caller gives each row its own seed.
    """

    max_new_tokens: int = 1024
    max_thinking_tokens: int | None = None
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    do_sample: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> DecodeConfig:
        """Check every field (also after changing one); raise DecodeConfigError naming the first bad one."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise DecodeConfigError("max_new_tokens", f"must be at least 1, got {self.max_new_tokens!r}")
        if self.max_thinking_tokens is not None and (not _is_int(self.max_thinking_tokens)
                                                     or self.max_thinking_tokens < 0):
            raise DecodeConfigError("max_thinking_tokens", f"must be >= 0 or None, got {self.max_thinking_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise DecodeConfigError("temperature", f"must be >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise DecodeConfigError("top_p", f"must be in (0, 1], got {p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise DecodeConfigError("top_k", f"must be >= 0, got {self.top_k!r}")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise DecodeConfigError("do_sample", f"must be True, False or None, got {self.do_sample!r}")
        if self.do_sample and t == 0:
            raise DecodeConfigError("do_sample", "needs temperature > 0 (temperature 0 means greedy decoding)")
        if not _is_int(self.seed):
            raise DecodeConfigError("seed", f"must be an integer, got {self.seed!r}")
        return self

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled (else picked greedily): `do_sample`, or temperature > 0 when it is None."""
        return self.temperature > 0 if self.do_sample is None else self.do_sample

    # -- JSON -------------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        d = asdict(self)
        d["temperature"], d["top_p"] = float(self.temperature), float(self.top_p)
        for k in ("max_new_tokens", "max_thinking_tokens", "top_k", "seed"):
            d[k] = None if d[k] is None else int(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict | str) -> DecodeConfig:
        return cls(**config_fields(d, cls, "decoding config"))
