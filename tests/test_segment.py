"""The segmenter: online equals offline, exact token spans, character offsets, against a slow reference."""

import random
import re

import pytest
from conftest import shared_trace_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepscope.formats import get_format, template_has_assistant_start
from stepscope.segment import Segmenter
from stepscope.tokens import token_bytes
from stepscope.trace import Trace

# -- the reference: docs/method.md §2 re-derived on a whole token sequence, slowly and obviously ----------------
# It shares no code with stepscope.segment: it reads the whole decoded text at once, finds the markers with
# str.find, the cuts with plain loops over characters, and maps characters to tokens through byte offsets.
# Its only inputs from stepscope are the bytes of each token (stepscope.tokens) and the marker strings.

def ref_weak(piece: str, min_chars: int) -> bool:
    """A piece that does not stand alone: shorter than min_chars once stripped, a bare number, or a markdown
    table row or separator line."""
    s = piece.strip()
    if len(s) < min_chars:
        return True
    # a bare number: an optional sign or "(", an optional currency sign, a digit, then digits, ",", "." or
    # white space, and an optional closing ".", ")", ":" or "%"
    body = s[1:] if s[0] in "-+(" else s
    body = body[1:] if body[:1] and body[0] in "$€£" else body
    if body[-1:] and body[-1] in ".):%":
        body = body[:-1]
    if body[:1].isdigit() and all(c.isdigit() or c in ",." or c.isspace() for c in body):
        return True
    # a table row: starts and ends with "|"; a separator: cells of 3+ dashes (with optional colons) between "|"
    if len(s) >= 2 and s[0] == "|" and s[-1] == "|":
        return True
    cells = s.removeprefix("|").removesuffix("|").split("|")

    def dashes(cell: str) -> bool:
        c = cell.strip()
        c = c.removeprefix(":").removesuffix(":")
        return len(c) >= 3 and set(c) == {"-"}
    return all(dashes(c) for c in cells)


