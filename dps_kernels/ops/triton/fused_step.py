"""Fused DPS + AdamW step over many tensors in one launch per dtype group.

Per element (g = grad, w = param, m/v = moments; arithmetic in fp32; see base.StepKind):

    PLAIN         AdamW(g)
    DENSE_STAGE1  GAM = (0 if reset else GAM) + g*g;  AdamW(g)
    DENSE_STAGE2  M = GAM >= thr;  AdamW(g*M), or with freeze AdamW(g) only where M
    MIX_STAGE1    m = keep(H(key ^ col));  GAM = (0|GAM) + g*g;  FAM[col] = (0|FAM[col]) + m
                  (written by the elements of row 0 only, so once per column);
                  AdamW(g), with freeze only where m
    MIX_STAGE2    AdamW(g); with freeze only where GAM * factor[col] >= thr

    AdamW, torch style:     w *= decay;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g g;
                            w -= step_size * m / (sqrt(v) / bias2_sqrt + eps)
           hf_legacy style: the same with bias2_sqrt = 1 and ``w *= decay`` after the update.

Bytes moved per element (P = bytes of the param dtype, grad in the param dtype):
    PLAIN / MIX_STAGE2     read w, g, m, v (4P)                  write w, m, v (3P)   = 7P
    DENSE_STAGE1/MIX_STAGE1  + read and write GAM (8)                                 = 7P + 8
    DENSE_STAGE2           + read GAM (4)                                              = 7P + 4
    MIX_STAGE2 + freeze    + read GAM (4) + factor[col] (cached, ~0)                   = 7P + 4
    fp32: AdamW 28 B, Stage I 36 B, Stage II 32 B (the minimum the issue states). With
    ``freeze`` the writes of frozen elements are skipped (masked stores), so Stage II
    with freeze moves 4P + 4 + 3P * (selected fraction).

Launch strategy. The kernel reads the addresses of each tensor's buffers from a pointer
table (int64 ``data_ptr()`` values cast in-kernel with ``.to(tl.pointer_type(...))``), so one
launch covers every tensor of a param group that shares (param dtype, grad dtype); launches
per ``step()`` = number of such dtype groups (1 for a usual model), not the number of
tensors. Programs map to (tensor, block) through a block table built on the host, cached
by the tensor sizes; the address/metadata tables are cached by the addresses and kinds,
so a training loop reuses them and new gradient buffers only rebuild 88 bytes per tensor. Only the per-step
scalars (bias corrections, lr-dependent decay, Mix hash keys, reset flags: 12 words per
tensor) are uploaded each step, from pinned memory with ``non_blocking=True``: no host
synchronisation. The pointer table works unchanged in the Triton interpreter, where the
addresses are real host addresses.

Vectorised access. Addresses read from a table carry no alignment information, and a
mask ``offs < numel`` with ``numel`` read from a table has unknown constancy; either would
force scalar 32-bit accesses. So the host checks that all element buffers are 16-byte
aligned (``ALIGNED``, true for allocator-made tensors, false for odd-offset views) and the
kernel hints it, and programs whose block lies wholly inside the tensor run with an
all-true mask; only a tensor's last block uses ``offs < numel``.

Why ``enable_fp_fusion=False``: GAM must be bit-identical to the reference
(``GAM + g*g`` rounded twice, as torch does with two ops) because the Stage II mask
``GAM >= thr`` is compared exactly across backends; a fused multiply-add would change
the last bit. ``sqrt_rn``/``div_rn`` give IEEE-rounded results like torch's own kernels.
The cost is a few extra instructions per element in a memory-bound kernel.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ...backends.base import StepKind, TensorStep
from ...backends import interpreter_enabled
from .keep_mask import column_keep
from .rounding import round_to

KIND_CODE = {
    StepKind.PLAIN: 0,
    StepKind.DENSE_STAGE1: 1,
    StepKind.DENSE_STAGE2: 2,
    StepKind.MIX_STAGE1: 3,
    StepKind.MIX_STAGE2: 4,
}
N_ADDR = 8   # param, grad, exp_avg, exp_avg_sq, gam, fam, column_factor, threshold
N_META = 3   # numel, cols, kind code
N_DYN = 12   # beta1, 1-beta1, beta2, 1-beta2, eps, decay, step_size, bias2_sqrt (fp32 bits),
#              decay_after, reset, mix_key (uint32 bits), keep_threshold
BLOCK = 1024
TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _table_ptr(entry_ptr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The buffer address stored at ``entry_ptr`` as a pointer to DTYPE."""
    address = tl.load(entry_ptr)
    if ALIGNED:
        # The host checked that every address is 16-byte aligned; the hint survives the
        # int -> pointer cast and lets the loads vectorize.
        address = tl.multiple_of(address, 16)
    return address.to(tl.pointer_type(DTYPE))


