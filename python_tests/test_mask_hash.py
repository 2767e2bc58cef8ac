"""The counter-based Mix keep-mask hash: host and tensor versions agree; masks are Bernoulli(1-p).

The pinned values below are the cross-backend contract: the Triton and C++ kernels are
tested against `column_keep_mask`, and this file keeps `column_keep_mask` itself from
drifting between releases (a checkpoint resumed on a newer version must see the same masks).
"""
import torch

from dps_kernels.mask_hash import (column_keep_mask, columns_of, hash32, hash32_tensor,
                                   keep_threshold, step_key)


def test_tensor_hash_equals_host_hash_over_the_whole_range():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randint(0, 2 ** 32, (4000,), dtype=torch.int64, generator=g),
                        torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1])])
    hashed = hash32_tensor(values)
    assert all(hash32(int(v)) == int(h) for v, h in zip(values, hashed))
    assert int(hashed.max()) < 2 ** 32 and int(hashed.min()) >= 0


def test_pinned_hash_values():
    assert [hash32(x) for x in (0, 1, 2, 0xDEADBEEF)] == [0, 2261973619, 229111015, 707447538]
    assert step_key(0, 0, 1) == 2261973619 and step_key(42, 3, 17) == 3819455026
    mask = column_keep_mask(step_key(1234, 5, 9), keep_threshold(0.3), 16)
    assert mask.int().tolist() == [1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1]


def test_keep_fraction_is_one_minus_p_and_masks_differ_by_step_param_seed():
    cols = 200_000
    for p in (0.1, 0.3, 0.9):
        m = column_keep_mask(step_key(7, 2, 5), keep_threshold(p), cols)
        # binomial std at n=2e5 is <= 0.0012: 5 sigma
        assert abs(m.float().mean().item() - (1 - p)) < 0.006
    base = column_keep_mask(step_key(7, 2, 5), keep_threshold(0.5), 4096)
    for key in (step_key(7, 2, 6), step_key(7, 3, 5), step_key(8, 2, 5), step_key(7 + 2 ** 32, 2, 5)):
        other = column_keep_mask(key, keep_threshold(0.5), 4096)
        agreement = (other == base).float().mean().item()
        assert 0.45 < agreement < 0.55  # independent masks agree on about half the columns


def test_p_zero_keeps_everything_and_p_near_one_almost_nothing():
    assert column_keep_mask(step_key(0, 0, 1), keep_threshold(0.0), 10_000).all()
    assert column_keep_mask(step_key(0, 0, 1), keep_threshold(0.9999), 10_000).float().mean() < 0.002


def test_columns_of():
    assert columns_of((7, 13)) == 13
    assert columns_of((4, 3, 2, 2)) == 12
    assert columns_of((5,)) == 5
    assert columns_of(()) == 1


def test_element_keep_mask_is_a_slice_of_the_whole_tensor_mask():
    """A shard's CHILD-TUNING_F mask: elements start .. start+count-1 of the whole mask."""
    from dps_kernels.mask_hash import element_keep_mask, keep_threshold_of_fraction
    key, thr, n = step_key(5, 2, 7), keep_threshold_of_fraction(0.3), 1000
    whole = column_keep_mask(key, thr, n)
    for start, count in ((0, 1000), (0, 347), (347, 347), (694, 306), (1000, 0)):
        assert torch.equal(element_keep_mask(key, thr, start, count), whole[start:start + count])
    assert not torch.equal(element_keep_mask(key, thr, 1, 347), whole[:347])
