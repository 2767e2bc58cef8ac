"""Every step path takes the same gradients and refuses the same ones.

The first step of a group (and any step after a change) goes through the general path; the
steps after it reuse the group's cached plan (``group_plan.py``). Found by the one-engine
review: from the second step on the plan skipped the per-step gradient checks, so a sparse
gradient was stepped silently (torch backend) or failed inside a kernel after earlier groups
had stepped, and an odd-strided gradient that step 1 copied made step 2 raise; and one
group holding fp32 and bf16 parameters stepped once on the triton backend, then failed at
step 2 ("a group must share one device and dtype")."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dps_kernels import DPSAdamW
from dps_kernels.backends import interpreter_enabled, unavailable_reason


def backends():
    out = []
    for name in ("torch", "cpu", "triton"):
        reason = unavailable_reason(name)
        if name == "triton" and reason is None and not interpreter_enabled():
            reason = "the CPU tensors of this test need TRITON_INTERPRET=1"
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None,
                                                                  reason=str(reason))))
    return out


def params(dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 13), (5, 3), (11,)]
    return [nn.Parameter(torch.randn(*shape, generator=g).to(dtype))
            for shape, dtype in zip(shapes, dtypes)]


def grads_for(ps, t):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps]


def step_all(opt, ps, t):
    for p, grad in zip(ps, grads_for(ps, t)):
        p.grad = grad
    opt.step()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_one_group_of_mixed_dtypes_steps_like_single_dtype_groups(backend, mode):
    """fp32 + bf16 + fp16 (fp16 where the backend takes it) in one group, two full cycles,
    bit-identical to one group per dtype."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16 if backend != "cpu" else
              torch.bfloat16]
    kw = dict(mode=mode, p=0.4, update_steps=2, lr=1e-2, weight_decay=0.01, seed=5,
              backend=backend, fp32_moments=True)
    together = params(dtypes)
    apart = [nn.Parameter(p.detach().clone()) for p in together]
    opts = [DPSAdamW([{"params": together}], **kw),
            DPSAdamW([{"params": [p]} for p in apart], **kw)]
    if mode == "mix":   # unwired: the step's Mix arithmetic is still the same in both
        for opt in opts:
            opt._check_grad = lambda param, group: None
    for t in range(1, 9):
        for opt, ps in zip(opts, (together, apart)):
            step_all(opt, ps, t)
        for a, b in zip(together, apart):
            assert torch.equal(a, b), f"step {t}"
            assert (opts[0].subnetwork(a) is None) == (opts[1].subnetwork(b) is None)


@pytest.mark.parametrize("backend", backends())
def test_a_sparse_gradient_at_a_later_step_is_refused_as_at_the_first(backend):
    ps = params([torch.float32] * 3)
    first = DPSAdamW([{"params": ps[:2]}, {"params": ps[2:]}], mode="dense", update_steps=2,
                     backend=backend)
    for t in (1, 2):
        step_all(first, ps, t)   # the plans exist now
    before = [p.detach().clone() for p in ps]
    state_before = copy.deepcopy(first.state_dict())
    grads = grads_for(ps, 3)
    for p, grad in zip(ps, grads):
        p.grad = grad
    ps[2].grad = grads[2].to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        first.step()
    for a, b in zip(before, ps):   # the first group did not step either
        assert torch.equal(a, b)
    assert first.state_dict()["state"][0]["step"] == state_before["state"][0]["step"] == 2


@pytest.mark.parametrize("backend", backends())
def test_an_odd_strided_gradient_at_a_later_step_is_taken_as_at_the_first(backend):
    ps = params([torch.float32] * 2)
    twin = [nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(mode="dense", update_steps=2, backend=backend, lr=1e-2)
    opt, ref = DPSAdamW(ps, **kw), DPSAdamW(twin, **kw)
    for t in range(1, 6):
        grads = grads_for(ps, t)
        for p, q, grad in zip(ps, twin, grads):
            q.grad = grad.clone()
            # step 4: a transposed copy, the same values in another layout
            p.grad = grad.t().contiguous().t() if t == 4 and grad.dim() == 2 else grad
        opt.step()
        ref.step()
        for a, b in zip(ps, twin):
            assert torch.equal(a, b), f"step {t}"
