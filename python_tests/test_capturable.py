"""``DPSAdamW(capturable=True)``: every step launches the same kernels with the same arguments.

A CUDA graph replays exactly the launches (kernels, grids, argument values and buffer
addresses) recorded at capture. No GPU here, so the property is checked where it is
decided: under the Triton interpreter every Triton launch (kernel, grid, each argument:
the address of a tensor, the value of a scalar) and every aten op ``step()`` runs are
recorded for consecutive steps across several stage boundaries; the record of each step
after the first (which builds the tables) must be identical. The Mix forward and backward
kernels are recorded too, with their freshly allocated outputs (and the upstream gradient
autograd hands the backward) left out, since a graph's private memory pool makes those
addresses static anyway.

Training must match ``capturable=False``. Tolerance: masks, thresholds, GAM and FAM exactly
(the selection reads the same GAM bits; the Mix factor comes from a table made by the
reference); parameters and moments within 1e-6 absolute (the capturable kernel computes
the bias corrections in fp64 by binary powering on the device, the host path with
Python's ``**``: after rounding to fp32 they agree, or differ by one fp32 ulp).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dps_kernels import DPSAdamW
from dps_kernels.backends import unavailable_reason
from triton_device import compiled_triton

pytestmark = pytest.mark.skipif(
    unavailable_reason("triton") is not None or compiled_triton(),
    reason="CPU tensors only: needs the Triton interpreter (TRITON_INTERPRET=1) to record "
           "launches on CPU")

US = 2          # stage length: boundaries after steps 2, 4, 6
STEPS = 7
# per kernel, the arguments that are fresh allocations of the Mix autograd function
TRANSIENT = {"_mix_weight_kernel": {"out_ptr"}, "_mix_grad_kernel": {"g_ptr", "out_ptr"}}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 36), nn.Tanh(), nn.Linear(36, 3))


def _batches(n=STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 40, generator=gen), torch.randn(8, 3, generator=gen))
            for _ in range(n)]


def _describe(value):
    if torch.is_tensor(value):
        return ("tensor", value.data_ptr(), value.dtype, tuple(value.shape))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    return repr(value)


class _LaunchRecorder:
    """Records every Triton launch (interpreter) into ``self.current``."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction

        self.current = None
        self.in_launch = False    # the interpreter's own tensor ops are not the program's
        original = InterpretedFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            if recorder.current is not None:
                name = fn.fn.__name__
                skip = TRANSIENT.get(name, set())
                named = dict(zip(fn.arg_names, args), **kwargs)
                recorder.current.append(
                    ("triton", name, _describe(grid),
                     tuple((k, _describe(v)) for k, v in named.items() if k not in skip)))
            recorder.in_launch = True
            try:
                return original(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                recorder.in_launch = False

        monkeypatch.setattr(InterpretedFunction, "run", run)


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, log, launches):
        super().__init__()
        self.log = log
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # the profiler's record_function markers of Optimizer.step launch no device work
        if not self.launches.in_launch and not str(func).startswith("profiler."):
            self.log.append(("aten", str(func), _describe(args), _describe(tuple(kwargs.items()))))
        return func(*args, **kwargs)


def _train(mode, capturable, batches, record=None, freeze=False):
    model = _model()
    opt = DPSAdamW.from_model(model, mode=mode, p=0.4, update_steps=US, lr=5e-3,
                              weight_decay=0.01, freeze=freeze, seed=3, backend="triton",
                              capturable=capturable)
    per_step, history = [], []
    for x, y in batches:
        log = []
        if record is not None:
            record.current = log
        opt.zero_grad(set_to_none=False)   # static gradient buffers, as under a CUDA graph
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if record is not None:
            with _AtenRecorder(log, record):
                opt.step()
        else:
            opt.step()
        if record is not None:
            record.current = None
        per_step.append(log)
        history.append([opt.subnetwork(m.weight) for m in (model[0], model[2])])
    return model, opt, per_step, history


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_same_launches_and_arguments_at_every_step(mode, monkeypatch):
    recorder = _LaunchRecorder(monkeypatch)
    _, _, per_step, _ = _train(mode, True, _batches(), record=recorder)
    kernels = {entry[1] for entry in per_step[1] if entry[0] == "triton"}
    expected = {"_dps_step_kernel", "_multi_hist_kernel", "_multi_pick_kernel"}
    if mode == "mix":
        expected |= {"_capturable_factor_kernel", "_mix_weight_kernel", "_mix_grad_kernel"}
    assert expected <= kernels, kernels
    for t in range(2, STEPS):
        assert per_step[t] == per_step[1], f"step {t + 1} launches differ from step 2"


@pytest.mark.parametrize("freeze", [False, True], ids=["mask", "freeze"])
@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_training_matches_host_scheduled(mode, freeze):
    batches = _batches()
    runs = [_train(mode, capturable, batches, freeze=freeze) for capturable in (False, True)]
    (m0, o0, _, h0), (m1, o1, _, h1) = runs
    for masks0, masks1 in zip(h0, h1):
        for a, b in zip(masks0, masks1):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b)
    assert any(m is not None for masks in h1 for m in masks), "never reached Stage II"
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        torch.testing.assert_close(p1, p0, rtol=0, atol=1e-6)
        s0, s1 = o0.state[p0], o1.state[p1]
        assert float(s1["step"]) == s0["step"] == STEPS
        for key in ("fam", "threshold", "column_factor"):
            if key in s0:
                assert torch.equal(s1[key], s0[key]), key
        if "gam" in s0:
            if mode == "mix":   # host-scheduled Mix holds W' in the GAM buffer in Stage II
                torch.testing.assert_close(s0["gam"], s1["stage_anchor"].float(), rtol=0,
                                           atol=1e-6)
            else:
                assert torch.equal(s1["gam"], s0["gam"])
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s0:
                torch.testing.assert_close(s1[key], s0[key], rtol=0, atol=1e-6)


