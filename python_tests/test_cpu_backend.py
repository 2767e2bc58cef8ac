"""The C++ cpu backend against the torch backend (itself tested against the reference).

DPS cycles are simulated with dps_kernels.schedule exactly as DPSAdamW drives a backend:
one ``step(tasks, freeze)`` per optimizer step with one TensorStep per tensor, and
``select_threshold`` after the last Stage I step. Both backends see the same gradients.

What must be equal, and why:

* GAM, FAM, both moments, thresholds, Stage II masks, Mix weights and masked gradients:
  EXACTLY. They involve only +, *, compares and the integer hash; the kernels do each
  fp32 operation in the reference's order with no fused multiply-add
  (-ffp-contract=off), and IEEE +/* are correctly rounded everywhere.
* parameters: within TOL below. The one operation that differs is sqrt: torch.sqrt on
  CPU goes through MKL's vector math (not always correctly rounded, <= 1 ulp), the
  kernels use the correctly rounded hardware sqrt. One ulp in the denominator moves the
  update by ~1 ulp of itself, so after rounding the weight differs by at most ~1 ulp of
  |w| (+ ~1 ulp of the update) per step, and the moments do not depend on the weight, so
  the difference grows at most linearly in the number of steps. In bf16 a 1-ulp fp32
  difference may straddle a bf16 rounding boundary: then the bf16 weight differs by one
  bf16 ulp (2**-8 relative), rarely.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dps_kernels import reference as ref
from dps_kernels.backends import cpu_backend, torch_backend
from dps_kernels.backends.base import MixMask, StepKind, TensorStep
from dps_kernels.mask_hash import columns_of, keep_threshold, step_key
from dps_kernels.schedule import (STAGE_ONE, is_last_of_stage_one, is_stage_start,
                                  selected_count, stage_of)

_REASON = cpu_backend.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend unavailable: {_REASON}")

CPU = cpu_backend.BACKEND
TORCH = torch_backend.BACKEND
LR = 1e-2
EPS32 = torch.finfo(torch.float32).eps


def param_tol(dtype, steps):
    """(rtol, atol) of the parameters after ``steps`` steps (see the module docstring)."""
    if dtype == torch.float32:
        return 2 * steps * EPS32, 2 * steps * EPS32 * LR
    return 2.0 ** -7, 2.0 ** -7 * LR


def isas():
    best = torch.ops.dps_cpu.best_isa() if _REASON is None else "default"
    order = ["default", "avx2", "avx512"]
    return order[: order.index(best) + 1]


class Tensors:
    """One DPS tensor and one plain tensor (a bias) with their optimizer state."""

    def __init__(self, shape, dtype, gen):
        self.p = (torch.randn(shape, generator=gen)).to(dtype)
        self.m = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.gam = torch.zeros(shape)
        self.cols = columns_of(shape)
        self.fam = torch.zeros(self.cols)
        self.factor = None
        self.threshold = torch.zeros(())
        self.anchor = self.p.clone()  # W0 (Mix Stage I anchor)
        self.bias = torch.randn(shape[0], generator=gen).to(dtype)
        self.bias_m = torch.zeros_like(self.bias)
        self.bias_v = torch.zeros_like(self.bias)

    def mask(self, stage, key, keep_thr):
        if stage == STAGE_ONE:
            return MixMask(self.cols, column_key=key, keep_threshold=keep_thr)
        return MixMask(self.cols, gam=self.gam, column_factor=self.factor, threshold=self.threshold)


def simulate(mode, freeze, style, dtype, shape, p, us, steps, ties=False, weight_decay=0.1,
             seed=0, check_every_step=True, grad_dtype=None):
    """Run ``steps`` optimizer steps on both backends; compare as the module docstring says."""
    gen = torch.Generator().manual_seed(seed)
    init_state = torch.get_rng_state()
    states = {}
    for name in ("cpu", "torch"):
        states[name] = Tensors(shape, dtype, torch.Generator().manual_seed(seed + 1))
    backends = {"cpu": CPU, "torch": TORCH}
    n = states["cpu"].p.numel()
    k = selected_count(n, p)
    thresholds_seen = 0
    for t in range(1, steps + 1):
        stage = stage_of(t, us)
        if ties:  # integer-valued gradients: many equal GAM values, ties at the threshold
            raw = torch.randint(-3, 4, shape, generator=gen).to(dtype)
        else:
            raw = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
        raw = raw.to(grad_dtype or dtype)
        bias_grad = torch.randn(shape[0], generator=gen).to(grad_dtype or dtype)
        key = step_key(seed, 0, t)
        keep_thr = keep_threshold(p)
        scalars = ref.adamw_scalars(LR, 0.8, 0.95, 1e-6, weight_decay, t, style)
        for name, b in backends.items():
            s = states[name]
            grad = raw
            if mode == "mix":
                mask = s.mask(stage, key, keep_thr)
                # Weights may differ by the sqrt rounding (see above), so both backends'
                # Mix weights are computed from the torch run's weight and anchor.
                r = states["torch"]
                s.last_weight = b.mix_weight(r.p, r.anchor, mask, p)
                grad = b.mix_grad(raw, mask)  # the Mix backward masks the gradient
                s.last_grad = grad
            task = TensorStep(StepKind.PLAIN, s.p, grad, s.m, s.v, scalars, gam=s.gam,
                              threshold=s.threshold, fam=s.fam, column_factor=s.factor,
                              cols=s.cols)
            task.reset = stage == STAGE_ONE and is_stage_start(t, us)
            if mode == "dense":
                task.kind = StepKind.DENSE_STAGE1 if stage == STAGE_ONE else StepKind.DENSE_STAGE2
            elif stage == STAGE_ONE:
                task.kind = StepKind.MIX_STAGE1
                task.mix_key, task.keep_threshold = key, keep_thr
            else:
                task.kind = StepKind.MIX_STAGE2
            plain = TensorStep(StepKind.PLAIN, s.bias, bias_grad, s.bias_m, s.bias_v, scalars)
            b.step([plain, task], freeze)
            if is_last_of_stage_one(t, us):
                if mode == "mix":
                    s.factor = ref.mix_column_factor(s.fam, us)
                    s.anchor = s.p.clone()  # W' for Stage II
                s.threshold = b.select_threshold(s.gam, s.factor, k)
        c, r = states["cpu"], states["torch"]
        where = f"step {t} (stage {stage})"
        if mode == "mix":
            assert torch.equal(c.last_weight, r.last_weight), f"Mix weight differs at {where}"
            assert torch.equal(c.last_grad, r.last_grad), f"Mix gradient mask differs at {where}"
        if is_last_of_stage_one(t, us):
            thresholds_seen += 1
            assert torch.equal(c.threshold, r.threshold), (
                f"threshold differs at {where}: {c.threshold.item()!r} vs {r.threshold.item()!r}")
            score_c = c.gam if c.factor is None else ref.mix_score(c.gam, c.factor)
            selected = (score_c >= c.threshold).sum().item()
            assert selected >= k, f"only {selected} < k={k} selected at {where}"
        if check_every_step or t == steps:
            for attr in ("gam", "fam", "m", "v", "bias_m", "bias_v"):
                assert torch.equal(getattr(c, attr), getattr(r, attr)), f"{attr} differs at {where}"
            rtol, atol = param_tol(dtype, t)
            torch.testing.assert_close(c.p, r.p, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(c.bias, r.bias, rtol=rtol, atol=atol,
                                       msg=lambda m: f"bias, {where}: {m}")
    torch.set_rng_state(init_state)
    return thresholds_seen


SHAPES = [(1,), (7, 13), (129, 385), (3, 5, 7)]  # size 1, odd, > one chunk (32768), 3-d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("style", ["torch", "hf_legacy"])
@pytest.mark.parametrize("freeze", [False, True], ids=["mask", "freeze"])
@pytest.mark.parametrize("mode", ["dense", "mix"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cycles_match_torch_backend(shape, mode, freeze, style, dtype):
    # 3 stages of 3 steps: Stage I, Stage II, Stage I again (GAM/FAM reset), + 1 step.
    big = shape == (129, 385)
    seen = simulate(mode, freeze, style, dtype, shape, p=0.3, us=3, steps=10 if not big else 7,
                    check_every_step=not big)
    assert seen >= 1


@pytest.mark.parametrize("p", [0.0, 0.99])
@pytest.mark.parametrize("mode", ["dense", "mix"])
@pytest.mark.parametrize("freeze", [False, True], ids=["mask", "freeze"])
def test_extreme_p(p, mode, freeze):
    simulate(mode, freeze, "torch", torch.float32, (23, 41), p=p, us=2, steps=9)


@pytest.mark.parametrize("mode", ["dense", "mix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ties_integer_gradients(mode, dtype):
    simulate(mode, True, "torch", dtype, (31, 17), p=0.5, us=2, steps=7, ties=True)
    simulate(mode, False, "hf_legacy", dtype, (31, 17), p=0.3, us=3, steps=8, ties=True)


@pytest.mark.parametrize("freeze", [False, True], ids=["mask", "freeze"])
@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_fp32_gradients_on_bf16_parameters(mode, freeze):
    # Mixed precision may hand fp32 gradients to bf16 parameters; the torch backend
    # accepts them (grad.float()), so the cpu backend must too, with the same result.
    simulate(mode, freeze, "torch", torch.bfloat16, (33, 40), p=0.3, us=2, steps=7,
             grad_dtype=torch.float32)


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_update_steps_at_least_50(mode):
    # us >= 50 switches the Mix score to GAM / F * exp(-F / us); one full cycle + 1 step.
    simulate(mode, False, "torch", torch.float32, (5, 9), p=0.3, us=50, steps=101,
             check_every_step=False)


def test_no_weight_decay_and_default_betas():
    simulate("dense", False, "torch", torch.float32, (7, 13), p=0.3, us=2, steps=6,
             weight_decay=0.0)


@pytest.mark.parametrize("isa", isas())
def test_instruction_set_variants_bit_identical(isa):
    """Every kernel variant computes the same bits (no FMA, correctly rounded sqrt/div)."""
    def run():
        results = []
        for kind in StepKind:
            for freeze in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    gen = torch.Generator().manual_seed(3)
                    shape = (67, 515)
                    cols = columns_of(shape)
                    p = torch.randn(shape, generator=gen).to(dtype)
                    m = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
                    v = (torch.rand(shape, generator=gen) * 0.1).to(dtype)
                    g = torch.randn(shape, generator=gen).to(dtype)
                    gam = torch.rand(shape, generator=gen)
                    fam = torch.randint(0, 4, (cols,), generator=gen).float()
                    factor = ref.mix_column_factor(fam, 7)
                    task = TensorStep(kind, p, g, m, v,
                                      ref.adamw_scalars(1e-2, 0.9, 0.99, 1e-8, 0.1, 4, "torch"),
                                      gam=gam, threshold=torch.tensor(0.5), fam=fam,
                                      column_factor=factor, mix_key=123456789,
                                      keep_threshold=keep_threshold(0.3), cols=cols)
                    CPU.step([task], freeze)
                    results += [p, m, v, gam, fam]
        return results

    previous = torch.ops.dps_cpu.set_isa("default")
    try:
        expected = run()
        torch.ops.dps_cpu.set_isa(isa)
        got = run()
    finally:
        torch.ops.dps_cpu.set_isa(previous)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"{isa} differs from the portable kernels in result {i}"


# ---------------------------------------------------------------- selection
def _kth_ref(score, k):
    return ref.kth_largest(score, k)


def _same_value(a, b):
    return torch.equal(a, b) or (bool(torch.isnan(a)) and bool(torch.isnan(b)))


@pytest.mark.parametrize("method", ["radix", "nth_element"])
@pytest.mark.parametrize("n,kind", [(1, "randn"), (97, "randn"), (70001, "randn"),
                                    (5000, "ties"), (4099, "signed_zero"), (300, "nan"),
                                    (100000, "huge_range")])
def test_select_threshold_matches_kthvalue(n, kind, method):
    gen = torch.Generator().manual_seed(n)
    if kind == "ties":
        score = torch.randint(0, 5, (n,), generator=gen).float()
    elif kind == "signed_zero":
        score = torch.randint(-1, 2, (n,), generator=gen).float() * 0.0  # +0 and -0 mixed
        score[::7] = torch.randn(len(score[::7]), generator=gen)
    elif kind == "nan":
        score = torch.randn(n, generator=gen)
        score[::11] = float("nan")
    elif kind == "huge_range":
        score = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 30)
        score[:10] = torch.tensor([float("inf"), -float("inf"), 1e-45, -1e-45, 0.0, -0.0,
                                   3.4e38, -3.4e38, 1.0, 1.0])
    else:
        score = torch.randn(n, generator=gen)
    for k in sorted(k for k in {1, 2, n // 3 + 1, n // 2 + 1, n - 1, n} if 1 <= k <= n):
        got = CPU.select_threshold(score, None, k, method=method)
        want = _kth_ref(score, k)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert _same_value(got, want), f"k={k}: {got.item()!r} vs {want.item()!r}"


@pytest.mark.parametrize("method", ["radix", "nth_element"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (300, 257)])
def test_select_threshold_mix_score(shape, method):
    """Mix: the score is GAM * factor[col], one fp32 multiply, never materialised."""
    gen = torch.Generator().manual_seed(1)
    gam = torch.rand(shape, generator=gen) * torch.randint(0, 3, shape, generator=gen)
    fam = torch.randint(0, 60, (shape[1],), generator=gen).float()
    for us in (7, 60):
        factor = ref.mix_column_factor(fam, us)
        score = ref.mix_score(gam, factor)
        n = gam.numel()
        for k in sorted({1, (n + 1) // 2, n}):
            got = CPU.select_threshold(gam, factor, k, method=method)
            assert torch.equal(got, _kth_ref(score, k)), (us, k)


# ---------------------------------------------------------------- Mix weight and grad
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(1,), (5, 3), (130, 300)])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.99])
def test_mix_weight_and_grad_exact(shape, dtype, out_dtype, p):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=gen).to(dtype)
    a = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    cols = columns_of(shape)
    gam = torch.rand(shape, generator=gen)
    factor = ref.mix_column_factor(torch.randint(0, 5, (cols,), generator=gen).float(), 10)
    thr = ref.kth_largest(ref.mix_score(gam, factor), max(1, gam.numel() // 2))
    masks = [MixMask(cols, column_key=step_key(9, 1, 4), keep_threshold=keep_threshold(p)),
             MixMask(cols, gam=gam, column_factor=factor, threshold=thr)]
    for mask in masks:
        got = CPU.mix_weight(w, a, mask, p, out_dtype)
        want = TORCH.mix_weight(w, a, mask, p, out_dtype)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"mix_weight differs (stage one: {mask.stage_one})"
        assert torch.equal(CPU.mix_grad(g, mask), TORCH.mix_grad(g, mask))


def test_mix_grad_non_contiguous_upstream():
    g = torch.randn(40, 30).t()  # autograd may hand a transposed gradient
    mask = MixMask(40, column_key=77, keep_threshold=keep_threshold(0.5))
    assert torch.equal(CPU.mix_grad(g, mask), TORCH.mix_grad(g.contiguous(), mask))


# ---------------------------------------------------------------- bad input
def _task(**over):
    shape = over.pop("shape", (4, 6))
    dtype = over.pop("dtype", torch.float32)
    kw = dict(kind=StepKind.DENSE_STAGE2, param=torch.zeros(shape, dtype=dtype),
              grad=torch.zeros(shape, dtype=dtype), exp_avg=torch.zeros(shape, dtype=dtype),
              exp_avg_sq=torch.zeros(shape, dtype=dtype),
              scalars=ref.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 1), gam=torch.zeros(shape),
              threshold=torch.tensor(0.0), fam=torch.zeros(shape[-1]), cols=shape[-1])
    kw.update(over)
    return TensorStep(**kw)


@pytest.mark.parametrize("task,message", [
    (lambda: _task(dtype=torch.float16), r"params\[0\] must be float32 or bfloat16"),
    (lambda: _task(param=torch.zeros(6, 4).t()), r"params\[0\] must be contiguous"),
    (lambda: _task(grad=torch.zeros(4, 5)), r"grads\[0\] has shape"),
    (lambda: _task(grad=torch.zeros(4, 6, dtype=torch.float64)), r"grads\[0\] must have the param's dtype .* or float32"),
    (lambda: _task(dtype=torch.bfloat16, grad=torch.zeros(4, 6, dtype=torch.float16)), r"grads\[0\] must have"),
    (lambda: _task(exp_avg=torch.zeros(4, 6, dtype=torch.bfloat16)), r"exp_avgs\[0\] must have the param's dtype"),
    (lambda: _task(gam=torch.zeros(4, 6, dtype=torch.float64)), r"gams\[0\] must be float32"),
    (lambda: _task(gam=torch.zeros(3)), r"gams\[0\] must have 24 elements"),
    (lambda: _task(threshold=torch.zeros(2)), r"thresholds\[0\] must be a one-element float32"),
    (lambda: _task(kind=StepKind.MIX_STAGE1, cols=5), r"cols\[0\] must be >= 1 and divide"),
    (lambda: _task(kind=StepKind.MIX_STAGE1, fam=torch.zeros(2)), r"fams\[0\] must have 6 elements"),
    (lambda: _task(kind=StepKind.MIX_STAGE1, mix_key=-1), r"mix_keys\[0\] must be a uint32"),
])
def test_step_bad_input_raises_clear_error(task, message):
    with pytest.raises(RuntimeError, match=message):
        CPU.step([task()], False)


def test_other_bad_input():
    with pytest.raises(RuntimeError, match=r"k must be in \[1, 10\]"):
        CPU.select_threshold(torch.zeros(10), None, 11)
    with pytest.raises(RuntimeError, match=r"gam must be float32"):
        CPU.select_threshold(torch.zeros(10, dtype=torch.float64), None, 1)
    with pytest.raises(RuntimeError, match=r"column_factor has 3 entries"):
        CPU.select_threshold(torch.zeros(10), torch.ones(3), 1)
    with pytest.raises(RuntimeError, match=r"method must be 'radix' or 'nth_element'"):
        CPU.select_threshold(torch.zeros(10), None, 1, method="sort")
    mask = MixMask(3, column_key=1, keep_threshold=keep_threshold(0.5))
    with pytest.raises(RuntimeError, match=r"anchor must have the weight's dtype"):
        CPU.mix_weight(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bfloat16), mask, 0.5)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        CPU.mix_weight(torch.zeros(2, 3), torch.zeros(2, 3), mask, 1.0)
    with pytest.raises(RuntimeError, match=r"Stage II mask needs gam"):
        CPU.mix_grad(torch.zeros(2, 3), MixMask(3))
    with pytest.raises(RuntimeError, match=r"unknown instruction set"):
        torch.ops.dps_cpu.set_isa("sse9")


def test_supports_gives_reasons():
    assert CPU.supports(torch.zeros(3)) is None
    assert CPU.supports(torch.zeros(3, dtype=torch.bfloat16)) is None
    assert "float16" in CPU.supports(torch.zeros(3, dtype=torch.float16))
    assert "meta" in CPU.supports(torch.zeros(3, device="meta"))
    assert "contiguous" in CPU.supports(torch.zeros(3, 4).t())


# ---------------------------------------------------------------- loading
def _python(code, **env):
    import os
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300)


def test_import_compiles_nothing_and_skip_env_falls_back_with_one_warning():
    out = _python("""
        import sys, warnings
        import dps_kernels
        assert "dps_kernels.backends.cpu_backend" not in sys.modules, "loaded at import"
        from dps_kernels.backends import auto_backend_name, available_backends, unavailable_reason
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reasons = [unavailable_reason("cpu") for _ in range(3)]
            picked = auto_backend_name("cpu")
            live = available_backends()
        print(reasons[0]); print(picked); print(live)
        print(sum("cpu backend is unavailable" in str(w.message) for w in caught))
    """, DPS_SKIP_EXT="1")
    assert out.returncode == 0, out.stderr
    reason, picked, live, warnings_count = out.stdout.strip().splitlines()
    assert "DPS_SKIP_EXT=1" in reason
    assert picked == "torch"
    assert "'cpu'" not in live
    assert warnings_count == "1"


def test_auto_picks_cpu_when_built():
    from dps_kernels.backends import auto_backend_name
    assert auto_backend_name("cpu") == "cpu"
    assert torch.ops.dps_cpu.abi_version() == cpu_backend.ABI_VERSION


def test_no_compiler_gives_reason_and_torch_fallback(tmp_path):
    import importlib.util
    if importlib.util.find_spec(cpu_backend.PREBUILT_MODULE) is not None:
        pytest.skip("a prebuilt dps_kernels._cpu_ext is installed, so no compiler is needed")
    out = _python("""
        import warnings
        from dps_kernels.backends import auto_backend_name, unavailable_reason
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(unavailable_reason("cpu")); print(auto_backend_name("cpu")); print(len(caught))
    """, CXX="definitely-not-a-compiler", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    reason, picked, warnings_count = out.stdout.strip().splitlines()
    assert "no C++ compiler" in reason and picked == "torch" and warnings_count == "1"