def reference_segment(tokbytes: list[bytes], fmt, *, require_assistant: bool, split_question: bool = False):
    """(steps, char_ends, starts) of a whole token sequence under docs/method.md §2.

    steps: [(kind, index, token_start, token_end, char_start, char_end, text, closed_at, by_end)], where
    closed_at is the token holding the character that confirmed the step's end (a cut's following white space or
    second newline, a marker's last character, or the last token) and by_end says the end of the sequence
    closed it. starts: {"thinking": token or None, "summary": token or None}, the first token of each segment.
    """
    text = b"".join(tokbytes).decode("utf-8")  # valid UTF-8 in these tests
    T = len(tokbytes)
    # a character belongs to the token that holds its last byte
    token_byte_end = []
    total = 0
    for b in tokbytes:
        total += len(b)
        token_byte_end.append(total)
    owner, byte_pos, t = [], 0, 0  # owner[c]: the token holding character c
    for ch in text:
        byte_pos += len(ch.encode("utf-8"))
        while token_byte_end[t] < byte_pos:
            t += 1
        owner.append(t)
    char_ends = [0] * T  # char_ends[t]: the characters held by tokens 0 .. t
    for o in owner:
        char_ends[o] += 1
    for t in range(1, T):
        char_ends[t] += char_ends[t - 1]

    def first_end(marker: str | None, after: int) -> int | None:
        """The last character of the first occurrence of `marker` that ends after character `after`."""
        if not marker:
            return None
        i = text.find(marker, max(0, after + 2 - len(marker)))
        return None if i < 0 else i + len(marker) - 1

    # segments: each marker is matched on the text; the token holding its last character ends the segment
    armed = -1
    if require_assistant:
        ends = [e for e in (first_end(a, -1) for a in fmt.assistant_start) if e is not None]
        armed = min(ends) if ends else len(text)
    bounds = []  # (kind, first token, last character of the marker that opened it)
    e_think, e_sum = first_end(fmt.think_start, armed), first_end(fmt.summary_start, armed)
    if e_think is not None and (e_sum is None or e_think <= e_sum):
        bounds.append(("thinking", owner[e_think] + 1, e_think))
        e_end = first_end(fmt.think_end, e_think)
        if e_end is not None:
            bounds.append(("summary", owner[e_end] + 1, e_end))
    elif e_sum is not None:
        bounds.append(("thinking", owner[e_sum] + 1, e_sum))  # an empty thinking
        bounds.append(("summary", owner[e_sum] + 1, e_sum))
    starts = {"thinking": None, "summary": None, **{k: a for k, a, _ in bounds}}
    kinds = ["question", *[k for k, _, _ in bounds]]
    firsts = [0, *[a for _, a, _ in bounds]]
    lasts = firsts[1:] + [T]

    steps = []
    for kind, a, b in zip(kinds, firsts, lasts):
        if a >= b:
            continue
        ca, cb = (char_ends[a - 1] if a > 0 else 0), char_ends[b - 1]
        seg = text[ca:cb]
        confirm = {}  # cut (segment character of a step's last character) -> the character that confirmed it
        if kind != "question" or split_question:
            last_nonspace, newlines = -1, 0
            for i, ch in enumerate(seg):
                if not ch.isspace():
                    last_nonspace, newlines = i, 0
                    continue
                if kind != "summary" and i > 0 and seg[i - 1] in ".!?":
                    confirm.setdefault(i - 1, i)  # a sentence end followed by white space
                if ch == "\n":
                    newlines += 1
                    if newlines == 2 and last_nonspace >= 0:
                        confirm.setdefault(last_nonspace, i)  # a blank line
        min_chars = 10 if kind == "summary" else 15
        start_tok, piece_start = a, 0
        for c in sorted(confirm):
            piece, piece_start = seg[piece_start:c + 1], c + 1
            end_tok = owner[ca + c] + 1
            if end_tok <= start_tok or ref_weak(piece, min_chars):
                continue  # joins the step that follows
            steps.append([kind, start_tok, end_tok, owner[ca + confirm[c]], False])
            start_tok = end_tok
        if start_tok < b:  # the last piece of a segment always ends a step
            steps.append([kind, start_tok, b, b - 1, kind == kinds[-1]])  # a marker, or the end, closes it
    out = []
    for i, (kind, a, b, closed_at, by_end) in enumerate(steps):
        c0, c1 = (char_ends[a - 1] if a > 0 else 0), char_ends[b - 1]
        out.append((kind, i, a, b, c0, c1, text[c0:c1], closed_at, by_end))
    return out, char_ends, starts


def reference_of(tok, ids, fmt_name="think", split_question=False):
    fmt = get_format(fmt_name, tok)
    tb = token_bytes(tok)
    return reference_segment([tb(i) for i in ids], fmt, require_assistant=template_has_assistant_start(fmt, tok),
                             split_question=split_question)


def spans(steps):
    return [(s.kind, s.index, s.token_start, s.token_end, s.char_start, s.char_end, s.text, s.closed_at)
            for s in steps]


def ref_spans(ref_steps):
    return [r[:8] for r in ref_steps]


def run_chunks(tok, ids, chunks, fmt="think", split_question=False):
    seg = Segmenter(tok, fmt, split_question=split_question)
    got = []
    i = 0
    for n in chunks:
        got += seg.feed(ids[i:i + n])
        i += n
    got += seg.feed(ids[i:])
    got += seg.finish()
    return seg, got


ALPHABET = st.sampled_from(list("abc xyz..!?  \n\n\t12345,;|-é中😀") + [". ", ".\n\n", "3.14", " Wait.", "\n\n",
                                                                  "| a | b |", "<think>", "</think>", "|---|"])
TEXTS = st.lists(ALPHABET, min_size=0, max_size=60).map("".join)


