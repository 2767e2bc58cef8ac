"""The interface between ``DPSAdamW`` and a compute backend (torch, triton, cpu).

The optimizer owns the schedule, the state and the bookkeeping; a backend only does
arithmetic on tensors it is handed. Per optimizer step the optimizer calls
``backend.step_group(group)`` once per param group (and step ``t``) with every tensor that
has a gradient, so a backend may batch all tensors of a group into one launch; the default
``step_group`` hands ``backend.step(tasks, freeze)`` one :class:`TensorStep` per tensor.
At the end of the last Stage I step it calls ``backend.select_thresholds`` once with every
tensor that closes Stage I. Mix forwards call ``mix_weight`` and their backwards
``mix_grad``.

The data types (``StepKind``, ``TensorStep``, ``MixMask``, ``GroupStep``) live in
``dps_kernels/step_types.py``, below both this layer and the kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..mask_bits import check_mask_bits, pack_subnetwork
from ..mask_hash import hash32
from ..step_types import GroupStep, MixMask, StepKind, TensorStep  # noqa: F401  (re-exported)


class Backend:
    """Base class; each backend module defines ``BACKEND`` (an instance) and ``unavailable_reason()``."""

    name = "base"

    def step(self, tasks: list[TensorStep], freeze: bool) -> None:
        raise NotImplementedError

    def step_group(self, group: GroupStep) -> None:
        """One host-scheduled step of a :class:`GroupStep` (what ``DPSAdamW.step`` calls).

        This default turns the group into per-tensor :class:`TensorStep` tasks; the Triton
        backend overrides it with cached address tables (no per-tensor Python per step).
        """
        if group.capturable:
            raise NotImplementedError(f"backend {self.name!r} has no capturable step")
        kind = group.kind()
        tasks = []
        for entry, grad in zip(group.entries, group.grads):
            task = TensorStep(kind, entry.param, grad, entry.exp_avg, entry.exp_avg_sq,
                              group.scalars, gam=entry.gam, reset=group.reset,
                              threshold=entry.threshold, fam=entry.fam,
                              column_factor=entry.column_factor,
                              keep_threshold=group.keep_threshold, cols=entry.cols,
                              mask_bits=entry.mask_bits)
            if kind is StepKind.MIX_STAGE1:
                task.mix_key = hash32(entry.key_base ^ group.t)
            tasks.append(task)
        self.step(tasks, group.freeze)

    def select_threshold(self, gam: torch.Tensor, column_factor: Optional[torch.Tensor],
                         k: int) -> torch.Tensor:
        """Exact k-th largest of ``gam`` (Dense) or ``gam * column_factor[col]`` (Mix)."""
        raise NotImplementedError

    def select_thresholds(self, items: list[tuple[torch.Tensor, Optional[torch.Tensor], int]],
                          out: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        """``select_threshold`` of every ``(gam, column_factor, k)``; the optimizer calls this
        once per backend for all tensors that end Stage I at the same step, so a backend can
        batch them (the Triton one does all in a fixed number of launches). With ``out``
        (0-d fp32 tensors, one per item) the thresholds are written there, in place."""
        thresholds = [self.select_threshold(gam, factor, k) for gam, factor, k in items]
        if out is None:
            return thresholds
        for dst, thr in zip(out, thresholds):
            dst.copy_(thr)
        return out

    def pack_mask(self, gam: torch.Tensor, column_factor: Optional[torch.Tensor],
                  threshold: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The Stage II subnetwork ``score >= threshold`` packed into int32 words, in the
        layout of ``dps_kernels/mask_bits.py`` (the same bits on every backend); ``score`` is
        ``gam`` (Dense, ``column_factor`` None) or ``gam * column_factor[col]`` (Mix).
        With ``out`` (int32, ``ceil(n/32)`` words) the words are written there, in place.
        This default is the reference."""
        if out is not None:
            check_mask_bits(out, gam.numel(), "out", gam.device)
        return write_out(pack_subnetwork(gam, column_factor, threshold), out)

    def mix_weight(self, weight: torch.Tensor, anchor: torch.Tensor, mask: MixMask, p: float,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        raise NotImplementedError

    def mix_grad(self, grad: torch.Tensor, mask: MixMask) -> torch.Tensor:
        raise NotImplementedError

    def supports(self, tensor: torch.Tensor) -> Optional[str]:
        """None if this backend can work on ``tensor``, else the reason it cannot."""
        return None


def write_out(words: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``words``, or ``out`` (already checked) after copying them in (``pack_mask(out=)``)."""
    if out is None:
        return words
    out.copy_(words)
    return out

