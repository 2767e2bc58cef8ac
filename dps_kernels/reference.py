"""Plain PyTorch reference of every DPS equation: the semantics all backends must match.

One function per equation of ``DPS_SPEC.md``; readability beats speed here. Element-wise
arithmetic is done in fp32 whatever the storage dtype, and results are rounded back to
the storage dtype once (round to nearest even), which is what the fused kernels do too.

Scalars that depend only on the step (bias corrections, decay factors) are computed on
the host in float64 by :func:`adamw_scalars`; every backend takes them from there, so
backends differ at most by fp32 rounding of the element-wise part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ADAMW_STYLES = ("torch", "hf_legacy")


@dataclass(frozen=True)
class AdamWScalars:
    """Per-step scalars of one AdamW update (host floats, passed to kernels as arguments).

    torch style:      w = w * decay;  w -= step_size * m / (sqrt(v) / bias2_sqrt + eps)
    hf_legacy style:  w -= step_size * m / (sqrt(v) + eps);  w = w * decay
    """

    beta1: float
    beta2: float
    eps: float
    decay: float        # 1 - lr * weight_decay
    step_size: float    # torch: lr / (1 - b1^t);  hf_legacy: lr * sqrt(1 - b2^t) / (1 - b1^t)
    bias2_sqrt: float   # torch: sqrt(1 - b2^t);   hf_legacy: 1.0 (unused)
    decay_after: bool   # hf_legacy decays after the step, torch before


def adamw_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  step: int, style: str = "torch") -> AdamWScalars:
    """The host-side scalars of AdamW step ``step`` (1-based) in the given style."""
    if style not in ADAMW_STYLES:
        raise ValueError(f"adamw_style must be one of {ADAMW_STYLES}, got {style!r}")
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    decay = 1.0 - lr * weight_decay
    if style == "torch":
        return AdamWScalars(beta1, beta2, eps, decay, lr / bias1, math.sqrt(bias2), False)
    return AdamWScalars(beta1, beta2, eps, decay, lr * math.sqrt(bias2) / bias1, 1.0, True)


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, s: AdamWScalars,
                 update_mask: torch.Tensor | None = None) -> None:
    """One AdamW step, in place, in fp32.

    ``update_mask`` (bool, broadcastable to ``param``) implements ``freeze=True``: where it
    is False the weight and both moments are left untouched. Gradient masking (the
    default DPS behaviour) is done by the caller, by passing ``grad * mask``.
    """
    w = param.float()
    g = grad.float()
    m = exp_avg.float()
    v = exp_avg_sq.float()
    if not s.decay_after:
        w = w * s.decay
    m = s.beta1 * m + (1.0 - s.beta1) * g
    v = s.beta2 * v + (1.0 - s.beta2) * g * g
    denom = torch.sqrt(v) / s.bias2_sqrt + s.eps
    w = w - s.step_size * m / denom
    if s.decay_after:
        w = w * s.decay
    if update_mask is not None:
        w = torch.where(update_mask, w, param.float())
        m = torch.where(update_mask, m, exp_avg.float())
        v = torch.where(update_mask, v, exp_avg_sq.float())
    param.copy_(w)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def accumulate_fisher(gam: torch.Tensor, grad: torch.Tensor, reset: bool) -> None:
    """Stage I: ``GAM <- 0`` on the first step of the stage, then ``GAM += g * g`` (fp32)."""
    g = grad.float()
    if reset:
        gam.zero_()
    gam.add_(g * g)


def accumulate_frequency(fam: torch.Tensor, keep: torch.Tensor, reset: bool) -> None:
    """Mix Stage I: ``FAM <- 0`` on the first step of the stage, then ``FAM += M_t``.

    FAM is stored per column (the keep-masks are column masks), as fp32 counts.
    """
    if reset:
        fam.zero_()
    fam.add_(keep.float())


def mix_column_factor(fam: torch.Tensor, update_steps: int) -> torch.Tensor:
    """Per-column factor of the Mix score: ``exp(-F / us) / F`` (or ``1 / F`` when us < 50).

    ``F = max(FAM, 1)``. The score ``GAM / F * exp(-F / us)`` is evaluated as
    ``GAM * factor``: one fp32 multiply per element, which every backend reproduces
    bit for bit from this fp32 vector, so all backends rank the same scores.
    """
    f = torch.clamp(fam.float(), min=1.0)
    if update_steps >= 50:
        return torch.exp(-f / update_steps) / f
    return 1.0 / f


def mix_score(gam: torch.Tensor, column_factor: torch.Tensor) -> torch.Tensor:
    """Mix selection score per element: ``GAM * factor[column]``."""
    cols = column_factor.numel()
    return (gam.reshape(-1, cols) * column_factor).reshape(gam.shape)


def kth_largest(score: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest value of ``score`` (0-d fp32 tensor on the same device)."""
    flat = score.reshape(-1).float()
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return torch.kthvalue(flat, n - k + 1).values


def selection_mask(score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Stage II subnetwork: ``score >= thr``. Ties with the threshold are all kept."""
    return score >= threshold


def mix_weight(weight: torch.Tensor, anchor: torch.Tensor, keep: torch.Tensor, p: float,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Training-time Mix weight ``(M*W + (1-M)*A - p*A) / (1-p)`` in fp32.

    ``keep`` is a bool mask broadcastable to ``weight`` (a column vector in Stage I,
    a full mask in Stage II). The result is rounded to ``out_dtype`` (default: W's dtype).
    """
    w = weight.float()
    a = anchor.float()
    m = keep.to(torch.float32)
    out = (m * w + (1.0 - m) * a - p * a) / (1.0 - p)
    return out.to(out_dtype or weight.dtype)


def mix_grad(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Backward of the Mix weight: ``upstream * M`` (no 1/(1-p) factor, as the authors)."""
    return grad * keep.to(grad.dtype)
