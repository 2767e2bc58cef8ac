"""Mix forward weight and backward gradient mask, with the mask recomputed in-kernel.

    W~ = (M*W + (1-M)*A - p*A) / (1-p)   evaluated as  (where(M, W, A) - p*A) / (1-p)  in fp32
    dW = upstream * M                    (no 1/(1-p) factor, as the authors)

M is never materialised: Stage I uses the column keep-hash of (key, col) (keep_mask.py);
Stage II uses ``GAM * factor[col] >= thr`` (Dense-style ``GAM >= thr`` without a factor),
or, with ``MASK_BITS``, reads M from the packed subnetwork (dps_kernels/mask_bits.py:
bit ``i % 32`` of int32 word ``i // 32``) and then reads no GAM, factor or threshold.
``where(M, W, A)`` is exact for M in {0, 1}, so the result equals the reference formula up
to the last fp32 bit (the GPU compiler may fuse ``- p*A`` into an FMA, and torch divides by
the scalar ``1-p`` through its reciprocal on CUDA): within one ulp of the output dtype. The
mask itself (a compare and one multiply) and ``grad * M`` are exact. ``enable_fp_fusion`` is
left at its default so the ops stay traceable through ``wrap_triton`` unchanged.

Bytes moved per element (P = weight/anchor/grad bytes, O = output bytes):
    mix_weight  Stage I: 2P + O        Stage II: 2P + 4 (GAM) + O    (bits: 2P + 1/8 + O)
    mix_grad    Stage I: 2P            Stage II: 2P + 4 (GAM)        (bits: 2P + 1/8)
(the reference reads and writes a full mask and several temporaries instead).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...backends import interpreter_enabled
from ...step_types import MAX_TENSOR_ELEMENTS
from ...mask_bits import num_words
from .keep_mask import column_keep, hash32
from .mask_bits import load_bit
from .rounding import round_to

BLOCK = 1024
TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _stage_of_step(step_ptr, key_base, update_steps):
    """Capturable: (Stage I?, Stage I key) of the step about to be taken (step + 1)."""
    t = tl.load(step_ptr).to(tl.int32) + 1
    stage_one = ((t + update_steps - 1) // update_steps) % 2 == 1
    key = hash32(tl.cast(key_base, tl.uint32, bitcast=True) ^ t.to(tl.uint32))
    return stage_one, key


@triton.jit
def _mask(offs, inb, s1, cols, key, keep_threshold, gam_ptr, factor_ptr, thr_ptr, bits_ptr,
          STAGE: tl.constexpr, HAS_FACTOR: tl.constexpr, MASK_BITS: tl.constexpr):
    """Keep flags of the elements ``offs``: the Stage I column hash (``STAGE`` 1), the
    Stage II subnetwork ``GAM [* factor[col]] >= thr`` (``STAGE`` 2; with ``MASK_BITS``
    read from the packed words instead), or the one that block flag ``s1`` picks
    (``STAGE`` 0, capturable)."""
    col = offs % cols
    if STAGE != 2:
        keep1 = column_keep(key, col, tl.cast(keep_threshold, tl.uint32, bitcast=True))
    if STAGE != 1:
        inb2 = inb
        if STAGE == 0:
            inb2 = inb & ~s1   # GAM is read only in Stage II
        if MASK_BITS:
            keep2 = load_bit(bits_ptr, offs, inb2)
        else:
            score = tl.load(gam_ptr + offs, mask=inb2, other=0.0)
            if HAS_FACTOR:
                score = score * tl.load(factor_ptr + col, mask=inb2, other=0.0)
            keep2 = score >= tl.load(thr_ptr)
    if STAGE == 1:
        keep = keep1
    elif STAGE == 2:
        keep = keep2
    else:
        keep = tl.where(s1, keep1, keep2)
    return keep


@triton.jit
def _stage_flags(offs, step_ptr, key, key_base, update_steps, STAGE: tl.constexpr):
    """(block Stage I flag, key) for ``_mask``: from the device step when STAGE is 0."""
    zero = tl.zeros_like(offs)
    if STAGE == 0:
        stage_one, key = _stage_of_step(step_ptr, key_base, update_steps)
        s1 = (zero + stage_one.to(tl.int32)) != 0
    else:
        s1 = (zero == 0) if STAGE == 1 else (zero != 0)
        key = tl.cast(key, tl.uint32, bitcast=True)
    return s1, key


@triton.jit(do_not_specialize=["key", "keep_threshold", "key_base", "update_steps"])
def _mix_weight_kernel(
    w_ptr,            # W, any float dtype
    a_ptr,            # anchor A (W0 when STAGE is 0), any float dtype
    a2_ptr,           # W' (STAGE 0: the Stage II anchor, picked on the device)
    out_ptr,          # W~ in the output dtype
    gam_ptr,          # fp32 GAM (Stage II)
    factor_ptr,       # fp32 [cols] column factor (Stage II Mix)
    thr_ptr,          # fp32 0-d threshold (Stage II)
    step_ptr,         # fp32 0-d step counter (STAGE 0)
    bits_ptr,         # int32 packed subnetwork (MASK_BITS)
    n,                # elements
    cols,             # mask columns
    key,              # int32 bit pattern of the uint32 hash prefix of the step (STAGE 1)
    keep_threshold,   # keep threshold, < 2**24 (Stage I)
    key_base,         # int32 bits of mask_hash.key_base (STAGE 0)
    update_steps,     # stage length (STAGE 0)
    p,                # fp32 p
    one_minus_p,      # fp32 1 - p (rounded from float64 on the host, as torch does)
    STAGE: tl.constexpr,        # 1, 2, or 0: from the device step (capturable)
    HAS_FACTOR: tl.constexpr,
    MASK_BITS: tl.constexpr,    # Stage II mask from bits_ptr (no GAM, factor, threshold)
    OUT_DTYPE: tl.constexpr,    # dtype of out
    EMULATE_RNE: tl.constexpr,  # interpreter only: round bf16 to nearest even (rounding.py)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    s1, key = _stage_flags(offs, step_ptr, key, key_base, update_steps, STAGE)
    keep = _mask(offs, inb, s1, cols, key, keep_threshold, gam_ptr, factor_ptr, thr_ptr,
                 bits_ptr, STAGE, HAS_FACTOR, MASK_BITS)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if STAGE == 0:
        a = tl.where(s1, tl.load(a_ptr + offs, mask=inb & s1, other=0.0).to(tl.float32),
                     tl.load(a2_ptr + offs, mask=inb & ~s1, other=0.0).to(tl.float32))
    else:
        a = tl.load(a_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    out = tl.div_rn(tl.where(keep, w, a) - p * a, one_minus_p)
    tl.store(out_ptr + offs, round_to(out, OUT_DTYPE, EMULATE_RNE), mask=inb)


@triton.jit(do_not_specialize=["key", "keep_threshold", "key_base", "update_steps"])
def _mix_grad_kernel(
    g_ptr,            # upstream gradient
    out_ptr,          # upstream * M, same dtype
    gam_ptr, factor_ptr, thr_ptr, step_ptr, bits_ptr,    # see _mix_weight_kernel
    n, cols, key, keep_threshold, key_base, update_steps,  # see _mix_weight_kernel
    STAGE: tl.constexpr,
    HAS_FACTOR: tl.constexpr,
    MASK_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    s1, key = _stage_flags(offs, step_ptr, key, key_base, update_steps, STAGE)
    keep = _mask(offs, inb, s1, cols, key, keep_threshold, gam_ptr, factor_ptr, thr_ptr,
                 bits_ptr, STAGE, HAS_FACTOR, MASK_BITS)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    # g * M rather than where(M, g, 0): the reference multiplies, so NaN/inf and -0 match.
    tl.store(out_ptr + offs, (g * keep.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=inb)


def _mask_args(like: torch.Tensor, cols: int, column_key: Optional[int], keep_threshold: int,
               gam, column_factor, threshold, device_step=None, key_base: int = 0,
               update_steps: int = 1, mask_bits=None):
    n = like.numel()
    if cols < 1 or n % cols:
        raise ValueError(f"mask cols={cols} must divide numel={n}")
    if n > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"tensors of more than {MAX_TENSOR_ELEMENTS} elements are not "
                         f"supported (n={n})")
    common = dict(step_ptr=like, bits_ptr=like, key=0, keep_threshold=keep_threshold,
                  key_base=0, update_steps=1, MASK_BITS=False)
    stage_one = column_key is not None
    if stage_one:
        return dict(common, gam_ptr=like, factor_ptr=like, thr_ptr=like,
                    key=_as_int32(column_key), STAGE=1, HAS_FACTOR=False)
    if mask_bits is not None:
        # The packed Stage II subnetwork: GAM, factor and threshold are not read.
        if device_step is not None:
            raise ValueError("mask_bits is not supported with a capturable (device_step) "
                             "mix mask yet")
        if (mask_bits.dtype != torch.int32 or not mask_bits.is_contiguous()
                or mask_bits.device != like.device or mask_bits.numel() != num_words(n)):
            raise ValueError(f"mask_bits must be a contiguous int32 tensor of ceil({n}/32) = "
                             f"{num_words(n)} words on {like.device}, got {mask_bits.dtype} "
                             f"with {mask_bits.numel()} elements on {mask_bits.device}")
        return dict(common, gam_ptr=like, factor_ptr=like, thr_ptr=like, bits_ptr=mask_bits,
                    STAGE=2, HAS_FACTOR=False, MASK_BITS=True)
    if gam is None or threshold is None:
        raise ValueError("a Stage II (or capturable) mix mask needs gam and threshold")
    for label, x in (("gam", gam), ("threshold", threshold), ("column_factor", column_factor)):
        if x is not None and (x.dtype != torch.float32 or not x.is_contiguous()
                              or x.device != like.device):
            raise ValueError(f"{label} must be a contiguous fp32 tensor on {like.device}")
    if gam.numel() != n or (column_factor is not None and column_factor.numel() != cols):
        raise ValueError(f"gam must have {n} elements and column_factor {cols}")
    # Unused pointers point at state buffers, never at ``like`` (a fresh tensor per call):
    # a capturable launch must have the same arguments at every step.
    args = dict(common, gam_ptr=gam, bits_ptr=gam,
                factor_ptr=gam if column_factor is None else column_factor, thr_ptr=threshold,
                STAGE=2, HAS_FACTOR=column_factor is not None)
    if device_step is not None:
        if device_step.device != like.device or device_step.numel() != 1:
            raise ValueError(f"device_step must be a one-element tensor on {like.device}")
        args.update(step_ptr=device_step, key_base=_as_int32(key_base),
                    update_steps=int(update_steps), STAGE=0)
    return args


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
               p: float, out_dtype: Optional[torch.dtype], device_step=None, key_base: int = 0,
               update_steps: int = 1, stage_anchor=None, launch=None,
               mask_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W~ (see module docstring); ``launch`` wraps the kernel (``wrap_triton`` in torch.library).

    Capturable (``device_step`` given): the stage, the Stage I key ``H(key_base ^ t)`` and
    the anchor (``anchor`` = W0 in Stage I, ``stage_anchor`` = W' in Stage II) are picked
    on the device from ``device_step + 1``; ``gam``/``threshold`` must be given.
    ``mask_bits`` (Stage II): the packed subnetwork, read instead of GAM/factor/threshold."""
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
    args = _mask_args(weight, cols, column_key, keep_threshold, gam, column_factor, threshold,
                      device_step, key_base, update_steps, mask_bits)
    if device_step is not None:
        if stage_anchor is None or stage_anchor.shape != weight.shape:
            raise ValueError("a capturable mix weight needs stage_anchor shaped like weight")
        stage_anchor = _contiguous(stage_anchor, "stage_anchor")
    kernel = _mix_weight_kernel if launch is None else launch(_mix_weight_kernel)
    kernel[(triton.cdiv(n, BLOCK),)](
        weight, anchor, anchor if stage_anchor is None else stage_anchor, out, n=n, cols=cols,
        p=float(p), one_minus_p=1.0 - float(p),
        OUT_DTYPE=TORCH_TO_TL[out.dtype], EMULATE_RNE=interpreter_enabled(), BLOCK=BLOCK,
        **args)
    return out


def mix_grad(grad: torch.Tensor, cols: int, column_key: Optional[int], keep_threshold: int,
             gam: Optional[torch.Tensor], column_factor: Optional[torch.Tensor],
             threshold: Optional[torch.Tensor], device_step=None, key_base: int = 0,
             update_steps: int = 1, launch=None,
             mask_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grad * M`` in grad's dtype (capturable with ``device_step``, ``mask_bits``: see
    mix_weight)."""
    grad = _contiguous(grad, "grad")
    out = torch.empty_like(grad)
    n = grad.numel()
    if n == 0:
        return out
    args = _mask_args(grad, cols, column_key, keep_threshold, gam, column_factor, threshold,
                      device_step, key_base, update_steps, mask_bits)
    kernel = _mix_grad_kernel if launch is None else launch(_mix_grad_kernel)
    kernel[(triton.cdiv(n, BLOCK),)](grad, out, n=n, cols=cols, BLOCK=BLOCK, **args)
    return out
