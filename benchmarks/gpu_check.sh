#!/usr/bin/env bash
# The GPU checklist of docs/benchmarks.md ("GPU") in one command, on a machine with a CUDA GPU, torch, numba and
# pytest, after benchmarks/gpu_prepare.sh has filled .gpu/ (it needs no network access then):
#   bash benchmarks/gpu_check.sh        (about 10 minutes on a fresh machine)
# 1. mamba-ssm's selective-scan extension is built for this GPU's architecture only, in the background (bounded by
#    MAMBA_BUILD_S, default 300 s); 2. meanwhile the GPU tests that need only CUDA run; 3. then the cuda-backend
#    tests (when the build worked) and benchmarks/bench_gpu.py at the 512 x 512 plan, including CIPA-tiny at the
#    batch the memory model picks and at batch 12 with activation checkpointing, on this GPU and on an emulated
#    24 GB one. Logs and bench_gpu.json go to $OUT (default ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=$(command -v "${PY:-python3}")
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH  # .gpu/wheels' ninja binary

build_prerequisites() {  # what a from-source build of mamba-ssm needs; prints what is missing, fails if anything is
    local missing="" cuda_home=${CUDA_HOME:-}
    [ -n "$cuda_home" ] || cuda_home=$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")
    [ -x "$cuda_home/bin/nvcc" ] || missing+=" nvcc (CUDA_HOME=$cuda_home)"
    command -v ninja >/dev/null || missing+=" ninja"
    for module in wheel packaging setuptools; do
        "$PY" -c "import $module" 2>/dev/null || missing+=" $module"
    done
    [ -z "$missing" ] || { echo "cannot build mamba-ssm here, missing:$missing"; return 1; }
}

build_mamba() {  # the extension selective_scan_cuda and the mamba_ssm package, into /tmp/site_mamba
    local arch src
    build_prerequisites || return 1
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    # unpacked once: a second call on the still-warm machine continues the build (ninja keeps its objects)
    [ -d /tmp/mamba ] || { mkdir -p /tmp/mamba && tar xzf .gpu/mamba_ssm-*.tar.gz -C /tmp/mamba; } || return 1
    src=$(ls -d /tmp/mamba/mamba_ssm-*/)
    # only this GPU's architecture: setup.py's own -gencode list spans sm_75 to sm_121 (many times the compile time);
    # and C++20 where torch's headers require it (torch >= 2.14), which setup.py's -std=c++17 would override
    grep -q "cc_flag = \[\"-gencode\", \"arch=compute_" "$src/setup.py" || "$PY" - "$src/setup.py" "$arch" <<'PYEOF' || return 1
import sys
from nnunetv2_cipa.ops.cuda_scan import torch_requires_cxx20
path, arch = sys.argv[1], sys.argv[2].replace(".", "")
text = open(path).read()
marker = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
assert marker in text, "mamba-ssm's setup.py changed: adapt gpu_check.sh"
text = text.replace(marker, f'    cc_flag = ["-gencode", "arch=compute_{arch},code=sm_{arch}"]\n' + marker, 1)
if torch_requires_cxx20():
    text = text.replace('"-std=c++17"', '"-std=c++20"')
open(path, "w").write(text)
PYEOF
    cd "$src" && TORCH_CUDA_ARCH_LIST=$arch MAMBA_FORCE_BUILD=TRUE MAMBA_KEEP_CUDA_BUILD=TRUE MAX_JOBS=$(nproc) \
        timeout "${MAMBA_BUILD_S:-300}" "$PY" -m pip install -q --no-build-isolation --no-deps --no-index \
        --target /tmp/site_mamba .
}
gpu_tests() {
    "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_selective_scan.py tests/test_directional_scan.py \
        tests/test_triton_scan.py tests/test_network.py tests/test_trainer_variants.py
    # the kernels' softplus compiled for this GPU (approximate exp), against torch's
    "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_scan.py -k softplus
}

main() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl \
        || exit 1
    (time build_mamba) > "$OUT/mamba_build.log" 2>&1 &
    local build=$!

    echo "== GPU tests without mamba-ssm"
    gpu_tests
    echo "== waiting for the mamba-ssm build"
    if wait "$build"; then
        export PYTHONPATH=/tmp/site_mamba:$PYTHONPATH
        "$PY" -c "from nnunetv2_cipa.ops.backends import available_backends as a; print('backends', a())"
        echo "== GPU tests with mamba-ssm"
        gpu_tests
    else
        echo "mamba-ssm build failed or ran out of time; the tail of its log:"; tail -30 "$OUT/mamba_build.log"
    fi
    echo "== bench_gpu"
    "$PY" benchmarks/bench_gpu.py --plan .gpu/plan_2d_512.json --iterations 10 --out "$OUT"
}

main 2>&1 | tee "$OUT/gpu_check.log"
