"""Compile StepFlow's fused decoding kernels for a GPU architecture, on a machine without a GPU.

Triton's interpreter (the CPU tests) runs the kernels' Python, not the compiler: a kernel can pass every CPU
test and still fail to compile for a real GPU (an unsupported tl.dot shape, a type error in the lowering). This
compiles them ahead of time for sm_90 (H100/H200) with the ptxas that ships in the triton wheel, and checks
that the tl.dot form really lowers to tensor-core mma instructions.

  python scripts/compile_flow_kernels.py          # the variants StepFlow launches by default (bf16 on a GPU)
  python scripts/compile_flow_kernels.py --all    # every dtype / product form / finish / sink combination
  python scripts/compile_flow_kernels.py --ptxas-info   # registers and spills (ptxas -v) of the split kernel's
                                                        # bf16 variants: default, 8 warps, 32 keys per block

Run it without TRITON_INTERPRET in the environment. Exit status 0 when every variant compiled.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def compile_variant(fn, types: dict, const: dict, num_warps: int, arch: int) -> str:
    """The PTX of one specialization of a @triton.jit function (args not in `types` or `const` are i32)."""
    import triton
    from triton.backends.compiler import GPUTarget

    params = inspect.signature(fn.fn).parameters
    sig = {n: ("constexpr" if n in const else types.get(n, "i32")) for n in params}
    try:  # the keyword was renamed across triton 3.x
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(const))
    except TypeError:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constants=dict(const))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm["ptx"]


def ptxas_info(ptx: str, arch: int) -> str:
    """ptxas -v's resource line (registers, spills) for this PTX, with the newest ptxas the triton wheel ships."""
    import glob
    import subprocess
    import tempfile

    import triton

    bins = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*")))
    errs = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for exe in reversed(bins):  # ptxas-blackwell (newer) reads the PTX versions newer tritons write
            r = subprocess.run([exe, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(d, "k.o")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                lines = [ln.split("info    :")[-1].strip() for ln in (r.stdout + r.stderr).splitlines()
                         if "registers" in ln or "spill" in ln]
                return "; ".join(lines)
            errs.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}")
    return "ptxas failed: " + " | ".join(errs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every variant (about a minute uncached)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    ap.add_argument("--ptxas-info", action="store_true", help="registers and spills of the bf16 split kernel")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    warnings.filterwarnings("ignore")
    import triton

    from stepscope.flow import kernels

    split, combine = kernels._kernels()
    if args.ptxas_info:
        types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "seg_ptr": "*i8", "qg_ptr": "*i32",
                 "tau_ptr": "*fp32", "sink_ptr": "*bf16", "out_ptr": "*bf16", "stats_ptr": "*fp32",
                 "ws_ptr": "*fp32", "scaling": "fp32"}
        for name, bk, nw in (("default: 64 keys/block, 4 warps", 64, 4), ("64 keys/block, 8 warps", 64, 8),
                             ("32 keys/block, 4 warps", 32, 4)):
            for final in (True, False):
                const = dict(NR=16, BK=bk, BD=128, BDV=128, FINAL=final, HAS_SINK=False, HAS_STATS=True,
                             DOT=True, DOT_F32=False)
                info = ptxas_info(compile_variant(split, types, const, nw, args.arch), args.arch)
                print(f"tl.dot bf16, head dim 128, {name}, {'one split' if final else 'split-K'}: {info}")
        return 0
    dtypes = ("bf16", "fp32") if args.all else ("bf16",)
    forms = (True, False) if args.all else (True,)
    n = 0
    for dt, dot, final, sink in itertools.product(dtypes, forms, (True, False), (True, False) if args.all else (False,)):
        types = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "seg_ptr": "*i8", "qg_ptr": "*i32",
                 "tau_ptr": "*fp32", "sink_ptr": f"*{dt}", "out_ptr": f"*{dt}", "stats_ptr": "*fp32",
                 "ws_ptr": "*fp32", "scaling": "fp32"}
        const = dict(NR=16 if dot else 8, BK=64 if dot else 16, BD=128, BDV=128, FINAL=final, HAS_SINK=sink,
                     HAS_STATS=True, DOT=dot, DOT_F32=dt == "fp32")
        ptx = compile_variant(split, types, const, 4 if dot else 8, args.arch)
        if dot and dt != "fp32" and "mma" not in ptx:
            sys.exit(f"the tl.dot form ({dt}) compiled without tensor-core mma instructions")
        n += 1
    for dt in dtypes:
        types = {"ws_ptr": "*fp32", "tau_ptr": "*fp32", "sink_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                 "stats_ptr": "*fp32"}
        compile_variant(combine, types, dict(NR=16, BDV=128, HAS_SINK=False, HAS_STATS=True), 4, args.arch)
        n += 1
    print(f"triton {triton.__version__}: {n} kernel variants compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