def check_against_reference(tok, ids, fmt="think", split_question=False) -> Trace:
    """Fed one token at a time, the segmenter returns each of the reference's steps from the call that fed the
    token confirming it, and its public state (segment, boundaries, num_tokens) follows the reference; offline
    (Trace.from_ids) it gives the same steps and character offsets."""
    ref, char_ends, starts = reference_of(tok, ids, fmt, split_question)
    by_token: dict[int, list] = {}
    for r in ref:
        if not r[8]:
            by_token.setdefault(r[7], []).append(r[:8])
    seg = Segmenter(tok, fmt, split_question=split_question)
    for i, tid in enumerate(ids):
        assert spans(seg.feed((tid,))) == by_token.get(i, []), f"token {i}"
        known = {k: (a if a is not None and a <= i + 1 else None) for k, a in starts.items()}
        assert seg.boundaries == known and seg.num_tokens == i + 1
        assert seg.segment == ("summary" if known["summary"] is not None else
                               "thinking" if known["thinking"] is not None else "question")
    assert spans(seg.finish()) == [r[:8] for r in ref if r[8]]
    assert spans(seg.steps) == ref_spans(ref)
    trace = Trace.from_ids(tok, ids, fmt=fmt, split_question=split_question)
    assert spans(trace.steps) == ref_spans(ref) and trace.token_char_ends == char_ends
    return trace


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(thinking=TEXTS, summary=TEXTS, chunk_seed=st.integers(0, 10_000), split=st.booleans(), nl=st.booleans())
def test_online_equals_offline_and_reference(think_tokenizer, thinking, summary, chunk_seed, split, nl):
    tok = think_tokenizer
    text = ("<|im_start|>user\nQ. Yes?\n\nok<|im_end|>\n<|im_start|>assistant\n<think>" + "\n" * nl + thinking
            + "</think>" + summary)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    trace = check_against_reference(tok, ids, "think", split)
    trace.validate()  # tiling, segments, texts concatenate
    assert trace.text == text  # byte-level BPE round trip
    rng = random.Random(chunk_seed)
    for chunks in ([], [rng.randint(1, 7) for _ in range(len(ids))]):  # all at once; in random chunks
        assert spans(run_chunks(tok, ids, chunks, split_question=split)[1]) == spans(trace.steps)


HARMONY_TEXTS = st.lists(st.sampled_from(list("ab .!?\n\n7") + [" Wait.", "<|end|>", "<|channel|>final<|message|>",
                                                                 "<|start|>assistant"]),
                         max_size=40).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(thinking=HARMONY_TEXTS, summary=HARMONY_TEXTS, analysis=st.booleans())
def test_harmony_online_equals_offline_and_reference(harmony_tokenizer, thinking, summary, analysis):
    tok = harmony_tokenizer
    text = "<|start|>user<|message|>Q?<|end|><|start|>assistant"
    if analysis:
        text += "<|channel|>analysis<|message|>" + thinking + "<|end|><|start|>assistant"
    text += "<|channel|>final<|message|>" + summary
    ids = tok(text, add_special_tokens=False)["input_ids"]
    check_against_reference(tok, ids, "harmony").validate()


def test_a_marker_that_ends_inside_a_token(think_tokenizer):
    """Markers are matched on the text: a start marker whose last character shares a token with the beginning
    of the end marker ("<think></think>" is tokenized "<", "think", "></", "think", ">") still lets the end
    marker close the thinking."""
    tok = think_tokenizer
    text = "<|im_start|>assistant\n<think></think>The answer is long enough."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "></" in tok.convert_ids_to_tokens(ids)
    trace = check_against_reference(tok, ids, "think")
    assert trace.thinking_closed and trace.steps_of("summary")[0].text == "The answer is long enough."


