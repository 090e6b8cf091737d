"""Compile time of mamba-ssm's selective-scan extension for one GPU architecture, measured without a GPU.

The ``cuda`` scan backend needs mamba-ssm's ``selective_scan_cuda``, which pip compiles when no prebuilt wheel matches
the installed torch (docs/usage.md, "0. Install"). This compiles each of the extension's sources, as mamba-ssm's own
``setup.py`` lists them, with the nvcc / host-compiler flags that file passes (read from it, not copied), for
``--arch`` only (what ``benchmarks/gpu_check.sh`` builds), ``--jobs`` at a time: the compile time per source, the sum
(about one core's work) and the wall time, with a bound for other job counts. Only the objects are built, in a
temporary folder that is removed: the link step needs a CUDA build of torch's libraries, and takes seconds.

Needs nvcc (``--nvcc``, default the one on PATH) and torch's headers with their CUDA part: a CPU build of torch
lacks ``c10/cuda/impl/cuda_cmake_macros.h``; then pass ``--torch-include`` the ``torch/include`` folder of a CUDA
build's wheel (``unzip WHEEL 'torch/include/*'``).
Usage: python benchmarks/bench_mamba_build.py [--sdist .gpu/mamba_ssm-2.3.2.post1.tar.gz] [--arch 9.0] [--jobs N]
       [--std c++20] [--torch-include DIR] [--nvcc PATH] [--json PATH]
Prints a markdown table and writes benchmarks/results/bench_mamba_build.json (or --json).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_mamba_build.json"
EXTENSION = "selective_scan_cuda"
CUDA_HEADER = "c10/cuda/impl/cuda_cmake_macros.h"
JOB_COUNTS = (4, 8, 16, 32)  # the wall-time bounds printed besides the measured --jobs


class SetupPyChanged(Exception):
    """mamba-ssm's setup.py does not have the shape this benchmark reads."""


def _literal_list(node: ast.AST, setup_py: str, what: str) -> list[str]:
    try:
        value = ast.literal_eval(node)
    except ValueError as e:
        raise SetupPyChanged(f"{setup_py}: {what} is not a literal list ({e})") from e
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SetupPyChanged(f"{setup_py}: {what} is not a list of strings")
    return value


def build_recipe(setup_py_text: str, setup_py: str = "setup.py") -> dict:
    """What mamba-ssm's setup.py compiles for ``selective_scan_cuda``: {"sources": [...], "nvcc": [...], "cxx": [...]}
    (sources relative to the source root; nvcc flags without its -gencode list, which --arch replaces)."""
    tree = ast.parse(setup_py_text, setup_py)
    threads_flags, sources, nvcc, cxx = None, None, None, None
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "append_nvcc_threads":
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            if len(returns) == 1 and isinstance(returns[0].value, ast.BinOp):
                threads_flags = _literal_list(returns[0].value.right, setup_py, "append_nvcc_threads' flags")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "CUDAExtension":
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(keywords.get("name"), ast.Constant) and keywords["name"].value == EXTENSION:
                sources = _literal_list(keywords["sources"], setup_py, f"{EXTENSION}'s sources")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "append_nvcc_threads":
            argument = node.args[0] if node.args else None
            if isinstance(argument, ast.BinOp) and isinstance(argument.left, ast.List):
                nvcc = _literal_list(argument.left, setup_py, "the nvcc flags")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "cxx" and isinstance(value, ast.List):
                    cxx = _literal_list(value, setup_py, "the cxx flags")
    missing = [name for name, value in (("append_nvcc_threads", threads_flags), (f"{EXTENSION}'s sources", sources),
                                        ("append_nvcc_threads([...] + cc_flag)", nvcc), ('"cxx" flags', cxx))
               if value is None]
    if missing:
        raise SetupPyChanged(f"{setup_py}: not found: {', '.join(missing)} (mamba-ssm's setup.py changed shape)")
    return {"sources": sources, "nvcc": nvcc + threads_flags, "cxx": cxx}


def with_standard(recipe: dict, standard: str) -> dict:
    """``recipe`` with every -std= flag of setup.py replaced by -std=``standard`` (c++20 for torch >= 2.14, whose
    ATen headers refuse C++17)."""
    def replace(flags):
        return [f"-std={standard}" if flag.startswith("-std=") else flag for flag in flags]

    return {**recipe, "nvcc": replace(recipe["nvcc"]), "cxx": replace(recipe["cxx"])}


