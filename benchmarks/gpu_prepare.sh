#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what benchmarks/gpu_check.sh needs on an offline GPU machine: the
# pure-Python wheels such a machine may lack (nnunetv2 for get_network_from_plans, dynamic-network-architectures,
# batchgenerators; it needs torch, numba, einops, triton, timm, pytest), wheel and ninja for mamba-ssm's build,
# mamba-ssm's source (its CUDA kernel is
# built there, for that GPU only) and nnU-Net's 2d plan for 512 x 512 images (run here: the planner needs nnunetv2's
# full dependencies). About 0.9 MB. Run from anywhere after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MAMBA_SSM=${MAMBA_SSM:-2.3.2.post1}
rm -rf .gpu && mkdir -p .gpu/wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
    nnunetv2==2.8.1 dynamic_network_architectures==0.4.4 batchgenerators==0.25.5 wheel ninja
"$PY" - "$MAMBA_SSM" <<'PYEOF'
# the sdist from PyPI's JSON API (pip download would run its setup.py, which needs CUDA)
import json, sys, urllib.request
meta = json.load(urllib.request.urlopen("https://pypi.org/pypi/mamba-ssm/json"))
sdist = next(f for f in meta["releases"][sys.argv[1]] if f["packagetype"] == "sdist")
urllib.request.urlretrieve(sdist["url"], ".gpu/" + sdist["filename"])
PYEOF
"$PY" benchmarks/bench_gpu.py --write-plan .gpu/plan_2d_512.json --size 512
ls -la .gpu .gpu/wheels
