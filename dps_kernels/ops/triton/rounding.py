"""fp32 -> storage dtype rounding that is round-to-nearest-even on every Triton target.

Compiled Triton rounds ``x.to(tl.bfloat16)`` to nearest even, like torch. The Triton
interpreter (3.x) truncates fp32 -> bf16 instead, so under the interpreter the kernels
round explicitly with integer ops (``bits + 0x7FFF + lsb, >> 16``; NaN payloads are not
preserved). ``EMULATE_RNE`` is a compile-time switch set only when the interpreter runs, so
the GPU code path is the plain cast. fp16 needs no help (numpy rounds to nearest even).
"""
import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 tensor ``x`` rounded to ``DTYPE`` (round to nearest, ties to even)."""
    if EMULATE_RNE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
