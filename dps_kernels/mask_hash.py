"""Counter-based hash for the DPS Mix Stage I keep-masks, shared bit for bit by every backend.

Mix draws a fresh Bernoulli(1 - p) keep-mask over the input features (columns) of each
weight at every Stage I step. Instead of a stateful RNG, the mask is a pure function of
``(seed, parameter index, step, column)``, so a recomputed forward (gradient
checkpointing), every micro-batch of one optimizer step, the optimizer step itself and
every backend (torch, Triton, C++) see the same mask without storing it.

The hash is a 32-bit integer mixer (``lowbias32`` shape from Wellons' hash-prospector,
with multipliers below 2**31 so that torch can evaluate it exactly in int64):

    x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15   (mod 2**32)

Keys are chained, one mix per field; ``key_base`` (the first three mixes) is fixed per
parameter, and the last mix, with the step, is done on the host or, by the fused and
capturable kernels, on the device:

    key  = H(H(H(H(seed_lo) ^ seed_hi) ^ param_index) ^ step)
    h    = H(key ^ column)
    keep = (h >> 8) < keep_threshold,   keep_threshold = floor((1 - p) * 2**24)

so each kernel only evaluates ``H(key ^ column)`` and one integer compare.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
MULT_1 = 0x21F0AAAD
MULT_2 = 0x735A2D97
KEEP_BITS = 24  # the top 24 bits of the hash are compared with the keep threshold


def hash32(x: int) -> int:
    """The 32-bit mixer on a Python int (host side)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MULT_1) & MASK32
    x ^= x >> 15
    x = (x * MULT_2) & MASK32
    x ^= x >> 15
    return x


def hash32_tensor(x: torch.Tensor) -> torch.Tensor:
    """The same mixer on an int64 tensor holding values in [0, 2**32).

    Products stay below 2**63 because both multipliers are below 2**31.
    """
    x = x ^ (x >> 16)
    x = (x * MULT_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MULT_2) & MASK32
    x = x ^ (x >> 15)
    return x


def key_base(seed: int, param_index: int) -> int:
    """The per-(seed, parameter) part of the key; kernels finish it with the step."""
    x = hash32(seed & MASK32)
    x = hash32(x ^ ((seed >> 32) & MASK32))
    return hash32(x ^ (param_index & MASK32))


def step_key(seed: int, param_index: int, step: int) -> int:
    """The per-(seed, parameter, step) prefix of the keep-mask hash: ``H(key_base ^ step)``."""
    return hash32(key_base(seed, param_index) ^ (step & MASK32))


def keep_threshold(p: float) -> int:
    """Integer threshold such that ``(h >> 8) < keep_threshold`` has probability ~ 1 - p."""
    return math.floor((1.0 - p) * (1 << KEEP_BITS))


def keep_threshold_of_fraction(keep: float) -> int:
    """Integer threshold such that ``(h >> 8) < threshold`` has probability ~ ``keep``
    (CHILD-TUNING_F's ``reserve_p``, which is a kept fraction, not DPS's ``p``)."""
    return math.floor(keep * (1 << KEEP_BITS))


def column_keep_mask(key: int, threshold: int, cols: int, device=None) -> torch.Tensor:
    """Bool keep-mask over ``cols`` columns for one parameter and one step."""
    col = torch.arange(cols, dtype=torch.int64, device=device)
    h = hash32_tensor(col ^ key)
    return (h >> 8) < threshold


def element_keep_mask(key: int, threshold: int, start: int, count: int,
                      device=None) -> torch.Tensor:
    """Bool keep-mask of elements ``start .. start + count - 1`` when every element is its
    own column (CHILD-TUNING_F): ``column_keep_mask(key, threshold, n)[start:start + count]``
    without building the other ``n - count`` (a shard's piece of the whole tensor's mask)."""
    col = torch.arange(start, start + count, dtype=torch.int64, device=device)
    h = hash32_tensor(col ^ key)
    return (h >> 8) < threshold


def columns_of(shape) -> int:
    """Number of mask columns of a tensor: the input features of an ``[out, in, ...]`` weight.

    A tensor of 2 or more dims is seen as ``[shape[0], numel // shape[0]]`` (row-major),
    so flat element ``i`` lies in column ``i % cols``. A 0-d or 1-d tensor has one row.
    """
    numel = math.prod(shape)
    if len(shape) >= 2 and shape[0] > 0:
        return numel // shape[0]
    return max(numel, 1)
