"""Bad input gets an error that names the argument and the value."""
import re

import pytest
import torch

from dps_kernels import DPSAdamW
from test_optimizer import make


def params():
    return [torch.nn.Parameter(torch.randn(3, 4))]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(p=1.0), ValueError, r"p must be a finite number in \[0.0, 1.0\), got 1.0"),
    (dict(p=-0.1), ValueError, r"p must be .* got -0.1"),
    (dict(p=float("nan")), ValueError, r"p must be .* got nan"),
    (dict(mode="sparse"), ValueError, r"mode must be one of \('dense', 'mix', 'mixout', .*\), got 'sparse'"),
    (dict(backend="cuda"), ValueError, r"backend must be one of .* got 'cuda'"),
    (dict(adamw_style="bert"), ValueError, r"adamw_style must be one of .* got 'bert'"),
    (dict(update_steps=None), ValueError, r"pass update_steps, or both total_steps and update_ratio"),
    (dict(update_steps=None, total_steps=10, update_ratio=0.05), ValueError, r"= 0 < 1"),
    (dict(update_steps=0), ValueError, r"update_steps must be >= 1, got 0"),
    (dict(lr=-1.0), ValueError, r"Invalid learning rate: -1.0 \(lr must be .*\[0.0, inf\)"),
    (dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08 \(eps must be"),
    (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0.1 \(weight_decay must"),
    (dict(betas=(0.9, 1.0)), ValueError, r"Invalid beta parameter at index 1: 1.0 \(betas\[1\]"),
    (dict(betas=(0.9,)), ValueError, r"betas must be a pair"),
    (dict(freeze="yes"), TypeError, r"freeze must be a bool, got 'yes'"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*64\), got -1"),
])
def test_bad_hyperparameters(kwargs, error, match):
    kwargs = {"update_steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        DPSAdamW(params(), **kwargs)


def test_group_level_values_are_checked_too():
    with pytest.raises(ValueError, match=r"p must be .* got 1.5"):
        DPSAdamW([{"params": params(), "p": 1.5}], update_steps=2)
    with pytest.raises(TypeError, match="dps must be a bool"):
        DPSAdamW([{"params": params(), "dps": 1}], update_steps=2)


def test_integer_dps_parameter():
    ints = torch.nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match=r"must be floating point, got dtype torch.int64"):
        DPSAdamW([ints], update_steps=2)
    DPSAdamW([{"params": [ints], "dps": False}], update_steps=2)  # allowed as plain


def test_sparse_gradient():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = DPSAdamW(emb.parameters(), update_steps=2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_complex_parameter():
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="is complex"):
        DPSAdamW([{"params": [z], "dps": False}], update_steps=2)


def test_unavailable_backend_says_why(monkeypatch):
    import dps_kernels.optim as optim
    monkeypatch.setattr(optim, "unavailable_reason",
                        lambda name: "no C++ compiler found" if name == "cpu" else None)
    with pytest.raises(RuntimeError, match="backend='cpu' is not available here: no C.. compiler"):
        DPSAdamW(params(), update_steps=2, backend="cpu")


def test_introspection_errors():
    model = make(torch.float32)
    dense = DPSAdamW.from_model(model, update_steps=2)
    with pytest.raises(ValueError, match="stage_one_mask needs a DPS parameter"):
        dense.stage_one_mask(model.inp.weight, 1)
    with pytest.raises(ValueError, match="needs a DPS parameter"):
        dense.subnetwork(model.inp.bias)
    with pytest.raises(ValueError, match="not managed by this optimizer"):
        dense.subnetwork(torch.nn.Parameter(torch.ones(2)))
    mix = DPSAdamW.from_model(make(torch.float32), mode="mix", update_steps=2)
    w = next(p for p in mix.param_groups[0]["params"])
    with pytest.raises(ValueError, match="step 3 is in Stage II"):
        mix.stage_one_mask(w, 3)
    with pytest.raises(ValueError, match="1-based int, got 0"):
        mix.stage_one_mask(w, 0)


def test_from_model_bad_targets():
    with pytest.raises(TypeError, match="targets must hold nn.Module subclasses or fnmatch"):
        DPSAdamW.from_model(make(torch.float32), targets=[3], update_steps=2)
    with pytest.raises(ValueError, match="select no trainable parameter"):
        DPSAdamW.from_model(make(torch.float32), targets=["nothing.*"], update_steps=2)


@pytest.mark.parametrize("reserve_p", [0, 0.0, -0.5, 1.5, float("nan")])
def test_reserve_p_message_gives_its_real_range(reserve_p):
    """Before: reserve_p=0 was said to lie outside "(0.0, inf)"; the range is (0, 1]."""
    with pytest.raises(ValueError, match=rf"reserve_p must be a finite number in \(0, 1\], "
                                         rf"got {re.escape(repr(reserve_p))}$"):
        DPSAdamW(params(), mode="childtuning_f", reserve_p=reserve_p)
    DPSAdamW(params(), mode="childtuning_f", reserve_p=1)   # the upper end is allowed


def _fp16_grads(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=gen).half()


def test_model_cast_to_fp16_after_from_model_steps_with_torch_backend():
    """Before: auto chose the cpu backend for the fp32 model, and the first step after
    ``model.half()`` failed in the C++ op's dtype check. Now the backend is chosen again,
    with the usual fallback warning, and the step is the one of an optimizer built after
    the cast."""
    from dps_kernels.backends import unavailable_reason
    if unavailable_reason("cpu"):
        pytest.skip(unavailable_reason("cpu"))
    model, twin = make(torch.float32), make(torch.float32)
    opt = DPSAdamW.from_model(model, update_steps=2, fp32_moments=True)
    model.half()
    twin.half()
    with pytest.warns(UserWarning, match=r"backend 'cpu' cannot step"):
        late = DPSAdamW.from_model(twin, update_steps=2, fp32_moments=True)
    for step in range(3):
        _fp16_grads(model, step)
        _fp16_grads(twin, step)
        if step == 0:
            with pytest.warns(UserWarning, match=r"backend 'cpu' cannot step parameter #\d+ "
                              r".*torch.float16.*using the torch backend"):
                opt.step()
        else:
            opt.step()
        late.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_model_cast_after_building_with_named_cpu_backend_names_the_cause():
    from dps_kernels.backends import unavailable_reason
    if unavailable_reason("cpu"):
        pytest.skip(unavailable_reason("cpu"))
    model = make(torch.float32)
    opt = DPSAdamW.from_model(model, update_steps=2, backend="cpu", fp32_moments=True)
    model.half()
    _fp16_grads(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"backend='cpu' cannot step parameter #\d+ .*float16"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state   # the refused step changed nothing
