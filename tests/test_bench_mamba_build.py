"""benchmarks/bench_mamba_build.py reads what it compiles from mamba-ssm's setup.py; these check that reading."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_mamba_build  # noqa: E402

# the parts of mamba-ssm 2.3.2.post1's setup.py the benchmark reads, in their shape there (HIP branch included)
SETUP_PY = '''
def append_nvcc_threads(nvcc_extra_args):
    return nvcc_extra_args + ["--threads", "4"]

cc_flag = []
cc_flag.append("-gencode")
cc_flag.append("arch=compute_90,code=sm_90")
if HIP_BUILD:
    extra_compile_args = {"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-fgpu-flush-denormals-to-zero"] + cc_flag}
else:
    extra_compile_args = {
        "cxx": ["-O3", "-std=c++17"],
        "nvcc": append_nvcc_threads(["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + cc_flag),
    }
ext_modules.append(
    CUDAExtension(
        name="selective_scan_cuda",
        sources=["csrc/selective_scan/selective_scan.cpp", "csrc/selective_scan/selective_scan_fwd_fp32.cu"],
        extra_compile_args=extra_compile_args,
    )
)
'''


def test_recipe_is_read_from_setup_py():
    recipe = bench_mamba_build.build_recipe(SETUP_PY)
    assert recipe == {"sources": ["csrc/selective_scan/selective_scan.cpp",
                                  "csrc/selective_scan/selective_scan_fwd_fp32.cu"],
                      "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--threads", "4"],
                      "cxx": ["-O3", "-std=c++17"]}


def test_changed_setup_py_is_named_with_what_is_missing():
    changed = SETUP_PY.replace('name="selective_scan_cuda"', 'name="selective_scan_cuda_core"')
    with pytest.raises(bench_mamba_build.SetupPyChanged, match=r"mamba_ssm-9\.9\.tar\.gz/setup\.py: not found: "
                                                               r"selective_scan_cuda's sources"):
        bench_mamba_build.build_recipe(changed, "mamba_ssm-9.9.tar.gz/setup.py")
    computed = SETUP_PY.replace('"--use_fast_math", "-lineinfo"]', '"--use_fast_math", LINEINFO]')
    with pytest.raises(bench_mamba_build.SetupPyChanged, match="the nvcc flags is not a literal list"):
        bench_mamba_build.build_recipe(computed)


def test_commands_compile_for_the_requested_architecture_only(tmp_path):
    recipe = bench_mamba_build.build_recipe(SETUP_PY)
    commands = bench_mamba_build.compile_commands(recipe, tmp_path / "src", tmp_path / "torch_include", "nvcc", "8.6",
                                                  tmp_path / "objects")
    cu = commands["csrc/selective_scan/selective_scan_fwd_fp32.cu"]
    assert [cu[i + 1] for i, flag in enumerate(cu) if flag == "-gencode"] == ["arch=compute_86,code=sm_86"]
    assert cu[:5] == ["nvcc", "-c", str(tmp_path / "src/csrc/selective_scan/selective_scan_fwd_fp32.cu"), "-o",
                      str(tmp_path / "objects/selective_scan_fwd_fp32.cu.o")]
    assert "--threads" in cu and f"-I{tmp_path / 'torch_include/torch/csrc/api/include'}" in cu
    cpp = commands["csrc/selective_scan/selective_scan.cpp"]
    assert "-gencode" not in cpp and cpp[-2:] == ["-Xcompiler", "-fPIC,-O3,-std=c++17"]


def test_standard_replaces_every_std_flag():
    recipe = bench_mamba_build.with_standard(bench_mamba_build.build_recipe(SETUP_PY), "c++20")
    assert recipe["cxx"] == ["-O3", "-std=c++20"]
    assert recipe["nvcc"] == ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--threads", "4"]


def test_wall_bound():
    assert bench_mamba_build.wall_bound([100.0, 50.0, 30.0], 2) == 100.0
    assert bench_mamba_build.wall_bound([60.0, 60.0, 60.0], 2) == 90.0
