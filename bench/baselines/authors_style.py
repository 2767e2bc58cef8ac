"""DPS wired into a model the way the authors' released code does it: the cost baseline.

Written by us from the paper (sections 2.3-2.4, Appendix F) and from what DPS_SPEC.md
records about the authors' patched transformers 4.7, so that the benchmark can measure,
in the same process, what DPS costs when it is implemented in their style rather than
fused into the optimizer. Its job is to reproduce their costs, not to be tuned:

- every targeted ``nn.Linear`` weight gets an autograd hook; the schedule advances on
  every training forward of the model (not on optimizer steps);
- Stage I squares the gradient, divides it by 1e3 and adds it to an fp32 GAM, each a
  separate tensor op (three passes and two temporaries per weight and backward);
- at every Stage II start each weight's score is fully sorted with ``torch.sort``
  (values plus int64 indices) to read the threshold, and the mask is kept as int64;
- Dense multiplies the gradient by that int64 mask in the backward hook;
- Mix works like Mixout: the anchor weight is cloned (the pretrained ``W0`` for the whole
  run, plus ``W'`` during Stage II), every training forward builds the mixed weight
  ``(M*W + (1-M)*A - p*A) / (1-p)`` as a new tensor and keeps the full-size mask for the
  backward (``grad * M``); Stage I masks are one Bernoulli row repeated over all rows,
  FAM counts them in a full-size int64 tensor.

The optimizer after it is plain AdamW (``torch.optim.AdamW``), as in the authors' runs.

Persistent extra bytes per targeted weight element: Dense 4 (GAM) + 8 (int64 mask);
Mix 4 (GAM) + 8 (FAM) + 8 (mask) + 4 (W0) + 4 (W') + 4 (Stage I noise). The sort adds
4 + 8 transient bytes per element of the largest weight at each selection.

Selection follows DPS_SPEC.md (``score >= k-th largest``, k = ceil(n(1-p))) so that the
masks can be checked against dps_kernels; the differences that remain are the spec's
"Deliberate differences from the authors' code" (forward-counted steps, GAM taken in
backward before clipping and scaled by 1/1e3).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dps_kernels.schedule import STAGE_ONE, is_stage_start, selected_count, stage_of

MODES = ("dense", "mix")

# Mask source for Mix Stage I: (weight, 1-based step) -> keep-mask over the input features.
MaskFn = Callable[[torch.Tensor, int], torch.Tensor]


class _Mixout(torch.autograd.Function):
    """Mixout-style weight mixing; the full-size mask is kept for the backward."""

    @staticmethod
    def forward(ctx, weight, anchor, mask, p):
        ctx.save_for_backward(mask)
        return (mask * weight + (1 - mask) * anchor - p * anchor) / (1 - p)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        # The authors' convention: no 1/(1-p) factor on the gradient.
        return grad * mask, None, None, None


class _Layer:
    """Per-weight state, allocated the way the authors' code holds it."""

    def __init__(self, name: str, module: nn.Linear):
        self.name = name
        self.module = module
        self.gam: Optional[torch.Tensor] = None      # fp32, full size
        self.fam: Optional[torch.Tensor] = None      # int64, full size (Mix)
        self.mask: Optional[torch.Tensor] = None     # int64, full size (Stage II)
        self.anchor0: Optional[torch.Tensor] = None  # clone of W0 (Mix)
        self.anchor2: Optional[torch.Tensor] = None  # clone of W' (Mix Stage II)
        self.noise: Optional[torch.Tensor] = None    # Stage I mask of this forward (Mix)
        self.handles: list = []

    def tensors(self):
        return [t for t in (self.gam, self.fam, self.mask, self.anchor0, self.anchor2,
                            self.noise) if t is not None]


