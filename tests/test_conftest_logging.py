"""The test suite's end leaves no logging into pytest's closed capture: a library that, like vLLM, binds a log
handler to sys.stdout at import and logs when its engines shut down at interpreter exit printed
"--- Logging error --- ValueError: I/O operation on closed file" once per message (conftest.py's
pytest_unconfigure). A stand-in `vllm` package does what vLLM does, without vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

FAKE_VLLM = '''
import atexit, logging, sys
handler = logging.StreamHandler(sys.stdout)  # as vLLM's logging config: "ext://sys.stdout", read at import
logger = logging.getLogger("vllm")
logger.addHandler(handler)
logger.setLevel(logging.DEBUG)
logger.propagate = False
def _shutdown():
    for i in range(3):
        logger.info("engine core %d shutting down", i)
    logger.warning("a warning at exit")
    logger.error("an error at exit")
atexit.register(_shutdown)
'''


def test_vllm_like_logging_at_exit_prints_no_logging_errors(tmp_path):
    (tmp_path / "fakes" / "vllm").mkdir(parents=True)
    (tmp_path / "fakes" / "vllm" / "__init__.py").write_text(FAKE_VLLM, encoding="utf-8")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "test_uses_vllm.py").write_text("import vllm\n\ndef test_it():\n    assert vllm\n",
                                                          encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fakes"), str(TESTS),
                                                         os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-c", os.devnull, "--rootdir",
                        str(tmp_path / "work"), str(tmp_path / "work")], cwd=tmp_path / "work", env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout + p.stderr
    both = p.stdout + p.stderr
    assert "Logging error" not in both and "closed file" not in both, both
    assert "shutting down" not in both and "warning at exit" not in both  # the exit's chatter is not printed
    assert "an error at exit" in p.stderr  # errors still are, on the real stderr
