"""Compile StepFlow's fused decoding kernels for a GPU architecture, on a machine without a GPU.

Triton's interpreter (the CPU tests) runs the kernels' Python, not the compiler: a kernel can pass every CPU
test and still fail to compile for a real GPU (an unsupported tl.dot shape, a type error in the lowering). This
compiles them ahead of time for sm_90 (H100/H200) with the ptxas that ships in the triton wheel, and checks
that the tl.dot form really lowers to tensor-core mma instructions.

  python scripts/compile_flow_kernels.py          # the variants StepFlow launches by default (bf16 on a GPU),
                                                  # over a dense cache and over vLLM's paged cache
  python scripts/compile_flow_kernels.py --all    # every dtype / product form / finish / sink / cache form
  python scripts/compile_flow_kernels.py --ptxas-info   # registers and spills (ptxas -v) of the split kernel's
                                                        # bf16 variants: default, 8 warps, 32 keys per block,
                                                        # paged with 8 (its default) and 4 warps

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


PAGE_SIZE = 16  # vLLM's default KV-cache block size


def split_types(dt: str) -> dict:
    """The pointer and float argument types of the split kernel for input dtype `dt` (the rest are i32)."""
    return {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "seg_ptr": "*i8", "qg_ptr": "*i32",
            "tau_ptr": "*fp32", "sink_ptr": f"*{dt}", "out_ptr": f"*{dt}", "stats_ptr": "*fp32", "ws_ptr": "*fp32",
            "bt_ptr": "*i32", "scaling": "fp32"}


def split_constants(dt: str, dot: bool, final: bool, sink: bool, paged: bool, BK: int | None = None) -> dict:
    """The split kernel's constexprs for head dim 128 as plan_decode / plan_decode_paged choose them (with dot:
    16 rows, 64 keys per block; broadcast: 8 rows (n_rep 7), 16 keys per block)."""
    return dict(NR=16 if dot else 8, BK=BK or (64 if dot else 16), BD=128, BDV=128, FINAL=final, HAS_SINK=sink,
                HAS_STATS=True, DOT=dot, DOT_F32=dt == "fp32", PAGED=paged, PAGE_SIZE=PAGE_SIZE if paged else 1)


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

    from stepscope.core import kernels

    split, combine = kernels._kernels()
    if args.ptxas_info:
        paged_name = f"paged cache ({PAGE_SIZE}-key blocks), 64 keys/block"
        for name, bk, nw, paged in (("default: 64 keys/block, 4 warps", 64, 4, False),
                                    ("64 keys/block, 8 warps", 64, 8, False), ("32 keys/block, 4 warps", 32, 4, False),
                                    (f"{paged_name}, 8 warps (its default)", 64, 8, True),
                                    (f"{paged_name}, 4 warps", 64, 4, True)):
            for final in (True, False):
                const = split_constants("bf16", True, final, False, paged, BK=bk)
                info = ptxas_info(compile_variant(split, split_types("bf16"), const, nw, args.arch), args.arch)
                print(f"tl.dot bf16, head dim 128, {name}, {'one split' if final else 'split-K'}: {info}")
        return 0
    dtypes = ("bf16", "fp32") if args.all else ("bf16",)
    forms = (True, False) if args.all else (True,)
    sinks = (True, False) if args.all else (False,)
    n = n_paged = 0
    for dt, dot, final, sink, paged in itertools.product(dtypes, forms, (True, False), sinks, (False, True)):
        num_warps = 8 if paged or not dot else 4  # as plan_decode / plan_decode_paged choose them here
        ptx = compile_variant(split, split_types(dt), split_constants(dt, dot, final, sink, paged), num_warps,
                              args.arch)
        if dot and dt != "fp32" and "mma" not in ptx:
            sys.exit(f"the tl.dot form ({dt}{', paged' if paged else ''}) compiled without tensor-core mma "
                     "instructions")
        n += 1
        n_paged += paged
    for dt in dtypes:
        types = {"ws_ptr": "*fp32", "tau_ptr": "*fp32", "sink_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                 "stats_ptr": "*fp32"}
        compile_variant(combine, types, dict(NR=16, BDV=128, HAS_SINK=False, HAS_STATS=True), 4, args.arch)
        n += 1
    print(f"triton {triton.__version__}: {n} kernel variants compiled for sm_{args.arch} ({n_paged} of them reading "
          f"a paged cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