@triton.jit
def _dps_step_kernel(
    addr_ptr,          # int64 [T, 8]: buffer addresses per tensor (see N_ADDR)
    meta_ptr,          # int64 [T, 3]: numel, cols, kind code per tensor
    dyn_ptr,           # int32 [T, 12]: per-step scalars per tensor (see N_DYN)
    block_tensor_ptr,  # int32 [G]: the tensor program ``pid`` works on
    block_start_ptr,   # int32 [G]: the first flat element of program ``pid`` in its tensor
    PARAM_DTYPE: tl.constexpr,  # dtype of param, exp_avg, exp_avg_sq
    GRAD_DTYPE: tl.constexpr,   # dtype of grad
    FREEZE: tl.constexpr,       # frozen elements keep weight and moments
    ALIGNED: tl.constexpr,      # every address in the table is a multiple of 16 bytes
    EMULATE_RNE: tl.constexpr,  # interpreter only: round bf16 to nearest even (rounding.py)
    BLOCK: tl.constexpr,        # elements per program
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid).to(tl.int64)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    numel = tl.load(meta_ptr + t * 3).to(tl.int32)
    cols = tl.load(meta_ptr + t * 3 + 1).to(tl.int32)
    kind = tl.load(meta_ptr + t * 3 + 2).to(tl.int32)

    a = addr_ptr + t * 8
    w_ptr = _table_ptr(a, PARAM_DTYPE, ALIGNED)
    g_ptr = _table_ptr(a + 1, GRAD_DTYPE, ALIGNED)
    m_ptr = _table_ptr(a + 2, PARAM_DTYPE, ALIGNED)
    v_ptr = _table_ptr(a + 3, PARAM_DTYPE, ALIGNED)
    gam_ptr = _table_ptr(a + 4, tl.float32, ALIGNED)
    fam_ptr = _table_ptr(a + 5, tl.float32, False)
    factor_ptr = _table_ptr(a + 6, tl.float32, False)
    thr_ptr = _table_ptr(a + 7, tl.float32, False)

    d = dyn_ptr + t * 12
    beta1 = tl.load(d).to(tl.float32, bitcast=True)
    one_minus_beta1 = tl.load(d + 1).to(tl.float32, bitcast=True)
    beta2 = tl.load(d + 2).to(tl.float32, bitcast=True)
    one_minus_beta2 = tl.load(d + 3).to(tl.float32, bitcast=True)
    eps = tl.load(d + 4).to(tl.float32, bitcast=True)
    decay = tl.load(d + 5).to(tl.float32, bitcast=True)
    step_size = tl.load(d + 6).to(tl.float32, bitcast=True)
    bias2_sqrt = tl.load(d + 7).to(tl.float32, bitcast=True)   # sqrt(1 - beta2^t) or 1
    decay_after = tl.load(d + 8)
    reset = tl.load(d + 9)
    mix_key = tl.load(d + 10).to(tl.uint32, bitcast=True)
    keep_threshold = tl.load(d + 11).to(tl.uint32, bitcast=True)

    offs = start + tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    if start + BLOCK <= numel:
        # A whole block: the all-true mask has known constancy, so the loads vectorize;
        # with ``offs < numel`` (numel read from a table) they could not.
        _step_block(offs, zero == 0, zero, cols, kind, w_ptr, g_ptr, m_ptr, v_ptr,
                    gam_ptr, fam_ptr, factor_ptr, thr_ptr, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, eps, decay, step_size, bias2_sqrt, decay_after, reset,
                    mix_key, keep_threshold,
                    PARAM_DTYPE, FREEZE, EMULATE_RNE)
    else:
        _step_block(offs, offs < numel, zero, cols, kind, w_ptr, g_ptr, m_ptr, v_ptr,
                    gam_ptr, fam_ptr, factor_ptr, thr_ptr, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, eps, decay, step_size, bias2_sqrt, decay_after, reset,
                    mix_key, keep_threshold,
                    PARAM_DTYPE, FREEZE, EMULATE_RNE)


