"""Triton backend against the reference (torch backend / reference.py).

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1 python -m pytest
python_tests/test_triton_backend.py``) and, with larger sizes, on CUDA when present.

What must be EXACT (any slip of one element fails): GAM, FAM, thresholds (radix select vs
``torch.kthvalue``), subnetwork masks, Stage I keep-masks, masked gradients, frozen
elements. These are pure functions of the gradients (``g*g`` accumulated in fp32 in the
same order, one fp32 multiply for the Mix score), so every backend gets the same bits.

Tolerances (params and moments): each run is compared with an fp32 reference run fed the
same gradient values; the kernel's error must satisfy
``err(kernel) <= 2 * err(torch backend in the same dtype) + atol``. The same-dtype torch
run carries the rounding the storage dtype forces (bf16/fp16 moments and weights); the
kernel does the same fp32 arithmetic and one rounding per store, so it may differ from it
only by a few fp32 ulps (torch may divide by a scalar through a reciprocal), which atol
covers: fp32 1e-6 (a few ulps of |w| <= 4 over the run), fp16 1e-3 and bf16 1e-2 (half a
storage ulp at |w| <= 4: one rounding landing on the other side).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dps_kernels import reference as ref
from dps_kernels.backends import get_backend, interpreter_enabled, unavailable_reason
from dps_kernels.backends.base import MixMask, StepKind, TensorStep
from dps_kernels.mask_hash import column_keep_mask, columns_of, keep_threshold, step_key
from dps_kernels.schedule import (STAGE_ONE, is_last_of_stage_one, is_stage_start,
                                  selected_count, stage_of)

REASON = unavailable_reason("triton")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend: {REASON}")

HAS_CUDA = torch.cuda.is_available()
# CPU runs only under the interpreter; CUDA runs the compiled kernels with larger sizes.
DEVICES = (["cpu"] if interpreter_enabled() else []) + (["cuda"] if HAS_CUDA else [])
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HYPER = dict(lr=2e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)  # not defaults


def triton_backend():
    return get_backend("triton")


def torch_backend():
    return get_backend("torch")


def _device_param(device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if device == "cpu" and not interpreter_enabled():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return torch.device(device)


devices = pytest.mark.parametrize("device", DEVICES or ["cpu"])


def _shapes(device):
    # 1 element, odd 7x13, more than one 1024-element block; a GPU gets real sizes.
    if device.type == "cuda":
        return [(1,), (7, 13), (257, 1031), (1024, 4096)]
    return [(1,), (7, 13), (33, 70)]


# ------------------------------------------------------------------ availability, registry
def test_import_does_not_load_triton():
    code = "import sys, dps_kernels; assert 'triton' not in sys.modules, 'triton imported'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_unavailable_reason_without_cuda_or_interpreter(monkeypatch):
    from dps_kernels.backends import triton_backend as tb
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = tb.unavailable_reason()
    assert reason is not None and "TRITON_INTERPRET" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.unavailable_reason() is None


@devices
def test_supports_gives_reasons(device):
    device = _device_param(device)
    backend = triton_backend()
    assert backend.supports(torch.zeros(3, 4, device=device)) is None
    assert "contiguous" in backend.supports(torch.zeros(4, 3, device=device).t())
    assert "dtype" in backend.supports(torch.zeros(3, dtype=torch.float64, device=device))
    assert "dtype" in backend.supports(torch.zeros(3, dtype=torch.int32, device=device))


# ------------------------------------------------------------------ Stage I keep-mask hash
@devices
def test_keep_mask_bit_identical_to_mask_hash(device):
    device = _device_param(device)
    cols = 5003 if device.type == "cpu" else 100_003
    ones = torch.ones(1, cols, device=device)
    # keys above 2**31 exercise the uint32 bit pattern passed as an int32 argument
    for key in (0, 1, step_key(7, 3, 11), 0xFFFFFFFF, 0x80000000):
        for p in (0.0, 0.3, 0.99):
            mask = MixMask(cols, column_key=key, keep_threshold=keep_threshold(p))
            got = triton_backend().mix_grad(ones, mask)[0] != 0
            assert torch.equal(got, column_keep_mask(key, keep_threshold(p), cols, device))


# ------------------------------------------------------------------ selection
def _scores(kind, shape, device, gen):
    if kind == "ties":        # integer-valued GAM: most values are tied
        return torch.randint(0, 4, shape, generator=gen).float().to(device)
    if kind == "zeros":
        return torch.zeros(shape, device=device)
    if kind == "signed":      # not produced by DPS, but the key map handles any sign
        return torch.randn(shape, generator=gen).to(device)
    return torch.rand(shape, generator=gen).pow(3).to(device)  # spread over exponents


@devices
@pytest.mark.parametrize("kind,mix_us", [("random", None), ("ties", None), ("zeros", None),
                                         ("signed", None), ("random", 10), ("ties", 60)])
def test_select_threshold_exact(device, kind, mix_us):
    device = _device_param(device)
    gen = torch.Generator().manual_seed(5)
    shapes = _shapes(device) + ([(5, 1013)] if device.type == "cpu" else [])  # > 4 blocks
    for shape in shapes:
        gam = _scores(kind, shape, device, gen)
        factor = None
        if mix_us is not None:
            cols = columns_of(shape)
            fam = torch.randint(0, mix_us + 1, (cols,), generator=gen).float().to(device)
            factor = ref.mix_column_factor(fam, mix_us)
        score = gam if factor is None else ref.mix_score(gam, factor)
        n = gam.numel()
        for k in sorted({1, 2, n // 3 + 1, selected_count(n, 0.3), n - 1, n} - {0}):
            if not 1 <= k <= n:
                continue
            got = triton_backend().select_threshold(gam, factor, k)
            want = ref.kth_largest(score, k)
            assert got.shape == () and got.dtype == torch.float32 and got.device == gam.device
            assert torch.equal(got, want), (shape, k, got.item(), want.item())
            assert torch.equal(score >= got, score >= want)
            # the k-th largest: at least k scores >= thr, fewer than k scores > thr
            assert int((score >= got).sum()) >= k > int((score > got).sum())


@devices
def test_select_threshold_approx_error_bound(device):
    device = _device_param(device)
    gen = torch.Generator().manual_seed(9)
    for shape in _shapes(device)[1:]:
        gam = torch.rand(shape, generator=gen).pow(4).to(device) + 1e-30
        n = gam.numel()
        for k in (1, n // 2 + 1, n):
            exact = ref.kth_largest(gam, k)
            approx = triton_backend().select_threshold(gam, None, k, approx=True)
            # documented bound: thr <= v < thr * (1 + 2**-3) for positive normal v
            assert approx <= exact < approx * (1 + 2 ** -3)
            assert bool(((gam >= exact) <= (gam >= approx)).all())   # a superset of the mask


@devices
def test_select_threshold_bad_input(device):
    device = _device_param(device)
    gam = torch.rand(3, 5, device=device)
    with pytest.raises(ValueError, match="k must be in"):
        triton_backend().select_threshold(gam, None, 0)
    with pytest.raises(ValueError, match="k must be in"):
        triton_backend().select_threshold(gam, None, 16)
    with pytest.raises(ValueError, match="fp32"):
        triton_backend().select_threshold(gam.half(), None, 1)
    with pytest.raises(ValueError, match="column_factor"):
        triton_backend().select_threshold(gam, torch.ones(4, device=device), 1)


# ------------------------------------------------------------------ Mix weight and grad
def _stage_two_mask(shape, device, gen, with_factor=True):
    cols = columns_of(shape)
    gam = torch.randint(0, 5, shape, generator=gen).float().to(device)
    factor = ref.mix_column_factor(torch.randint(0, 4, (cols,), generator=gen).float(), 3)
    factor = factor.to(device) if with_factor else None
    score = gam if factor is None else ref.mix_score(gam, factor)
    thr = ref.kth_largest(score, selected_count(gam.numel(), 0.4))
    return MixMask(cols, gam=gam, column_factor=factor, threshold=thr), score >= thr


@devices
@pytest.mark.parametrize("dtype", DTYPES)
def test_mix_weight_and_grad(device, dtype):
    device = _device_param(device)
    gen = torch.Generator().manual_seed(3)
    for shape in _shapes(device):
        cols = columns_of(shape)
        w = torch.randn(shape, generator=gen).to(dtype).to(device)
        a = torch.randn(shape, generator=gen).to(dtype).to(device)
        g = torch.randn(shape, generator=gen).to(dtype).to(device)
        stage_two, full = _stage_two_mask(shape, device, gen)
        dense_two, dense_full = _stage_two_mask(shape, device, gen, with_factor=False)
        key = step_key(1, 2, 3)
        stage_one = MixMask(cols, column_key=key, keep_threshold=keep_threshold(0.3))
        keep_one = column_keep_mask(key, keep_threshold(0.3), cols, device).expand(
            w.numel() // cols, cols).reshape(shape)
        for mask, keep in ((stage_one, keep_one), (stage_two, full), (dense_two, dense_full)):
            # the masked gradient is exact: g or 0 per element
            got = triton_backend().mix_grad(g, mask)
            assert got.dtype == dtype and torch.equal(got, ref.mix_grad(g, keep))
            for p in (0.0, 0.3, 0.99):
                for out_dtype in (None, torch.float32, torch.bfloat16):
                    got = triton_backend().mix_weight(w, a, mask, p, out_dtype)
                    want = ref.mix_weight(w, a, keep, p, out_dtype)
                    assert got.dtype == want.dtype and got.shape == want.shape
                    # one rounding of an fp32 formula: within 1 ulp of the output dtype
                    # (torch divides by the scalar 1-p through its reciprocal on CUDA)
                    ulp = torch.finfo(want.dtype).eps * want.float().abs()
                    err = (got.float() - want.float()).abs()
                    assert bool((err <= ulp + 1e-30).all()), (p, out_dtype, err.max())


# ------------------------------------------------------------------ the fused step, cycles
class Run:
    """Tensors stepped through the DPS schedule exactly as DPSAdamW does, on one backend."""

    def __init__(self, backend, mode, shapes, ps, dtype, device, us, style, seed=0):
        self.backend, self.mode, self.ps, self.us, self.style = backend, mode, ps, us, style
        self.dtype = dtype
        gen = torch.Generator().manual_seed(seed)
        self.params = [(torch.randn(s, generator=gen) * 0.5).to(dtype).to(device)
                       for s in shapes]
        self.plain = (torch.randn(5, generator=gen)).to(dtype).to(device)  # non-DPS tensor
        self.state = []
        for prm in self.params + [self.plain]:
            cols = columns_of(prm.shape)
            st = dict(exp_avg=torch.zeros_like(prm), exp_avg_sq=torch.zeros_like(prm),
                      gam=torch.zeros_like(prm, dtype=torch.float32),
                      threshold=torch.zeros((), device=device),
                      fam=torch.zeros(cols, device=device),
                      column_factor=torch.ones(cols, device=device),
                      anchor=prm.clone(), stage_anchor=prm.clone(), cols=cols)
            self.state.append(st)
        self.log = []   # per step: thresholds, masks (exact checks)

    def mask(self, i, t):
        st = self.state[i]
        if stage_of(t, self.us) == STAGE_ONE:
            return MixMask(st["cols"], column_key=step_key(11, i, t),
                           keep_threshold=keep_threshold(self.ps[i]))
        if self.mode == "dense":
            return MixMask(st["cols"], gam=st["gam"], threshold=st["threshold"])
        return MixMask(st["cols"], gam=st["gam"], column_factor=st["column_factor"],
                       threshold=st["threshold"])

    def step(self, t, raw_grads, freeze):
        s = ref.adamw_scalars(HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"],
                              HYPER["weight_decay"], t, self.style)
        first = stage_of(t, self.us) == STAGE_ONE
        tasks, record = [], {}
        for i, (prm, st) in enumerate(zip(self.params, self.state)):
            grad = raw_grads[i].to(self.dtype).to(prm.device)
            if self.mode == "mix":
                # the forward uses W~ and the backward masks the gradient
                anchor = st["anchor"] if first else st["stage_anchor"]
                record[f"mixw{i}"] = self.backend.mix_weight(prm, anchor, self.mask(i, t),
                                                             self.ps[i])
                grad = self.backend.mix_grad(grad, self.mask(i, t))
                record[f"grad{i}"] = grad
            task = TensorStep(StepKind.PLAIN, prm, grad, st["exp_avg"], st["exp_avg_sq"], s,
                              gam=st["gam"], cols=st["cols"])
            task.reset = first and is_stage_start(t, self.us)
            if self.mode == "dense":
                task.kind = StepKind.DENSE_STAGE1 if first else StepKind.DENSE_STAGE2
                task.threshold = st["threshold"]
            elif first:
                task.kind = StepKind.MIX_STAGE1
                task.fam = st["fam"]
                task.mix_key = step_key(11, i, t)
                task.keep_threshold = keep_threshold(self.ps[i])
            else:
                task.kind = StepKind.MIX_STAGE2
                task.fam, task.threshold = st["fam"], st["threshold"]
                task.column_factor = st["column_factor"]
            tasks.append(task)
        plain_state = self.state[-1]
        tasks.append(TensorStep(StepKind.PLAIN, self.plain, raw_grads[-1].to(self.dtype).to(
            self.plain.device), plain_state["exp_avg"], plain_state["exp_avg_sq"], s))
        before = [prm.clone() for prm in self.params]
        self.backend.step(tasks, freeze)
        for i, (prm, st) in enumerate(zip(self.params, self.state)):
            if not first:
                score = st["gam"] if self.mode == "dense" else ref.mix_score(
                    st["gam"], st["column_factor"])
                selected = score >= st["threshold"]
                record[f"mask{i}"] = selected
                if freeze:
                    record[f"frozen_ok{i}"] = torch.equal(prm[~selected], before[i][~selected])
            if is_last_of_stage_one(t, self.us):
                k = selected_count(prm.numel(), self.ps[i])
                factor = None
                if self.mode == "mix":
                    st["column_factor"] = ref.mix_column_factor(st["fam"], self.us)
                    factor = st["column_factor"]
                    st["stage_anchor"].copy_(prm)
                st["threshold"] = self.backend.select_threshold(st["gam"], factor, k)
                record[f"thr{i}"] = st["threshold"].clone()
        self.log.append(record)


def _grads(shapes, steps, seed, integer):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        if integer:   # integer-valued gradients: GAM is full of ties
            out.append([torch.randint(-3, 4, s, generator=gen).float() for s in shapes])
        else:
            out.append([torch.randn(s, generator=gen) for s in shapes])
    return out


def _compare_runs(kernel, same, fp32, dtype):
    atol = ATOL[dtype]
    # exact: GAM, FAM, thresholds, masks, masked gradients, frozen elements
    for st_k, st_s in zip(kernel.state, same.state):
        assert torch.equal(st_k["gam"], st_s["gam"])
        assert torch.equal(st_k["fam"], st_s["fam"])
        assert torch.equal(st_k["threshold"], st_s["threshold"])
    for step, (rec_k, rec_s) in enumerate(zip(kernel.log, same.log), start=1):
        assert rec_k.keys() == rec_s.keys()
        for key in rec_k:
            if key.startswith(("thr", "mask", "grad")):
                assert torch.equal(rec_k[key], rec_s[key]), f"step {step}: {key} differs"
            elif key.startswith("frozen_ok"):
                assert rec_k[key], f"step {step}: a frozen element changed ({key})"
            elif key.startswith("mixw"):
                # W~ of each run is computed from that run's W, which may differ by atol;
                # 1/(1-p) amplifies it
                p = kernel.ps[int(key[4:])]
                err = (rec_k[key].float() - rec_s[key].float()).abs()
                ulp = torch.finfo(dtype).eps * rec_s[key].float().abs()
                assert bool((err <= (ulp + atol) / (1 - p)).all()), f"step {step}: {key}"
    # params and moments: err(kernel) <= 2 * err(same-dtype torch) + atol, vs fp32
    tensors = [(k, s, r) for k, s, r in zip(kernel.params + [kernel.plain],
                                            same.params + [same.plain],
                                            fp32.params + [fp32.plain])]
    tensors += [(a[name], b[name], c[name]) for a, b, c in zip(kernel.state, same.state,
                                                               fp32.state)
                for name in ("exp_avg", "exp_avg_sq")]
    for k, s, r in tensors:
        err_k = (k.float() - r.float()).abs().max().item()
        err_s = (s.float() - r.float()).abs().max().item()
        assert err_k <= 2 * err_s + atol, (tuple(k.shape), err_k, err_s)


def _cycle_case(device, mode, freeze, style, dtype, us, steps, integer, ps, shapes=None):
    shapes = shapes or _shapes(device)
    assert len(ps) == len(shapes)
    grads = _grads(shapes + [(5,)], steps, seed=17, integer=integer)
    # gradients representable in the storage dtype, so all three runs see the same values
    grads = [[g.to(dtype).float() for g in gs] for gs in grads]
    kernel = Run(triton_backend(), mode, shapes, ps, dtype, device, us, style)
    same = Run(torch_backend(), mode, shapes, ps, dtype, device, us, style)
    fp32 = Run(torch_backend(), mode, shapes, ps, torch.float32, device, us, style)
    for t in range(1, steps + 1):
        for run in (kernel, same, fp32):
            run.step(t, grads[t - 1], freeze)
    _compare_runs(kernel, same, fp32, dtype)
    return kernel


# Every pair of (mode, freeze, style, dtype) values appears (a pairwise cover of the 24
# combinations), which keeps the interpreter run short.
_T, _H = "torch", "hf_legacy"
CYCLE_CASES = [(mode, freeze, style, dtype) for mode, freeze, styles in (
    ("dense", False, (_T, _H, _T)), ("dense", True, (_H, _T, _H)),
    ("mix", False, (_H, _T, _H)), ("mix", True, (_T, _H, _T)))
    for style, dtype in zip(styles, DTYPES)]   # styles for fp32, bf16, fp16


@devices
@pytest.mark.parametrize("mode,freeze,style,dtype", CYCLE_CASES, ids=str)
def test_step_cycles_match_reference(device, mode, freeze, style, dtype):
    """10 steps with us=3 (Stage I, II, I again with a GAM/FAM reset, II), all kinds at once:
    1 element (p=0), 7x13 (p=0.3), more than one block (p=0.99), plus a plain tensor, in one
    step() call; integer gradients (ties in the scores) with the torch style, Gaussian ones
    with hf_legacy."""
    device = _device_param(device)
    _cycle_case(device, mode, freeze, style, dtype, us=3, steps=10, integer=style == "torch",
                ps=[0.0, 0.3, 0.99] + ([0.5] if device.type == "cuda" else []))


@devices
def test_mix_cycle_with_long_stage(device):
    """us >= 50: the Mix score carries exp(-F/us); one full Stage I then Stage II steps."""
    device = _device_param(device)
    _cycle_case(device, "mix", False, "torch", torch.float32, us=50, steps=52,
                integer=False, ps=[0.3, 0.5], shapes=[(7, 13), (3, 50)])


# ------------------------------------------------------------------ launches and caching
@devices
def test_one_launch_per_step_and_cached_tables(device, monkeypatch):
    device = _device_param(device)
    from dps_kernels.ops.triton import fused_step

    launches = []
    kernel = fused_step._dps_step_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(fused_step, "_dps_step_kernel", Counting())
    backend = triton_backend()
    backend._load()
    s = ref.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    params = [torch.randn(3, 5, device=device) for _ in range(40)]
    grads = [torch.randn_like(p) for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    tasks = [TensorStep(StepKind.PLAIN, p, g, m, v, s) for p, g, (m, v) in
             zip(params, grads, moments)]
    backend.step(tasks, False)
    plans = dict(backend._fused_step._plans)
    backend.step(tasks, False)
    assert len(launches) == 2, "one launch per step() whatever the number of tensors"
    assert backend._fused_step._plans.keys() == plans.keys()
    assert all(backend._fused_step._plans[k] is plans[k] for k in plans), "tables rebuilt"
    # a mixed-dtype group: one launch per dtype
    half = [TensorStep(StepKind.PLAIN, p.half(), g.half(), m.half(), v.half(), s)
            for p, g, (m, v) in zip(params, grads, moments)]
    launches.clear()
    backend.step(tasks + half, False)
    assert len(launches) == 2


@devices
def test_step_rejects_bad_state(device):
    device = _device_param(device)
    s = ref.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    p = torch.randn(4, 6, device=device)
    task = TensorStep(StepKind.DENSE_STAGE1, p, torch.randn_like(p), torch.zeros_like(p),
                      torch.zeros_like(p), s, gam=torch.zeros(4, 6, dtype=torch.float16,
                                                              device=device), cols=6)
    with pytest.raises(ValueError, match="gam must be a contiguous fp32"):
        triton_backend().step([task], False)
    task = TensorStep(StepKind.PLAIN, p, torch.randn_like(p), torch.zeros_like(p).half(),
                      torch.zeros_like(p), s)
    with pytest.raises(ValueError, match="moments"):
        triton_backend().step([task], False)


# ------------------------------------------------------------------ torch.library
@devices
def test_library_ops_registered(device):
    device = _device_param(device)
    triton_backend()._load()
    ops = torch.ops.dps_kernels
    w = torch.randn(6, 10, device=device)
    a = torch.randn(6, 10, device=device)
    key, thr = step_key(1, 1, 1), keep_threshold(0.5)
    mask = MixMask(10, column_key=key, keep_threshold=thr)
    got = ops.triton_mix_weight(w, a, 10, key, thr, None, None, None, 0.5, torch.bfloat16)
    assert torch.equal(got, triton_backend().mix_weight(w, a, mask, 0.5, torch.bfloat16))
    got = ops.triton_mix_grad(w, 10, key, thr, None, None, None)
    assert torch.equal(got, torch_backend().mix_grad(w, mask))
    got = ops.triton_select_threshold(w.abs(), None, 7, False)
    assert torch.equal(got, ref.kth_largest(w.abs(), 7))


@pytest.mark.parametrize("device", DEVICES)
def test_library_ops_fake_traceable(device):
    # On CUDA the triton_op launchers trace; under TRITON_INTERPRET the ops are opaque
    # custom ops with allocation-only fakes (ops/triton/library.py).
    from torch._subclasses.fake_tensor import FakeTensorMode

    triton_backend()._load()
    ops = torch.ops.dps_kernels
    w = torch.randn(6, 10, device=device)
    mask = dict(cols=10, column_key=step_key(1, 1, 1), keep_threshold=keep_threshold(0.5),
                gam=None, column_factor=None, threshold=None)
    with FakeTensorMode() as mode:
        fw = mode.from_tensor(w)
        out = ops.triton_mix_weight(fw, fw, p=0.5, out_dtype=torch.bfloat16, **mask)
        grad = ops.triton_mix_grad(fw, **mask)
        thr = ops.triton_select_threshold(fw, None, 3, False)
    assert out.shape == (6, 10) and out.dtype == torch.bfloat16
    assert grad.shape == (6, 10) and thr.shape == () and thr.dtype == torch.float32
    compiled = torch.compile(lambda x: ops.triton_mix_grad(x * 2, **mask) + 1, fullgraph=True)
    assert torch.equal(compiled(w), ops.triton_mix_grad(w * 2, **mask) + 1)


# ------------------------------------------------------------------ DPSAdamW end to end
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(13, 33)     # 429 weights, odd
        self.hidden = torch.nn.Linear(33, 40)  # 1320 weights, more than one block
        self.out = torch.nn.Linear(40, 1)      # one row

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def _train(backend, mode, freeze, dtype, device, steps, us=3, seed=0, state=None):
    """Train _Net with DPSAdamW.from_model; returns per-step snapshots."""
    from dps_kernels.optim import DPSAdamW

    torch.manual_seed(seed)
    model = _Net().to(dtype).to(device)
    opt = DPSAdamW.from_model(model, mode=mode, p=0.3, update_steps=us, freeze=freeze,
                              lr=2e-2, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05,
                              seed=3, backend=backend)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 13, generator=gen), torch.randn(8, 1, generator=gen))
            for _ in range(steps)]
    snaps = []
    for x, y in data:
        model.train()
        opt.zero_grad()
        loss = (model(x.to(dtype).to(device)).float() - y.to(device)).pow(2).mean()
        loss.backward()
        opt.step()
        dps = [(n, p, opt.state[p]) for n, p in model.named_parameters()
               if p in opt.state and "gam" in opt.state[p]]
        snaps.append(dict(params={n: p.detach().clone() for n, p in model.named_parameters()},
                          masks={n: opt.subnetwork(p) for n, p, _ in dps},
                          thresholds={n: st["threshold"].clone() for n, _, st in dps},
                          # Mix's GAM buffer holds W' in Stage II (the subnetwork is in the
                          # bits): its scores are checked by the oracle tests instead
                          scores={n: st["gam"].clone() for n, _, st in dps
                                  if mode == "dense"}))
    return snaps, model, opt


@devices
@pytest.mark.parametrize("mode,freeze,dtype", [
    ("dense", False, torch.float32), ("dense", True, torch.bfloat16),
    ("mix", False, torch.bfloat16), ("mix", True, torch.float32)], ids=str)
def test_dps_adamw_triton_matches_torch_backend(device, mode, freeze, dtype):
    """Two full cycles of real training (gradients depend on the weights) on both backends.

    Each threshold must be exactly the k-th largest of that run's own scores. Across the
    two runs, fp32 weights differ by a few ulps (torch's CPU sqrt is not correctly rounded,
    the kernels' ``sqrt_rn`` is), so gradients and GAM differ in the last bits: thresholds
    are compared with a tolerance, masks exactly (a flip would need a near-tie in GAM; the
    run is deterministic, so this cannot be flaky)."""
    device = _device_param(device)
    got, _, opt = _train("triton", mode, freeze, dtype, device, steps=12)
    want, _, _ = _train("torch", mode, freeze, dtype, device, steps=12)
    assert opt._backend_for(next(iter(opt.state))).name == "triton"
    stage_two = 0
    for t, (a, b) in enumerate(zip(got, want), start=1):
        for name in a["params"]:
            torch.testing.assert_close(a["params"][name], b["params"][name], rtol=0,
                                       atol=ATOL[dtype], msg=lambda m: f"{name} step {t}: {m}")
        for name, mask in a["masks"].items():
            assert (mask is None) == (b["masks"][name] is None)
            if mask is not None:
                stage_two += 1
                assert torch.equal(mask, b["masks"][name]), f"{name} mask after step {t}"
            for run in (a, b):
                if name not in run["scores"]:
                    continue
                score = run["scores"][name]
                k = selected_count(score.numel(), 0.3)
                if mask is not None:   # the threshold in use is the k-th largest score
                    assert int((score >= run["thresholds"][name]).sum()) >= k
                    assert int((score > run["thresholds"][name]).sum()) < k
            torch.testing.assert_close(a["thresholds"][name], b["thresholds"][name],
                                       rtol=1e-4, atol=0)
    assert stage_two > 0


@devices
def test_dps_adamw_triton_state_dict_round_trip(device):
    """Save mid-Stage II, reload into a fresh model and optimizer (new tensors: the cached
    pointer tables must be rebuilt), continue: identical to the uninterrupted run."""
    from dps_kernels.optim import DPSAdamW

    device = _device_param(device)
    full, _, _ = _train("triton", "dense", False, torch.float32, device, steps=8)
    _, model, opt = _train("triton", "dense", False, torch.float32, device, steps=5)
    saved_model, saved_opt = model.state_dict(), opt.state_dict()
    torch.manual_seed(123)
    model2 = _Net().to(device)
    model2.load_state_dict(saved_model)
    opt2 = DPSAdamW.from_model(model2, mode="dense", p=0.3, update_steps=3, lr=2e-2,
                               betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05, seed=3,
                               backend="triton")
    opt2.load_state_dict(saved_opt)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 13, generator=gen), torch.randn(8, 1, generator=gen))
            for _ in range(8)]
    for x, y in data[5:]:
        opt2.zero_grad()
        (model2(x.to(device)) - y.to(device)).pow(2).mean().backward()
        opt2.step()
    for name, p in model2.named_parameters():
        assert torch.equal(p.detach(), full[-1]["params"][name]), name


@devices
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_step_on_views_at_any_alignment(device, offset):
    """Buffers that are views at an odd element offset (not 16-byte aligned) take the
    kernel's unhinted path; aligned ones the vectorisable one. Both match the reference."""
    device = _device_param(device)
    gen = torch.Generator().manual_seed(4)
    s = ref.adamw_scalars(1e-2, 0.9, 0.99, 1e-6, 0.1, 2)
    shape, n = (3, 700), 2100     # two blocks: a full one and a tail
    values = [torch.randn(n, generator=gen) for _ in range(5)]
    values[3] = values[3].abs()   # exp_avg_sq >= 0
    runs = []
    for backend in (triton_backend(), torch_backend()):
        # the tensors are views ``offset`` elements into a fresh buffer
        p, g, m, v, gam = [torch.cat([x.new_zeros(offset), x]).to(device)[offset:].view(shape)
                           for x in values]
        assert (p.data_ptr() % 16 == 0) == (offset == 0)
        backend.step([TensorStep(StepKind.DENSE_STAGE1, p, g, m, v, s, gam=gam, cols=700)],
                     False)
        runs.append((p, m, v, gam))
    plan = list(triton_backend()._fused_step._plans.values())[-1]
    assert plan.aligned == (offset == 0)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(runs[0][3], runs[1][3])


@devices
@pytest.mark.parametrize("approx", [False, True], ids=["exact", "approx"])
def test_select_thresholds_batched(device, approx):
    """Many tensors (Dense and Mix scores, ties, sizes 1 to several chunks) in one call give
    the same thresholds as one call per tensor."""
    device = _device_param(device)
    gen = torch.Generator().manual_seed(21)
    items = []
    for i, shape in enumerate(_shapes(device) + [(5, 1013), (2, 3)]):
        gam = _scores(("random", "ties", "zeros", "signed")[i % 4], shape, device, gen)
        factor = None
        if i % 2:
            fam = torch.randint(0, 61, (columns_of(shape),), generator=gen).float()
            factor = ref.mix_column_factor(fam, 60).to(device)
        n = gam.numel()
        for k in {1, selected_count(n, 0.3), n}:
            items.append((gam, factor, k))
    got = triton_backend().select_thresholds(items, approx=approx)
    assert len(got) == len(items)
    for (gam, factor, k), thr in zip(items, got):
        assert thr.shape == () and thr.dtype == torch.float32
        assert torch.equal(thr, triton_backend().select_threshold(gam, factor, k, approx))
        if not approx:
            score = gam if factor is None else ref.mix_score(gam, factor)
            assert torch.equal(thr, ref.kth_largest(score, k))


@devices
def test_new_gradient_buffers_reuse_the_block_layout(device):
    """Gradients set to None between steps come back at new addresses: only the small
    address table is rebuilt, the block table is reused, and no old gradient is kept."""
    import weakref

    device = _device_param(device)
    backend = triton_backend()
    backend._load()
    s = ref.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    params = [torch.randn(3, 5, device=device), torch.randn(2000, device=device)]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    plans = []
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        backend.step([TensorStep(StepKind.PLAIN, p, g, m, v, s)
                      for p, g, (m, v) in zip(params, grads, moments)], False)
        plans.append(list(backend._fused_step._plans.values())[-1])
        refs = [weakref.ref(g) for g in grads]
    del grads
    assert all(r() is None for r in refs), "the backend kept a gradient alive"
    assert plans[0].layout is plans[1].layout


@devices
def test_fp32_gradients_on_bf16_params(device):
    """Gradients in another dtype than the parameter (fp32 master gradients on bf16
    weights) are read in their own dtype: equal to the torch backend."""
    device = _device_param(device)
    gen = torch.Generator().manual_seed(8)
    s = ref.adamw_scalars(1e-2, 0.9, 0.99, 1e-6, 0.1, 3, "hf_legacy")
    runs = []
    for backend in (triton_backend(), torch_backend()):
        gen.manual_seed(8)
        p = torch.randn(7, 13, generator=gen).bfloat16().to(device)
        g = torch.randn(7, 13, generator=gen).to(device)          # fp32
        gam = torch.rand(7, 13, generator=gen).to(device)
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        backend.step([TensorStep(StepKind.DENSE_STAGE1, p, g, m, v, s, gam=gam, cols=13)],
                     False)
        runs.append((p, m, v, gam))
    for a, b in zip(runs[0][:3], runs[1][:3]):
        # one bf16 rounding of fp32 values that may differ by an ulp (torch's CPU sqrt)
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=ATOL[torch.bfloat16])
    assert torch.equal(runs[0][3], runs[1][3])   # GAM from fp32 gradients: exact
