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
On triton < 3.9 the first pass reads each chunk 4 times (``hist_part_bins``), 3 of them
expected from L2 (not measured).

Histograms: each program accumulates a private histogram of its tiles with
``tl.histogram`` and adds it to the global one with one vector ``atomic_add``. Elements that
do not match the prefix (or lie past the end) are counted in bin 0 and subtracted again,
which avoids relying on ``tl.histogram``'s ``mask`` argument (absent in older Triton).
A program covers all bins of its pass, or, on triton < 3.9, 1024 of the first pass's 4096
(4 programs per chunk): see ``hist_part_bins``.

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

from ...step_types import MAX_TENSOR_ELEMENTS

PASSES = ((20, 4096), (10, 1024), (0, 1024))   # (shift, bins) of each pass
WORKSPACE = 2 + sum(bins for _, bins in PASSES)  # [prefix, remaining k, histograms...]
BLOCK = 1024
# Histogram launches: 8 warps. A BLOCK tile is then 4 fp32 per thread (one 128-bit load),
# and triton 3.6 keeps the 1024-bin passes at 79-101 registers (4 warps: 128-168, 12
# resident warps/SM on sm_90a; bench/results/aot_triton36/aot.md).
HIST_WARPS = 8


def hist_part_bins() -> int:
    """Bins per histogram program: 4096 (a pass's whole histogram) on triton >= 3.9; 1024
    on older triton, whose ``tl.histogram`` keeps a per-warp histogram of NUM_BINS / 32
    registers per lane (4096 bins: 255 registers and ~460 B of spills on triton 3.6), so
    the 4096-bin first pass runs as 4 programs per chunk of 1024 bins each, each reading
    the chunk (the 2nd to 4th read from L2, as the programs of a chunk are adjacent).
    Measured on 3.6, 3.8 (which passes the gate with the 3.6 setting) and 3.9; 3.7 takes
    the 3.6 setting untested."""
    return 4096 if _triton_version() >= (3, 9) else 1024


def _triton_version() -> tuple:
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


@triton.jit
def _order_key(s):
    """fp32 -> uint32 whose unsigned order is the float order (sign flip / complement)."""
    bits = s.to(tl.uint32, bitcast=True)
    sign = tl.full((), 0x80000000, tl.uint32)
    # ``bits ^ ones`` is ``~bits``: triton 3.6's interpreter builds ``~`` on uint32 from
    # np.full(1, -1, uint32), which numpy >= 2 refuses.
    ones = tl.full((), 0xFFFFFFFF, tl.uint32)
    return tl.where((bits & sign) != 0, bits ^ ones, bits | sign)


@triton.jit
def _key_to_float(key):
    """Inverse of _order_key."""
    sign = tl.full((), 0x80000000, tl.uint32)
    ones = tl.full((), 0xFFFFFFFF, tl.uint32)   # key ^ ones == ~key (see _order_key)
    bits = tl.where((key & sign) != 0, key ^ sign, key ^ ones)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _score_key(gam_ptr, factor_ptr, offs, inb, cols, HAS_FACTOR: tl.constexpr):
    s = tl.load(gam_ptr + offs, mask=inb, other=0.0)
    if HAS_FACTOR:
        s = s * tl.load(factor_ptr + offs % cols, mask=inb, other=0.0)
    return _order_key(s)


@triton.jit
def _tile_digits(gam_ptr, factor_ptr, start, n, cols, prefix, SHIFT: tl.constexpr,
                 NUM_BINS: tl.constexpr, HIGH: tl.constexpr, FIRST: tl.constexpr,
                 HAS_FACTOR: tl.constexpr, BLOCK: tl.constexpr):
    """This pass's digit of the BLOCK scores starting at ``start``, and which lanes count
    (in the tensor and, after the first pass, matching the known prefix).

    A tile wholly inside the tensor runs with an all-true mask of known constancy, so its
    GAM loads vectorize (128-bit); only the tensor's last tile masks with ``offs < n``."""
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        inb = tl.zeros([BLOCK], dtype=tl.int32) == 0
        key = _score_key(gam_ptr, factor_ptr, offs, inb, cols, HAS_FACTOR)
    else:
        inb = offs < n
        key = _score_key(gam_ptr, factor_ptr, offs, inb, cols, HAS_FACTOR)
    if FIRST:
        valid = inb
    else:
        valid = inb & ((key >> HIGH) == (prefix >> HIGH))
    return ((key >> SHIFT) & (NUM_BINS - 1)).to(tl.int32), valid


