"""``torch.library.opcheck`` of every op the package registers (docs/compile.md).

opcheck runs each op for real and on FakeTensors and checks the schema (declared mutations
and aliasing), the fake implementation (shapes, dtypes, strides of the outputs), the
autograd registration and AOTAutograd tracing with dynamic shapes. Ops:

* ``dps_cpu::*`` (C++, csrc/bindings.cpp; fakes in backends/cpu_fake.py): ``fused_step``,
  ``select_threshold``, ``mix_weight``, ``mix_grad``, ``pack_mask``. Inputs do not require
  grad: these ops have no autograd formula, they run inside ``mix._MixWeight`` and
  ``mix_op`` (which have one) and in the optimizer step (no grad). The tensor-free ops
  (``abi_version``, ``isa``, ``best_isa``, ``set_isa``) have nothing to fake.
* ``dps_kernels::triton_*`` (ops/triton/library.py): on CUDA the ``triton_op`` launchers,
  under ``TRITON_INTERPRET=1`` the opaque custom ops with allocation-only fakes.
* ``dps_kernels::mixed_weight`` / ``mixed_weight_backward`` (mix_op.py), what a compiled
  Mix forward calls, on a wired parameter (it requires grad: the autograd formula is
  checked too), at every stage.
"""
import pytest
import torch

from dps_kernels import DPSAdamW, attach
from dps_kernels.backends import get_backend, unavailable_reason
from dps_kernels.mask_hash import keep_threshold, key_base, step_key
from triton_device import triton_device

needs_cpu = pytest.mark.skipif(unavailable_reason("cpu") is not None,
                               reason=f"cpu backend: {unavailable_reason('cpu')}")
TRITON_REASON = unavailable_reason("triton")
TRITON_DEVICE = triton_device()
needs_triton = pytest.mark.skipif(TRITON_REASON is not None,
                                  reason=f"triton backend: {TRITON_REASON}")