@triton.jit
def _step_block(offs, inb, zero, cols, kind_code, w_ptr, g_ptr, m_ptr, v_ptr, gam_ptr,
                fam_ptr, factor_ptr, thr_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                eps, decay, step_size, bias2_sqrt, decay_after_flag, reset_flag, mix_key,
                keep_threshold, PARAM_DTYPE: tl.constexpr, FREEZE: tl.constexpr,
                EMULATE_RNE: tl.constexpr):
    """The step of the elements ``offs`` (``inb``: in bounds) of one tensor."""
    # Per-tensor flags are broadcast to the block before use: the interpreter mistypes
    # (block bool) & (scalar bool) as int32, compiled Triton folds the splat away.
    kind = zero + kind_code
    decay_after = (zero + decay_after_flag) != 0
    reset = (zero + reset_flag) != 0
    dense1 = kind == 1
    dense2 = kind == 2
    mix1 = kind == 3
    mix2 = kind == 4
    accumulate = dense1 | mix1
    if FREEZE:
        thresholded = dense2 | mix2   # Stage II masks are needed only to freeze Mix
    else:
        thresholded = dense2
    col = offs % cols

    w0 = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    # Masked-off loads touch no memory, so absent buffers (a dummy address) cost nothing.
    gam = tl.load(gam_ptr + offs, mask=inb & (accumulate | thresholded), other=0.0)

    # Stage I: Fisher accumulation, and per-column keep counts for Mix.
    gam_new = tl.where(reset, 0.0, gam) + g * g
    tl.store(gam_ptr + offs, gam_new, mask=inb & accumulate)
    keep = column_keep(mix_key, col, keep_threshold)
    row0 = inb & mix1 & (offs < cols)
    fam = tl.load(fam_ptr + col, mask=row0, other=0.0)
    tl.store(fam_ptr + col, tl.where(reset, 0.0, fam) + keep.to(tl.float32), mask=row0)

    # Stage II: the subnetwork mask, derived on the fly from GAM (never stored).
    thr = tl.load(thr_ptr + zero, mask=thresholded, other=0.0)
    factor = tl.load(factor_ptr + col, mask=inb & mix2 & thresholded, other=0.0)
    selected = tl.where(mix2, gam * factor, gam) >= thr
    if FREEZE:
        update = inb & tl.where(thresholded, selected, tl.where(mix1, keep, True))
    else:
        # Gradient masking, as ``grad * M`` in the reference (NaN/inf behave the same).
        g = tl.where(dense2, g * selected.to(tl.float32), g)
        update = inb

    w = tl.where(decay_after, w0, w0 * decay)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    w = w - tl.div_rn(step_size * m, denom)
    w = tl.where(decay_after, w * decay, w)
    tl.store(w_ptr + offs, round_to(w, PARAM_DTYPE, EMULATE_RNE), mask=update)
    tl.store(m_ptr + offs, round_to(m, PARAM_DTYPE, EMULATE_RNE), mask=update)
    tl.store(v_ptr + offs, round_to(v, PARAM_DTYPE, EMULATE_RNE), mask=update)


class _Layout:
    """Block table of a list of tensor sizes: program -> (tensor, first element).

    Depends only on the sizes, so it survives new gradient buffers, new thresholds and
    reloaded state; on BERT-large it is 325,764 entries (2.6 MB), worth not rebuilding.
    """

    def __init__(self, numels: tuple, device: torch.device):
        counts = [triton.cdiv(n, BLOCK) for n in numels]
        block_tensor = np.repeat(np.arange(len(numels), dtype=np.int32), counts)
        block_start = np.concatenate([np.arange(c, dtype=np.int32) * BLOCK for c in counts])
        self.block_tensor = _to_device(block_tensor, device)
        self.block_start = _to_device(block_start, device)
        self.grid = (int(block_tensor.size),)


