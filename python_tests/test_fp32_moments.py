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
from dps_kernels.backends import available_backends, get_backend
from dps_kernels.mask_hash import keep_threshold, step_key
from dps_kernels.step_types import StepKind, TensorStep
from triton_device import device_for

KINDS = [StepKind.PLAIN, StepKind.DENSE_STAGE1, StepKind.DENSE_STAGE2, StepKind.MIX_STAGE1,
         StepKind.MIX_STAGE2]
ATOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _backends():
    # available_backends() lists triton only where it runs: on CUDA or under the interpreter
    return [n for n in ("cpu", "triton") if n in available_backends()]


def _task(kind, dtype, gen, t, device):
    """Built with ``gen`` on the CPU (the same numbers for every backend), then moved."""
    task = _cpu_task(kind, dtype, gen, t)
    return TensorStep(**{k: (v.to(device) if torch.is_tensor(v) else v)
                         for k, v in vars(task).items()})


def _cpu_task(kind, dtype, gen, t):
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
    fused, device = get_backend(backend), device_for(backend)
    if fused.supports(torch.zeros(1, dtype=dtype, device=device)) is not None:
        pytest.skip(f"{backend} does not take {dtype} parameters")
    gen = torch.Generator().manual_seed(4)
    for kind in KINDS:
        for t in (1, 2):
            a = _task(kind, dtype, gen, t, device)
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


def _train(dtype, fp32_moments, backend="torch", lr=1e-2, steps=40):
    from torch import nn
    from dps_kernels import DPSAdamW
    device = device_for(backend)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)).to(device, dtype)
    opt = DPSAdamW.from_model(model, mode="mix", p=0.3, update_steps=10, lr=lr,
                              backend=backend, fp32_moments=fp32_moments)
    gen = torch.Generator().manual_seed(1)
    # small targets, so late gradients are small: their squares underflow fp16
    x = torch.randn(64, 32, generator=gen).to(device, dtype)
    y = (torch.randn(64, 4, generator=gen) * 1e-3).to(device, dtype)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if "triton" in _backends() else []))
def test_fp16_mix_with_fp32_moments_trains_like_fp32(backend):
    """fp16 + Mix at an lr where fp32 training is stable: with fp16 moments the weights blow
    up (NaN/inf by step 40); with fp32_moments the run tracks the fp32 one: finite weights,
    99% of them within 1e-2 (fp16 forward/backward rounding moves a few elements across
    the selection threshold, so a handful may differ more), the largest within 5%."""
    steps = 40 if backend == "torch" else 12
    ref_model, _ = _train(torch.float32, False, "torch", steps=steps)
    model, opt = _train(torch.float16, True, backend, steps=steps)
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in opt.state.values())
    for a, b in zip(ref_model.parameters(), model.parameters()):
        b = b.detach().cpu()   # the reference ran on the CPU
        assert torch.isfinite(b).all()
        close = ((b.float() - a).abs() <= 1e-2).float().mean().item()
        assert close >= 0.99, close
        assert abs(b.float().abs().max() - a.abs().max()) <= 0.05 * a.abs().max()
    if backend == "torch":
        with pytest.warns(UserWarning, match="fp32_moments=True"):
            bad, _ = _train(torch.float16, False, backend, steps=steps)
        assert not all(torch.isfinite(p).all() for p in bad.parameters())


def test_fp32_moments_state_dict_keeps_fp32():
    from dps_kernels import DPSAdamW
    model, opt = _train(torch.bfloat16, True, steps=3)
    sd = opt.state_dict()
    model2, opt2 = _train(torch.bfloat16, True, steps=1)
    opt2.load_state_dict(sd)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt2.state.values())
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in opt2.state.values())