def _snapshot(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for state in opt.state.values():
        out += [v.clone() for v in state.values() if torch.is_tensor(v)]
    return out


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_grad_scaler_in_kernel_skip_and_unscale(mode):
    """GradScaler hands a capturable DPSAdamW its scale and inf flag (no host sync): a step
    with an inf leaves weights and every DPS state tensor (steps included) untouched, and a
    scaled step equals the unscaled one."""
    batches = _batches(US + 1)
    plain_model, plain_opt, _, _ = _train(mode, True, batches)
    model = _model()
    opt = DPSAdamW.from_model(model, mode=mode, p=0.4, update_steps=US, lr=5e-3,
                              weight_decay=0.01, seed=3, backend="triton", capturable=True)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1000)
    for t, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=False)
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        if t == 1:   # an overflowing step in the middle of Stage I's accumulation
            before = _snapshot(model, opt)
            opt.zero_grad(set_to_none=False)
            scaler.scale(((model(x) - y) ** 2).mean() * float("inf")).backward()
            scaler.step(opt)
            scaler.update()
            after = _snapshot(model, opt)
            assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all()
                       for a, b in zip(before, after))
    for p0, p1 in zip(plain_model.parameters(), model.parameters()):
        torch.testing.assert_close(p1, p0, rtol=0, atol=1e-6)


def test_capturable_needs_triton():
    model = _model()
    with pytest.raises(ValueError, match="capturable=True needs the triton backend"):
        DPSAdamW.from_model(model, update_steps=2, backend="torch", capturable=True)
    # a tensor triton cannot take: the error says why, not only which backend it got
    device = next(_model().parameters()).device
    strided = nn.Parameter(torch.randn(10, 5, 2, device=device)[..., 0])
    with pytest.warns(UserWarning, match="not contiguous"), pytest.raises(
            ValueError, match=r"would be stepped by 'torch'.*triton: the tensor is not "
                              r"contiguous"):
        DPSAdamW([strided], update_steps=2, backend="triton", capturable=True)


def test_capturable_refuses_partial_gradients():
    model = _model()
    opt = DPSAdamW.from_model(model, update_steps=2, backend="triton", capturable=True)
    x, y = _batches(1)[0]
    ((model(x) - y) ** 2).mean().backward()
    model[2].weight.grad = None
    with pytest.raises(RuntimeError, match="every parameter of a group"):
        opt.step()


def test_capturable_state_dict_resumes_host_scheduled():
    """A capturable run's checkpoint loads into a host-scheduled optimizer and back."""
    batches = _batches()
    full, full_opt, _, _ = _train("mix", False, batches)
    first, first_opt, _, _ = _train("mix", True, batches[:3])
    sd = first_opt.state_dict()
    resumed = _model()
    resumed.load_state_dict(first.state_dict())
    opt = DPSAdamW.from_model(resumed, mode="mix", p=0.4, update_steps=US, lr=5e-3,
                              weight_decay=0.01, seed=3, backend="triton")
    opt.load_state_dict(sd)
    assert all(isinstance(s["step"], int) for s in opt.state.values())
    for x, y in batches[3:]:
        opt.zero_grad()
        ((resumed(x) - y) ** 2).mean().backward()
        opt.step()
    for p0, p1 in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p1, p0, rtol=0, atol=1e-6)


def test_tensor_lr_updated_in_place_is_followed():
    """Under graph replay only device memory changes: an lr tensor updated in place (what a
    scheduler does to a tensor lr) must be used at the next step, like a float lr change."""
    batches = _batches(4)
    models = []
    for as_tensor in (False, True):
        model = _model()
        # fp64, so the tensor holds the same number as the float (an fp32 lr is rounded)
        lr = torch.tensor(5e-3, dtype=torch.float64) if as_tensor else 5e-3
        opt = DPSAdamW.from_model(model, mode="dense", update_steps=US, lr=lr,
                                  backend="triton", capturable=True)
        for t, (x, y) in enumerate(batches):
            if t == 2:
                for group in opt.param_groups:
                    if as_tensor:
                        group["lr"].fill_(1e-2)
                    else:
                        group["lr"] = 1e-2
            opt.zero_grad(set_to_none=False)
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_capturable_refuses_a_host_scheduled_mix_stage_two_state_unchanged():
    """Host-scheduled Mix keeps W' in the GAM buffer in Stage II: a capturable optimizer
    (which needs GAM there) refuses the state, and the refusal changes nothing."""
    _, host_opt, _, _ = _train("mix", False, _batches(3))   # next step: Stage II
    model = _model()
    opt = DPSAdamW.from_model(model, mode="mix", p=0.4, update_steps=US, lr=5e-3,
                              weight_decay=0.01, seed=3, backend="triton", capturable=True)
    before = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
              for p, s in opt.state.items()}
    with pytest.raises(ValueError, match="capturable=False"):
        opt.load_state_dict(host_opt.state_dict())
    for p, s in opt.state.items():
        assert s.keys() == before[id(p)].keys()
        assert all(torch.equal(v, before[id(p)][k]) if torch.is_tensor(v)
                   else v == before[id(p)][k] for k, v in s.items())
