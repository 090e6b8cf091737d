"""The triton backend's kernels compiled for NVIDIA GPUs on any machine (no GPU needed): Triton's own compiler and
the ptxas / cuobjdump binaries of its Linux wheel. For each state size CIPA uses (and N = 1), the block shape the
backend picks, compile time, registers per thread and bytes spilled to local memory, forward and backward, plain and
directional layout, per GPU architecture and dtype, and how many of its scans run in reverse (none should: Triton
versions disagree on the operand order of a compiled reverse scan). A kernel that does not compile, or one that
spills, shows here before it reaches a GPU. The integer arguments are compiled generic; a training specialises the
length and the channels per group on divisibility by 16, which can change the registers slightly.

Usage: python benchmarks/bench_triton_compile.py [--archs 80 90] [--dtypes float32 float64] [--states 1 2 4 16]
       [--json PATH]
Prints a markdown table and writes benchmarks/results/bench_triton_compile.json (or --json). Must run without
TRITON_INTERPRET (which replaces the kernels by the interpreter's). Compiles into an empty Triton cache (removed
after), so that the compile times are a first run's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_triton_compile.json"
GROUP_DIM = 192  # channels per scan direction in CIPA-tiny's first encoder stage: the widest blocks
ELEMENT_TYPES = {"float32": ("fp32", 4), "float64": ("fp64", 8)}


def resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """Registers per thread and spill (stack) bytes of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(usage.group(1)), "spill_bytes": int(usage.group(2))}


def compile_kernel(kernel, dtype: str, arch: int, directional: bool, block_d: int, block_n: int, block_l: int,
                   num_warps: int):
    """``kernel`` compiled for sm_``arch`` with pointers to ``dtype`` (fp32 / fp64), as training runs it: bias,
    softplus and (forward) the saved states on."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    flags = dict(HAS_BIAS=True, SOFTPLUS=True, SAVE_STATES=True, DIRECTIONAL=directional, BLOCK_D=block_d,
                 BLOCK_N=block_n, BLOCK_L=block_l)
    constants = {name: value for name, value in flags.items() if name in kernel.arg_names}
    signature = {name: "constexpr" if name in constants else "*i64" if name == "positions_ptr"
                 else "*" + dtype if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(ELEMENT_TYPES), default=["float32", "float64"])
    parser.add_argument("--states", type=int, nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("bench_triton_compile: unset TRITON_INTERPRET (the interpreter replaces the kernels)")
    cache = tempfile.mkdtemp(prefix="bench_triton_compile-")
    os.environ["TRITON_CACHE_DIR"] = cache  # read by Triton when it compiles
    try:
        rows = compile_all(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    import triton

    from nnunetv2_cipa.ops import triton_scan

    print(f"triton {triton.__version__}, {triton_scan.NUM_WARPS} warps, tiles of {triton_scan.BLOCK_L} steps, "
          f"{GROUP_DIM} channels per group\n")
    print("| dtype | N | block (channels, state) | GPU | layout | kernel | compile | registers | spilled |\n"
          "|---|---:|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['n_state']} | {r['block'][0]} x {r['block'][1]} | sm_{r['arch']} | {r['layout']} | "
              f"{r['kernel']} | {r['compile_s']:.1f} s | {r['registers']} | {r['spill_bytes']} B |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"triton": triton.__version__, "machine": platform.machine(),
                                     "python": sys.version.split()[0], "rows": rows}, indent=1))


def compile_all(args) -> list[dict]:
    """One row per (dtype, state size, GPU architecture, layout, kernel)."""
    import triton

    from nnunetv2_cipa.ops import triton_scan

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for dtype in args.dtypes:
        short, size = ELEMENT_TYPES[dtype]
        for n_state in args.states:
            block_d, block_n = triton_scan._blocks(GROUP_DIM, n_state, size)
            for arch, layout, (name, kernel) in itertools.product(
                    args.archs, ("plain", "directional"), (("forward", triton_scan._scan_forward_kernel),
                                                           ("backward", triton_scan._scan_backward_kernel))):
                begin = time.perf_counter()
                compiled = compile_kernel(kernel, short, arch, layout == "directional", block_d, block_n,
                                          triton_scan.BLOCK_L, triton_scan.NUM_WARPS)
                rows.append({"dtype": dtype, "n_state": n_state, "block": [block_d, block_n], "arch": arch,
                             "layout": layout, "kernel": name, "compile_s": time.perf_counter() - begin,
                             "reverse_scans": len(re.findall(r'"tt\.scan".*reverse = true', compiled.asm["ttir"])),
                             **resource_usage(compiled.asm["cubin"], str(cuobjdump))})
    return rows


if __name__ == "__main__":
    main()
