"""The interface between ``DPSAdamW`` and a compute backend (torch, triton, cpu).

The optimizer owns the schedule, the state and the bookkeeping; a backend only does
arithmetic on tensors it is handed. Per optimizer step the optimizer calls
``backend.step(tasks, hyper)`` once per param group with one :class:`TensorStep` per
parameter that has a gradient, so a backend may batch all tensors of a group into one
launch. At the end of the last Stage I step it calls ``backend.select_threshold`` once
per DPS tensor. Mix forwards call ``mix_weight`` and their backwards ``mix_grad``.

What each :class:`StepKind` means (g = grad, all arithmetic in fp32):

=============  ==========================================================================
PLAIN          AdamW(g)                                                 (non-DPS tensor)
DENSE_STAGE1   GAM = (0 if reset else GAM) + g*g;  AdamW(g)
DENSE_STAGE2   M = GAM >= thr;  AdamW(g * M), or with freeze AdamW(g) only where M
MIX_STAGE1     m = column keep-mask of (mix_key, keep_threshold);  GAM = (0|GAM) + g*g;
               FAM[col] = (0|FAM[col]) + m[col] (once per column);  AdamW(g), freeze: where m
MIX_STAGE2     AdamW(g) (g was masked in backward); freeze: only where GAM*factor[col] >= thr
=============  ==========================================================================
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

from ..reference import AdamWScalars


class StepKind(enum.Enum):
    PLAIN = "plain"
    DENSE_STAGE1 = "dense_stage1"
    DENSE_STAGE2 = "dense_stage2"
    MIX_STAGE1 = "mix_stage1"
    MIX_STAGE2 = "mix_stage2"


@dataclass
class TensorStep:
    """Everything a backend needs to take one step of one tensor (updated in place)."""

    kind: StepKind
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor                    # same dtype as param
    exp_avg_sq: torch.Tensor                 # same dtype as param
    scalars: AdamWScalars                    # host scalars of this tensor's step t
    gam: Optional[torch.Tensor] = None       # fp32, param's shape (DPS tensors)
    reset: bool = False                      # first step of Stage I: GAM/FAM restart at 0
    threshold: Optional[torch.Tensor] = None  # 0-d fp32, Stage II
    fam: Optional[torch.Tensor] = None       # fp32 [cols], Mix
    column_factor: Optional[torch.Tensor] = None  # fp32 [cols], Mix Stage II score factor
    mix_key: int = 0                         # Mix Stage I hash prefix (mask_hash.step_key)
    keep_threshold: int = 0                  # Mix Stage I (mask_hash.keep_threshold)
    cols: int = 1                            # mask columns (mask_hash.columns_of)


@dataclass(frozen=True)
class MixMask:
    """The mask of a Mix forward/backward, never materialised by fused backends.

    Stage I: ``column_key``/``keep_threshold`` give the column keep-mask of the step.
    Stage II: ``gam``/``column_factor``/``threshold`` give ``GAM * factor[col] >= thr``.
    """

    cols: int
    column_key: Optional[int] = None
    keep_threshold: int = 0
    gam: Optional[torch.Tensor] = None
    column_factor: Optional[torch.Tensor] = None
    threshold: Optional[torch.Tensor] = None

    @property
    def stage_one(self) -> bool:
        return self.column_key is not None


class Backend:
    """Base class; each backend module defines ``BACKEND`` (an instance) and ``unavailable_reason()``."""

    name = "base"

    def step(self, tasks: list[TensorStep], freeze: bool) -> None:
        raise NotImplementedError

    def select_threshold(self, gam: torch.Tensor, column_factor: Optional[torch.Tensor],
                         k: int) -> torch.Tensor:
        """Exact k-th largest of ``gam`` (Dense) or ``gam * column_factor[col]`` (Mix)."""
        raise NotImplementedError

    def select_thresholds(self, items: list[tuple[torch.Tensor, Optional[torch.Tensor], int]]
                          ) -> list[torch.Tensor]:
        """``select_threshold`` of every ``(gam, column_factor, k)``; the optimizer calls this
        once per backend for all tensors that end Stage I at the same step, so a backend can
        batch them (the Triton one does all in a fixed number of launches)."""
        return [self.select_threshold(gam, factor, k) for gam, factor, k in items]

    def mix_weight(self, weight: torch.Tensor, anchor: torch.Tensor, mask: MixMask, p: float,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        raise NotImplementedError

    def mix_grad(self, grad: torch.Tensor, mask: MixMask) -> torch.Tensor:
        raise NotImplementedError

    def supports(self, tensor: torch.Tensor) -> Optional[str]:
        """None if this backend can work on ``tensor``, else the reason it cannot."""
        return None
