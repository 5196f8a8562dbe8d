"""Compile StepFlow's fused decoding kernels for a GPU architecture, on a machine without a GPU.

Triton's interpreter (the CPU tests) runs the kernels' Python, not the compiler: a kernel can pass every CPU
test and still fail to compile for a real GPU (an unsupported tl.dot shape, a type error in the lowering). This
compiles them ahead of time for sm_90 (H100/H200) with the ptxas that ships in the triton wheel, and checks
that the tl.dot form really lowers to tensor-core mma instructions.

  python scripts/compile_flow_kernels.py          # the variants StepFlow launches by default (bf16 on a GPU)
  python scripts/compile_flow_kernels.py --all    # every dtype / product form / finish / sink combination

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every variant (about a minute uncached)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    warnings.filterwarnings("ignore")
    import triton

    from stepscope.flow import kernels

    split, combine = kernels._kernels()
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
