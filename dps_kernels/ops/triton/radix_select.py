"""Exact k-th largest score by radix select on the fp32 bit pattern, threshold left on device.

Score: Dense ``s = GAM``; Mix ``s = GAM * factor[col]`` (one fp32 multiply, bit-identical to
``reference.mix_score``), recomputed in every pass instead of being stored.

Order-preserving key: ``key = bits ^ 0x80000000`` for s >= +0, ``~bits`` for negative s, so
unsigned key order is float order (scores are >= 0 here, the map just makes any sign safe;
-0.0 and +0.0 get different keys but compare equal, so the mask is unaffected).

Passes over the 32 key bits, most significant first (12 + 10 + 10 bits):
  1. histogram of ``key >> 20`` (4096 bins) of all elements;
  2. histogram of bits 19..10 (1024 bins) of the elements whose top 12 bits equal the prefix;
  3. histogram of bits 9..0 (1024 bins) of the elements matching the top 22 bits.
After each histogram a one-program "pick" kernel finds the bin b holding the k-th largest
(``count(bins > b) < k <= count(bins >= b)``), appends b to the prefix and sets
``k -= count(bins > b)``, all on the device (prefix and remaining k live in a small int32
workspace). After pass 3 the prefix is the exact key of the k-th largest value; the last
pick writes it, decoded, to a 0-d fp32 tensor. No host sync; 7 launches per tensor
(1 memset + 3 histograms + 3 picks), whatever the size; ``select_thresholds`` does a
whole list of tensors in 7 launches (see the second half of this file).

Bytes moved per element: 4 (GAM) per pass, 12 in all (+ the factor vector, cached).
torch.sort moves >= 4 reads + 12 writes per element per radix pass plus an index payload.

Histograms: each program accumulates a private histogram of its tiles with
``tl.histogram`` and adds it to the global one with one vector ``atomic_add``. Elements that
do not match the prefix (or lie past the end) are counted in bin 0 and subtracted again,
which avoids relying on ``tl.histogram``'s ``mask`` argument (absent in older Triton).

approx=True stops after pass 1: threshold = the smallest float whose top 12 key bits are
the bin b, i.e. sign, 8 exponent bits and the top 3 mantissa bits of the exact k-th
largest value v with the rest zeroed. For positive normal v: ``thr <= v < thr * (1 + 2**-3)``,
so the mask is a superset of the exact one, holding every element of bin b: at most
``count(bin b) - 1`` extra elements (elements within 12.5% below v).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

PASSES = ((20, 4096), (10, 1024), (0, 1024))   # (shift, bins) of each pass
WORKSPACE = 2 + sum(bins for _, bins in PASSES)  # [prefix, remaining k, histograms...]
BLOCK = 1024


@triton.jit
def _order_key(s):
    """fp32 -> uint32 whose unsigned order is the float order (sign flip / complement)."""
    bits = s.to(tl.uint32, bitcast=True)
    sign = tl.full((), 0x80000000, tl.uint32)
    return tl.where((bits & sign) != 0, ~bits, bits | sign)


@triton.jit
def _key_to_float(key):
    """Inverse of _order_key."""
    sign = tl.full((), 0x80000000, tl.uint32)
    bits = tl.where((key & sign) != 0, key ^ sign, ~key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _score_key(gam_ptr, factor_ptr, offs, inb, cols, HAS_FACTOR: tl.constexpr):
    s = tl.load(gam_ptr + offs, mask=inb, other=0.0)
    if HAS_FACTOR:
        s = s * tl.load(factor_ptr + offs % cols, mask=inb, other=0.0)
    return _order_key(s)


@triton.jit
def _digit_counts(key, inb, prefix, SHIFT: tl.constexpr, NUM_BINS: tl.constexpr,
                  HIGH: tl.constexpr, FIRST: tl.constexpr):
    """Histogram of this pass's digit over the keys that still match the known prefix, and
    the number of lanes that did not count (they land in bin 0; see _flush_histogram)."""
    if FIRST:
        valid = inb
    else:
        valid = inb & ((key >> HIGH) == (prefix >> HIGH))
    digit = tl.where(valid, (key >> SHIFT) & (NUM_BINS - 1), 0).to(tl.int32)
    return tl.histogram(digit, NUM_BINS), tl.sum(1 - valid.to(tl.int32), axis=0)


@triton.jit
def _flush_histogram(hist_ptr, hist, skipped, NUM_BINS: tl.constexpr):
    """Take the lanes that did not count back out of bin 0 and add to the shared histogram.

    The correction keeps the histogram a true count (for debugging and the approx path's
    reasoning); the pick itself never depends on bin 0's count, since bin 0 is the lowest
    bin and ``remaining`` only subtracts bins above the chosen one."""
    bins = tl.arange(0, NUM_BINS)
    hist -= tl.where(bins == 0, skipped, 0)
    tl.atomic_add(hist_ptr + bins, hist, mask=hist != 0)


@triton.jit
def _radix_hist_kernel(
    gam_ptr,      # fp32 [n]: GAM
    factor_ptr,   # fp32 [cols]: Mix column factor (unused when HAS_FACTOR is False)
    work_ptr,     # int32 workspace: [prefix, remaining k, histograms of every pass]
    n,            # elements
    cols,         # columns of the Mix score
    tiles,        # tiles of BLOCK elements per program
    HIST_OFFSET: tl.constexpr,  # where this pass's histogram starts in the workspace
    SHIFT: tl.constexpr,        # low bit of this pass's digit
    NUM_BINS: tl.constexpr,     # 2**digit bits
    HIGH: tl.constexpr,         # SHIFT + digit bits: the bits above are the known prefix
    FIRST: tl.constexpr,        # first pass: no prefix to match
    HAS_FACTOR: tl.constexpr,   # Mix score
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    prefix = tl.load(work_ptr).to(tl.uint32, bitcast=True)
    hist = tl.zeros([NUM_BINS], dtype=tl.int32)
    skipped = tl.full((), 0, tl.int32)
    for i in range(tiles):
        offs = (pid * tiles + i) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        key = _score_key(gam_ptr, factor_ptr, offs, inb, cols, HAS_FACTOR)
        counts, missed = _digit_counts(key, inb, prefix, SHIFT, NUM_BINS, HIGH, FIRST)
        hist += counts
        skipped += missed
    _flush_histogram(work_ptr + HIST_OFFSET, hist, skipped, NUM_BINS)


@triton.jit
def _radix_pick_kernel(
    work_ptr,    # int32 workspace: [prefix, remaining k, histograms of every pass]
    out_ptr,     # fp32 0-d: the threshold (written by the last pass, or by pass 1 if approx)
    k,           # k of the selection (read by the first pass only)
    HIST_OFFSET: tl.constexpr,
    SHIFT: tl.constexpr,
    NUM_BINS: tl.constexpr,
    FIRST: tl.constexpr,
    WRITE: tl.constexpr,        # write the threshold after this pass
):
    bins = tl.arange(0, NUM_BINS)
    hist = tl.load(work_ptr + HIST_OFFSET + bins)
    if FIRST:
        remaining = k
        prefix = tl.full((), 0, tl.uint32)
    else:
        remaining = tl.load(work_ptr + 1)
        prefix = tl.load(work_ptr).to(tl.uint32, bitcast=True)
    total = tl.sum(hist, axis=0)
    above = total - tl.cumsum(hist, axis=0)   # elements in bins strictly above each bin
    hit = (above < remaining) & (above + hist >= remaining)
    b = tl.max(tl.where(hit, bins, -1), axis=0)
    remaining -= tl.sum(tl.where(bins == b, above, 0), axis=0)
    prefix = prefix | (b.to(tl.uint32) << SHIFT)
    tl.store(work_ptr, prefix.to(tl.int32, bitcast=True))
    tl.store(work_ptr + 1, remaining)
    if WRITE:
        tl.store(out_ptr, _key_to_float(prefix))


def _programs(n: int, device: torch.device) -> int:
    blocks = triton.cdiv(n, BLOCK)
    if device.type == "cuda":
        # A few programs per SM: enough to fill the GPU, few global atomics per bin.
        return min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(blocks, 4)


def _check_selection(gam: torch.Tensor, column_factor: Optional[torch.Tensor], k: int) -> None:
    if gam.dtype != torch.float32 or not gam.is_contiguous():
        raise ValueError(f"gam must be a contiguous fp32 tensor, got {gam.dtype}, "
                         f"contiguous={gam.is_contiguous()}")
    n = gam.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n >= 2**31 - 16 * BLOCK:
        raise ValueError(f"selection over 2**31 or more elements is not supported (n={n})")
    if column_factor is not None:
        cols = column_factor.numel()
        if (column_factor.dtype != torch.float32 or not column_factor.is_contiguous()
                or cols < 1 or n % cols or column_factor.device != gam.device):
            raise ValueError(f"column_factor must be a contiguous fp32 vector on {gam.device} "
                             f"whose length divides {n}, got {column_factor.dtype} "
                             f"[{cols}] on {column_factor.device}")


def select_threshold(gam: torch.Tensor, column_factor: Optional[torch.Tensor], k: int,
                     approx: bool = False, launch=None) -> torch.Tensor:
    """k-th largest of ``gam`` (or ``gam * column_factor[col]``) as a 0-d fp32 device tensor.

    ``launch`` wraps each kernel (``wrap_triton`` under torch.library).
    """
    _check_selection(gam, column_factor, k)
    n = gam.numel()
    has_factor = column_factor is not None
    cols = column_factor.numel() if has_factor else 1
    work = torch.zeros(WORKSPACE, dtype=torch.int32, device=gam.device)
    out = torch.empty((), dtype=torch.float32, device=gam.device)
    programs = _programs(n, gam.device)
    tiles = triton.cdiv(triton.cdiv(n, BLOCK), programs)
    factor = column_factor if has_factor else gam
    hist_kernel, pick_kernel = _radix_hist_kernel, _radix_pick_kernel
    if launch is not None:
        hist_kernel, pick_kernel = launch(hist_kernel), launch(pick_kernel)
    offset = 2
    passes = PASSES[:1] if approx else PASSES
    for i, (shift, bins) in enumerate(passes):
        last = i == len(passes) - 1
        hist_kernel[(programs,)](
            gam, factor, work, n, cols, tiles, HIST_OFFSET=offset, SHIFT=shift,
            NUM_BINS=bins, HIGH=shift + bins.bit_length() - 1, FIRST=i == 0,
            HAS_FACTOR=has_factor, BLOCK=BLOCK)
        pick_kernel[(1,)](
            work, out, k, HIST_OFFSET=offset, SHIFT=shift, NUM_BINS=bins, FIRST=i == 0,
            WRITE=last)
        offset += bins
    return out


# ------------------------------------------------------------------ many tensors at once
# The same passes over every DPS tensor of a model in 7 launches in all (a memset, 3
# histogram and 3 pick launches), instead of 7 per tensor: on BERT-large (146 tensors) the
# per-tensor launch overhead would otherwise exceed the kernels' own time. Buffers are
# reached through a pointer table (as in fused_step.py), so this path is not a
# torch.library op; the single-tensor ``select_threshold`` above is.

@triton.jit
def _multi_hist_kernel(
    addr_ptr,       # int64 [T, 2]: addresses of GAM and of the column factor (or GAM)
    meta_ptr,       # int32 [T, 3]: numel, cols, has_factor per tensor
    chunk_ptr,      # int32 [C, 2]: tensor index and first element of each program's chunk
    work_ptr,       # int32 [T, WORK_STRIDE]: per tensor [prefix, remaining k, histograms]
    WORK_STRIDE: tl.constexpr,
    HIST_OFFSET: tl.constexpr,
    SHIFT: tl.constexpr,
    NUM_BINS: tl.constexpr,
    HIGH: tl.constexpr,
    FIRST: tl.constexpr,
    TILES: tl.constexpr,        # BLOCK-element tiles per chunk
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + 2 * pid).to(tl.int64)
    start = tl.load(chunk_ptr + 2 * pid + 1)
    n = tl.load(meta_ptr + 3 * t)
    cols = tl.load(meta_ptr + 3 * t + 1)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    # broadcast before use (see fused_step.py: interpreter typing of scalar bools)
    has_factor = (zero + tl.load(meta_ptr + 3 * t + 2)) != 0
    gam_ptr = tl.load(addr_ptr + 2 * t).to(tl.pointer_type(tl.float32))
    factor_ptr = tl.load(addr_ptr + 2 * t + 1).to(tl.pointer_type(tl.float32))
    work = work_ptr + t * WORK_STRIDE
    prefix = tl.load(work).to(tl.uint32, bitcast=True)
    hist = tl.zeros([NUM_BINS], dtype=tl.int32)
    skipped = tl.full((), 0, tl.int32)
    for i in range(TILES):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        s = tl.load(gam_ptr + offs, mask=inb, other=0.0)
        # s * 1.0 == s exactly, so Dense scores are GAM bit for bit
        f = tl.load(factor_ptr + offs % cols, mask=inb & has_factor, other=1.0)
        key = _order_key(s * f)
        counts, missed = _digit_counts(key, inb, prefix, SHIFT, NUM_BINS, HIGH, FIRST)
        hist += counts
        skipped += missed
    _flush_histogram(work + HIST_OFFSET, hist, skipped, NUM_BINS)


@triton.jit
def _multi_pick_kernel(
    work_ptr,    # int32 [T, WORK_STRIDE]
    k_ptr,       # int32 [T]: k of each tensor (read by the first pass)
    out_ptr,     # fp32 [T]: thresholds
    WORK_STRIDE: tl.constexpr,
    HIST_OFFSET: tl.constexpr,
    SHIFT: tl.constexpr,
    NUM_BINS: tl.constexpr,
    FIRST: tl.constexpr,
    WRITE: tl.constexpr,
):
    t = tl.program_id(0)
    work = work_ptr + t * WORK_STRIDE
    bins = tl.arange(0, NUM_BINS)
    hist = tl.load(work + HIST_OFFSET + bins)
    if FIRST:
        remaining = tl.load(k_ptr + t)
        prefix = tl.full((), 0, tl.uint32)
    else:
        remaining = tl.load(work + 1)
        prefix = tl.load(work).to(tl.uint32, bitcast=True)
    total = tl.sum(hist, axis=0)
    above = total - tl.cumsum(hist, axis=0)
    hit = (above < remaining) & (above + hist >= remaining)
    b = tl.max(tl.where(hit, bins, -1), axis=0)
    remaining -= tl.sum(tl.where(bins == b, above, 0), axis=0)
    prefix = prefix | (b.to(tl.uint32) << SHIFT)
    tl.store(work, prefix.to(tl.int32, bitcast=True))
    tl.store(work + 1, remaining)
    if WRITE:
        tl.store(out_ptr + t, _key_to_float(prefix))


def select_thresholds(items, approx: bool = False) -> list[torch.Tensor]:
    """``select_threshold`` of every ``(gam, column_factor or None, k)`` in ``items`` in 7
    launches; returns one 0-d fp32 tensor per item (views of one device buffer)."""
    from .fused_step import _to_device   # pinned, non-blocking table upload

    if not items:
        return []
    device = items[0][0].device
    addr = np.zeros((len(items), 2), dtype=np.int64)
    meta = np.zeros((len(items), 3), dtype=np.int32)
    ks = np.zeros(len(items), dtype=np.int32)
    chunks = []
    tiles = 8 if device.type == "cuda" else 2
    for i, (gam, factor, k) in enumerate(items):
        _check_selection(gam, factor, k)
        if gam.device != device:
            raise ValueError(f"all tensors must be on {device}, got one on {gam.device}")
        n = gam.numel()
        addr[i] = [gam.data_ptr(), (gam if factor is None else factor).data_ptr()]
        meta[i] = [n, 1 if factor is None else factor.numel(), factor is not None]
        ks[i] = k
        starts = np.arange(0, n, tiles * BLOCK, dtype=np.int32)
        chunks.append(np.stack([np.full_like(starts, i), starts], axis=1))
    addr_t, meta_t = _to_device(addr, device), _to_device(meta, device)
    chunk_t, k_t = _to_device(np.concatenate(chunks), device), _to_device(ks, device)
    work = torch.zeros((len(items), WORKSPACE), dtype=torch.int32, device=device)
    out = torch.empty(len(items), dtype=torch.float32, device=device)
    offset = 2
    passes = PASSES[:1] if approx else PASSES
    for i, (shift, bins) in enumerate(passes):
        _multi_hist_kernel[(chunk_t.shape[0],)](
            addr_t, meta_t, chunk_t, work, WORK_STRIDE=WORKSPACE, HIST_OFFSET=offset,
            SHIFT=shift, NUM_BINS=bins, HIGH=shift + bins.bit_length() - 1, FIRST=i == 0,
            TILES=tiles, BLOCK=BLOCK)
        _multi_pick_kernel[(len(items),)](
            work, k_t, out, WORK_STRIDE=WORKSPACE, HIST_OFFSET=offset, SHIFT=shift,
            NUM_BINS=bins, FIRST=i == 0, WRITE=i == len(passes) - 1)
        offset += bins
    # Inputs freed by the caller after this returns are safe: the caching allocator
    # reuses memory in stream order, after these kernels.
    return [out[i] for i in range(len(items))]
