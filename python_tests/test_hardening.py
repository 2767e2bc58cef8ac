"""Failures that used to be silent or opaque (issue "Hardening"), each with the test that
failed before its fix."""
import pytest
import torch
from torch import nn

from dps_kernels import DPSAdamW


def _data(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("mode", ["dense", "mix"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_zero_size_dps_parameter_trains_through_selections(mode, backend):
    """Before: the selection of the empty tensor raised ``k must be in [1, 0]`` with no
    parameter named, after the step counters had advanced and the other thresholds were
    left 0.0. Now an empty tensor has nothing to select and the others are unaffected."""
    from dps_kernels.backends import unavailable_reason
    if unavailable_reason(backend):
        pytest.skip(unavailable_reason(backend))
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)
            self.empty = nn.Linear(6, 0)   # a DPS weight of shape (0, 6)

        def forward(self, x):
            return self.lin(x) + self.empty(x).sum()

    net = Net()
    model, empty = net.lin, net.empty.weight
    opt = DPSAdamW.from_model(net, mode=mode, update_steps=2, lr=1e-2, backend=backend)
    for x, y in _data(7):   # selections after steps 2 and 6; step 8 is Stage II
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    assert opt.state[model.weight]["threshold"] > 0
    assert opt.subnetwork(empty).shape == (0, 6)
    assert opt.subnetwork(model.weight).any()


def test_rejected_param_group_leaves_the_optimizer_as_it_was():
    """Before: ``add_param_group`` raised on a bad value but kept the rejected group, and
    the next ``step()`` failed with ``KeyError``."""
    model = nn.Linear(6, 2)
    extra = nn.Parameter(torch.randn(3, 6))
    opt = DPSAdamW([model.weight], update_steps=2, backend="torch")
    groups, indexed = len(opt.param_groups), dict(opt._param_index)
    with pytest.raises(ValueError, match=r"p must be .* got 1\.5"):
        opt.add_param_group({"params": [extra], "p": 1.5})
    assert len(opt.param_groups) == groups and opt._param_index == indexed
    x, y = _data(1)[0]
    ((model(x) - y) ** 2).mean().backward()
    extra.grad = torch.ones_like(extra)
    opt.step()   # worked before the fix? no: KeyError
    assert opt.state[model.weight]["step"] == 1 and extra not in opt.state
