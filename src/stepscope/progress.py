"""Signs of life for long generations: tokens, tokens/s and rows finished inside a batch, and a line saying, before
a run starts, how much it may generate when that is a lot for the device.

The decode loops know nothing of the display: a generator (`stepscope.flow.generate_traces`, the vLLM driver)
takes `on_progress(new_tokens, rows_done)` and calls it as tokens come (the transformers loop after every
decode step, the vLLM driver after every vLLM call). `TokenProgress` is such a hook; it draws on a tqdm bar at
most every `interval` seconds.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

# tokens that a run may generate before the plan line warns, by device type (an order of magnitude: a 7B model
# writes about ten tokens a second on a laptop CPU, thousands a second in batches on a GPU)
LARGE_RUN_TOKENS = {"cpu": 200_000, "mps": 2_000_000}
LARGE_RUN_TOKENS_DEFAULT = 200_000_000


class TokenProgress:
    """An `on_progress(new_tokens, rows_done)` hook: counts tokens and finished rows, and shows them (with the
    rate since the batch began) on `bar`'s postfix; `count_rows`: also advance the bar by the finished rows (a
    bar over traces); `extra()`: text put before the counts (e.g. the running accuracy)."""

    def __init__(self, bar=None, *, count_rows: bool = False, extra: Callable[[], str] | None = None,
                 interval: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.bar, self.count_rows, self.extra, self.interval, self.clock = bar, count_rows, extra, interval, clock
        self.tokens = 0  # over the whole run
        self.batch_rows = self.batch_done = self.batch_tokens = 0
        self.batch_start = self.last_draw = clock()

    def start_batch(self, rows: int) -> None:
        """A new batch of `rows` rows begins (its counts and rate start from zero)."""
        self.batch_rows, self.batch_done, self.batch_tokens = rows, 0, 0
        self.batch_start = self.clock()

    def __call__(self, new_tokens: int, rows_done: int = 0) -> None:
        self.tokens += new_tokens
        self.batch_tokens += new_tokens
        self.batch_done += rows_done
        if self.count_rows and rows_done and self.bar is not None:
            self.bar.update(rows_done)
        now = self.clock()
        if rows_done or now - self.last_draw >= self.interval:
            self.last_draw = now
            self.draw()

    def describe(self) -> str:
        """"batch 3/8 rows done, 1,234 tokens, 45.6 tokens/s" (the rows part when a batch size is known)."""
        seconds = max(self.clock() - self.batch_start, 1e-9)
        rows = f"batch {self.batch_done}/{self.batch_rows} rows done, " if self.batch_rows else ""
        return f"{rows}{self.batch_tokens:,} tokens, {self.batch_tokens / seconds:.1f} tokens/s"

    def draw(self) -> None:
        if self.bar is not None:
            head = self.extra() if self.extra is not None else ""
            self.bar.set_postfix_str(f"{head}, {self.describe()}" if head else self.describe())


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes the keyword argument `name` (a generator written before the hook existed does not)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def plan_warning(sequences: int, max_new_tokens: int, device: str, what: str) -> str | None:
    """A warning when `sequences` of up to `max_new_tokens` new tokens each are a lot for `device` ("cpu",
    "cuda:0", ...); `what` says how the sequences come about ("1 problem x 16 samples x 2 arms"). None when
    the run is not large for the device."""
    total = sequences * max_new_tokens
    kind = str(device).split(":")[0]
    if total <= LARGE_RUN_TOKENS.get(kind, LARGE_RUN_TOKENS_DEFAULT):
        return None
    from .wording import plural

    return (f"this run generates {plural(sequences, 'sequence')} ({what}) of up to "
            f"{max_new_tokens:,} new tokens each: up to {total:,} tokens, a lot for {kind}; --limit, --n-samples "
            "and --max-new-tokens make it smaller")
