"""Failures that used to be silent or opaque (issue "Hardening"), each with the test that
failed before its fix."""
import copy

import pytest
import torch
from torch import nn

from dps_kernels import DPSAdamW, attach
from test_state_dict import roundtrip as _roundtrip, train as _train
from triton_device import device_for


def _data(n, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=gen).to(device),
             torch.randn(4, 2, generator=gen).to(device)) for _ in range(n)]


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

    device = device_for(backend)
    net = Net().to(device)
    model, empty = net.lin, net.empty.weight
    opt = DPSAdamW.from_model(net, mode=mode, update_steps=2, lr=1e-2, backend=backend)
    for x, y in _data(7, device=device):   # selections after steps 2 and 6; step 8 is Stage II
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



def test_a_refused_step_changes_no_group():
    """Before: each group was checked while stepping, so a sparse gradient in the second
    group raised after the first group had stepped (weight, moments, step counter)."""
    model = nn.Linear(6, 2)
    emb = nn.Embedding(5, 3, sparse=True)
    opt = DPSAdamW([{"params": [model.weight]}, {"params": [emb.weight], "dps": False}],
                   update_steps=2, backend="torch")
    (x, y), (x2, y2) = _data(2)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()   # the embedding has no gradient yet: the first group steps (and gets a plan)
    opt.zero_grad()
    ((model(x2) - y2) ** 2).mean().backward()
    emb(torch.tensor([1, 2])).sum().backward()
    weight, exp_avg = model.weight.detach().clone(), opt.state[model.weight]["exp_avg"].clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(model.weight, weight)
    assert torch.equal(opt.state[model.weight]["exp_avg"], exp_avg)
    assert opt.state[model.weight]["step"] == 1


# ------------------------------------------------------------------ copies and pickles
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def _build(mode, **kw):
    net = _net()
    kw = dict(mode=mode, p=0.5, update_steps=2, lr=1e-2, seed=4, backend="torch", **kw)
    return net, DPSAdamW.from_model(net, **kw)


def _plain_forward_matches(net, x):
    """A training forward of ``net`` is its eval forward: nothing is mixed."""
    net.train()
    with torch.no_grad():
        trained = net(x)
        net.eval()
        evaluated = net(x)
    net.train()
    return torch.equal(trained, evaluated)


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_copied_and_pickled_optimizers_train_on_their_own(mode):
    """Before: torch's ``Optimizer.__getstate__`` kept only defaults/state/param_groups, so
    the first step of a ``copy.deepcopy`` or ``torch.save``/``torch.load`` copy raised
    ``AttributeError: ... '_param_index'``. Now a copy is an independent optimizer (its own
    state tensors and index maps; a Mix copy must be attached to its model first)."""
    data = _data(6, seed=3)
    net, opt = _build(mode)
    _train(net, opt, data[:2])   # to the selection
    copies = [copy.deepcopy((net, opt)), _roundtrip((net, opt))]
    for copy_net, copy_opt in copies:
        assert (list(copy_opt._param_index.values()) == list(opt._param_index.values())
                and not copy_opt._plans and not copy_opt._wired)
        for param, copy_param in zip(net.parameters(), copy_net.parameters()):
            for key, value in opt.state[param].items():
                if torch.is_tensor(value):
                    copied = copy_opt.state[copy_param][key]
                    assert torch.equal(copied, value) and copied.data_ptr() != value.data_ptr()
        if mode == "mix":   # the wiring is the original model's: the copy is not wired
            ((copy_net(data[2][0]) - data[2][1]) ** 2).mean().backward()
            with pytest.raises(RuntimeError, match="not wired to a model"):
                copy_opt.step()
            attach(copy_net, copy_opt)
    for model, optimizer in [(net, opt)] + copies:
        _train(model, optimizer, data[2:])
    for copy_net, _ in copies:
        for a, b in zip(net.parameters(), copy_net.parameters()):
            assert torch.equal(a, b)
    lone = copy.deepcopy(opt)   # alone: it steps its own copies of the parameters
    for param in lone.param_groups[0]["params"]:
        param.grad = torch.ones_like(param)
    if mode == "mix":
        with pytest.raises(RuntimeError, match="not wired to a model"):
            lone.step()
    else:
        lone.step()


