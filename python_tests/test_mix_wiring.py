"""Mix wiring: per-parameter state, micro-batches share a mask, checkpointing recomputes the
same mask, eval uses W, several models coexist, the model stays a normal module."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dps_kernels import DPSAdamW, attach
from test_optimizer import Net, batches, make, mse


def mix_opt(model, **kw):
    kw = {"mode": "mix", "p": 0.5, "update_steps": 2, "seed": 3, **kw}
    return DPSAdamW.from_model(model, **kw)


def sum_loss(model, x, y):
    return (model(x) - y).pow(2).sum()


@pytest.mark.parametrize("step_before", [0, 2], ids=["stage1", "stage2"])
def test_micro_batches_of_one_step_share_the_mask(step_before):
    x, y = torch.randn(8, 13), torch.randn(8, 1)
    grads = []
    for micro in (1, 2, 4):
        model = make(torch.float32)
        opt = mix_opt(model)
        for batch in batches(step_before, torch.float32):
            opt.zero_grad()
            mse(model, batch).backward()
            opt.step()
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            sum_loss(model, xs, ys).backward()
        grads.append(model.hidden.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-6)
    assert (grads[0] == 0).any()  # the mask did drop something


class CheckpointedNet(Net):
    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)))
        h = checkpoint(lambda z: torch.tanh(self.hidden(z)), h, use_reentrant=False)
        return self.scale(self.out(h))


def test_gradient_checkpointing_recomputes_the_same_mask():
    torch.manual_seed(0)
    plain = Net()
    ckpt = CheckpointedNet()
    ckpt.load_state_dict(plain.state_dict())
    opts = [mix_opt(plain), mix_opt(ckpt)]
    for batch in batches(5, torch.float32):  # crosses into Stage II
        for model, opt in zip((plain, ckpt), opts):
            opt.zero_grad()
            mse(model, batch).backward()
            opt.step()
        for a, b in zip(plain.parameters(), ckpt.parameters()):
            assert torch.equal(a, b)


def test_eval_mode_uses_w_and_training_mode_mixes():
    model = make(torch.float32)
    opt = mix_opt(model)
    for batch in batches(3, torch.float32):
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    x = torch.randn(4, 13)
    model.eval()
    with torch.no_grad():
        direct = torch.nn.functional.linear(x, model.inp.weight, model.inp.bias)
        assert torch.equal(model.inp(x), direct)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.inp(x), direct)
    assert isinstance(model.inp.weight, nn.Parameter)  # restored after the forward


def test_parameter_is_restored_when_the_forward_raises():
    model = make(torch.float32)
    mix_opt(model)
    with pytest.raises(RuntimeError):
        model.inp(torch.randn(2, 5))  # wrong input width
    assert isinstance(model.inp.weight, nn.Parameter)
    assert set(model.state_dict()) == set(Net().state_dict())


def test_two_models_in_one_process_do_not_interact():
    data = batches(6, torch.float32)
    solo = make(torch.float32)
    solo_opt = mix_opt(solo, seed=1)
    for batch in data:
        solo_opt.zero_grad()
        mse(solo, batch).backward()
        solo_opt.step()
    a, b = make(torch.float32), make(torch.float32, seed=9)
    opt_a, opt_b = mix_opt(a, seed=1), mix_opt(b, seed=2, p=0.2, update_steps=3)
    for batch in data:
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            mse(model, batch).backward()
            opt.step()
    for x, y in zip(solo.parameters(), a.parameters()):
        assert torch.equal(x, y)


def test_mix_without_wiring_is_an_error():
    model = make(torch.float32)
    opt = DPSAdamW(model.parameters(), mode="mix", update_steps=2)
    mse(model, batches(1, torch.float32)[0]).backward()
    with pytest.raises(RuntimeError, match="not wired to a model: call dps_kernels.attach"):
        opt.step()
    attach(model, opt)
    opt.step()  # wired now


def test_attach_errors():
    model = make(torch.float32)
    dense = DPSAdamW(model.parameters(), mode="dense", update_steps=2)
    with pytest.raises(ValueError, match="mode in"):
        attach(model, dense)
    with pytest.raises(ValueError, match="needs a DPSAdamW"):
        attach(model, torch.optim.AdamW(model.parameters()))
    second = DPSAdamW(model.parameters(), mode="mix", update_steps=2)   # before any wiring
    opt = mix_opt(model)
    with pytest.raises(ValueError, match="no parameter of this model"):
        attach(make(torch.float32), opt)
    with pytest.raises(RuntimeError, match=r"already wired to another live DPSAdamW.*"
                                           r"dps_kernels\.detach\(model\)"):
        attach(model, second)


def test_remove_unwires():
    model = make(torch.float32)
    opt = DPSAdamW(model.parameters(), mode="mix", update_steps=2)
    handle = attach(model, opt)
    handle.remove()
    x = torch.randn(3, 13)
    with torch.no_grad():
        assert torch.equal(model.inp(x), torch.nn.functional.linear(x, model.inp.weight, model.inp.bias))


def test_a_removed_wiring_frees_the_parameters_for_another_optimizer():
    model = make(torch.float32)
    first = DPSAdamW(model.parameters(), mode="mix", update_steps=2)
    attach(model, first).remove()
    second = DPSAdamW(model.parameters(), mode="mix", update_steps=2)
    attach(model, second)
    mse(model, batches(1, torch.float32)[0]).backward()
    second.step()