def compile_commands(recipe: dict, source_root: Path, torch_include: Path, nvcc: str, arch: str,
                     objects: Path) -> dict[str, list[str]]:
    """source -> the nvcc command that compiles it to an object in ``objects``, as torch's BuildExtension would
    (its common nvcc flags and defines, the extension's include folder, -fPIC)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    sm = arch.replace(".", "")
    includes = [f"-I{d}" for d in (source_root / "csrc" / "selective_scan", torch_include,
                                   torch_include / "torch" / "csrc" / "api" / "include",
                                   sysconfig.get_paths()["include"])]
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={EXTENSION}", "-D_GLIBCXX_USE_CXX11_ABI=1"]
    commands = {}
    for source in recipe["sources"]:
        output = objects / (Path(source).name + ".o")
        if source.endswith(".cu"):
            flags = [*COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", *recipe["nvcc"],
                     "-gencode", f"arch=compute_{sm},code=sm_{sm}"]
        else:  # host code: nvcc hands it to the host compiler with CUDA's include folder
            flags = ["-Xcompiler", ",".join(["-fPIC", *recipe["cxx"]])]
        commands[source] = [nvcc, "-c", str(source_root / source), "-o", str(output), *includes, *defines, *flags]
    return commands


def timed_run(command: list[str]) -> dict:
    """{"seconds", "returncode", "error"}: the command's wall time, exit status and its first error line."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    lines = (result.stderr + result.stdout).splitlines()
    error = next((line.strip() for line in lines if "error" in line.lower()), lines[-1].strip() if lines else "")
    return {"seconds": round(time.perf_counter() - start, 1), "returncode": result.returncode,
            "error": None if result.returncode == 0 else error}


def wall_bound(seconds: list[float], jobs: int) -> float:
    """Least wall time of independent compiles of ``seconds`` at ``jobs`` at a time: max(longest, sum / jobs)."""
    return max(max(seconds), sum(seconds) / jobs)


def default_sdist() -> Path | None:
    found = sorted((REPO / ".gpu").glob("mamba_ssm-*.tar.gz"))
    return found[-1] if found else None


def default_torch_include() -> Path:
    import torch

    return Path(torch.__file__).parent / "include"


def fail(message: str) -> None:
    print(f"bench_mamba_build: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, default=default_sdist(),
                        help="mamba-ssm's source distribution (default: the one benchmarks/gpu_prepare.sh put in .gpu/)")
    parser.add_argument("--arch", default="9.0", help="compute capability to compile for (9.0: H100 / H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--std", default=None,
                        help="replace setup.py's -std= flags (c++20: torch >= 2.14 needs it; default: as setup.py)")
    parser.add_argument("--torch-include", type=Path, default=None)
    parser.add_argument("--nvcc", default=shutil.which("nvcc"))
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.sdist is None or not args.sdist.is_file():
        fail(f"no mamba-ssm source distribution at {args.sdist} (run benchmarks/gpu_prepare.sh, or pass --sdist)")
    if not args.nvcc:
        fail("nvcc not found on PATH (pass --nvcc)")
    torch_include = args.torch_include or default_torch_include()
    if not (torch_include / CUDA_HEADER).is_file():
        fail(f"{torch_include} lacks {CUDA_HEADER} (a CPU build of torch): pass --torch-include with the "
             "torch/include folder of a CUDA build's wheel (unzip WHEEL 'torch/include/*')")

    with tempfile.TemporaryDirectory(prefix="bench_mamba_build_") as tmp:
        with tarfile.open(args.sdist) as archive:
            archive.extractall(tmp, filter="data")
        source_root = next(Path(tmp).glob("mamba_ssm-*"))
        try:
            recipe = build_recipe((source_root / "setup.py").read_text(), f"{args.sdist.name}/setup.py")
        except SetupPyChanged as e:
            fail(str(e))
        if args.std:
            recipe = with_standard(recipe, args.std)
        objects = Path(tmp) / "objects"
        objects.mkdir()
        commands = compile_commands(recipe, source_root, torch_include, args.nvcc, args.arch, objects)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            results = dict(zip(commands, pool.map(timed_run, commands.values())))
        wall = round(time.perf_counter() - start, 1)

    nvcc_version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout.strip()
    seconds = [r["seconds"] for r in results.values()]
    summary = {"sdist": args.sdist.name, "arch": args.arch, "jobs": args.jobs, "std": args.std or "setup.py's", "nvcc": nvcc_version.splitlines()[-1],
               "torch_include": str(torch_include), "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "sum_s": round(sum(seconds), 1), "wall_s": wall,
               "wall_bound_s": {str(j): round(wall_bound(seconds, j), 1) for j in JOB_COUNTS},
               "sources": [{"source": s, **r} for s, r in results.items()]}
    print(f"{summary['sdist']}, sm_{args.arch.replace('.', '')}, {summary['nvcc']}, -std: {summary['std']}, "
          f"{args.jobs} jobs\n")
    print("| source | compile s | result |\n|---|---|---|")
    for source, r in results.items():
        print(f"| {Path(source).name} | {r['seconds']:.1f} | {'ok' if r['returncode'] == 0 else r['error']} |")
    print(f"\nsum {summary['sum_s']:.1f} s, wall {wall:.1f} s at {args.jobs} jobs; least wall at "
          + ", ".join(f"{j} jobs {b:.0f} s" for j, b in summary["wall_bound_s"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))
    if any(r["returncode"] != 0 for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
