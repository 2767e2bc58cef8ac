"""The bit-packed Stage II subnetwork: one layout, shared by every backend.

At the selection (the end of Stage I) the subnetwork ``M = score >= thr`` (``score`` = GAM
for Dense, ``GAM * column_factor[col]`` for Mix; ties kept, see ``reference.selection_mask``)
can be packed once into bits, so that every Stage II consumer (the fused step, Mix weight
and Mix gradient) reads 1 bit per element instead of the 4-byte fp32 GAM (and the factor).

Layout (the same on every backend, so checkpoints move between them):

* an **int32** tensor of ``ceil(n / 32)`` words, on the score's device, ``n`` = number of
  elements of the tensor;
* element ``i`` (flat index, row-major, as ``tensor.reshape(-1)[i]``) is **bit ``i % 32``
  of word ``i // 32``**, least significant bit first: element ``32*j + b`` is
  ``(words[j] >> b) & 1``;
* bits at ``i >= n`` (the tail of the last word) are **zero**;
* int32 holds the uint32 bit pattern: a word with bit 31 set is negative.

This module is the reference, written with plain torch ops; ``Backend.pack_mask`` of each
backend must give the same words bit for bit (the compare is exact on every backend).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import reference as ref

WORD_BITS = 32


def num_words(n: int) -> int:
    """Words of the packed mask of ``n`` elements: ``ceil(n / 32)``."""
    return (int(n) + WORD_BITS - 1) // WORD_BITS


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (any shape, flattened row-major) into int32 words (layout above)."""
    flat = mask.reshape(-1).to(torch.bool)
    n = flat.numel()
    padded = torch.zeros(num_words(n) * WORD_BITS, dtype=torch.int64, device=mask.device)
    padded[:n] = flat.to(torch.int64)
    lanes = torch.arange(WORD_BITS, dtype=torch.int64, device=mask.device)
    # Distinct powers of two: the sum is the bitwise or, a uint32 value in [0, 2**32).
    words = (padded.reshape(-1, WORD_BITS) << lanes).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)   # uint32 bits -> int32 value
    return words.to(torch.int32)


def pack_mask(score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The int32 words of ``score >= threshold`` (ties kept), in the layout above."""
    return pack_bool(ref.selection_mask(score, threshold))


def pack_subnetwork(gam: torch.Tensor, column_factor: Optional[torch.Tensor],
                    threshold: torch.Tensor) -> torch.Tensor:
    """``pack_mask`` of the Dense score (``column_factor`` None) or the Mix score
    ``GAM * column_factor[col]`` (``reference.mix_score``): what ``Backend.pack_mask`` does."""
    score = gam if column_factor is None else ref.mix_score(gam, column_factor)
    return pack_mask(score, threshold)


def unpack_mask(words: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """The bool mask of ``shape`` stored in ``words`` (inverse of ``pack_bool``)."""
    shape = torch.Size(shape)
    n = shape.numel()
    if words.dtype != torch.int32 or words.numel() != num_words(n):
        raise ValueError(f"mask bits of {n} elements must be {num_words(n)} int32 words, got "
                         f"{words.numel()} of {words.dtype}")
    lanes = torch.arange(WORD_BITS, dtype=torch.int32, device=words.device)
    # Arithmetic shift of the int32 word; & 1 keeps bit `lane` whatever the sign.
    bits = (words.reshape(-1, 1) >> lanes) & 1
    return bits.reshape(-1)[:n].reshape(shape).to(torch.bool)


def check_mask_bits(bits: torch.Tensor, n: int, label: str = "mask_bits",
                    device: Optional[torch.device] = None) -> None:
    """Raise ValueError unless ``bits`` can hold the packed mask of ``n`` elements."""
    want = num_words(n)
    if (bits.dtype != torch.int32 or bits.numel() != want or not bits.is_contiguous()
            or (device is not None and bits.device != device)):
        raise ValueError(f"{label} must be a contiguous int32 tensor of ceil({n}/32) = {want} "
                         f"words{'' if device is None else f' on {device}'}, got "
                         f"{bits.dtype} with {bits.numel()} elements on {bits.device}")
