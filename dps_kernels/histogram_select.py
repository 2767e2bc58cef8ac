"""Exact k-th largest over a union of tensors by radix select on summed histograms.

The fused backends select per tensor (``backends/*.select_thresholds``). Two callers need
the k-th largest over something bigger than one tensor:

* CHILD-TUNING_D: one threshold over all targeted tensors together (the official code
  concatenates them and calls ``np.percentile``; here nothing is concatenated);
* a sharded tensor (FSDP2): one threshold over the shards of several processes.

Both are the same radix select, only the histograms are summed over more pieces: over the
tensors of a selection group here, and over processes by the optional ``reduce`` callback
(an ``all_reduce`` of the ``[groups, bins]`` count matrix: one collective per pass for all
groups at once).

Keys and digits are those of the Triton kernels (``ops/triton/radix_select.py``): the fp32
bit pattern mapped to an unsigned order key, 3 passes of 12 + 10 + 10 bits, most
significant first. After pass 3 the prefix is the exact key of the k-th largest value.
Histograms are built with ``torch.bincount`` on each piece's device and summed on the
host, so pieces may live on different devices. Cost: the int64 keys of every piece once
(8 B per element, transient) and one ``bincount`` over them; the later passes count only
the keys left under the prefix. This runs once per selection, not per step.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

PASSES = ((20, 12), (10, 10), (0, 10))   # (shift, digit bits) of each pass
_MASK32 = 0xFFFFFFFF
_SIGN = 0x80000000


def order_keys(score: torch.Tensor) -> torch.Tensor:
    """fp32 scores -> int64 keys in [0, 2**32) whose order is the float order."""
    bits = score.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32)
    bits = bits.to(torch.int64) & _MASK32
    return torch.where((bits & _SIGN) != 0, (~bits) & _MASK32, bits | _SIGN)


def key_to_float(key: int) -> float:
    """Inverse of :func:`order_keys` for one key (host)."""
    bits = key ^ _SIGN if key & _SIGN else (~key) & _MASK32
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def kth_largest_of_unions(groups: Sequence[Sequence[torch.Tensor]], ks: Sequence[int],
                          reduce: Optional[Callable[[torch.Tensor], None]] = None,
                          totals: Optional[Sequence[int]] = None) -> list[float]:
    """The exact ``ks[g]``-th largest value of the union of the tensors of ``groups[g]``.

    ``reduce(counts)`` (optional) sums the int64 ``[len(groups), bins]`` count matrix in
    place over the pieces held elsewhere (e.g. ``dist.all_reduce``); it is called once per
    pass (3 times) with every group in one matrix. ``totals`` (optional) are the element
    counts of the whole unions (including pieces held elsewhere), for the range check of
    ``ks``; by default the local counts.
    """
    if len(groups) != len(ks):
        raise ValueError(f"got {len(groups)} groups and {len(ks)} values of k")
    sizes = [sum(t.numel() for t in group) for group in groups]
    totals = sizes if totals is None else list(totals)
    for g, (k, n) in enumerate(zip(ks, totals)):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"k of selection group #{g} must be an int in [1, {n}], got {k!r}")
    prefix = [0] * len(groups)
    remaining = list(ks)
    done_bits = 0
    # Each piece's keys are computed once; after every pass only the keys under the chosen
    # prefix stay (about 1/4096 of them after the first pass), so passes 2 and 3 cost
    # almost nothing.
    candidates = [[order_keys(piece) for piece in group if piece.numel()] for group in groups]
    for shift, bits in PASSES:
        bins = 1 << bits
        counts = torch.zeros(len(groups), bins, dtype=torch.int64)
        for g, group in enumerate(candidates):
            if done_bits:
                group[:] = [keys[(keys >> (shift + bits)) == prefix[g]] for keys in group]
            for keys in group:
                digits = (keys >> shift) & (bins - 1)
                counts[g] += torch.bincount(digits, minlength=bins).cpu()
        if reduce is not None:
            reduce(counts)
        # bin b holds the k-th largest when count(bins > b) < k <= count(bins >= b)
        at_or_above = counts.flip(1).cumsum(1).flip(1)
        for g in range(len(groups)):
            row = at_or_above[g]
            if int(row[0]) < remaining[g]:
                raise RuntimeError(
                    f"selection group #{g}: its histograms hold {int(row[0])} elements, fewer "
                    f"than the {remaining[g]} still to select (with a reduce: did every "
                    f"process take part with the same tensors?)")
            b = int((row >= remaining[g]).nonzero().max())
            above = int(row[b + 1]) if b + 1 < bins else 0
            remaining[g] -= above
            prefix[g] = (prefix[g] << bits) | b
        done_bits += bits
    return [key_to_float(key) for key in prefix]
