"""Fused DPS + AdamW step over many tensors: one launch per (dtype, kind) group.

Per element (g = grad, w = param, m/v = moments; arithmetic in fp32; see step_types.StepKind):

    PLAIN         AdamW(g)
    DENSE_STAGE1  GAM = (0 if reset else GAM) + g*g;  AdamW(g)
    DENSE_STAGE2  M = GAM >= thr;  AdamW(g*M), or with freeze AdamW(g) only where M
                  (MASK_BITS: M read from the packed subnetwork, GAM not read)
    MIX_STAGE1    m = keep(H(key ^ col));  GAM = (0|GAM) + g*g;  FAM[col] = (0|FAM[col]) + m
                  (written by the elements of row 0 only, so once per column);
                  AdamW(g), with freeze only where m
    MIX_STAGE2    AdamW(g); with freeze only where GAM * factor[col] >= thr
                  (MASK_BITS: where the packed bit is set, GAM and factor not read)

    AdamW, torch style:     w *= decay;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g g;
                            w -= step_size * m / (sqrt(v) / bias2_sqrt + eps)
           hf_legacy style: the same with bias2_sqrt = 1 and ``w *= decay`` after the update.

Bytes moved per element (P = bytes of the param dtype, grad and moments in the param dtype;
fp32 moments on 16-bit params, ``DPSAdamW(fp32_moments=True)``, make the moments 4 B):
    PLAIN / MIX_STAGE2       read w, g, m, v (4P)                write w, m, v (3P)   = 7P
    DENSE_STAGE1/MIX_STAGE1    + read and write GAM (8)                               = 7P + 8
    DENSE_STAGE2             + read GAM (4)                                            = 7P + 4
    MIX_STAGE2 + freeze      + read GAM (4) + factor[col] (a per-column vector, cached) = 7P + 4
    either, MASK_BITS        + read 1 bit (int32 word i // 32, bit i % 32)        = 7P + 0.125
    fp32: AdamW 28 B, Stage I 36 B, Stage II 32 B. ``freeze`` saves no traffic: frozen
    elements are written back unchanged, because DRAM moves whole 32-byte sectors anyway and
    a full-width store keeps the accesses 128-bit. Capturable Mix also writes W' once, at the
    last Stage I step (+P on that step only).

Kind as a compile-time constant. ``KIND`` (plain / dense / mix) and ``STAGE`` (1, 2, or 0 =
decided on the device) are ``tl.constexpr``, so a launch carries only its own kind's code:
no hash or ``offs % cols`` in Dense, no GAM in plain AdamW (fewer registers, more resident
warps). Launches per ``step()`` = number of (param dtype, grad dtype, kind) groups: one per
param group for a model built with ``DPSAdamW.from_model``.

Launch strategy. The kernel reads each tensor's buffer addresses from a pointer table
(int64 ``data_ptr()`` values, cast in-kernel with ``.to(tl.pointer_type(...))``), so one
launch covers every tensor of a group. Programs map to (tensor, block) through a block
table built on the host and cached by the tensor sizes; the state address table is cached
with the optimizer's group and the gradient address table is rebuilt only when a gradient
address changes (``zero_grad(set_to_none=True)`` usually gets the same addresses back from
the caching allocator). Per-step values are kernel arguments, never tables: the fp32 AdamW
scalars, ``t`` and the reset flag (``do_not_specialize``: a step that is a multiple of 16
must not compile a new variant mid-run), and the Mix key, finished in-kernel as
``H(key_base ^ t)`` from a static per-tensor ``key_base``.

Capturable (``STAGE = 0``): the step counter of each tensor (0-d fp32, ``state["step"]``)
and the hyperparameters (fp64 ``[lr, beta1, beta2, eps, weight_decay]``) are read on the
device; stage, reset, bias corrections (fp64, then rounded to fp32 as the host path
does), the Mix key and the W' snapshot are derived in-kernel. Every launch then has the
same arguments, so a CUDA graph of the step replays correctly. ``found_inf`` (GradScaler)
makes every program return before touching memory; ``grad_scale`` unscales in-kernel
(``g * fp32(1 / fp64(scale))``, as ``GradScaler.unscale_``).

Vectorised access. Addresses read from a table carry no alignment information, and a mask
``offs < numel`` with ``numel`` read from a table has unknown constancy; either would force
scalar accesses. The host checks that all element buffers are 16-byte aligned
(``ALIGNED``, true for allocator-made tensors, false for odd-offset views) and the kernel
puts ``tl.multiple_of(ptr, 16)`` on the pointer after the int -> pointer cast (a hint on the
integer is lost by the cast); programs whose block lies wholly inside the tensor run with
an all-true mask, only a tensor's last block uses ``offs < numel``. ``bench/aot.py``
checks the result in the compiled SASS (128-bit loads).

Why ``enable_fp_fusion=False``: GAM must be bit-identical to the reference
(``GAM + g*g`` rounded twice, as torch does with two ops) because the Stage II mask
``GAM >= thr`` is compared exactly across backends; a fused multiply-add would change
the last bit. ``sqrt_rn``/``div_rn`` give IEEE-rounded results like torch's own kernels.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ...backends import interpreter_enabled
from ...mask_bits import check_mask_bits
from ...step_types import GroupStep, StepKind, TensorStep
from .keep_mask import column_keep, hash32 as tl_hash32
from .mask_bits import load_bit
from .rounding import round_to

# KIND constexpr codes
PLAIN, DENSE, MIX = 0, 1, 2
KIND_CODE = {StepKind.PLAIN: (PLAIN, 1), StepKind.DENSE_STAGE1: (DENSE, 1),
             StepKind.DENSE_STAGE2: (DENSE, 2), StepKind.MIX_STAGE1: (MIX, 1),
             StepKind.MIX_STAGE2: (MIX, 2)}   # kind -> (KIND, STAGE)
MODE_CODE = {"plain": PLAIN, "dense": DENSE, "mix": MIX}
# Columns of the address table
ADDR = ("param", "exp_avg", "exp_avg_sq", "gam", "fam", "column_factor", "threshold",
        "stage_anchor", "device_step", "mask_bits")   # the kernel's stride is 10: keep in step
N_ADDR = len(ADDR)
N_META = 3   # numel, cols, key word (uint32 bits: key_base, or the finished key)
BLOCK = 1024
TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _table_ptr(entry_ptr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The buffer address stored at ``entry_ptr`` as a pointer to DTYPE."""
    ptr = tl.load(entry_ptr).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # The host checked that the address is 16-byte aligned. The hint must sit on the
        # pointer: one on the int64 is dropped by the cast, and the loads stay scalar.
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _pow_int(base, e):
    """``base ** e`` for an fp64 scalar and an int32 exponent >= 0 (binary powering)."""
    result = tl.full((), 1.0, tl.float64)
    for _ in range(31):
        result = tl.where((e & 1) != 0, result * base, result)
        base = base * base
        e = e >> 1
    return result