def test_a_mix_wired_model_pickles():
    """Before: ``torch.save(model)`` raised ``cannot pickle 'weakref.ReferenceType'``: each
    wired Parameter carried a weakref to its optimizer."""
    net, opt = _build("mix")
    _train(net, opt, _data(1))
    loaded = _roundtrip(net)
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_a_copy_of_a_mix_wired_model_is_plain_and_independent():
    """Before: a deepcopy kept the original's hooks: its training forward mixed the
    original's weights (ignoring its own) and left the original's Parameter in the copy."""
    data = _data(5, seed=2)
    net, opt = _build("mix")
    twin, twin_opt = _build("mix")   # never copied: what the original must keep doing
    _train(net, opt, data[:3])
    _train(twin, twin_opt, data[:3])
    dup = copy.deepcopy(net)
    own = dup[0].weight
    x = data[3][0]
    assert _plain_forward_matches(dup, x) and dup[0].weight is own
    assert not _plain_forward_matches(net, x)   # the original still mixes
    _train(dup, torch.optim.SGD(dup.parameters(), lr=0.1), data[3:])   # a plain model
    _train(net, opt, data[3:])
    _train(twin, twin_opt, data[3:])
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    loaded = _roundtrip(net)
    assert _plain_forward_matches(loaded, x)
    assert not _plain_forward_matches(net, x)


# ------------------------------------------------------------------ load_state_dict checks
def _snapshot(opt):
    """Everything a load could change, as values."""
    def value(v):
        return v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
    return ([{k: value(v) for k, v in opt.state[p].items()} if p in opt.state else None
             for g in opt.param_groups for p in g["params"]],
            [{k: value(v) for k, v in g.items() if k != "params"} for g in opt.param_groups])


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _drop(key):
    def corrupt(sd):
        del sd["state"][0][key]
    return corrupt


def _set(key, value):
    def corrupt(sd):
        sd["state"][0][key] = value
    return corrupt


def _set_group(key, value):
    def corrupt(sd):
        sd["param_groups"][0][key] = value
    return corrupt


def _other_model(mode):
    """A state of the same group structure from a model with other shapes."""
    def corrupt(sd):
        torch.manual_seed(0)
        other = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2))
        other_opt = DPSAdamW.from_model(other, mode=mode, p=0.5, update_steps=2, lr=1e-2,
                                        seed=4, backend="torch")
        _train(other, other_opt, _data(3, seed=9))
        sd.clear()
        sd.update(other_opt.state_dict())
    return corrupt


def _lost_state(sd):
    del sd["state"][0]


@pytest.mark.parametrize("mode, corrupt, match", [
    ("dense", _drop("gam"), r"parameter #0 \(shape \(5, 6\)\) has no 'gam'"),
    ("dense", _drop("exp_avg_sq"), r"parameter #0 .* has no 'exp_avg_sq'"),
    ("mix", _drop("anchor"), r"parameter #0 .* has no 'anchor'"),
    ("dense", _drop("step"), r"parameter #0 .* has no 'step'"),
    ("dense", _set("exp_avg", torch.zeros(6, 5)),
     r"parameter #0 \(shape \(5, 6\)\).*'exp_avg' has shape \(6, 5\), expected \(5, 6\)"),
    ("mix", _set("fam", torch.zeros(5)), r"'fam' has shape \(5,\), expected \(6,\)"),
    ("dense", _set("gam", torch.zeros(5, 6, dtype=torch.int64)),
     r"'gam' must be a floating-point tensor, got a torch.int64"),
    ("dense", _set("threshold", torch.zeros(1)), r"'threshold' has shape \(1,\), expected \(\)"),
    ("dense", _set("step", -1), r"'step' must be a count of steps"),
    ("dense", _set("mask_bits", torch.zeros(3, dtype=torch.int32)), r"'mask_bits' must be"),
    ("dense", _other_model("dense"), r"parameter #0 \(shape \(5, 6\)\).*shape \(3, 6\)"),
    ("mix", _other_model("mix"), r"parameter #0 \(shape \(5, 6\)\).*shape \(3, 6\)"),
    ("dense", _lost_state, r"state of parameter #0 \(shape \(5, 6\)\) is missing"),
    ("mix", _lost_state, r"state of parameter #0 .* is missing"),
    ("dense", _set_group("p", 1.5), r"param group #0 of the state: p must be .* got 1.5"),
    ("dense", _set_group("dps", False), r"param group #0 of the state has dps=False"),
])
def test_load_state_dict_refuses_what_cannot_work_and_changes_nothing(mode, corrupt, match):
    """Before: these states were loaded (a missing ``gam`` or a wrong shape failed at a later
    step, a lost state silently restarted its parameter at step 0, p=1.5 was taken)."""
    data = _data(6, seed=5)
    net, opt = _build(mode)
    twin, twin_opt = _build(mode)
    _train(net, opt, data[:3])
    _train(twin, twin_opt, data[:3])
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert _same(_snapshot(opt), before)
    _train(net, opt, data[3:])
    _train(twin, twin_opt, data[3:])
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_takes_the_checkpoints_p():
    """The documented choice: ``p`` is a hyperparameter like ``lr``, the checkpoint's wins
    (its thresholds and bits were chosen with it)."""
    net, opt = _build("dense")
    _train(net, opt, _data(2))
    _, other = _build("dense")
    for group in other.param_groups:
        group["p"] = 0.2
    other.load_state_dict(opt.state_dict())
    assert [g["p"] for g in other.param_groups] == [0.5] * len(opt.param_groups)