class AuthorsStyleDPS:
    """Authors-style DPS on every ``nn.Linear`` weight of ``model``; pair it with AdamW.

    Args:
        model: the model whose forward is called in training (its forward advances the
            schedule, as in the authors' code).
        mode: "dense" or "mix".
        p: fraction NOT updated in Stage II, in [0, 1).
        update_steps: steps (training forwards) per stage, >= 1.
        targets: module types whose ``weight`` is hooked (default ``nn.Linear``).
        grad_scale: GAM accumulates ``g*g / grad_scale`` (the authors' 1e3).
        mask_fn: Mix Stage I keep-mask source ``(weight, step) -> [in_features]``; default
            a fresh ``bernoulli_(1 - p)`` row from torch's global RNG, like Mixout. Tests
            pass dps_kernels' hash masks here to compare trajectories.
    """

    def __init__(self, model: nn.Module, *, mode: str = "dense", p: float = 0.3,
                 update_steps: int, targets=(nn.Linear,), grad_scale: float = 1e3,
                 mask_fn: Optional[MaskFn] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        if isinstance(update_steps, bool) or not isinstance(update_steps, int) or update_steps < 1:
            raise ValueError(f"update_steps must be an int >= 1, got {update_steps!r}")
        if not grad_scale > 0:
            raise ValueError(f"grad_scale must be > 0, got {grad_scale!r}")
        self.model = model
        self.mode = mode
        self.p = float(p)
        self.update_steps = update_steps
        self.grad_scale = float(grad_scale)
        self.mask_fn = mask_fn
        self.step = 0  # training forwards seen, the authors' clock
        self.layers = [_Layer(name, m) for name, m in model.named_modules()
                       if isinstance(m, tuple(targets))]
        if not self.layers:
            raise ValueError(f"model has no module of types {targets}")
        self._model_handle = model.register_forward_pre_hook(self._on_forward)
        for layer in self.layers:
            w = layer.module.weight
            layer.handles.append(w.register_hook(lambda g, layer=layer: self._on_grad(layer, g)))
            if mode == "mix":
                layer.anchor0 = w.detach().clone()
                # An instance attribute shadows nn.Linear.forward; detach() removes it.
                layer.module.forward = lambda x, layer=layer: self._mix_forward(layer, x)

    # -- schedule -------------------------------------------------------------------
    def stage(self) -> Optional[int]:
        """Stage of the last training forward (None before the first)."""
        return stage_of(self.step, self.update_steps) if self.step else None

    def _on_forward(self, module, args):
        if not module.training:
            return None
        self.step += 1
        t, us = self.step, self.update_steps
        first = is_stage_start(t, us)
        if stage_of(t, us) == STAGE_ONE:
            if first:
                for layer in self.layers:
                    w = layer.module.weight
                    layer.gam = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                    layer.mask = None
                    layer.anchor2 = None
                    if self.mode == "mix":
                        layer.fam = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
            if self.mode == "mix":
                self._draw_stage_one_masks(t)
        elif first:
            self._select()
        return None

    def _draw_stage_one_masks(self, t: int) -> None:
        for layer in self.layers:
            w = layer.module.weight
            rows, cols = w.shape[0], w.numel() // w.shape[0]
            if self.mask_fn is None:
                row = torch.empty(cols, dtype=w.dtype, device=w.device).bernoulli_(1 - self.p)
            else:
                row = self.mask_fn(w, t).to(w.dtype)
            layer.noise = row.repeat(rows, 1).reshape(w.shape)
            layer.fam += layer.noise.long()

    def _select(self) -> None:
        us = self.update_steps
        for layer in self.layers:
            score = layer.gam
            if self.mode == "mix":
                f = layer.fam.clamp(min=1).float()
                score = layer.gam / f
                if us >= 50:
                    score = score * torch.exp(-f / us)
            n = score.numel()
            k = selected_count(n, self.p)
            ranked, _ = torch.sort(score.reshape(-1))
            layer.mask = (score >= ranked[n - k]).long()
            layer.noise = None
            if self.mode == "mix":
                layer.anchor2 = layer.module.weight.detach().clone()

    # -- autograd -------------------------------------------------------------------
    def _on_grad(self, layer: _Layer, grad: torch.Tensor):
        if self.step == 0:
            return None
        if stage_of(self.step, self.update_steps) == STAGE_ONE:
            sq = torch.pow(grad, 2)
            sq = sq / self.grad_scale
            layer.gam.add_(sq)
            return None
        if self.mode == "dense":
            return grad * layer.mask
        return None  # Mix Stage II: the mixing backward already masked it

    def _mix_forward(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        m = layer.module
        if not m.training:
            return F.linear(x, m.weight, m.bias)
        if self.step == 0:
            raise RuntimeError("AuthorsStyleDPS: a training forward reached a mixed layer before "
                               "the model's forward; call the model given to AuthorsStyleDPS")
        if stage_of(self.step, self.update_steps) == STAGE_ONE:
            w = _Mixout.apply(m.weight, layer.anchor0, layer.noise, self.p)
        else:
            w = _Mixout.apply(m.weight, layer.anchor2, layer.mask, self.p)
        return F.linear(x, w, m.bias)

    # -- introspection --------------------------------------------------------------
    def subnetwork(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """Bool Stage II mask of ``weight`` (None outside Stage II)."""
        for layer in self.layers:
            if layer.module.weight is weight:
                if layer.mask is None:
                    return None
                return layer.mask.bool()
        raise KeyError("weight is not managed by this AuthorsStyleDPS")

    def gam_of(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        for layer in self.layers:
            if layer.module.weight is weight:
                return layer.gam
        raise KeyError("weight is not managed by this AuthorsStyleDPS")

    def dps_numel(self) -> int:
        return sum(layer.module.weight.numel() for layer in self.layers)

    def state_bytes(self) -> int:
        """Bytes of every DPS tensor held now (on top of the optimizer's own state)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def detach(self) -> None:
        """Remove every hook and restore the layers' own forward."""
        self._model_handle.remove()
        for layer in self.layers:
            for h in layer.handles:
                h.remove()
            layer.handles.clear()
            layer.module.__dict__.pop("forward", None)


def no_decay_groups(model: nn.Module, weight_decay: float):
    """Hugging Face convention: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        (no_decay if prm.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(prm)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["AuthorsStyleDPS", "no_decay_groups", "MODES"]
