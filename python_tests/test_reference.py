"""The reference itself, checked against PyTorch before anything is checked against it.

- AdamW (torch style) against ``torch.optim.AdamW`` over many steps with non-default
  hyperparameters; hf_legacy against a transcription of transformers 4.7 ``AdamW``.
- Threshold and mask against ``torch.sort`` (ties included).
- Mix score, weight and gradient against the spec's formulas written out directly.

Tolerance: fp32 AdamW differs from torch only by the order of fp32 operations (torch uses
``lerp`` and ``addcdiv``), a few ulp per step; after 50 steps with lr 1e-2 the weights
agree to 1e-6 relative (measured ~1e-7).
"""
import math

import pytest
import torch

from dps_kernels import reference as ref

HYPER = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def _run_reference(w0, grads, style, update_mask=None):
    w = w0.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        s = ref.adamw_scalars(HYPER["lr"], *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"],
                              t, style)
        ref.adamw_update(w, g, m, v, s, update_mask)
    return w, m, v


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (0.1 + t % 3) for t in range(steps)]


@pytest.mark.parametrize("shape", [(1,), (7, 13), (300,)])
def test_torch_style_matches_torch_adamw(shape):
    w0 = torch.randn(shape)
    grads = _grads(shape, 50)
    w, m, v = _run_reference(w0, grads, "torch")
    param = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([param], foreach=False, **HYPER)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    st = opt.state[param]
    torch.testing.assert_close(w, param.detach(), rtol=1e-6, atol=1e-7)
    # torch's lerp rounds differently where m crosses zero: absolute, at the gradients'
    # scale (~1), a few ulp
    torch.testing.assert_close(m, st["exp_avg"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, st["exp_avg_sq"], rtol=1e-6, atol=1e-6)


def test_hf_legacy_matches_transformers_4_7_adamw():
    """transformers 4.7 AdamW.step, transcribed: eps on sqrt(v), decay after the step."""
    lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    w0 = torch.randn(5, 9, dtype=torch.float64)
    grads = [g.double() for g in _grads((5, 9), 30)]
    p = w0.clone()
    exp_avg = torch.zeros_like(p)
    exp_avg_sq = torch.zeros_like(p)
    for step, grad in enumerate(grads, start=1):
        exp_avg.mul_(b1).add_(grad, alpha=1.0 - b1)
        exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        denom = exp_avg_sq.sqrt().add_(eps)
        step_size = lr * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)
        p.addcdiv_(exp_avg, denom, value=-step_size)
        p.add_(p, alpha=-lr * wd)
    w, m, v = _run_reference(w0.float(), grads, "hf_legacy")
    torch.testing.assert_close(w.double(), p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.double(), exp_avg, rtol=1e-5, atol=1e-7)
    # and the two styles really differ (the test would not notice a swapped style otherwise)
    w_torch, _, _ = _run_reference(w0.float(), grads, "torch")
    assert (w_torch - w).abs().max() > 1e-4


def test_freeze_mask_leaves_unselected_elements_untouched():
    w0 = torch.randn(6, 4)
    mask = torch.rand(6, 4) > 0.5
    grads = _grads((6, 4), 5)
    w, m, v = _run_reference(w0, grads, "torch", update_mask=mask)
    assert torch.equal(w[~mask], w0[~mask])
    assert torch.equal(m[~mask], torch.zeros_like(m[~mask]))
    w_free, m_free, _ = _run_reference(w0, grads, "torch")
    assert torch.equal(w[mask], w_free[mask]) and torch.equal(m[mask], m_free[mask])


def test_fp32_arithmetic_for_bf16_storage():
    w0 = torch.randn(50).to(torch.bfloat16)
    g = torch.randn(50).to(torch.bfloat16)
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    s = ref.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
    ref.adamw_update(w, g, m, v, s)
    expected = w0.float() * s.decay - s.step_size * (0.1 * g.float()) / (
        torch.sqrt(0.001 * g.float() ** 2) / s.bias2_sqrt + 1e-8)
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, expected.to(torch.bfloat16))


def _sort_threshold(score, k):
    return torch.sort(score.flatten(), descending=True).values[k - 1]


@pytest.mark.parametrize("n, k", [(1, 1), (13, 1), (13, 13), (91, 64), (1000, 700)])
def test_kth_largest_matches_sort(n, k):
    g = torch.Generator().manual_seed(n)
    score = torch.rand(n, generator=g)
    thr = ref.kth_largest(score, k)
    assert thr == _sort_threshold(score, k)
    assert int(ref.selection_mask(score, thr).sum()) == k  # no ties in random floats


def test_ties_are_all_kept():
    score = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 5.0])
    thr = ref.kth_largest(score, 3)
    assert thr == _sort_threshold(score, 3) == 2.0
    assert ref.selection_mask(score, thr).tolist() == [True, False, True, True, True, False, True]


def test_kth_largest_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        ref.kth_largest(torch.ones(4), 5)


@pytest.mark.parametrize("us", [10, 49, 50, 80])
def test_mix_score_is_gam_over_fam_with_penalty_from_us_50(us):
    gam = torch.rand(4, 6) * 3
    fam = torch.tensor([0.0, 1.0, 2.0, 5.0, float(us), 3.0])
    score = ref.mix_score(gam, ref.mix_column_factor(fam, us))
    f = fam.clamp(min=1.0).double()
    expected = gam.double() / f
    if us >= 50:
        expected = expected * torch.exp(-f / us)
    torch.testing.assert_close(score.double(), expected, rtol=1e-6, atol=0)


def test_mix_weight_and_grad_follow_the_spec_formula():
    w = torch.randn(3, 5)
    a = torch.randn(3, 5)
    keep = torch.tensor([True, False, True, True, False])
    p = 0.3
    out = ref.mix_weight(w, a, keep, p)
    m = keep.float()
    torch.testing.assert_close(out, (m * w + (1 - m) * a - p * a) / (1 - p))
    # kept columns: (W - pA)/(1-p); dropped ones: exactly A
    torch.testing.assert_close(out[:, ~keep], a[:, ~keep])
    g = torch.randn(3, 5)
    assert torch.equal(ref.mix_grad(g, keep), g * m)


def test_fisher_and_frequency_accumulate_and_reset():
    gam = torch.full((2, 3), 7.0)
    g = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    ref.accumulate_fisher(gam, g, reset=True)
    assert torch.equal(gam, g * g)
    ref.accumulate_fisher(gam, g, reset=False)
    assert torch.equal(gam, 2 * g * g)
    fam = torch.full((3,), 4.0)
    ref.accumulate_frequency(fam, torch.tensor([True, False, True]), reset=True)
    assert fam.tolist() == [1.0, 0.0, 1.0]


def test_unknown_style_is_rejected():
    with pytest.raises(ValueError, match="adamw_style must be one of"):
        ref.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 1, "adam")
