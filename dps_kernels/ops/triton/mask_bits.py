"""The packed Stage II subnetwork in Triton: the pack kernel and the per-element bit load.

Layout (``dps_kernels/mask_bits.py``): int32 words, element ``i`` is bit ``i % 32`` (LSB
first) of word ``i // 32``, tail bits past ``n`` zero.

``_pack_mask_kernel``: each program reads ``BLOCK`` scores (GAM, times ``factor[col]`` for
Mix: one fp32 multiply, as ``reference.mix_score``), compares them with the 0-d threshold
(``>=``, ties kept; exact) and writes ``BLOCK / 32`` words: the flags are reshaped to
``[BLOCK / 32, 32]`` and each row is or-reduced after shifting lane ``b`` to bit ``b``.
Bytes per element: read 4 (GAM) + write 1/8.

``load_bit``: the consumers' side, ``(words[offs // 32] >> (offs % 32)) & 1``; the 32
lanes of a word load the same address (one 4-byte word per 32 elements from DRAM).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...mask_bits import num_words
from ...step_types import MAX_TENSOR_ELEMENTS

BLOCK = 1024   # elements per program: 32 words


@triton.jit
def load_bit(bits_ptr, offs, mask):
    """Bool flags of the elements ``offs`` (int32, >= 0) from the packed words at
    ``bits_ptr`` (int32); masked-off lanes read 0 (not selected)."""
    word = tl.load(bits_ptr + offs // 32, mask=mask, other=0)
    return ((word >> (offs % 32)) & 1) != 0


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _pack_mask_kernel(
    gam_ptr,      # fp32 [n]
    factor_ptr,   # fp32 [cols] (HAS_FACTOR)
    thr_ptr,      # fp32 0-d threshold
    out_ptr,      # int32 [ceil(n / 32)]
    n,            # elements
    cols,         # columns of the factor (HAS_FACTOR)
    HAS_FACTOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    score = tl.load(gam_ptr + offs, mask=inb, other=0.0)
    if HAS_FACTOR:
        score = score * tl.load(factor_ptr + offs % cols, mask=inb, other=0.0)
    # Out-of-range lanes give 0: the tail bits of the last word are zero.
    flags = ((score >= tl.load(thr_ptr)) & inb).to(tl.int32)
    lanes = tl.arange(0, 32)
    shifted = tl.reshape(flags, [BLOCK // 32, 32]) << lanes[None, :]
    words = tl.reduce(shifted, 1, _bit_or)
    woffs = pid * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
    tl.store(out_ptr + woffs, words, mask=woffs < (n + 31) // 32)


def pack_mask(gam: torch.Tensor, column_factor: Optional[torch.Tensor],
              threshold: torch.Tensor, out: Optional[torch.Tensor] = None,
              launch=None) -> torch.Tensor:
    """int32 words of ``gam [* column_factor[col]] >= threshold`` (see the module docstring);
    written into ``out`` when given. ``launch`` wraps the kernel (``wrap_triton``)."""
    n = gam.numel()
    if gam.dtype != torch.float32 or not gam.is_contiguous():
        raise ValueError(f"gam must be a contiguous fp32 tensor, got {gam.dtype}")
    if n > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"tensors of more than {MAX_TENSOR_ELEMENTS} elements are not "
                         f"supported (n={n})")
    device = gam.device
    if (threshold.dtype != torch.float32 or threshold.numel() != 1
            or threshold.device != device):
        raise ValueError(f"threshold must be a one-element fp32 tensor on {device}")
    cols = 1
    if column_factor is not None:
        cols = column_factor.numel()
        if (column_factor.dtype != torch.float32 or not column_factor.is_contiguous()
                or column_factor.device != device or cols < 1 or n % cols):
            raise ValueError(f"column_factor must be a contiguous fp32 tensor on {device} whose "
                             f"length divides numel={n}, got {column_factor.dtype} with {cols}")
    words = num_words(n)
    if out is None:
        out = torch.empty(words, dtype=torch.int32, device=device)
    elif (out.dtype != torch.int32 or out.numel() != words or not out.is_contiguous()
          or out.device != device):
        raise ValueError(f"out must be a contiguous int32 tensor of ceil({n}/32) = {words} "
                         f"words on {device}, got {out.dtype} with {out.numel()} elements")
    if n == 0:
        return out
    kernel = _pack_mask_kernel if launch is None else launch(_pack_mask_kernel)
    kernel[(triton.cdiv(n, BLOCK),)](
        gam, gam if column_factor is None else column_factor, threshold, out, n, cols,
        HAS_FACTOR=column_factor is not None, BLOCK=BLOCK)
    return out
