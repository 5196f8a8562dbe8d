"""The exact bytes of every token id, so that text and character offsets follow the real token sequence."""

from __future__ import annotations

import functools
import weakref


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenBytes:
    """Maps a token id to its bytes. Knows byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM, o200k),
    SentencePiece ("▁" and <0xNN> byte fallback) and added tokens; anything else falls back to decode()."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._added = {int(i): str(t) for i, t in added.items()}
        probe = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a\n", add_special_tokens=False))
        joined = "".join(p for p in probe if p)
        if "Ġ" in joined or "Ċ" in joined:
            self.mode = "bytelevel"
        elif "▁" in joined or "<0x0A>" in joined:
            self.mode = "sentencepiece"
        else:
            self.mode = "decode"

    def __call__(self, tid: int) -> bytes:
        b = self._cache.get(tid)
        if b is None:
            b = self._compute(tid)
            self._cache[tid] = b
        return b

    def _compute(self, tid: int) -> bytes:
        if tid in self._added:
            return self._added[tid].encode("utf-8")
        if self.mode == "decode":
            return self.tokenizer.decode([tid], clean_up_tokenization_spaces=False).encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(tid)
        if piece is None:
            raise ValueError(f"token id {tid} is outside the tokenizer's vocabulary")
        if self.mode == "bytelevel":
            dec = _byte_decoder()
            try:
                return bytes(dec[c] for c in piece)
            except KeyError:  # a vocabulary entry stored as plain text
                return piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode("utf-8")


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_bytes(tokenizer) -> TokenBytes:
    """The (cached) TokenBytes of a tokenizer."""
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn token ids into text")
    try:
        tb = _CACHE.get(tokenizer)
    except TypeError:
        return TokenBytes(tokenizer)
    if tb is None:
        tb = TokenBytes(tokenizer)
        _CACHE[tokenizer] = tb
    return tb
