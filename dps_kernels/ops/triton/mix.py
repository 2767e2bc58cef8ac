"""Mix forward weight and backward gradient mask, with the mask recomputed in-kernel.

    W~ = (M*W + (1-M)*A - p*A) / (1-p)   evaluated as  (where(M, W, A) - p*A) / (1-p)  in fp32
    dW = upstream * M                    (no 1/(1-p) factor, as the authors)

M is never materialised: Stage I uses the column keep-hash of (key, col) (keep_mask.py);
Stage II uses ``GAM * factor[col] >= thr`` (Dense-style ``GAM >= thr`` without a factor).
``where(M, W, A)`` is exact for M in {0, 1}, so the result equals the reference formula up
to the last fp32 bit (the GPU compiler may fuse ``- p*A`` into an FMA, and torch divides by
the scalar ``1-p`` through its reciprocal on CUDA): within one ulp of the output dtype. The
mask itself (a compare and one multiply) and ``grad * M`` are exact. ``enable_fp_fusion`` is
left at its default so the ops stay traceable through ``wrap_triton`` unchanged.

Bytes moved per element (P = weight/anchor/grad bytes, O = output bytes):
    mix_weight  Stage I: 2P + O        Stage II: 2P + 4 (GAM) + O
    mix_grad    Stage I: 2P            Stage II: 2P + 4 (GAM)
(the reference reads and writes a full mask and several temporaries instead).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...backends import interpreter_enabled
from .keep_mask import column_keep
from .rounding import round_to

BLOCK = 1024
TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _mask(offs, inb, cols, key, keep_threshold, gam_ptr, factor_ptr, thr_ptr,
          STAGE_ONE: tl.constexpr, HAS_FACTOR: tl.constexpr):
    col = offs % cols
    if STAGE_ONE:
        keep = column_keep(tl.cast(key, tl.uint32, bitcast=True),
                           col, tl.cast(keep_threshold, tl.uint32, bitcast=True))
    else:
        score = tl.load(gam_ptr + offs, mask=inb, other=0.0)
        if HAS_FACTOR:
            score = score * tl.load(factor_ptr + col, mask=inb, other=0.0)
        keep = score >= tl.load(thr_ptr)
    return keep


@triton.jit
def _mix_weight_kernel(
    w_ptr,            # W, any float dtype
    a_ptr,            # anchor A, any float dtype
    out_ptr,          # W~ in the output dtype
    gam_ptr,          # fp32 GAM (Stage II)
    factor_ptr,       # fp32 [cols] column factor (Stage II Mix)
    thr_ptr,          # fp32 0-d threshold (Stage II)
    n,                # elements
    cols,             # mask columns
    key,              # int32 bit pattern of the uint32 hash prefix of the step (Stage I)
    keep_threshold,   # keep threshold, < 2**24 (Stage I)
    p,                # fp32 p
    one_minus_p,      # fp32 1 - p (rounded from float64 on the host, as torch does)
    STAGE_ONE: tl.constexpr,
    HAS_FACTOR: tl.constexpr,
    OUT_DTYPE: tl.constexpr,    # dtype of out
    EMULATE_RNE: tl.constexpr,  # interpreter only: round bf16 to nearest even (rounding.py)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    keep = _mask(offs, inb, cols, key, keep_threshold, gam_ptr, factor_ptr, thr_ptr,
                 STAGE_ONE, HAS_FACTOR)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    out = tl.div_rn(tl.where(keep, w, a) - p * a, one_minus_p)
    tl.store(out_ptr + offs, round_to(out, OUT_DTYPE, EMULATE_RNE), mask=inb)


@triton.jit
def _mix_grad_kernel(
    g_ptr,            # upstream gradient
    out_ptr,          # upstream * M, same dtype
    gam_ptr, factor_ptr, thr_ptr,   # Stage II mask inputs (see _mix_weight_kernel)
    n, cols, key, keep_threshold,   # see _mix_weight_kernel
    STAGE_ONE: tl.constexpr,
    HAS_FACTOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    keep = _mask(offs, inb, cols, key, keep_threshold, gam_ptr, factor_ptr, thr_ptr,
                 STAGE_ONE, HAS_FACTOR)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    # g * M rather than where(M, g, 0): the reference multiplies, so NaN/inf and -0 match.
    tl.store(out_ptr + offs, (g * keep.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=inb)


def _mask_args(like: torch.Tensor, cols: int, column_key: Optional[int], keep_threshold: int,
               gam, column_factor, threshold):
    n = like.numel()
    if cols < 1 or n % cols:
        raise ValueError(f"mask cols={cols} must divide numel={n}")
    if n >= 2**31 - BLOCK:
        raise ValueError(f"tensors of 2**31 or more elements are not supported (n={n})")
    stage_one = column_key is not None
    if stage_one:
        return dict(gam_ptr=like, factor_ptr=like, thr_ptr=like, key=_as_int32(column_key),
                    keep_threshold=keep_threshold, STAGE_ONE=True, HAS_FACTOR=False)
    if gam is None or threshold is None:
        raise ValueError("a Stage II mix mask needs gam and threshold")
    for label, x in (("gam", gam), ("threshold", threshold), ("column_factor", column_factor)):
        if x is not None and (x.dtype != torch.float32 or not x.is_contiguous()
                              or x.device != like.device):
            raise ValueError(f"{label} must be a contiguous fp32 tensor on {like.device}")
    if gam.numel() != n or (column_factor is not None and column_factor.numel() != cols):
        raise ValueError(f"gam must have {n} elements and column_factor {cols}")
    return dict(gam_ptr=gam, factor_ptr=gam if column_factor is None else column_factor,
                thr_ptr=threshold, key=0, keep_threshold=0, STAGE_ONE=False,
                HAS_FACTOR=column_factor is not None)


def _as_int32(x: int) -> int:
    """The int32 with the bit pattern of uint32 ``x``: Triton passes ints >= 2**31 as int64."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _contiguous(x: torch.Tensor, label: str) -> torch.Tensor:
    if x.dtype not in TORCH_TO_TL:
        raise ValueError(f"{label} must be fp32, bf16 or fp16, got {x.dtype}")
    return x.contiguous()


