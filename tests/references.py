"""Slow, obviously-correct references of StepFlow's mathematics (docs/method.md §5), written from the method, sharing
no code with stepscope: one query at a time, in Python floats (float64), keys listed one by one."""

from __future__ import annotations

import math


def reference_oeb(z, v, groups, tau_b, sink=None):
    """One query and head: the softmax over logits z (+ an optional sink logit whose mass belongs to O), then the
    KL projection onto {q(O) = p(O), q(B) = tau_B} written as the method's logit shifts (add log(tau_B / p(B)) to
    B's logits and log(tau_S / p(S)) to S's, tau_S = 1 - p(O) - tau_B), only where p(B) < tau_B, p(B) > 0 and
    tau_S > 0. z: K logits (-inf: a hidden key); v: K value vectors; groups: K of 0 (B), 1 (S), 2 (O).
    Returns (output [D] list, fired, (p(B), p(S)) before, (p(B), p(S)) after)."""
    z = [float(x) for x in z]
    extra = [float(sink)] if sink is not None else []

    def softmax(logits):
        m = max(logits)
        e = [math.exp(x - m) if x != -math.inf else 0.0 for x in logits]
        tot = sum(e)
        return [x / tot for x in e]

    p = softmax(z + extra)
    pb = sum(p[k] for k, g in enumerate(groups) if g == 0)
    ps = sum(p[k] for k, g in enumerate(groups) if g == 1)
    tau_s = pb + ps - tau_b
    fired = 0 < pb < tau_b and tau_s > 0
    if fired:
        shift = {0: math.log(tau_b / pb), 1: math.log(tau_s / ps), 2: 0.0}
        p = softmax([z[k] + shift[g] for k, g in enumerate(groups)] + extra)
    after = (sum(p[k] for k, g in enumerate(groups) if g == 0), sum(p[k] for k, g in enumerate(groups) if g == 1))
    out = [sum(p[k] * float(v[k][d]) for k in range(len(z))) for d in range(len(v[0]))]
    return out, fired, (pb, ps), after


def reference_geometry(q, lo, hi, t0, s0, window, tau_max):
    """One query at position q of a row whose real keys are [lo, hi), thinking from t0, summary from s0:
    ((segment of B, segment of S), tau_B), or (None, 0.0) where OEB does not act. The visible keys are listed
    one by one (real, causal, inside a sliding window of `window` keys) and counted by segment."""
    def seg(k):
        return 2 if k >= s0 else 1 if k >= t0 else 0

    own = seg(q)
    if own == 0 or not lo <= q < hi:
        return None, 0.0
    visible = [k for k in range(lo, q + 1) if window is None or k > q - window]
    bridge = own - 1  # thinking queries bridge to the question, summary queries to the thinking
    n_b = sum(1 for k in visible if seg(k) == bridge)
    n_s = sum(1 for k in visible if seg(k) == own)
    if n_b == 0:
        return None, 0.0
    return (bridge, own), min(math.sqrt(n_b / (n_b + n_s)), tau_max)
