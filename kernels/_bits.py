"""Bit-level helpers for numba kernels: half/bfloat16 decoding and float32 <-> int32 casts.

numba rejects float16 arrays on the CPU, so fp16 rows arrive as uint16 views; LLVM's own
`fpext half -> float` decodes them (one F16C instruction per 8-16 lanes, subnormals and inf
exact).  bfloat16 is the top half of a float32.  The float32 <-> int32 bit casts build 2**k
and split mantissa/exponent in the polynomial exp/log below, which LLVM vectorizes (calls to
libm's expf/logf would not be).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kernels import constants


@intrinsic
def f16_bits_to_f32(typingctx, x):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def bf16_bits_to_f32(typingctx, x):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


@intrinsic
def i32_as_f32(typingctx, x):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def f32_as_i32(typingctx, x):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)
_LN2_HI = np.float32(0.693145751953125)  # 11 significant bits: k * _LN2_HI is exact
_LN2_LO = np.float32(1.4286068203094173e-06)  # ln2 - _LN2_HI
# `constants.EXP_FLOOR` as float32 (so max(d, EXP_FLOOR) stays float32): exp at or below it
# is exactly 0, and clamping d to it keeps 2**k a normal float32 (see constants.py)
EXP_FLOOR = np.float32(constants.EXP_FLOOR)


@njit(inline="always", fastmath={"contract"})
def exp_nonpos(d):
    """exp(d) for float32 d <= 0 (d = -inf allowed -> 0.0); relative error < 2e-7.

    Range reduction d = k*ln2 + f with |f| <= ln2/2 (Cody-Waite: ln2 split in a high part
    exact in float32 and a low part, so f carries no rounding of d*log2(e)), exp(f) by its
    degree-7 Taylor polynomial (truncation error (ln2/2)**8/8! = 5e-9), 2**k assembled from
    the exponent bits.  Inputs at or below EXP_FLOOR give exactly 0 (true value < 2e-38)."""
    dc = max(d, EXP_FLOOR)  # clamped so the int conversion below is safe
    k = np.float32(np.floor(dc * _LOG2E + np.float32(0.5)))
    f = (dc - k * _LN2_HI) - k * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * f + np.float32(1.0 / 720.0)
    p = p * f + np.float32(1.0 / 120.0)
    p = p * f + np.float32(1.0 / 24.0)
    p = p * f + np.float32(1.0 / 6.0)
    p = p * f + np.float32(0.5)
    p = p * f + np.float32(1.0)
    p = p * f + np.float32(1.0)
    e = p * i32_as_f32((np.int32(k) + np.int32(127)) << np.int32(23))
    return e if d > EXP_FLOOR else np.float32(0.0)


@njit(inline="always", fastmath={"contract"})
def log_pos(x):
    """log(x) for normal float32 x > 0; relative error < 3e-7 away from x = 1 (absolute
    < 1e-7 near it).  Mantissa m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s) with
    s = (m-1)/(m+1), |s| < 0.172, series to s**9 (next term < 2e-9)."""
    bits = f32_as_i32(x)
    e = ((bits >> np.int32(23)) & np.int32(255)) - np.int32(127)
    m = i32_as_f32((bits & np.int32(0x7FFFFF)) | np.int32(0x3F800000))  # in [1, 2)
    big = m > np.float32(1.4142135)
    m = m * np.float32(0.5) if big else m
    e = e + np.int32(1) if big else e
    s = (m - np.float32(1.0)) / (m + np.float32(1.0))
    z = s * s
    poly = np.float32(1.0 / 9.0)
    poly = poly * z + np.float32(1.0 / 7.0)
    poly = poly * z + np.float32(1.0 / 5.0)
    poly = poly * z + np.float32(1.0 / 3.0)
    poly = poly * z + np.float32(1.0)
    return np.float32(2.0) * s * poly + np.float32(e) * _LN2
