"""Exact k-th largest over unions of tensors (``dps_kernels/histogram_select.py``) against
``torch.kthvalue`` of the concatenation: ties, zeros, one element, k = 1 and k = n, several
groups at once, and a ``reduce`` that sums the histograms of pieces held "elsewhere"."""
from __future__ import annotations

import threading

import pytest
import torch

from dps_kernels.histogram_select import kth_largest_of_unions, order_keys


def kth(values, k):
    flat = torch.cat([v.reshape(-1) for v in values]).float()
    return torch.kthvalue(flat, flat.numel() - k + 1).values.item()


def pieces(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 40, (3,), generator=g).tolist()
    out = [torch.rand(n, generator=g) ** 6 for n in sizes]            # wide exponent range
    out.append(torch.tensor([0.25, 0.25, 0.25, 0.0, 1e-30, 3e38]))    # ties, zero, extremes
    return out


@pytest.mark.parametrize("seed", range(8))
def test_union_equals_kthvalue_of_the_concatenation(seed):
    group = pieces(seed)
    n = sum(t.numel() for t in group)
    for k in sorted({1, 2, n // 3 + 1, n // 2, n - 1, n}):
        assert kth_largest_of_unions([group], [k]) == [kth(group, k)]


def test_several_groups_in_one_call():
    groups = [pieces(1), pieces(2)[:2], [torch.tensor([5.0])]]
    ks = [3, 1, 1]
    assert kth_largest_of_unions(groups, ks) == [kth(g, k) for g, k in zip(groups, ks)]


def test_reduce_sums_histograms_of_pieces_held_elsewhere():
    """Two "ranks" each hold half of every group; summing their count matrices (what an
    all_reduce does) gives the k-th largest of the whole union, one call per pass."""
    whole = [pieces(3), pieces(4)]
    halves = [[[t[: t.numel() // 2] for t in g], [t[t.numel() // 2:] for t in g]] for g in whole]
    ks = [5, 9]
    calls = []
    # Both ranks see the same prefixes only after summing, so run them in lock step.
    barrier = threading.Barrier(2)
    shared: list = [None, None]
    results = [None, None]

    def rank_fn(rank):
        def all_reduce(counts):
            shared[rank] = counts.clone()
            barrier.wait()
            total = shared[0] + shared[1]
            barrier.wait()
            counts.copy_(total)
            calls.append(rank)
        results[rank] = kth_largest_of_unions([halves[0][rank], halves[1][rank]], ks,
                                              reduce=all_reduce,
                                              totals=[sum(t.numel() for t in g) for g in whole])

    threads = [threading.Thread(target=rank_fn, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = [kth(g, k) for g, k in zip(whole, ks)]
    assert results[0] == results[1] == expected
    assert len(calls) == 2 * 3   # one collective per pass per rank, for both groups


def test_bad_k_names_the_group():
    with pytest.raises(ValueError, match=r"group #1 must be an int in \[1, 2\], got 3"):
        kth_largest_of_unions([[torch.ones(3)], [torch.ones(2)]], [1, 3])


def test_order_keys_follow_float_order():
    x = torch.tensor([-2.0, -0.5, 0.0, 1e-38, 0.5, 2.0, float("inf")])
    keys = order_keys(x)
    assert torch.all(keys[1:] > keys[:-1])


def test_missing_counts_fail_clearly():
    """k beyond what the histograms hold (a reduce that lost a process) is an error."""
    with pytest.raises(RuntimeError, match="hold 3 elements, fewer than the 5"):
        kth_largest_of_unions([[torch.ones(3)]], [5], reduce=lambda c: None, totals=[6])