@triton.jit
def _device_schedule(t, update_steps):
    """(stage one?, first step of the stage?, last step of Stage I?) of 1-based step t."""
    cycle = (t + update_steps - 1) // update_steps
    stage_one = (cycle % 2) == 1
    reset = stage_one & (((t - 1) % update_steps) == 0)
    due = stage_one & ((t % update_steps) == 0)
    return stage_one, reset, due


@triton.jit(do_not_specialize=["t", "reset", "keep_threshold", "update_steps"])
def _dps_step_kernel(
    addr_ptr,          # int64 [T, N_ADDR]: state buffer addresses per tensor (see ADDR)
    grad_addr_ptr,     # int64 [T]: gradient addresses
    meta_ptr,          # int32 [T, N_META]: numel, cols, key word
    block_tensor_ptr,  # int32 [G]: the tensor program ``pid`` works on
    block_start_ptr,   # int32 [G]: the first flat element of program ``pid`` in its tensor
    beta1, one_minus_beta1, beta2, one_minus_beta2,  # fp32 host scalars (STAGE != 0)
    eps, decay, step_size, bias2_sqrt,               # fp32 host scalars (STAGE != 0)
    t,                 # host step, 1-based (STAGE != 0; the Mix key)
    reset,             # host flag: first step of Stage I (STAGE != 0)
    keep_threshold,    # Mix keep threshold (mask_hash.keep_threshold)
    hyper_ptr,         # fp64 [5]: lr, beta1, beta2, eps, weight_decay (STAGE == 0)
    update_steps,      # stage length (STAGE == 0)
    scale_ptr,         # fp32 0-d GradScaler scale (HAS_SCALE)
    found_inf_ptr,     # fp32 0-d GradScaler found_inf (HAS_FOUND_INF)
    PARAM_DTYPE: tl.constexpr,  # dtype of param (and W')
    MOMENT_DTYPE: tl.constexpr,  # dtype of exp_avg, exp_avg_sq: the param's, or fp32
    GRAD_DTYPE: tl.constexpr,   # dtype of grad
    KIND: tl.constexpr,         # PLAIN, DENSE or MIX
    STAGE: tl.constexpr,        # 1, 2, or 0: decided per tensor from its device step
    FREEZE: tl.constexpr,       # frozen elements keep weight and moments
    MASK_BITS: tl.constexpr,    # Stage II subnetwork from the packed bits (no GAM/factor/thr)
    HF_LEGACY: tl.constexpr,    # transformers-4.7 AdamW (decay after the update)
    DERIVE_KEY: tl.constexpr,   # key word is key_base: the key is H(key_base ^ t)
    HAS_SCALE: tl.constexpr,    # unscale the gradient by scale_ptr
    HAS_FOUND_INF: tl.constexpr,  # skip the whole step when found_inf != 0
    ALIGNED: tl.constexpr,      # every element buffer address is a multiple of 16 bytes
    EMULATE_RNE: tl.constexpr,  # interpreter only: round bf16 to nearest even (rounding.py)
    BLOCK: tl.constexpr,        # elements per program
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    numel = tl.load(meta_ptr + tensor * 3)
    cols = tl.load(meta_ptr + tensor * 3 + 1)
    key_word = tl.load(meta_ptr + tensor * 3 + 2).to(tl.uint32, bitcast=True)

    a = addr_ptr + tensor * 10   # N_ADDR
    w_ptr = _table_ptr(a, PARAM_DTYPE, ALIGNED)
    g_ptr = _table_ptr(grad_addr_ptr + tensor, GRAD_DTYPE, ALIGNED)
    m_ptr = _table_ptr(a + 1, MOMENT_DTYPE, ALIGNED)
    v_ptr = _table_ptr(a + 2, MOMENT_DTYPE, ALIGNED)
    gam_ptr = _table_ptr(a + 3, tl.float32, ALIGNED)
    fam_ptr = _table_ptr(a + 4, tl.float32, False)
    factor_ptr = _table_ptr(a + 5, tl.float32, False)
    thr_ptr = _table_ptr(a + 6, tl.float32, False)
    snap_ptr = _table_ptr(a + 7, PARAM_DTYPE, ALIGNED)
    bits_ptr = _table_ptr(a + 9, tl.int32, False)

    offs = start + tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    if STAGE == 0:
        # Capturable: everything that depends on the step is derived here, in fp64 as the
        # host path does (reference.adamw_scalars), then rounded to fp32.
        step_ptr = _table_ptr(a + 8, tl.float32, False)
        t_dev = tl.load(step_ptr).to(tl.int32) + 1
        stage_one, reset_dev, due = _device_schedule(t_dev, update_steps)
        lr = tl.load(hyper_ptr)
        b1 = tl.load(hyper_ptr + 1)
        b2 = tl.load(hyper_ptr + 2)
        bias1 = 1.0 - _pow_int(b1, t_dev)
        bias2 = 1.0 - _pow_int(b2, t_dev)
        if HF_LEGACY:
            step_size = (lr * tl.sqrt(bias2) / bias1).to(tl.float32)
            bias2_sqrt = tl.full((), 1.0, tl.float32)
        else:
            step_size = (lr / bias1).to(tl.float32)
            bias2_sqrt = tl.sqrt(bias2).to(tl.float32)  # fp64 sqrt is IEEE (sqrt.rn.f64)
        beta1 = b1.to(tl.float32)
        one_minus_beta1 = (1.0 - b1).to(tl.float32)
        beta2 = b2.to(tl.float32)
        one_minus_beta2 = (1.0 - b2).to(tl.float32)
        eps = tl.load(hyper_ptr + 3).to(tl.float32)
        decay = (1.0 - lr * tl.load(hyper_ptr + 4)).to(tl.float32)
        t = t_dev
        # Per-tensor flags are broadcast to the block before use: the interpreter mistypes
        # (block bool) & (scalar bool) as int32; compiled Triton folds the splat away.
        s1 = zero == 0   # unused: the stage picks a code path below
        rst = (zero + reset_dev.to(tl.int32)) != 0
        snap = (zero + due.to(tl.int32)) != 0
    else:
        if STAGE == 1:
            s1 = zero == 0
        else:
            s1 = zero != 0
        rst = (zero + reset) != 0
        snap = zero != 0
    if DERIVE_KEY:
        key = tl_hash32(key_word ^ t.to(tl.uint32))
    else:
        key = key_word
    keep_thr = keep_threshold.to(tl.uint32)
    inv_scale = 1.0
    if HAS_SCALE:
        # GradScaler.unscale_ multiplies by fp32(1 / fp64(scale)); so do we.
        inv_scale = (1.0 / tl.load(scale_ptr).to(tl.float64)).to(tl.float32)

    args = (cols, key, keep_thr, inv_scale, w_ptr, g_ptr, m_ptr, v_ptr, gam_ptr, fam_ptr,
            factor_ptr, thr_ptr, snap_ptr, bits_ptr, beta1, one_minus_beta1, beta2,
            one_minus_beta2, eps, decay, step_size, bias2_sqrt)
    if STAGE == 0:
        # One code path per stage, chosen per tensor at run time: registers are those of
        # the larger path, not of both (the flags would otherwise keep both alive).
        if stage_one:
            _split_blocks(start, numel, offs, zero == 0, rst, snap, *args, PARAM_DTYPE,
                          MOMENT_DTYPE, KIND, FREEZE, MASK_BITS, HF_LEGACY, HAS_SCALE,
                          KIND == 2, EMULATE_RNE, BLOCK)
        else:
            _split_blocks(start, numel, offs, zero != 0, rst, snap, *args, PARAM_DTYPE,
                          MOMENT_DTYPE, KIND, FREEZE, MASK_BITS, HF_LEGACY, HAS_SCALE, False,
                          EMULATE_RNE, BLOCK)
    else:
        _split_blocks(start, numel, offs, s1, rst, snap, *args, PARAM_DTYPE, MOMENT_DTYPE,
                      KIND, FREEZE, MASK_BITS, HF_LEGACY, HAS_SCALE, False, EMULATE_RNE, BLOCK)


@triton.jit
def _split_blocks(start, numel, offs, s1, rst, snap, cols, key, keep_thr, inv_scale, w_ptr,
                  g_ptr, m_ptr, v_ptr, gam_ptr, fam_ptr, factor_ptr, thr_ptr, snap_ptr,
                  bits_ptr, beta1,
                  one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt,
                  PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, KIND: tl.constexpr,
                  FREEZE: tl.constexpr, MASK_BITS: tl.constexpr,
                  HF_LEGACY: tl.constexpr, HAS_SCALE: tl.constexpr, SNAPSHOT: tl.constexpr,
                  EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
    if start + BLOCK <= numel:
        # A whole block: the all-true mask has known constancy, so the accesses vectorize.
        _step_block(offs, tl.zeros_like(offs) == 0, s1, rst, snap, cols, key, keep_thr,
                    inv_scale, w_ptr, g_ptr, m_ptr, v_ptr, gam_ptr, fam_ptr, factor_ptr, thr_ptr, snap_ptr,
                    bits_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                    step_size, bias2_sqrt, PARAM_DTYPE, MOMENT_DTYPE, KIND, FREEZE, MASK_BITS,
                    HF_LEGACY, HAS_SCALE, SNAPSHOT, EMULATE_RNE)
    else:
        _step_block(offs, offs < numel, s1, rst, snap, cols, key, keep_thr, inv_scale, w_ptr,
                    g_ptr, m_ptr, v_ptr, gam_ptr, fam_ptr, factor_ptr, thr_ptr, snap_ptr,
                    bits_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                    step_size, bias2_sqrt, PARAM_DTYPE, MOMENT_DTYPE, KIND, FREEZE, MASK_BITS,
                    HF_LEGACY, HAS_SCALE, SNAPSHOT, EMULATE_RNE)


@triton.jit
def _step_block(offs, inb, s1, reset, snap, cols, key, keep_threshold, inv_scale,
                w_ptr, g_ptr, m_ptr, v_ptr, gam_ptr, fam_ptr, factor_ptr, thr_ptr, snap_ptr,
                bits_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                step_size, bias2_sqrt, PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr,
                KIND: tl.constexpr, FREEZE: tl.constexpr, MASK_BITS: tl.constexpr,
                HF_LEGACY: tl.constexpr, HAS_SCALE: tl.constexpr,
                SNAPSHOT: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """The step of the elements ``offs`` (``inb``: in bounds) of one tensor.

    ``s1`` (Stage I) is a constant block the compiler folds away; ``reset`` and ``snap``
    (write W', capturable Mix: ``SNAPSHOT``) are per-tensor block-wide flags. With
    ``MASK_BITS`` the Stage II subnetwork is read from the packed bits (``bits_ptr``) and
    GAM only in Stage I (Dense and Mix with freeze; Mix without freeze needs no mask)."""
    w0 = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m0 = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    v0 = tl.load(v_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * inv_scale
    update = inb
    if KIND != 0:
        s2 = ~s1
        if MASK_BITS:
            # Stage II reads the packed subnetwork: GAM is read in Stage I only.
            gam = tl.load(gam_ptr + offs, mask=inb & s1, other=0.0)
        elif KIND == 1:
            gam = tl.load(gam_ptr + offs, mask=inb, other=0.0)
        elif FREEZE:
            gam = tl.load(gam_ptr + offs, mask=inb, other=0.0)
        else:   # Mix Stage II without freeze needs no GAM: read it in Stage I only
            gam = tl.load(gam_ptr + offs, mask=inb & s1, other=0.0)
        # Stage I: Fisher accumulation.
        tl.store(gam_ptr + offs, tl.where(reset, 0.0, gam) + g * g, mask=inb & s1)
        if MASK_BITS:
            # Stage II: bit offs % 32 of word offs // 32 (mask_bits.py), 1/8 B per element.
            bit = load_bit(bits_ptr, offs, inb & s2)
        else:
            thr = tl.load(thr_ptr)
        if KIND == 1:
            # Stage II: the subnetwork mask, derived on the fly from GAM (never stored),
            # or read from the bits packed at the selection.
            if MASK_BITS:
                selected = s2 & bit
            else:
                selected = s2 & (gam >= thr)
            if FREEZE:
                update = s1 | selected
            else:
                # Gradient masking, as ``grad * M`` in the reference (NaN/inf alike).
                g = tl.where(s2, g * selected.to(tl.float32), g)
        else:
            col = offs % cols
            keep = column_keep(key, col, keep_threshold)
            # FAM counts each column once: the elements of row 0 write it.
            row0 = inb & s1 & (offs < cols)
            fam = tl.load(fam_ptr + col, mask=row0, other=0.0)
            tl.store(fam_ptr + col, tl.where(reset, 0.0, fam) + keep.to(tl.float32),
                     mask=row0)
            if FREEZE:
                if MASK_BITS:
                    update = tl.where(s1, keep, bit)
                else:
                    factor = tl.load(factor_ptr + col, mask=inb & s2, other=0.0)
                    update = tl.where(s1, keep, gam * factor >= thr)

    w = w0
    if not HF_LEGACY:
        w = w * decay
    m = beta1 * m0 + one_minus_beta1 * g
    v = beta2 * v0 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    w = w - tl.div_rn(step_size * m, denom)
    if HF_LEGACY:
        w = w * decay
    if FREEZE:
        # Frozen elements are written back unchanged (full-width stores, see docstring).
        w = tl.where(update, w, w0)
        m = tl.where(update, m, m0)
        v = tl.where(update, v, v0)
    w_out = round_to(w, PARAM_DTYPE, EMULATE_RNE)
    tl.store(w_ptr + offs, w_out, mask=inb)
    tl.store(m_ptr + offs, round_to(m, MOMENT_DTYPE, EMULATE_RNE), mask=inb)
    tl.store(v_ptr + offs, round_to(v, MOMENT_DTYPE, EMULATE_RNE), mask=inb)
    if SNAPSHOT:
        # Capturable Mix: W' = W after the last Stage I step, written here.
        tl.store(snap_ptr + offs, w_out, mask=inb & snap)


def launch_options(pdtype: torch.dtype, kind: int, stage: int) -> dict:
    """Warps (and a register cap) of the step kernel for a param dtype and kind.

    A BLOCK of 1024 over 8 warps (fp32) or 4 warps (16-bit) is 4 fp32 or 8 16-bit elements
    per thread: one 128-bit access per buffer. 16-bit launches cap registers at 128, so 4
    warps x 128 registers keep 16 warps resident per SM: triton 3.6 gives Dense with freeze
    136-140 registers (12 warps), and ptxas fits them in 128 without spilling. Not Mix
    Stage I or a capturable Mix launch (which may run Stage I): its keep-mask hash needs
    136-151 registers on 3.6, and under the cap ptxas spills 8-88 B on sm_70/sm_80, so it
    keeps 12 warps there (a GATE_EXCEPTIONS entry in bench/aot.py). On triton 3.9 the
    capped launches need at most 96 registers (the cap changes nothing) and the uncapped
    Mix ones 102-122 (16 warps/SM)."""
    if pdtype == torch.float32:
        return {"num_warps": 8}
    if kind == MIX and stage != 2:
        return {"num_warps": 4}
    return {"num_warps": 4, "maxnreg": 128}


class _Layout:
    """Block table of a list of tensor sizes: program -> (tensor, first element).

    Depends only on the sizes, so it survives new gradient buffers, new thresholds and
    reloaded state; on BERT-large it is 325,764 entries (2.6 MB), worth not rebuilding.
    """

    def __init__(self, numels: tuple, device: torch.device):
        counts = [triton.cdiv(n, BLOCK) for n in numels]
        block_tensor = np.repeat(np.arange(len(numels), dtype=np.int32), counts)
        block_start = np.concatenate([np.arange(c, dtype=np.int32) * BLOCK for c in counts])
        self.block_tensor = to_device(block_tensor, device)
        self.block_start = to_device(block_start, device)
        self.grid = (int(block_tensor.size),)


class _Plan:
    """Static tables of one list of tensors: state addresses, sizes, key words, layout.

    Kept as long as the tensors do not change (in the optimizer's group cache, or in the
    small LRU of :class:`FusedStep` for the per-task API). Only addresses are kept, never
    tensors, so gradients set to None between steps are freed as usual.
    """

    def __init__(self, entries, key_words, device, dummy, layout):
        addr = np.zeros((len(entries), N_ADDR), dtype=np.int64)
        meta = np.zeros((len(entries), N_META), dtype=np.int64)
        dummy_addr = dummy.data_ptr()
        for i, e in enumerate(entries):
            addr[i] = [dummy_addr if getattr(e, name) is None else getattr(e, name).data_ptr()
                       for name in ADDR]
            meta[i] = [e.param.numel(), e.cols, key_words[i] & 0xFFFFFFFF]
        self.addr = to_device(addr, device)
        self.meta = to_device(meta.astype(np.uint32).view(np.int32), device)
        self.layout = layout
        # 16-byte aligned element buffers (the allocator's usual case; views may not be)
        self.state_aligned = bool((addr[:, [0, 1, 2, 3, 7]] % 16 == 0).all())
        # Every entry has its packed subnetwork (all or none: one launch, one MASK_BITS).
        with_bits = [getattr(e, "mask_bits", None) is not None for e in entries]
        if any(with_bits) and not all(with_bits):
            raise ValueError("mask_bits must be given for every tensor of a group or for none "
                             "(one launch reads the subnetwork one way)")
        self.mask_bits = bool(with_bits) and all(with_bits)
        self.grad_ptrs: list = []
        self.grad_table = None
        self.grad_aligned = True

    @property
    def aligned(self) -> bool:
        """Every element buffer (state and the current gradients) is 16-byte aligned."""
        return self.state_aligned and self.grad_aligned

    def grad_table_for(self, grads, entries, device) -> torch.Tensor:
        """The gradient address table, rebuilt (and the gradients checked) only when an
        address changed since the last step.

        The first table checks every gradient fully. Later rebuilds check what torch's
        ``.grad`` setter does not already enforce (it refuses another shape, dtype or
        device than the parameter's): contiguity, and one gradient dtype for the launch."""
        try:
            ptrs = list(map(torch.Tensor.data_ptr, grads))
        except (RuntimeError, TypeError):   # a sparse gradient, or one without storage
            for entry, grad in zip(entries, grads):
                _check_grad(entry, grad, device)
            raise
        if ptrs != self.grad_ptrs:
            dtype = grads[0].dtype
            if not self.grad_ptrs:
                bad = range(len(grads))
            else:
                bad = [i for i, g in enumerate(grads)
                       if g.dtype is not dtype or not g.is_contiguous()]
            for i in bad:
                _check_grad(entries[i], grads[i], device)
                if grads[i].dtype != dtype:
                    raise ValueError(f"{_name(entries[i], 'step')}: gradient dtype "
                                     f"{grads[i].dtype} differs from the group's first "
                                     f"gradient ({dtype}); one launch reads one dtype")
            table = np.array(ptrs, dtype=np.int64)
            self.grad_table = to_device(table, device)
            self.grad_aligned = not (table & 15).any()
            self.grad_ptrs = ptrs
        return self.grad_table


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor without a host sync (pinned staging on CUDA)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _name(entry, kind: str) -> str:
    return f"{kind} tensor #{entry.index} of shape {tuple(entry.param.shape)}"


def _check_grad(entry, grad, device) -> None:
    p = entry.param
    if grad.layout != torch.strided:
        raise ValueError(f"{_name(entry, 'step')}: sparse gradients are not supported")
    if grad.shape != p.shape or not grad.is_contiguous() or grad.device != device:
        raise ValueError(f"{_name(entry, 'step')}: grad must be contiguous, on {device}, "
                         f"shaped like the param")


def _check_entry(entry, mode: str, capturable: bool, device, stage: int = 0) -> None:
    p = entry.param
    name = _name(entry, mode)
    for label, x in (("exp_avg", entry.exp_avg), ("exp_avg_sq", entry.exp_avg_sq)):
        if x.shape != p.shape or not x.is_contiguous() or x.device != device:
            raise ValueError(f"{name}: {label} must be contiguous, on {device}, shaped like "
                             f"the param")
        if x.dtype not in (p.dtype, torch.float32) or x.dtype != entry.exp_avg.dtype:
            raise ValueError(f"{name}: moments must both have the param dtype {p.dtype} or "
                             f"both be fp32, got {entry.exp_avg.dtype} and "
                             f"{entry.exp_avg_sq.dtype}")
    from ...step_types import MAX_TENSOR_ELEMENTS
    if p.numel() > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"{name}: more than {MAX_TENSOR_ELEMENTS} elements")
    if entry.cols < 1 or p.numel() % entry.cols:
        raise ValueError(f"{name}: cols={entry.cols} must divide numel={p.numel()}")
    bits = getattr(entry, "mask_bits", None)
    if bits is not None:
        if capturable:
            raise ValueError(f"{name}: mask_bits is not supported with capturable=True yet")
        check_mask_bits(bits, p.numel(), f"{name}: mask_bits", device)
    needs = {"dense": ("gam",), "mix": ("gam",), "plain": ()}[mode]
    if bits is not None and stage == 2:    # Stage II from the bits: no GAM, factor, threshold
        needs = ()
    if mode == "mix" and stage != 2:       # Stage I (or decided on the device)
        needs += ("fam",)
    if mode != "plain" and stage != 1 and not (bits is not None and stage == 2):
        # Stage II (or decided on the device)
        needs += ("threshold",) + (("column_factor",) if mode == "mix" else ())
    for label in needs:
        x = getattr(entry, label)
        if x is None or x.dtype != torch.float32 or not x.is_contiguous() or x.device != device:
            raise ValueError(f"{name}: {label} must be a contiguous fp32 tensor on {device}")
    if capturable:
        if entry.device_step is None or entry.device_step.device != device:
            raise ValueError(f"{name}: capturable needs a step tensor on {device}")
        if mode == "mix" and (entry.stage_anchor is None or entry.stage_anchor.dtype != p.dtype
                              or not entry.stage_anchor.is_contiguous()):
            raise ValueError(f"{name}: capturable Mix needs a contiguous stage_anchor")


class FusedStep:
    """The fused step: ``group(g)`` for a :class:`GroupStep`, ``(tasks, freeze)`` per task."""

    MAX_PLANS = 16  # per-task API: a few param groups x stage kinds; oldest dropped first

    def __init__(self):
        self._plans: dict = {}
        self._layouts: dict = {}
        self._dummies: dict = {}

    def _dummy(self, device: torch.device) -> torch.Tensor:
        if device not in self._dummies:
            self._dummies[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return self._dummies[device]

    def _layout(self, entries, device) -> _Layout:
        numels = (device,) + tuple(e.param.numel() for e in entries)
        layout = self._layouts.pop(numels, None) or _Layout(numels[1:], device)
        if len(self._layouts) >= self.MAX_PLANS:
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[numels] = layout
        return layout

    # ------------------------------------------------------------------ group API
    def group(self, gs: GroupStep) -> None:
        """One step of every tensor of ``gs`` (all on one device, one param dtype)."""
        cached = None if gs.cache is None else gs.cache.get("triton_plan")
        if cached is None:
            keep = [i for i, e in enumerate(gs.entries) if e.param.numel()]
            if len(keep) == len(gs.entries):
                keep = None   # no empty tensor: the gradients list is used as it is
            entries = gs.entries if keep is None else [gs.entries[i] for i in keep]
            if not entries:
                return
            device = entries[0].param.device
            for e in entries:
                _check_entry(e, gs.mode, gs.capturable, device,
                             0 if gs.capturable else gs.stage)
                if e.param.device != device or e.param.dtype != entries[0].param.dtype:
                    raise ValueError(f"{_name(e, gs.mode)}: a group must share one device "
                                     f"and dtype")
            plan = _Plan(entries, [e.key_base for e in entries], device, self._dummy(device),
                         self._layout(entries, device))
            cached = (plan, entries, keep, device)
            if gs.cache is not None:
                gs.cache["triton_plan"] = cached
        plan, entries, keep, device = cached
        grads = gs.grads if keep is None else [gs.grads[i] for i in keep]
        grad_table = plan.grad_table_for(grads, entries, device)
        kind = MODE_CODE[gs.mode]
        dummy = self._dummy(device)
        if gs.capturable:
            scalars = (0.0,) * 8
            t, reset, stage = 0, 0, 0
        else:
            s = gs.scalars
            scalars = (s.beta1, 1.0 - s.beta1, s.beta2, 1.0 - s.beta2, s.eps, s.decay,
                       s.step_size, s.bias2_sqrt)
            t, reset, stage = gs.t, int(gs.reset), gs.stage
        self._launch(plan, grad_table, scalars, t, reset, gs.keep_threshold,
                     gs.hyper if gs.capturable else dummy, gs.update_steps,
                     gs.grad_scale, gs.found_inf if gs.capturable else None, dummy,
                     entries[0].param.dtype, entries[0].exp_avg.dtype, grads[0].dtype, kind,
                     stage, gs.freeze,
                     gs.adamw_style == "hf_legacy", True, plan.aligned)

    @staticmethod
    def _launch(plan, grad_table, scalars, t, reset, keep_threshold, hyper, update_steps,
                grad_scale, found_inf, dummy, pdtype, mdtype, gdtype, kind, stage, freeze,
                hf_legacy, derive_key, aligned):
        # The bits are read where a Stage II mask is needed: Dense, and Mix with freeze.
        # Elsewhere the specialisation stays the one without bits.
        mask_bits = (plan.mask_bits and stage == 2
                     and (kind == DENSE or (kind == MIX and bool(freeze))))
        _dps_step_kernel[plan.layout.grid](
            plan.addr, grad_table, plan.meta, plan.layout.block_tensor, plan.layout.block_start,
            *scalars, t, reset, keep_threshold, hyper, update_steps,
            dummy if grad_scale is None else grad_scale,
            dummy if found_inf is None else found_inf,
            PARAM_DTYPE=TORCH_TO_TL[pdtype], MOMENT_DTYPE=TORCH_TO_TL[mdtype],
            GRAD_DTYPE=TORCH_TO_TL[gdtype], KIND=kind,
            STAGE=stage, FREEZE=bool(freeze), MASK_BITS=mask_bits, HF_LEGACY=hf_legacy,
            DERIVE_KEY=derive_key,
            HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            ALIGNED=aligned, EMULATE_RNE=interpreter_enabled(), BLOCK=BLOCK,
            enable_fp_fusion=False, **launch_options(pdtype, kind, stage))

    # ------------------------------------------------------------------ per-task API
    def __call__(self, tasks: list[TensorStep], freeze: bool) -> None:
        """Host-scheduled step of per-tensor tasks (tests, benchmarks): one launch per
        (device, dtypes, kind, scalars, reset) group; the Mix key is taken as given."""
        groups: dict = {}
        for task in tasks:
            if task.param.numel() == 0:
                continue
            key = (task.param.device, task.param.dtype, task.exp_avg.dtype, task.grad.dtype,
                   task.kind, task.scalars, bool(task.reset), task.keep_threshold,
                   task.mask_bits is not None)
            groups.setdefault(key, []).append(task)
        for (device, pdtype, mdtype, gdtype, kind, scalars, reset, keep_thr, _), group in \
                groups.items():
            entries = [_TaskEntry(task, i) for i, task in enumerate(group)]
            plan_key = (device, kind) + tuple(
                (t.cols, t.param.numel(), t.mix_key, *(0 if x is None else x.data_ptr() for x in
                 (t.param, t.exp_avg, t.exp_avg_sq, t.gam, t.fam, t.column_factor,
                  t.threshold, t.mask_bits)))
                for t in group)
            plan = self._plans.pop(plan_key, None)
            if plan is None:
                code, _ = KIND_CODE[kind]
                mode = {PLAIN: "plain", DENSE: "dense", MIX: "mix"}[code]
                for e in entries:
                    _check_entry(e, mode, False, device, KIND_CODE[kind][1])
                plan = _Plan(entries, [t.mix_key for t in group], device, self._dummy(device),
                             self._layout(entries, device))
                if len(self._plans) >= self.MAX_PLANS:
                    self._plans.pop(next(iter(self._plans)))
            self._plans[plan_key] = plan  # most recently used last
            grads = [t.grad for t in group]
            grad_table = plan.grad_table_for(grads, entries, device)
            code, stage = KIND_CODE[kind]
            s = scalars
            self._launch(plan, grad_table,
                         (s.beta1, 1.0 - s.beta1, s.beta2, 1.0 - s.beta2, s.eps, s.decay,
                          s.step_size, s.bias2_sqrt), 0, int(reset), keep_thr,
                         self._dummy(device), 1, None, None, self._dummy(device), pdtype,
                         mdtype, gdtype, code, stage, freeze, s.decay_after, False,
                         plan.aligned)


class _TaskEntry:
    """A :class:`TensorStep` seen as a table entry (the per-task API)."""

    def __init__(self, task: TensorStep, index: int):
        self.param, self.exp_avg, self.exp_avg_sq = task.param, task.exp_avg, task.exp_avg_sq
        self.gam, self.fam, self.column_factor = task.gam, task.fam, task.column_factor
        self.threshold, self.cols, self.index = task.threshold, task.cols, index
        self.mask_bits = task.mask_bits
        self.stage_anchor = self.device_step = None
        self.key_base = task.mix_key


