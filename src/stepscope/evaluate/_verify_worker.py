"""A math-verify worker process: JSON requests on stdin, JSON answers on stdout, one per line.

Started by stepscope.evaluate.grading, which enforces the deadline from outside (it kills this process when
an answer is late), so math-verify runs here with its own signal-based timeouts switched off. This file
imports nothing from stepscope, so it runs from its path with any interpreter that has math-verify.
Request: {"gold": str, "pred": str}. Answer: {"correct": bool, "answer": str | null} or {"error": str}.
"""

import json
import logging
import sys


def main() -> int:
    logging.disable(logging.WARNING)  # math-verify warns on every call made without its own timeout
    try:
        from math_verify import parse, verify
    except ImportError as e:
        print(json.dumps({"error": f"math-verify is not importable: {e}"}), flush=True)
        return 1
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            gold = parse(req["gold"], parsing_timeout=None)
            pred = parse(req["pred"], parsing_timeout=None)
            correct = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
            answer = next((p for p in reversed(pred) if isinstance(p, str)), None)
            if answer is None and pred:
                answer = str(pred[0])
            out = {"correct": correct, "answer": answer}
        except Exception as e:  # noqa: BLE001  (a bad expression is a wrong answer, never a crash)
            out = {"correct": False, "answer": None, "error": f"{type(e).__name__}: {e}"[:300]}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
