"""Mix wiring never outlives its optimizer, and a model is never trained through another
optimizer's ``W~`` without a word (issue: wiring that outlives its optimizer).

A wired model whose Mix optimizer is gone must train like a plain model under the next
optimizer; one whose Mix optimizer is still alive must refuse a second optimizer on its
parameters, naming the remedy (``dps_kernels.detach``), rather than let it train through
a mixed weight that no longer changes (the repro: all input columns of the first Linear
dropped by the old optimizer's last Stage I mask)."""
import gc
import weakref

import pytest
import torch
from torch import nn

import dps_kernels
from dps_kernels import DPSAdamW, attach, detach
from test_optimizer import batches, make, mse


def mix_opt(model, mode="mix"):
    stages = {"update_steps": 2} if mode == "mix" else {}
    return DPSAdamW.from_model(model, mode=mode, p=0.5, seed=3, backend="torch", **stages)


def train(model, opt, steps=3):
    for batch in batches(steps, torch.float32):
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()


def forwards_with_its_own_weights(model) -> bool:
    x = torch.randn(5, 13)
    model.train()
    with torch.no_grad():
        got = model.inp(x)
    return torch.equal(got, nn.functional.linear(x, model.inp.weight, model.inp.bias))


@pytest.mark.parametrize("mode", ["mix", "mixout"])
def test_the_wiring_does_not_keep_its_optimizer_alive(mode):
    model = make(torch.float32)
    opt = mix_opt(model, mode)
    train(model, opt)
    assert not forwards_with_its_own_weights(model)   # wired: W~ in training
    ref = weakref.ref(opt)
    del opt
    assert ref() is None, "the wiring (or the optimizer itself) holds the optimizer"
    # its wiring went with it: W in training, and a plain AdamW trains every column
    assert forwards_with_its_own_weights(model)
    assert not any(m._forward_pre_hooks for m in model.modules())
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    adamw.zero_grad()
    mse(model, batches(1, torch.float32)[0]).backward()
    column_grads = model.inp.weight.grad.abs().sum(0)
    assert bool((column_grads > 0).all()), column_grads


def test_a_second_optimizer_on_a_model_still_wired_is_refused_with_the_remedy():
    model = make(torch.float32)
    first = mix_opt(model)
    train(model, first)
    remedy = r"wired to the Mix forward of another live DPSAdamW.*dps_kernels\.detach\(model\)"
    for build in (lambda: mix_opt(model),
                  lambda: DPSAdamW.from_model(model, mode="dense", update_steps=2),
                  lambda: DPSAdamW(model.parameters(), mode="dense", update_steps=2)):
        with pytest.raises(ValueError, match=remedy):
            build()
    assert detach(model) == 4   # the four Linear weights
    assert forwards_with_its_own_weights(model)
    with pytest.raises(RuntimeError, match="not wired to a model"):
        train(model, first, 1)   # the unwired Mix optimizer refuses to step
    second = mix_opt(model)      # takes the model over
    train(model, second)
    assert not forwards_with_its_own_weights(model)
    assert detach(model) == 4 and detach(model) == 0


def test_detach_is_public_and_attach_wires_again():
    assert dps_kernels.detach is detach
    model = make(torch.float32)
    opt = mix_opt(model)
    detach(model)
    attach(model, opt)
    train(model, opt)
    assert not forwards_with_its_own_weights(model)


def test_a_garbage_collected_optimizer_frees_the_model_for_the_next_one():
    """A notebook or a sweep: the optimizer of the last run is dropped, a new one is built
    on the same model (no detach call)."""
    model = make(torch.float32)
    train(model, mix_opt(model))
    gc.collect()
    second = mix_opt(model)
    train(model, second)
    assert second.stage() == 2 and second.selected_fraction() is not None