@triton.jit
def _flush_histogram(hist_ptr, hist, skipped, NUM_BINS: tl.constexpr):
    """Take the lanes that did not count back out of bin 0 and add to the shared histogram.

    The correction keeps the histogram a true count (for debugging and the approx path's
    reasoning); the pick itself never depends on bin 0's count, since bin 0 is the lowest
    bin and ``remaining`` only subtracts bins above the chosen one."""
    bins = tl.arange(0, NUM_BINS)
    hist -= tl.where(bins == 0, skipped, 0)
    # relaxed and result unused: a non-returning reduction (RED), no acquire fence per bin
    tl.atomic_add(hist_ptr + bins, hist, mask=hist != 0, sem="relaxed")


@triton.jit
def _chunk_histogram(gam_ptr, factor_ptr, hist_ptr, first, tiles, part, n, cols, prefix,
                     SHIFT: tl.constexpr, NUM_BINS: tl.constexpr, PART_BINS: tl.constexpr,
                     HIGH: tl.constexpr, FIRST: tl.constexpr, HAS_FACTOR: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Add to the bins at ``hist_ptr`` the counts of part ``part`` (bins ``[part *
    PART_BINS, (part + 1) * PART_BINS)``) of the digit histogram of ``tiles`` tiles of
    BLOCK scores from element ``first``. PART_BINS == NUM_BINS: the whole histogram.

    A while loop, not ``range(tiles)``: triton 3.6's interpreter converts a runtime loop
    bound with ``int()`` of a shape-(1,) array, which numpy >= 2 refuses."""
    hist = tl.zeros([PART_BINS], dtype=tl.int32)
    skipped = tl.full((), 0, tl.int32)
    i = tl.full((), 0, tl.int32)
    while i < tiles:
        start = tl.multiple_of(first + i * BLOCK, BLOCK)
        digit, valid = _tile_digits(gam_ptr, factor_ptr, start, n, cols, prefix, SHIFT,
                                    NUM_BINS, HIGH, FIRST, HAS_FACTOR, BLOCK)
        if PART_BINS < NUM_BINS:
            valid = valid & ((digit // PART_BINS) == part)
            digit = digit % PART_BINS
        # lanes that do not count land in bin 0 and are taken out again (_flush_histogram)
        hist += tl.histogram(tl.where(valid, digit, 0), PART_BINS)
        skipped += tl.sum(1 - valid.to(tl.int32), axis=0)
        i += 1
    _flush_histogram(hist_ptr + part * PART_BINS, hist, skipped, PART_BINS)


@triton.jit
def _pick_bin(hist, remaining, prefix, SHIFT: tl.constexpr, NUM_BINS: tl.constexpr):
    """The bin b holding the ``remaining``-th largest (``count(bins > b) < remaining <=
    count(bins >= b)``): returns the prefix with b appended and what remains of k in b."""
    bins = tl.arange(0, NUM_BINS)
    total = tl.sum(hist, axis=0)
    above = total - tl.cumsum(hist, axis=0)   # elements in bins strictly above each bin
    hit = (above < remaining) & (above + hist >= remaining)
    b = tl.max(tl.where(hit, bins, -1), axis=0)
    remaining -= tl.sum(tl.where(bins == b, above, 0), axis=0)
    return prefix | (b.to(tl.uint32) << SHIFT), remaining


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
    PART_BINS: tl.constexpr,    # bins per program (see hist_part_bins); NUM_BINS: all
    BLOCK: tl.constexpr,
):
    # program id = (chunk of ``tiles`` tiles, part), part fastest: the programs of one
    # chunk run together, so the parts after the first read it from L2
    PARTS: tl.constexpr = NUM_BINS // PART_BINS
    pid = tl.program_id(0)
    prefix = tl.load(work_ptr).to(tl.uint32, bitcast=True)
    _chunk_histogram(gam_ptr, factor_ptr, work_ptr + HIST_OFFSET,
                     (pid // PARTS) * tiles * BLOCK, tiles, pid % PARTS, n, cols, prefix,
                     SHIFT, NUM_BINS, PART_BINS, HIGH, FIRST, HAS_FACTOR, BLOCK)


@triton.jit(do_not_specialize=["k"])
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
    prefix, remaining = _pick_bin(hist, remaining, prefix, SHIFT, NUM_BINS)
    tl.store(work_ptr, prefix.to(tl.int32, bitcast=True))
    tl.store(work_ptr + 1, remaining)
    if WRITE:
        tl.store(out_ptr, _key_to_float(prefix))


def _programs(n: int, device: torch.device) -> int:
    blocks = triton.cdiv(n, BLOCK)
    if device.type == "cuda":
        # A few programs per SM: enough to fill the GPU, few global atomics per bin. At
        # most 1024 programs, so the last program's tiles end less than 1024 * BLOCK (2**20,
        # the margin of MAX_TENSOR_ELEMENTS) past n: int32 offsets cannot overflow.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return min(blocks, 4 * sms, 1024)
    return min(blocks, 4)


def _check_selection(gam: torch.Tensor, column_factor: Optional[torch.Tensor], k: int) -> None:
    if gam.dtype != torch.float32 or not gam.is_contiguous():
        raise ValueError(f"gam must be a contiguous fp32 tensor, got {gam.dtype}, "
                         f"contiguous={gam.is_contiguous()}")
    n = gam.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"selection over more than {MAX_TENSOR_ELEMENTS} elements is not "
                         f"supported (n={n})")
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
        part_bins = min(bins, hist_part_bins())
        hist_kernel[(programs * (bins // part_bins),)](
            gam, factor, work, n, cols, tiles, HIST_OFFSET=offset, SHIFT=shift,
            NUM_BINS=bins, HIGH=shift + bins.bit_length() - 1, FIRST=i == 0,
            HAS_FACTOR=has_factor, PART_BINS=part_bins, BLOCK=BLOCK, num_warps=HIST_WARPS)
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
#
# Capturable (``CapturableSelection``): the tables and the workspace are built once and the
# same launches run at every step; each program reads its tensor's step counter and
# returns at once unless the tensor has just closed Stage I (or GradScaler found an inf),
# and the last pick zeroes its workspace row again for the next stage boundary.

@triton.jit
def _selection_due(step_addr_ptr, t, update_steps, found_inf_ptr, CAPTURABLE: tl.constexpr,
                   HAS_FOUND_INF: tl.constexpr):
    """Capturable: True when tensor ``t`` has just taken the last step of a Stage I."""
    if CAPTURABLE:
        step = tl.load(tl.load(step_addr_ptr + t).to(tl.pointer_type(tl.float32)))
        s = step.to(tl.int32) + 1      # the step the fused step kernel has just taken
        due = (((s + update_steps - 1) // update_steps) % 2 == 1) & (s % update_steps == 0)
        if HAS_FOUND_INF:
            due = due & (tl.load(found_inf_ptr) == 0)
    else:
        due = True
    return due


@triton.jit(do_not_specialize=["update_steps"])
def _multi_hist_kernel(
    addr_ptr,       # int64 [T, 2]: addresses of GAM and of the column factor (or GAM)
    meta_ptr,       # int32 [T, 2]: numel, cols per tensor
    chunk_ptr,      # int32 [C, 2]: tensor index and first element of each program's chunk
    work_ptr,       # int32 [T, WORK_STRIDE]: per tensor [prefix, remaining k, histograms]
    step_addr_ptr,  # int64 [T]: addresses of the 0-d fp32 step counters (CAPTURABLE)
    update_steps,   # stage length (CAPTURABLE)
    found_inf_ptr,  # fp32 0-d GradScaler found_inf (HAS_FOUND_INF)
    WORK_STRIDE: tl.constexpr,
    HIST_OFFSET: tl.constexpr,
    SHIFT: tl.constexpr,
    NUM_BINS: tl.constexpr,
    HIGH: tl.constexpr,
    FIRST: tl.constexpr,
    HAS_FACTOR: tl.constexpr,   # Mix scores (GAM * factor[col]); Dense reads GAM only
    CAPTURABLE: tl.constexpr,   # exit unless the tensor has just closed Stage I
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,      # every GAM address is a multiple of 16 bytes
    TILES: tl.constexpr,        # BLOCK-element tiles per chunk
    PART_BINS: tl.constexpr,    # bins per program (see hist_part_bins); NUM_BINS: all
    BLOCK: tl.constexpr,
):
    # program = (chunk, part), part fastest (see _radix_hist_kernel)
    PARTS: tl.constexpr = NUM_BINS // PART_BINS
    part = tl.program_id(0) % PARTS
    pid = tl.program_id(0) // PARTS
    t = tl.load(chunk_ptr + 2 * pid).to(tl.int64)
    if _selection_due(step_addr_ptr, t, update_steps, found_inf_ptr, CAPTURABLE,
                      HAS_FOUND_INF):
        chunk_start = tl.load(chunk_ptr + 2 * pid + 1)
        n = tl.load(meta_ptr + 2 * t)
        cols = tl.load(meta_ptr + 2 * t + 1)
        gam_ptr = tl.load(addr_ptr + 2 * t).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            gam_ptr = tl.multiple_of(gam_ptr, 16)   # on the pointer: survives the cast
        factor_ptr = tl.load(addr_ptr + 2 * t + 1).to(tl.pointer_type(tl.float32))
        work = work_ptr + t * WORK_STRIDE
        prefix = tl.load(work).to(tl.uint32, bitcast=True)
        _chunk_histogram(gam_ptr, factor_ptr, work + HIST_OFFSET, chunk_start, TILES, part, n,
                         cols, prefix, SHIFT, NUM_BINS, PART_BINS, HIGH, FIRST, HAS_FACTOR,
                         BLOCK)


@triton.jit(do_not_specialize=["update_steps"])
def _multi_pick_kernel(
    work_ptr,       # int32 [T, WORK_STRIDE]
    k_ptr,          # int32 [T]: k of each tensor (read by the first pass)
    out_addr_ptr,   # int64 [T]: address of each tensor's 0-d fp32 threshold
    step_addr_ptr,  # int64 [T] (CAPTURABLE)
    update_steps,   # (CAPTURABLE)
    found_inf_ptr,  # (HAS_FOUND_INF)
    WORK_STRIDE: tl.constexpr,
    HIST_OFFSET: tl.constexpr,
    SHIFT: tl.constexpr,
    NUM_BINS: tl.constexpr,
    FIRST: tl.constexpr,
    WRITE: tl.constexpr,        # last pass: write the threshold
    CAPTURABLE: tl.constexpr,   # exit unless due; the last pass re-zeroes the workspace row
    HAS_FOUND_INF: tl.constexpr,
):
    t = tl.program_id(0)
    if _selection_due(step_addr_ptr, t, update_steps, found_inf_ptr, CAPTURABLE,
                      HAS_FOUND_INF):
        work = work_ptr + t * WORK_STRIDE
        bins = tl.arange(0, NUM_BINS)
        hist = tl.load(work + HIST_OFFSET + bins)
        if FIRST:
            remaining = tl.load(k_ptr + t)
            prefix = tl.full((), 0, tl.uint32)
        else:
            remaining = tl.load(work + 1)
            prefix = tl.load(work).to(tl.uint32, bitcast=True)
        prefix, remaining = _pick_bin(hist, remaining, prefix, SHIFT, NUM_BINS)
        tl.store(work, prefix.to(tl.int32, bitcast=True))
        tl.store(work + 1, remaining)
        if WRITE:
            out = tl.load(out_addr_ptr + t).to(tl.pointer_type(tl.float32))
            tl.store(out, _key_to_float(prefix))
            if CAPTURABLE:
                # leave the row as it was allocated (zeros) for the next stage boundary
                for start in range(0, WORK_STRIDE, 1024):
                    offs = start + tl.arange(0, 1024)
                    tl.store(work + offs, tl.zeros([1024], dtype=tl.int32),
                             mask=offs < WORK_STRIDE)


@triton.jit(do_not_specialize=["update_steps"])
def _capturable_factor_kernel(
    addr_ptr,       # int64 [T, 2]: addresses of FAM and of the column factor
    meta_ptr,       # int32 [T, 2]: numel, cols
    step_addr_ptr,  # int64 [T]
    table_ptr,      # fp32 [update_steps + 1]: reference.mix_column_factor of F = 0..us
    update_steps,
    found_inf_ptr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Capturable Mix: ``factor = table[clamp(FAM, 1, us)]`` when the tensor has just
    closed Stage I. FAM counts keeps over one Stage I, an integer in [0, us], so the table
    (computed once on the host by the reference) gives the reference's bits exactly."""
    t = tl.program_id(0)
    if _selection_due(step_addr_ptr, t, update_steps, found_inf_ptr, True, HAS_FOUND_INF):
        cols = tl.load(meta_ptr + 2 * t + 1)
        fam_ptr = tl.load(addr_ptr + 2 * t).to(tl.pointer_type(tl.float32))
        factor_ptr = tl.load(addr_ptr + 2 * t + 1).to(tl.pointer_type(tl.float32))
        start = cols * 0
        while start < cols:   # not range(0, cols, BLOCK): see _chunk_histogram
            offs = start + tl.arange(0, BLOCK)
            inb = offs < cols
            f = tl.load(fam_ptr + offs, mask=inb, other=1.0).to(tl.int32)
            f = tl.minimum(tl.maximum(f, 1), update_steps)
            tl.store(factor_ptr + offs, tl.load(table_ptr + f, mask=inb, other=0.0), mask=inb)
            start += BLOCK


def _chunk_table(sizes, tiles: int) -> np.ndarray:
    chunks = [np.stack([np.full(triton.cdiv(n, tiles * BLOCK), i, dtype=np.int32),
                        np.arange(0, n, tiles * BLOCK, dtype=np.int32)], axis=1)
              for i, n in enumerate(sizes)]
    return np.concatenate(chunks)


class _SelectionTables:
    """Device tables of one list of ``(gam, column_factor or None, k)``; all Dense or all Mix."""

    def __init__(self, items, out, device, steps=None):
        from .fused_step import to_device   # pinned, non-blocking table upload

        addr = np.zeros((len(items), 2), dtype=np.int64)
        meta = np.zeros((len(items), 2), dtype=np.int32)
        ks = np.zeros(len(items), dtype=np.int32)
        for i, (gam, factor, k) in enumerate(items):
            _check_selection(gam, factor, k)
            if gam.device != device:
                raise ValueError(f"all tensors must be on {device}, got one on {gam.device}")
            addr[i] = [gam.data_ptr(), (gam if factor is None else factor).data_ptr()]
            meta[i] = [gam.numel(), 1 if factor is None else factor.numel()]
            ks[i] = k
        self.has_factor = items[0][1] is not None
        self.tiles = 8 if device.type == "cuda" else 2
        self.addr, self.meta = to_device(addr, device), to_device(meta, device)
        self.chunks = to_device(_chunk_table(meta[:, 0], self.tiles), device)
        self.ks = to_device(ks, device)
        self.out_addr = to_device(np.array([o.data_ptr() for o in out], dtype=np.int64), device)
        self.aligned = bool((addr[:, 0] % 16 == 0).all())
        self.work = torch.zeros((len(items), WORKSPACE), dtype=torch.int32, device=device)
        self.steps = (to_device(np.array([s.data_ptr() for s in steps], dtype=np.int64), device)
                      if steps is not None else self.ks)

    def run(self, approx: bool, capturable: bool = False, update_steps: int = 1,
            found_inf=None) -> None:
        offset = 2
        passes = PASSES[:1] if approx else PASSES
        flag = self.ks if found_inf is None else found_inf
        for i, (shift, bins) in enumerate(passes):
            part_bins = min(bins, hist_part_bins())
            _multi_hist_kernel[(self.chunks.shape[0] * (bins // part_bins),)](
                self.addr, self.meta, self.chunks, self.work, self.steps, update_steps, flag,
                WORK_STRIDE=WORKSPACE, HIST_OFFSET=offset, SHIFT=shift, NUM_BINS=bins,
                HIGH=shift + bins.bit_length() - 1, FIRST=i == 0, HAS_FACTOR=self.has_factor,
                CAPTURABLE=capturable, HAS_FOUND_INF=found_inf is not None,
                ALIGNED=self.aligned, TILES=self.tiles, PART_BINS=part_bins, BLOCK=BLOCK,
                num_warps=HIST_WARPS)
            _multi_pick_kernel[(self.ks.shape[0],)](
                self.work, self.ks, self.out_addr, self.steps, update_steps, flag,
                WORK_STRIDE=WORKSPACE, HIST_OFFSET=offset, SHIFT=shift, NUM_BINS=bins,
                FIRST=i == 0, WRITE=i == len(passes) - 1, CAPTURABLE=capturable,
                HAS_FOUND_INF=found_inf is not None)
            offset += bins


def select_thresholds(items, approx: bool = False, out=None) -> list[torch.Tensor]:
    """``select_threshold`` of every ``(gam, column_factor or None, k)`` in ``items`` in 7
    launches per kind of score (Dense, Mix); returns one 0-d fp32 tensor per item, ``out``
    (written in place) when given, else views of one new device buffer."""
    if not items:
        return []
    device = items[0][0].device
    if out is None:
        buffer = torch.empty(len(items), dtype=torch.float32, device=device)
        out = [buffer[i] for i in range(len(items))]
    elif len(out) != len(items) or any(o.dtype != torch.float32 or o.numel() != 1
                                       or o.device != device for o in out):
        raise ValueError(f"out must hold {len(items)} one-element fp32 tensors on {device}")
    for has_factor in (False, True):
        chosen = [i for i, item in enumerate(items) if (item[1] is not None) == has_factor]
        if chosen:
            _SelectionTables([items[i] for i in chosen], [out[i] for i in chosen],
                             device).run(approx)
    # Inputs freed by the caller after this returns are safe: the caching allocator
    # reuses memory in stream order, after these kernels.
    return out


class CapturableSelection:
    """The selection of one capturable param group: built once, ``run()`` at every step.

    ``entries`` are ``(gam, column_factor or None, k, threshold, step, fam or None)``;
    ``factor_table`` (Mix) is ``reference.mix_column_factor`` of ``0..update_steps``.
    Launches per ``run()``: 6 (Dense) or 7 (Mix), the same at every step.
    """

    def __init__(self, entries, update_steps: int, factor_table=None):
        from .fused_step import to_device

        device = entries[0][0].device
        self.update_steps = int(update_steps)
        self.tables = _SelectionTables([(g, f, k) for g, f, k, _, _, _ in entries],
                                       [thr for _, _, _, thr, _, _ in entries], device,
                                       steps=[s for _, _, _, _, s, _ in entries])
        self.factor_table = factor_table
        if factor_table is not None:
            addr = np.array([[fam.data_ptr(), f.data_ptr()] for _, f, _, _, _, fam in entries],
                            dtype=np.int64)
            self.factor_addr = to_device(addr, device)

    def run(self, found_inf=None) -> None:
        flag = self.tables.ks if found_inf is None else found_inf
        if self.factor_table is not None:
            _capturable_factor_kernel[(self.tables.ks.shape[0],)](
                self.factor_addr, self.tables.meta, self.tables.steps, self.factor_table,
                self.update_steps, flag, HAS_FOUND_INF=found_inf is not None, BLOCK=1024)
        self.tables.run(False, capturable=True, update_steps=self.update_steps,
                        found_inf=found_inf)
