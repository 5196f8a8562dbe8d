"""How messages say counts: "1 trace", "2 traces" (one place, so no message says "1 samples")."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """`n` and the word in the number it needs: plural(1, "sample") -> "1 sample", plural(2, "query") with
    many="queries" -> "2 queries"; thousands are grouped (10,080)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