class _Plan:
    """Address and metadata tables of one list of tensors (88 bytes per tensor).

    Cached by the tensors' addresses; no reference to the tensors is kept (a plan is only
    used when the current tensors have exactly its addresses), so gradients set to None
    between steps are freed as usual.
    """

    def __init__(self, tasks: list[TensorStep], layout: _Layout, device: torch.device,
                 dummy: torch.Tensor):
        addr = np.zeros((len(tasks), N_ADDR), dtype=np.int64)
        meta = np.zeros((len(tasks), N_META), dtype=np.int64)
        dummy_addr = dummy.data_ptr()
        for i, task in enumerate(tasks):
            opt = [task.gam, task.fam, task.column_factor, task.threshold]
            addr[i] = [task.param.data_ptr(), task.grad.data_ptr(), task.exp_avg.data_ptr(),
                       task.exp_avg_sq.data_ptr()] + [
                           dummy_addr if x is None else x.data_ptr() for x in opt]
            meta[i] = [task.param.numel(), task.cols, KIND_CODE[task.kind]]
        self.addr = _to_device(addr, device)
        self.meta = _to_device(meta, device)
        self.layout = layout
        self.block_tensor, self.block_start = layout.block_tensor, layout.block_start
        self.grid = layout.grid
        # 16-byte aligned element buffers (the allocator's usual case; views may not be)
        self.aligned = bool((addr[:, :5] % 16 == 0).all())


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor without a host sync (pinned staging on CUDA)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _check(task: TensorStep, device: torch.device) -> None:
    p = task.param
    name = f"{task.kind.value} tensor of shape {tuple(p.shape)}"
    for label, x in (("grad", task.grad), ("exp_avg", task.exp_avg),
                     ("exp_avg_sq", task.exp_avg_sq)):
        if x.shape != p.shape or not x.is_contiguous() or x.device != device:
            raise ValueError(f"{name}: {label} must be contiguous, on {device}, shaped like "
                             f"the param")
    if task.exp_avg.dtype != p.dtype or task.exp_avg_sq.dtype != p.dtype:
        raise ValueError(f"{name}: moments must have the param dtype {p.dtype}")
    if p.numel() >= 2**31 - BLOCK:
        raise ValueError(f"{name}: tensors of 2**31 or more elements are not supported")
    if task.cols < 1 or p.numel() % task.cols:
        raise ValueError(f"{name}: cols={task.cols} must divide numel={p.numel()}")
    needs = {StepKind.DENSE_STAGE1: ("gam",), StepKind.DENSE_STAGE2: ("gam", "threshold"),
             StepKind.MIX_STAGE1: ("gam", "fam"),
             StepKind.MIX_STAGE2: ("gam", "column_factor", "threshold")}.get(task.kind, ())
    for label in needs:
        x = getattr(task, label)
        if x is None or x.dtype != torch.float32 or not x.is_contiguous() or x.device != device:
            raise ValueError(f"{name}: {label} must be a contiguous fp32 tensor on {device}")


class FusedStep:
    """Callable ``(tasks, freeze)``: one kernel launch per (param dtype, grad dtype) group."""

    MAX_PLANS = 16  # a few param groups x stage kinds; old plans are dropped first

    def __init__(self):
        self._plans: dict = {}
        self._layouts: dict = {}
        self._dummies: dict = {}

    def _dummy(self, device: torch.device) -> torch.Tensor:
        if device not in self._dummies:
            self._dummies[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return self._dummies[device]

    def __call__(self, tasks: list[TensorStep], freeze: bool) -> None:
        groups: dict = {}
        for task in tasks:
            if task.param.numel() == 0:
                continue
            key = (task.param.device, task.param.dtype, task.grad.dtype)
            groups.setdefault(key, []).append(task)
        for (device, pdtype, gdtype), group in groups.items():
            plan = self._plan(group, device, freeze)
            dyn = _to_device(_dynamic_table(group), device)
            _dps_step_kernel[plan.grid](
                plan.addr, plan.meta, dyn, plan.block_tensor, plan.block_start,
                PARAM_DTYPE=TORCH_TO_TL[pdtype], GRAD_DTYPE=TORCH_TO_TL[gdtype],
                FREEZE=bool(freeze), ALIGNED=plan.aligned, EMULATE_RNE=interpreter_enabled(),
                BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)

    def _plan(self, group: list[TensorStep], device: torch.device, freeze: bool) -> _Plan:
        key = (device, bool(freeze)) + tuple(
            (KIND_CODE[t.kind], t.cols, t.param.numel(), t.param.data_ptr(), t.grad.data_ptr(),
             t.exp_avg.data_ptr(), t.exp_avg_sq.data_ptr(),
             *(0 if x is None else x.data_ptr()
               for x in (t.gam, t.fam, t.column_factor, t.threshold)))
            for t in group)
        plan = self._plans.pop(key, None)
        if plan is None:
            for task in group:
                _check(task, device)
            numels = (device,) + tuple(t.param.numel() for t in group)
            layout = self._layouts.pop(numels, None) or _Layout(numels[1:], device)
            if len(self._layouts) >= self.MAX_PLANS:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[numels] = layout
            plan = _Plan(group, layout, device, self._dummy(device))
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan  # most recently used last
        return plan


def _dynamic_table(group: list[TensorStep]) -> np.ndarray:
    """The per-step words of each tensor: fp32 bit patterns of the AdamW scalars, flags, keys."""
    floats = np.array([(s.beta1, 1.0 - s.beta1, s.beta2, 1.0 - s.beta2, s.eps, s.decay,
                        s.step_size, s.bias2_sqrt)
                       for s in (t.scalars for t in group)], dtype=np.float32).reshape(-1, 8)
    ints = np.array([(int(t.scalars.decay_after), int(t.reset), t.mix_key & 0xFFFFFFFF,
                      t.keep_threshold) for t in group], dtype=np.int64).reshape(-1, 4)
    table = np.empty((len(group), N_DYN), dtype=np.int32)
    table[:, :8] = floats.view(np.int32)
    table[:, 8:] = ints.astype(np.uint32).view(np.int32)
    return table
