"""One seed, one model, three backends: the same Mix masks and the same trajectory.

DPSAdamW trains a small MLP for a few DPS cycles (Dense and Mix, freeze off and on) on
the cpu, torch and triton backends (triton under the interpreter, TRITON_INTERPRET=1,
on CPU tensors; skipped with the reason otherwise).

* Mix Stage I keep-masks (``opt.stage_one_mask``) and the FAM counts the kernels
  accumulated from their own hash evaluations: exactly equal.
* Stage II subnetworks (``opt.subnetwork``): exactly equal. GAM differs across backends
  only through fp32 rounding of the trajectory, far below the gaps between GAM values of
  this model, so the k-th largest selects the same elements.
* parameters after every step: within TOL. The backends differ by the rounding of sqrt
  (torch.sqrt uses MKL on CPU, the C++ kernels the correctly rounded instruction, the
  interpreter numpy), ~1 ulp per step, which the model's gradients carry on to the next
  steps; 1e-5 relative bounds that growth over 13 steps with a wide margin.
* a state_dict saved mid Stage II on the cpu backend and loaded into a fresh model and
  optimizer continues bit-identically.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dps_kernels.backends import unavailable_reason
from dps_kernels.optim import DPSAdamW
from dps_kernels.schedule import STAGE_ONE, stage_of
from triton_device import compiled_triton

US = 3
STEPS = 4 * US + 1  # two full cycles and the first step of the third
TOL = dict(rtol=1e-5, atol=1e-7)


def backend_params():
    out = []
    for name in ("cpu", "torch", "triton"):
        reason = unavailable_reason(name)
        if name == "triton" and reason is None and compiled_triton():
            # Every backend steps the same CPU tensors here; compiled triton needs CUDA ones.
            reason = "CPU tensors only: triton needs TRITON_INTERPRET=1 to step them"
        marks = [pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}")] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(11, 24)   # 264 weights
        self.b = nn.Linear(24, 7)    # 168 weights, odd rows

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def data(n=STEPS):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 11, generator=g), torch.randn(16, 7, generator=g)) for _ in range(n)]


def build(backend, mode, freeze, seed_model=0):
    torch.manual_seed(seed_model)
    model = Net()
    opt = DPSAdamW.from_model(model, mode=mode, p=0.3, update_steps=US, lr=1e-2,
                              weight_decay=0.05, freeze=freeze, seed=1234, backend=backend)
    return model, opt


def train_step(model, opt, batch):
    model.train()
    opt.zero_grad()
    x, y = batch
    (model(x) - y).pow(2).mean().backward()
    opt.step()


def trajectory(backend, mode, freeze):
    """Per step: parameters, Stage I keep-masks, Stage II subnetworks, FAM."""
    model, opt = build(backend, mode, freeze)
    dps = [model.a.weight, model.b.weight]
    record = []
    for t, batch in enumerate(data(), start=1):
        masks = {}
        if mode == "mix" and stage_of(t, US) == STAGE_ONE:
            masks = {i: opt.stage_one_mask(p, t) for i, p in enumerate(dps)}
        subnet = {i: opt.subnetwork(p) for i, p in enumerate(dps)}
        train_step(model, opt, batch)
        fam = {i: opt.state[p]["fam"].clone() for i, p in enumerate(dps)} if mode == "mix" else {}
        record.append({"params": [p.detach().clone() for p in model.parameters()],
                       "keep": masks, "subnet": subnet, "fam": fam})
    return record


_cache: dict = {}


def cached(backend, mode, freeze):
    key = (backend, mode, freeze)
    if key not in _cache:
        _cache[key] = trajectory(backend, mode, freeze)
    return _cache[key]


@pytest.mark.parametrize("freeze", [False, True], ids=["mask", "freeze"])
@pytest.mark.parametrize("mode", ["dense", "mix"])
@pytest.mark.parametrize("backend", backend_params())
def test_same_masks_and_trajectory_as_torch_backend(backend, mode, freeze):
    got = cached(backend, mode, freeze)
    want = cached("torch", mode, freeze)
    stage_two_steps = 0
    for t, (g, w) in enumerate(zip(got, want), start=1):
        for i in w["keep"]:
            assert torch.equal(g["keep"][i], w["keep"][i]), f"keep-mask of weight {i}, step {t}"
        for i in w["fam"]:
            assert torch.equal(g["fam"][i], w["fam"][i]), f"FAM of weight {i}, step {t}"
        for i, mask in w["subnet"].items():
            if mask is None:
                assert g["subnet"][i] is None, f"step {t} is Stage I on torch but not on {backend}"
                continue
            stage_two_steps += 1
            assert torch.equal(g["subnet"][i], mask), f"subnetwork of weight {i}, step {t}"
        for j, (a, b) in enumerate(zip(g["params"], w["params"])):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"param {j}, step {t}: {m}")
    assert stage_two_steps == 2 * 2 * US, "the run must cover two Stage IIs of both weights"


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_cpu_state_dict_round_trip_mid_stage_two(mode):
    if unavailable_reason("cpu") is not None:
        pytest.skip(f"cpu backend unavailable: {unavailable_reason('cpu')}")
    batches = data()
    stop = US + 2  # inside the first Stage II
    full, full_opt = build("cpu", mode, False)
    for b in batches:
        train_step(full, full_opt, b)

    first, first_opt = build("cpu", mode, False)
    for b in batches[:stop]:
        train_step(first, first_opt, b)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    torch.manual_seed(99)  # another init: everything must come from the checkpoint
    resumed = Net()
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = DPSAdamW.from_model(resumed, mode=mode, p=0.3, update_steps=US, lr=1e-2,
                                      weight_decay=0.05, seed=1234, backend="cpu")
    resumed_opt.load_state_dict(ckpt["opt"])
    for b in batches[stop:]:
        train_step(resumed, resumed_opt, b)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
