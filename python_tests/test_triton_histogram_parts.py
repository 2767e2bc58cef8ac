"""The radix select's histograms, bin by bin, with the first pass whole (4096 bins per
program, triton >= 3.9) and split into 4 programs of 1024 bins (older triton; see
``radix_select.hist_part_bins``): both settings run on whichever triton is installed, so
each stack's tests check the code path the other stack launches too.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``), or on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from dps_kernels import reference as ref
from dps_kernels.backends import interpreter_enabled, unavailable_reason
from dps_kernels.mask_hash import columns_of

REASON = unavailable_reason("triton")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend: {REASON}")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreter_enabled()
                      else "cpu")


def _order_key(score: torch.Tensor) -> torch.Tensor:
    """radix_select._order_key in int64: unsigned order of the key = float order."""
    bits = score.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits & 0x80000000 != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def _items():
    gen = torch.Generator().manual_seed(3)
    items = []
    for shape, signed, mix in (((5, 1013), True, False), ((37, 64), False, True),
                               ((7,), False, False)):
        gam = torch.randn(shape, generator=gen) if signed else \
            torch.rand(shape, generator=gen).pow(3)
        flat = gam.view(-1)
        flat[:flat.numel() // 2] = flat[-1]               # ties
        factor = None
        if mix:
            fam = torch.randint(0, 11, (columns_of(shape),), generator=gen).float()
            factor = ref.mix_column_factor(fam, 10)
        items.append((gam.to(DEVICE), None if factor is None else factor.to(DEVICE),
                      max(1, gam.numel() // 3)))
    return items


def _run(monkeypatch, part_bins):
    from dps_kernels.ops.triton import radix_select

    monkeypatch.setattr(radix_select, "hist_part_bins", lambda: part_bins)
    out = []
    for item in _items():
        thr = torch.empty((), dtype=torch.float32, device=DEVICE)
        tables = radix_select._SelectionTables([item], [thr], DEVICE)
        tables.run(approx=False)
        single = radix_select.select_threshold(*item)   # the torch.library op's kernel
        assert torch.equal(single, thr)
        out.append((tables.work[0].cpu(), thr.cpu()))
    return out


@pytest.mark.parametrize("part_bins", [1024, 4096])
def test_first_pass_histogram_counts_every_element(monkeypatch, part_bins):
    from dps_kernels.ops.triton.radix_select import PASSES

    shift, bins = PASSES[0]
    for (gam, factor, k), (work, thr) in zip(_items(), _run(monkeypatch, part_bins)):
        score = gam if factor is None else ref.mix_score(gam, factor)
        want = torch.bincount((_order_key(score.cpu().reshape(-1)) >> shift), minlength=bins)
        assert torch.equal(work[2:2 + bins].to(torch.int64), want)
        assert torch.equal(thr, ref.kth_largest(score, k).cpu())


def test_split_and_whole_histograms_agree(monkeypatch):
    whole = _run(monkeypatch, 4096)
    split = _run(monkeypatch, 1024)
    for (w_work, w_thr), (s_work, s_thr) in zip(whole, split):
        assert torch.equal(w_work, s_work) and torch.equal(w_thr, s_thr)


def test_part_bins_follow_the_triton_version(monkeypatch):
    from dps_kernels.ops.triton import radix_select

    for version, want in (("3.6.0", 1024), ("3.8.0", 1024), ("3.9.0", 4096),
                          ("3.10.1", 4096)):
        monkeypatch.setattr(radix_select.triton, "__version__", version)
        assert radix_select.hist_part_bins() == want
