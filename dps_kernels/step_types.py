"""The data the optimizer hands a backend: step kinds, per-tensor tasks, Mix masks, size limit.

A neutral module below both ``optim.py`` and ``backends/`` / ``ops/``, so kernels never
import upward from the backend layer. What each :class:`StepKind` means (g = grad, all
arithmetic in fp32):

=============  ==========================================================================
PLAIN          AdamW(g)                                                 (non-DPS tensor)
DENSE_STAGE1   GAM = (0 if reset else GAM) + g*g;  AdamW(g)
DENSE_STAGE2   M = GAM >= thr;  AdamW(g * M), or with freeze AdamW(g) only where M
MIX_STAGE1     m = column keep-mask of (mix_key, keep_threshold);  GAM = (0|GAM) + g*g;
               FAM[col] = (0|FAM[col]) + m[col] (once per column);  AdamW(g), freeze: where m
MIX_STAGE2     AdamW(g) (g was masked in backward); freeze: only where GAM*factor[col] >= thr
=============  ==========================================================================

``mask_bits`` (optional, int32 words in the layout of ``dps_kernels/mask_bits.py``): the
Stage II subnetwork ``M`` packed once at the selection. When set, DENSE_STAGE2 and
MIX_STAGE2 (freeze), and the Stage II Mix weight/gradient, read ``M`` from these bits
instead of recomputing it from GAM (and the factor and the threshold), which they then do
not read at all. The bits must equal ``pack_mask`` of the current GAM/factor/threshold;
the result is then bit-identical to the GAM path.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

from .reference import AdamWScalars

# The one size limit of every backend's fused kernels, checked when the optimizer is built.
# The Triton kernels index with int32 offsets; a program's block may start up to
# 4 * BLOCK_MAX past the last element (the selection's chunks), so the limit keeps every
# offset they compute below 2**31.
MAX_TENSOR_ELEMENTS = 2**31 - 2**20


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
    mask_bits: Optional[torch.Tensor] = None  # int32 [ceil(n/32)], packed M (Stage II)


@dataclass(frozen=True)
class MixMask:
    """The mask of a Mix forward/backward, never materialised by fused backends.

    Stage I: ``column_key``/``keep_threshold`` give the column keep-mask of the step.
    Stage II: ``gam``/``column_factor``/``threshold`` give ``GAM * factor[col] >= thr``,
    or ``mask_bits`` (int32 words, ``dps_kernels/mask_bits.py``) give it packed; with
    ``mask_bits`` the other three are not read.
    Capturable (``device_step`` set): the stage, the key and the anchor are decided on the
    device from the parameter's step counter, so every call launches the same kernel with
    the same arguments; ``key_base`` (``mask_hash.key_base``), ``keep_threshold``, ``gam``,
    ``column_factor``, ``threshold``, ``stage_anchor`` and ``update_steps`` are all given.
    """

    cols: int
    column_key: Optional[int] = None
    keep_threshold: int = 0
    gam: Optional[torch.Tensor] = None
    column_factor: Optional[torch.Tensor] = None
    threshold: Optional[torch.Tensor] = None
    device_step: Optional[torch.Tensor] = None   # 0-d fp32 state["step"] (capturable)
    key_base: int = 0
    update_steps: int = 0
    stage_anchor: Optional[torch.Tensor] = None  # W' (capturable: picked on the device)
    mask_bits: Optional[torch.Tensor] = None     # int32 [ceil(n/32)], packed M (Stage II)

    @property
    def stage_one(self) -> bool:
        return self.column_key is not None

    @property
    def capturable(self) -> bool:
        return self.device_step is not None


@dataclass
class TensorEntry:
    """The buffers of one tensor that stay put across steps (the state, not the gradient)."""

    param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    index: int                                # the parameter's index in the optimizer
    cols: int = 1
    gam: Optional[torch.Tensor] = None
    fam: Optional[torch.Tensor] = None
    column_factor: Optional[torch.Tensor] = None
    threshold: Optional[torch.Tensor] = None
    stage_anchor: Optional[torch.Tensor] = None  # W' (capturable Mix: written in-kernel)
    device_step: Optional[torch.Tensor] = None   # 0-d fp32 step counter (capturable)
    key_base: int = 0                             # mask_hash.key_base(seed, index)
    mask_bits: Optional[torch.Tensor] = None      # int32 [ceil(n/32)], packed M (Stage II)


@dataclass
class GroupStep:
    """One step of many tensors that share their step ``t`` and hyperparameters.

    ``mode`` is ``"plain"``, ``"dense"`` or ``"mix"``. Host-scheduled (``capturable`` False):
    ``t``, ``scalars``, ``stage`` and ``reset`` are host values. Capturable: the backend
    derives all of them on the device from each entry's ``device_step`` and ``hyper``
    (fp64 [lr, beta1, beta2, eps, weight_decay] on the device), so its launches and their
    arguments are the same at every step. ``cache`` is a dict the optimizer keeps with the
    group while its tensors do not change (the backend stores its address tables there).
    """

    mode: str
    entries: list
    grads: list
    freeze: bool
    adamw_style: str
    keep_threshold: int = 0
    t: int = 0
    stage: int = 1
    reset: bool = False
    scalars: Optional[AdamWScalars] = None
    capturable: bool = False
    hyper: Optional[torch.Tensor] = None
    update_steps: int = 1
    grad_scale: Optional[torch.Tensor] = None
    found_inf: Optional[torch.Tensor] = None
    cache: Optional[dict] = None

    def kind(self) -> StepKind:
        """The kind of every tensor of a host-scheduled group."""
        if self.mode == "plain":
            return StepKind.PLAIN
        if self.mode == "dense":
            return StepKind.DENSE_STAGE1 if self.stage == 1 else StepKind.DENSE_STAGE2
        return StepKind.MIX_STAGE1 if self.stage == 1 else StepKind.MIX_STAGE2
