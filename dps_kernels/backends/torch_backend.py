"""Portable backend: vectorised PyTorch ops on any device, built from the reference functions.

It is the fallback of ``backend="auto"`` and the baseline the fused backends are measured
against. Every step is a chain of separate tensor ops (each a pass over memory), which is
exactly the cost the Triton and C++ backends fuse away.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference as ref
from ..mask_bits import unpack_mask
from ..mask_hash import column_keep_mask
from ..step_types import MixMask, StepKind, TensorStep
from .base import Backend


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    return t.reshape(-1, cols)


class TorchBackend(Backend):
    name = "torch"

    def step(self, tasks: list[TensorStep], freeze: bool) -> None:
        for task in tasks:
            self._step_one(task, freeze)

    def _step_one(self, task: TensorStep, freeze: bool) -> None:
        kind = task.kind
        grad = task.grad
        update_mask = None
        if kind is StepKind.DENSE_STAGE1 or kind is StepKind.MIX_STAGE1:
            ref.accumulate_fisher(task.gam, grad, task.reset)
        if kind is StepKind.MIX_STAGE1:
            keep = column_keep_mask(task.mix_key, task.keep_threshold, task.cols, grad.device)
            ref.accumulate_frequency(task.fam, keep, task.reset)
            if freeze:
                update_mask = keep.expand(task.param.numel() // task.cols, task.cols)
        elif kind is StepKind.DENSE_STAGE2:
            if task.mask_bits is not None:   # the packed subnetwork: GAM is not read
                selected = unpack_mask(task.mask_bits, task.param.shape)
            else:
                selected = ref.selection_mask(task.gam, task.threshold)
            if freeze:
                update_mask = selected
            else:
                grad = ref.mix_grad(grad, selected)
        elif kind is StepKind.MIX_STAGE2 and freeze:
            if task.mask_bits is not None:
                update_mask = unpack_mask(task.mask_bits, task.param.shape)
            else:
                score = ref.mix_score(task.gam, task.column_factor)
                update_mask = ref.selection_mask(score, task.threshold)
        if update_mask is not None:
            update_mask = update_mask.reshape(task.param.shape)
        ref.adamw_update(task.param, grad, task.exp_avg, task.exp_avg_sq, task.scalars,
                         update_mask)

    def select_threshold(self, gam, column_factor, k):
        score = gam if column_factor is None else ref.mix_score(gam, column_factor)
        return ref.kth_largest(score, k)

    def _keep(self, mask: MixMask, like: torch.Tensor) -> torch.Tensor:
        """The mask as a bool tensor that broadcasts over ``like`` viewed as [rows, cols]."""
        if mask.stage_one:
            return column_keep_mask(mask.column_key, mask.keep_threshold, mask.cols, like.device)
        if mask.mask_bits is not None:   # the packed subnetwork
            return _rows(unpack_mask(mask.mask_bits, like.shape), mask.cols)
        score = ref.mix_score(mask.gam, mask.column_factor)
        return _rows(ref.selection_mask(score, mask.threshold), mask.cols)

    def mix_weight(self, weight, anchor, mask, p, out_dtype=None):
        keep = self._keep(mask, weight)
        out = ref.mix_weight(_rows(weight, mask.cols), _rows(anchor, mask.cols), keep, p,
                             out_dtype)
        return out.reshape(weight.shape)

    def mix_grad(self, grad, mask):
        keep = self._keep(mask, grad)
        return ref.mix_grad(_rows(grad, mask.cols), keep).reshape(grad.shape)


BACKEND = TorchBackend()


def unavailable_reason() -> Optional[str]:
    return None