def test_char_offsets_follow_the_byte_holding_token(think_tokenizer):
    tok = think_tokenizer
    text = "<think>\n中文 😀 naïve. 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 is fun!\n\nÅngström.</think>ok 🎉"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tb = [tok.convert_ids_to_tokens(i) for i in ids]
    assert any(len(p) == 1 and ord(p) > 127 for p in tb) or len(ids) > len(text) // 2  # bytes are split somewhere
    from stepscope.tokens import token_bytes

    raw = [token_bytes(tok)(i) for i in ids]
    trace = Trace.from_ids(tok, ids, fmt="think")
    for t in range(len(ids)):
        # independent: the complete characters in the bytes of tokens 0..t
        expect = len(b"".join(raw[:t + 1]).decode("utf-8", errors="ignore"))
        assert trace.token_char_ends[t] == expect
    assert trace.text == text


def test_period_between_digits_and_weak_pieces(think_tokenizer):
    tok = think_tokenizer
    resp = ("The value is 3.14159 and that matters a lot. Wait. Let me recompute it carefully now.\n\n"
            "42.\n\nSo the final value stays the same as before.\n</think>\n\nAnswer: 3.14\n\nDone, yes.")
    trace = Trace.from_text(tok, question="Q", response=resp)
    think = [s.text for s in trace.steps_of("thinking")]
    assert think[0] == "\nThe value is 3.14159 and that matters a lot."  # the "\n" after <think> is its own token
    assert think[1] == " Wait. Let me recompute it carefully now."  # "Wait." is short: joins the next
    assert think[2] == "\n\n42.\n\nSo the final value stays the same as before."  # bare number joins too
    assert think[3] == "\n</think>"
    summ = [s.text for s in trace.steps_of("summary")]
    assert summ == ["\n\nAnswer: 3.14", "\n\nDone, yes."]


def test_every_shared_trace(traces_available, chatml_tokenizer):
    recs = shared_trace_records()
    assert len(recs) == 46
    for rec in recs:
        tr = Trace.from_text(chatml_tokenizer, question=rec["problem"], response=rec["response"],
                             meta={"id": rec["id"]})
        tr.validate()
        assert "".join(s.text for s in tr.steps) == tr.text
        assert tr.thinking_closed and len(tr.steps_of("thinking")) >= 2 and tr.steps_of("summary")
        # online, one token at a time, and offline: the reference's steps
        check_against_reference(chatml_tokenizer, tr.token_ids, "think")


@pytest.mark.parametrize("n", [2000, 8000])
def test_linear_time(think_tokenizer, n):
    import time

    tok = think_tokenizer
    sent = "We add the two numbers and carry the one. "
    ids = tok("<think>\n" + sent * (n // 10), add_special_tokens=False)["input_ids"]
    seg = Segmenter(tok, "think", require_assistant=False)
    t0 = time.perf_counter()
    for i in ids:
        seg.feed((i,))
    per_token = (time.perf_counter() - t0) / len(ids)
    assert per_token < 200e-6, f"{per_token * 1e6:.1f} us per token"
    assert len(seg.steps) >= n // 10 - 1


def test_white_space_is_str_isspace():
    """A sentence ends at ". " for exactly the characters Python calls white space (str.isspace), whether the
    space is a token of its own, opens a token or sits inside one. Candidates: every character that str.isspace,
    the regular expression class \\s or the Unicode space, separator, control and format categories name."""
    import sys
    import unicodedata

    candidates = [chr(c) for c in range(sys.maxunicode + 1)
                  if chr(c).isspace() or re.fullmatch(r"\s", chr(c))
                  or unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp", "Cc", "Cf")]
    assert len(candidates) > 200
    first, second = "This first sentence is long enough.", "And the second one is long enough too."
    for ch in candidates:
        for pieces in (["<think>", first, ch, second], ["<think>", first, ch + second],
                       ["<think>", first + ch + "And", second[3:]]):
            vocab = {i: p.encode("utf-8") for i, p in enumerate(pieces)}
            seg = Segmenter(None, "think", require_assistant=False, tokbytes=vocab.__getitem__)
            seg.feed(range(len(pieces)))
            seg.finish()
            thinking = [s for s in seg.steps if s.kind == "thinking"]
            assert len(thinking) == (2 if ch.isspace() else 1), (hex(ord(ch)), pieces)
