"""The fused decoding kernels compile for a real GPU (sm_90), here without one: the CPU tests run them in
Triton's interpreter, which never runs the compiler (scripts/compile_flow_kernels.py)."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import require_triton

require_triton()
ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_flow_kernels.py")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "5 kernel variants compiled for sm_90" in p.stdout
    assert any(tmp_path.rglob("*.cubin"))


def test_compile_script_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_flow_kernels.py")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode != 0 and "unset TRITON_INTERPRET" in p.stderr
