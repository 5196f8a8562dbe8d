"""Grading: summary-only, never-closed thinking is wrong, math-verify equivalence, deadlines without signals."""

import concurrent.futures as cf
import multiprocessing
import threading
import time

import pytest

from stepscope.evaluate.grading import (
    extract_choice,
    grade_choice,
    grade_math,
    grade_math_detail,
    summary_of,
    verify_answer,
)
from stepscope.trace import Trace

pytest.importorskip("math_verify")

HANG = r"The answer is \boxed{9^{9^{9^{9}}}}."  # sympy tries to evaluate this tower: minutes, if let run


def test_summary_of_plain_strings():
    assert summary_of("thinking...</think>\n\nfinal") == "\n\nfinal"
    assert summary_of("a </think> b </think> c") == " c"  # the last end marker
    assert summary_of("still thinking, 42") is None  # starts inside the thinking (R1 prompt) and never closed
    assert summary_of("no thinking here: 42", starts_in_thinking=False) == "no thinking here: 42"
    assert summary_of("<think> started, never ended", starts_in_thinking=False) is None
    assert summary_of("x [/THINK] y", think_end="[/THINK]") == " y"
    harmony = ("<|channel|>analysis<|message|>think 41<|end|><|start|>assistant<|channel|>final<|message|>"
               "It is \\boxed{42}.<|return|>")
    assert summary_of(harmony) == "It is \\boxed{42}."


def test_grade_math_uses_only_the_summary():
    assert grade_math("18", "16 - 3 - 4 = 9, 9 * 2 = 18.\n</think>\n\nShe makes \\boxed{18} dollars.")
    assert not grade_math("18", "so \\boxed{18}.\n</think>\n\nShe makes \\boxed{17} dollars.")
    assert not grade_math("18", "so \\boxed{18}. Out of tokens")  # thinking never closed
    assert not grade_math("18", "so \\boxed{18}.</think>")  # closed, but nothing after it
    d = grade_math_detail("18", "x</think>The answer is \\boxed{18}.")
    assert d.correct and d.answer == "18" and d.thinking_closed and not d.timed_out
    d = grade_math_detail("18", "x \\boxed{18}")
    assert not d.correct and not d.thinking_closed and d.answer is None


@pytest.mark.parametrize("gold,pred,ok", [
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", True),
    ("3, 5, 7", "so \\boxed{3,5,7}", True),
    ("10\\sqrt{2}", "\\boxed{10\\sqrt2}", True),
    ("6 - 5i", "\\boxed{6-5i}", True),
    ("204", "The walk takes $204$ minutes.", True),
    ("1,000", "\\boxed{1000}", True),
    ("204", "\\boxed{205}", False),
    ("\\frac{14}{3}", "\\boxed{\\frac{3}{14}}", False),
])
def test_grade_math_equivalences(gold, pred, ok):
    assert grade_math(gold, "thinking</think>\n" + pred) is ok


def test_grade_math_on_a_trace(think_tokenizer):
    t = Trace.from_text(think_tokenizer, question="What is 6 * 7?",
                        response="6 * 7 = 42. I'm sure.\n</think>\n\nThe answer is \\boxed{42}.")
    assert grade_math("42", t)
    assert not grade_math("41", t)
    cut = Trace.from_text(think_tokenizer, question="What is 6 * 7?", response="6 * 7 = \\boxed{42}. Let me")
    assert not cut.thinking_closed
    assert not grade_math("42", cut)


def test_timeout_is_enforced_and_the_pool_recovers():
    t0 = time.monotonic()
    g = verify_answer("5", HANG, timeout=1.0)
    assert g.timed_out and not g.correct
    assert time.monotonic() - t0 < 30  # startup of a fresh helper plus the 1 s deadline
    assert grade_math("5", "x</think>\\boxed{5}")  # a fresh helper takes over


def test_grading_from_threads_without_signals():
    cases = [("18", "a</think>\\boxed{18}", True), ("18", "a</think>\\boxed{19}", False),
             ("\\frac{1}{2}", "a</think>\\boxed{0.5}", True), ("2", "a</think>\\boxed{3}", False)] * 3
    seen_threads = set()

    def job(c):
        seen_threads.add(threading.get_ident())
        return grade_math(c[0], c[1])

    with cf.ThreadPoolExecutor(max_workers=4) as ex:
        got = list(ex.map(job, cases))
        hang = ex.submit(lambda: verify_answer("5", HANG, timeout=1.0)).result(timeout=60)
    assert got == [c[2] for c in cases]
    assert threading.get_ident() not in seen_threads
    assert hang.timed_out


def _grade_in_child(args):
    from stepscope.evaluate.grading import grade_math as gm

    return gm(*args)


def test_grading_inside_a_daemonic_process_pool():
    # multiprocessing.Pool workers are daemonic (they may not start multiprocessing children); ours are Popen
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        assert pool.map(_grade_in_child, [("7", "x</think>\\boxed{7}"), ("7", "x</think>\\boxed{8}")]) == [True, False]


@pytest.mark.parametrize("summary,letter", [
    ("The answer is \\boxed{B}.", "B"),
    ("So \\boxed{(C)}", "C"),
    ("\\boxed{\\text{D}}", "D"),
    ("The correct answer is (A).", "A"),
    ("Answer: D", "D"),
    ("First I thought \\boxed{A}, but the answer is (C).", "C"),
    ("The answer is \\boxed{B}. Option A was tempting.", "B"),
    ("No letter here.", None),
])
def test_extract_choice(summary, letter):
    assert extract_choice(summary) == letter


def test_grade_choice():
    assert grade_choice("B", "hmm A or B</think>\nThe answer is \\boxed{B}.")
    assert grade_choice("(b)", "hmm</think>\\boxed{B}")
    assert not grade_choice("B", "the answer is (B)</think>\nThe answer is \\boxed{C}.")
    assert not grade_choice("B", "the answer is \\boxed{B}")  # thinking never closed


@pytest.mark.parametrize("summary", ["The answer is a big number.", "Option A was tempting.", "answer is 42"])
def test_extract_choice_ignores_non_answers(summary):
    assert extract_choice(summary) is None
