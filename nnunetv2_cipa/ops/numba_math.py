"""exp, softplus and sigmoid-from-softplus for the numba scan kernels (callable from jitted code only).

For float32 they are polynomial approximations that LLVM vectorises (pip's llvmlite has no SVML, so ``np.exp`` and
``np.log1p`` run scalar inside numba); float64 keeps ``np.exp`` / ``np.log1p`` / ``np.expm1``. Accuracy in float32:
- ``exp``: within 1.1e-7 relative on [-1, 1] and 6e-8 absolute on decays (x <= 0); below float32's normal range
  (x < -87.3) it returns at most 1.2e-38, never 0;
- ``softplus``: within 7e-7 relative on [-10, 10];
- ``sigmoid_of_softplus``: sigmoid(x) from s = softplus(x) within 5e-7 relative, also where it is tiny.
The bodies are inlined into the kernels (``inline="always"``); ``error_model="numpy"`` keeps the divisions free of
Python's zero-division check, which would keep them scalar.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_LOG2E = np.float32(1.4426950408889634)
# 2**f on [-0.5, 0.5], degree 6, fitted for minimal relative error (1.9e-9; 1.0e-7 when evaluated in float32)
_C0, _C1, _C2, _C3, _C4, _C5, _C6 = (np.float32(c) for c in (
    1.0000000005535803, 0.693147205707945, 0.24022646892260208, 0.05550328837559937, 0.009618489030761276,
    0.0013399907668161098, 0.00015345731389521458))
# 1 / (2i + 1): atanh(z) = z * sum_i z**(2i) / (2i + 1), truncated after z**12 (error < 2e-9 for z <= 1/3)
_A1, _A2, _A3, _A4, _A5, _A6 = (np.float32(1.0 / (2 * i + 1)) for i in range(1, 7))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret int32 bits as float32 (an LLVM bitcast, which vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _bits_of_float32(typingctx, value):
    """Reinterpret float32 as int32 bits (an LLVM bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


def exp(x):
    """exp inside the kernels: a vectorisable polynomial exp for float32, np.exp otherwise."""
    return np.exp(x)


@overload(exp, inline="always", jit_options={"fastmath": True})
def _exp_overload(x):
    if x != types.float32:
        return lambda x: np.exp(x)

    def exp_float32(x):  # 2**y = 2**k * 2**f, k = rint(y): k is added to the exponent bits of 2**f
        y = max(min(x * _LOG2E, np.float32(127.0)), np.float32(-126.0))  # below -126: about 1e-38, not 0
        k = np.rint(y)
        f = y - k
        p = _C0 + f * (_C1 + f * (_C2 + f * (_C3 + f * (_C4 + f * (_C5 + f * _C6)))))
        return _float32_from_bits(_bits_of_float32(p) + (np.int32(k) << 23))

    return exp_float32


def softplus(x):
    """softplus inside the kernels: log(1 + exp(x)), vectorisable for float32."""
    return np.log1p(np.exp(x))


@overload(softplus, inline="always", jit_options={"fastmath": True, "error_model": "numpy"})
def _softplus_overload(x):
    if x != types.float32:
        return lambda x: max(x, 0.0) + np.log1p(np.exp(-abs(x)))

    def softplus_float32(x):  # max(x, 0) + log1p(t), t = exp(-|x|) in (0, 1]; log1p(t) = 2 atanh(t / (2 + t))
        t = exp(-abs(x))
        z = t / (np.float32(2.0) + t)
        w = z * z
        atanh = z * (np.float32(1.0) + w * (_A1 + w * (_A2 + w * (_A3 + w * (_A4 + w * (_A5 + w * _A6))))))
        return max(x, np.float32(0.0)) + np.float32(2.0) * atanh

    return softplus_float32


def sigmoid_of_softplus(s):
    """sigmoid(x) from s = softplus(x) (s > 0): 1 - exp(-s), by its series below 0.1 (no cancellation)."""
    return -np.expm1(-s)


@overload(sigmoid_of_softplus, inline="always", jit_options={"fastmath": True, "error_model": "numpy"})
def _sigmoid_of_softplus_overload(s):
    if s != types.float32:
        return lambda s: -np.expm1(-s)

    def sigmoid_float32(s):  # 1 - e^-s = s (1 - s/2 (1 - s/3 (1 - s/4 (1 - s/5 (1 - s/6))))), error < 2e-10 rel.
        one = np.float32(1.0)
        series = s * (one - s * np.float32(1 / 2) * (one - s * np.float32(1 / 3) * (
            one - s * np.float32(1 / 4) * (one - s * np.float32(1 / 5) * (one - s * np.float32(1 / 6))))))
        return series if s < np.float32(0.1) else one - exp(-s)

    return sigmoid_float32