def mix_weight(weight: torch.Tensor, anchor: torch.Tensor, cols: int,
               column_key: Optional[int], keep_threshold: int, gam: Optional[torch.Tensor],
               column_factor: Optional[torch.Tensor], threshold: Optional[torch.Tensor],
               p: float, out_dtype: Optional[torch.dtype], launch=None) -> torch.Tensor:
    """W~ (see module docstring); ``launch`` wraps the kernel (``wrap_triton`` in torch.library)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if anchor.shape != weight.shape:
        raise ValueError(f"anchor shape {tuple(anchor.shape)} != weight shape "
                         f"{tuple(weight.shape)}")
    weight, anchor = _contiguous(weight, "weight"), _contiguous(anchor, "anchor")
    out = torch.empty_like(weight, dtype=out_dtype or weight.dtype)
    _contiguous(out, "out_dtype")
    n = weight.numel()
    if n == 0:
        return out
    args = _mask_args(weight, cols, column_key, keep_threshold, gam, column_factor, threshold)
    kernel = _mix_weight_kernel if launch is None else launch(_mix_weight_kernel)
    kernel[(triton.cdiv(n, BLOCK),)](
        weight, anchor, out, n=n, cols=cols, p=float(p), one_minus_p=1.0 - float(p),
        OUT_DTYPE=TORCH_TO_TL[out.dtype], EMULATE_RNE=interpreter_enabled(), BLOCK=BLOCK,
        **args)
    return out


def mix_grad(grad: torch.Tensor, cols: int, column_key: Optional[int], keep_threshold: int,
             gam: Optional[torch.Tensor], column_factor: Optional[torch.Tensor],
             threshold: Optional[torch.Tensor], launch=None) -> torch.Tensor:
    """``grad * M`` in grad's dtype."""
    grad = _contiguous(grad, "grad")
    out = torch.empty_like(grad)
    n = grad.numel()
    if n == 0:
        return out
    args = _mask_args(grad, cols, column_key, keep_threshold, gam, column_factor, threshold)
    kernel = _mix_grad_kernel if launch is None else launch(_mix_grad_kernel)
    kernel[(triton.cdiv(n, BLOCK),)](grad, out, n=n, cols=cols, BLOCK=BLOCK, **args)
    return out