def tensors(device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, a, gam = (torch.randn(6, 10, generator=gen) for _ in range(3))
    return dict(w=w.to(device), a=a.to(device), gam=gam.abs().to(device),
                factor=torch.rand(10, generator=gen).to(device),
                thr=torch.tensor(0.5, device=device))


def opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


# ------------------------------------------------------------------ dps_cpu (C++)
@needs_cpu
def test_cpu_mix_select_pack_ops():
    get_backend("cpu")   # loads the library and registers the fakes
    ops, t = torch.ops.dps_cpu, tensors()
    bits = ops.pack_mask(t["gam"], t["factor"], t["thr"])
    key, keep = step_key(1, 2, 3), keep_threshold(0.3)
    for args in [(t["w"], t["a"], 10, key, keep, None, None, None, 0.3, None, None),
                 (t["w"], t["a"], 10, key, keep, None, None, None, 0.3, torch.bfloat16, None),
                 (t["w"], t["a"], 10, None, 0, t["gam"], t["factor"], t["thr"], 0.3, None, None),
                 (t["w"], t["a"], 10, None, 0, None, None, None, 0.3, None, bits)]:
        opcheck(ops.mix_weight, args)
    for args in [(t["w"], 10, key, keep, None, None, None, None),
                 (t["w"], 10, None, 0, t["gam"], t["factor"], t["thr"], None),
                 (t["w"], 10, None, 0, None, None, None, bits)]:
        opcheck(ops.mix_grad, args)
    opcheck(ops.select_threshold, (t["gam"], t["factor"], 7, "radix"))
    opcheck(ops.select_threshold, (t["gam"], None, 60, "nth_element"))
    opcheck(ops.pack_mask, (t["gam"], t["factor"], t["thr"]))
    opcheck(ops.pack_mask, (t["gam"], None, t["thr"]))


def _clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    return [_clone(v) for v in x] if isinstance(x, list) else x


@needs_cpu
@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_cpu_fused_step(mode, monkeypatch):
    """The arguments of real optimizer steps (every step kind of the mode: Stage I with its
    reset, Stage II after a selection, plain AdamW for the biases), each checked."""
    get_backend("cpu")
    calls, real = [], torch.ops.dps_cpu.fused_step

    def spy(*args):
        calls.append(_clone(list(args)))
        return real(*args)

    monkeypatch.setattr(torch.ops.dps_cpu, "fused_step", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    opt = DPSAdamW.from_model(model, mode=mode, update_steps=2, backend="cpu")
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(4, 5)).pow(2).sum().backward()
        opt.step()
    monkeypatch.undo()
    kinds = {kind for args in calls for kind in args[9]}
    assert kinds == ({0, 1, 2} if mode == "dense" else {0, 3, 4}), kinds
    for args in calls:
        opcheck(torch.ops.dps_cpu.fused_step, tuple(args))


# ------------------------------------------------------------------ Triton
@needs_triton
def test_triton_ops():
    ops, t = get_backend("triton")._load(), tensors(TRITON_DEVICE)
    bits = ops.pack_mask(t["gam"], t["factor"], t["thr"])
    step = torch.tensor(2.0, device=TRITON_DEVICE)   # capturable: the next step is t=3
    key, keep, base = step_key(1, 2, 3), keep_threshold(0.3), key_base(1, 2)
    for args in [(t["w"], t["a"], 10, key, keep, None, None, None, 0.3, torch.bfloat16),
                 (t["w"], t["a"], 10, None, 0, None, None, None, 0.3, None, None, 0, 1, None,
                  bits),
                 (t["w"], t["a"], 10, None, keep, t["gam"], t["factor"], t["thr"], 0.3, None,
                  step, base, 2, t["a"] * 2, None)]:
        opcheck(ops.mix_weight, args)
    for args in [(t["w"], 10, key, keep, None, None, None),
                 (t["w"], 10, None, 0, None, None, None, None, 0, 1, bits),
                 (t["w"], 10, None, keep, t["gam"], t["factor"], t["thr"], step, base, 2, None)]:
        opcheck(ops.mix_grad, args)
    opcheck(ops.select_threshold, (t["gam"], t["factor"], 7, False))
    opcheck(ops.pack_mask, (t["gam"], t["factor"], t["thr"]))


# ------------------------------------------------------------------ the compiled Mix op
def _mixed_weight_cases():
    cases = [("torch", "cpu", False, "mix"), ("cpu", "cpu", False, "mix"),
             ("triton", TRITON_DEVICE, False, "mix"), ("triton", TRITON_DEVICE, True, "mix"),
             ("torch", "cpu", False, "mixout"), ("cpu", "cpu", False, "mixout")]
    for backend, device, capturable, mode in cases:
        marks = (needs_cpu,) if backend == "cpu" else (needs_triton,) if backend == "triton" \
            else ()
        yield pytest.param(backend, device, capturable, mode, marks=marks,
                           id=f"{mode}-{backend}-{'capturable' if capturable else 'host'}")


@pytest.mark.parametrize("backend,device,capturable,mode", list(_mixed_weight_cases()))
def test_mixed_weight_op(backend, device, capturable, mode):
    """At the first forward (the op creates the state), then in Stage I and Stage II."""
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 6).to(device)
    stages = {"update_steps": 2} if mode == "mix" else {}
    opt = DPSAdamW([{"params": [model.weight]}, {"params": [model.bias], "dps": False}],
                   mode=mode, backend=backend, capturable=capturable, lr=1e-2, **stages)
    handle = attach(model, opt)
    (slot,) = handle.slots
    x = torch.randn(4, 10, device=device)
    for steps in range(4):   # mix: Stage I, I, II, II
        grad = torch.randn(6, 10, device=device)
        opcheck(torch.ops.dps_kernels.mixed_weight, (model.weight, slot))
        opcheck(torch.ops.dps_kernels.mixed_weight_backward, (grad, slot))
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
