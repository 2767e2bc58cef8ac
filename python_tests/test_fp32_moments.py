"""fp32 moments on 16-bit parameters (``DPSAdamW(fp32_moments=True)``) on every backend.

Backend level: a step of every kind with bf16 (and fp16, where the backend takes it)
parameters and fp32 ``exp_avg``/``exp_avg_sq`` equals the torch backend (the reference
ops, which compute in fp32 and round each stored value once). Tolerance: moments are fp32,
compared within 4 fp32 ulps of their size (torch's CPU sqrt is not correctly rounded, the
fused kernels' is); weights within half a bf16/fp16 ulp (atol 1e-2 / 1e-3 at |w| <= 4: one
rounding that may land on the other side); GAM, FAM exactly.
"""
import pytest
import torch

from dps_kernels import reference as ref
from dps_kernels.backends import available_backends, get_backend, interpreter_enabled
from dps_kernels.mask_hash import keep_threshold, step_key
from dps_kernels.step_types import StepKind, TensorStep

KINDS = [StepKind.PLAIN, StepKind.DENSE_STAGE1, StepKind.DENSE_STAGE2, StepKind.MIX_STAGE1,
         StepKind.MIX_STAGE2]
ATOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _backends():
    names = [n for n in ("cpu", "triton") if n in available_backends()]
    if "triton" in names and not interpreter_enabled() and not torch.cuda.is_available():
        names.remove("triton")
    return names


def _task(kind, dtype, gen, t):
    shape = (9, 37)
    cols = shape[1]
    p = (torch.randn(shape, generator=gen) * 2).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    m = torch.randn(shape, generator=gen) * 0.1
    v = torch.rand(shape, generator=gen) * 1e-3
    s = ref.adamw_scalars(1e-2, 0.9, 0.99, 1e-6, 0.1, t)
    task = TensorStep(kind, p, g, m, v, s, cols=cols)
    if kind is not StepKind.PLAIN:
        task.gam = torch.rand(shape, generator=gen)
        task.threshold = torch.tensor(0.5)
        task.reset = kind in (StepKind.DENSE_STAGE1, StepKind.MIX_STAGE1) and t == 1
    if kind in (StepKind.MIX_STAGE1, StepKind.MIX_STAGE2):
        task.fam = torch.zeros(cols)
        task.column_factor = torch.rand(cols, generator=gen)
        task.mix_key, task.keep_threshold = step_key(3, 1, t), keep_threshold(0.3)
    return task


def _clone(task):
    fields = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in vars(task).items()}
    return TensorStep(**fields)


@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", _backends())
def test_fp32_moments_match_torch_backend(backend, dtype, freeze):
    fused = get_backend(backend)
    if fused.supports(torch.zeros(1, dtype=dtype)) is not None:
        pytest.skip(f"{backend} does not take {dtype} parameters")
    gen = torch.Generator().manual_seed(4)
    for kind in KINDS:
        for t in (1, 2):
            a = _task(kind, dtype, gen, t)
            b = _clone(a)
            fused.step([a], freeze)
            get_backend("torch").step([b], freeze)
            assert a.exp_avg.dtype == torch.float32 and a.param.dtype == dtype
            for x, y in ((a.exp_avg, b.exp_avg), (a.exp_avg_sq, b.exp_avg_sq)):
                torch.testing.assert_close(x, y, rtol=4 * 2**-23, atol=0)
            torch.testing.assert_close(a.param.float(), b.param.float(), rtol=0,
                                       atol=ATOL[dtype])
            for key in ("gam", "fam"):
                if getattr(a, key) is not None:
                    assert torch.equal(getattr(a, key), getattr(b, key)), (kind, key)
