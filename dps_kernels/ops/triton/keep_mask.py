"""Mix Stage I column keep-mask in Triton, bit for bit ``mask_hash.column_keep_mask``.

    h    = H(key ^ col)            (uint32, H = the lowbias32-shaped mixer of mask_hash.py)
    keep = (h >> 8) < keep_threshold

No memory traffic: the mask is recomputed from (key, column) wherever it is needed, so
no per-element or per-column mask is ever stored. About 10 integer ops per element.
"""
import triton
import triton.language as tl


@triton.jit
def hash32(x):
    """The 32-bit mixer of ``mask_hash.hash32`` on a uint32 tensor (wraps mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x21F0AAAD, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x735A2D97, tl.uint32)
    x = x ^ (x >> 15)
    return x


@triton.jit
def column_keep(key, col, keep_threshold):
    """Bool keep flag of column ``col`` (int tensor, < 2**31) for the step prefix ``key``.

    ``key`` and ``keep_threshold`` are uint32 scalars.
    """
    h = hash32(key ^ col.to(tl.uint32))
    return (h >> 8) < keep_threshold
