"""DPSAdamW keeps the conventions of ``torch.optim`` optimizers, checked against
``torch.optim.AdamW`` wherever the two should agree.

What PyTorch's own optimizer suite exercises, written here for this package: errors for bad
hyperparameters (before ``params`` is looked at, AdamW's wording), step / state_dict /
load_state_dict hooks, closures, tensor ``lr``, LR schedulers, parameters without
gradients, ``zero_grad``, ``deepcopy``, ``repr``, non-contiguous parameters and keys of
``optimizer.state`` that are not parameters. With ``p=0`` DPS selects every element, so a
DPS parameter must follow AdamW's trajectory (up to the last bits of ``sqrt``: the fused
kernels round it correctly, torch's vectorised CPU sqrt not always, docs/cpu_backend.md).

Backends: torch and cpu always, triton under ``TRITON_INTERPRET=1`` (skipped otherwise).
"""
import ast
import copy
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dps_kernels import DPSAdamW
from dps_kernels.backends import interpreter_enabled, unavailable_reason

BACKENDS = ["torch", "cpu", "triton"]
US = 2   # stage length: steps 1-2 Stage I, 3-4 Stage II (a selection after step 2)


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = unavailable_reason(request.param)
    if request.param == "triton" and reason is None and not interpreter_enabled():
        # On a GPU machine the Triton backend steps CUDA tensors; these tests use CPU ones.
        reason = "triton needs TRITON_INTERPRET=1 to step CPU tensors"
    if reason is not None:
        pytest.skip(reason)
    return request.param


def leaves(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 4, generator=gen), torch.randn(4, generator=gen)]


def twins(seed=0):
    """The same two parameters twice: one list for DPSAdamW, one for torch.optim.AdamW."""
    values = leaves(seed)
    return ([nn.Parameter(v.clone()) for v in values], [nn.Parameter(v.clone()) for v in values])


def set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)


def assert_close(ours, theirs, steps=5):
    for a, b in zip(ours, theirs):
        # one ulp of sqrt per step at most (see the module docstring)
        torch.testing.assert_close(a.detach(), b.detach(), rtol=4 * steps * 1.2e-7, atol=1e-7)


def dps(params, backend, **kwargs):
    return DPSAdamW(params, update_steps=US, p=0.0, backend=backend, **kwargs)


# ---- defaults and bad hyperparameters --------------------------------------------------------

def test_defaults_are_adamws():
    ours = inspect.signature(DPSAdamW).parameters
    theirs = inspect.signature(torch.optim.AdamW).parameters
    for name in ("lr", "betas", "eps", "weight_decay"):
        assert ours[name].default == theirs[name].default, name
    # from_model's decay groups get the same default
    assert (inspect.signature(DPSAdamW.from_model).parameters["weight_decay"].default
            == theirs["weight_decay"].default)


def test_readme_options_give_the_signatures_defaults():
    """The README's options block lists each keyword with its default, as the code has it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("DPSAdamW(params, lr="):]
    block = re.sub(r"#.*", "", block[:block.index("```")])   # the comments' own examples
    listed = dict(re.findall(r"\b(\w+)=(\([^)]*\)|[^,\s)]+)", block))
    signature = inspect.signature(DPSAdamW).parameters
    assert set(listed) == set(signature) - {"params"}
    for name, text in listed.items():
        assert ast.literal_eval(text) == signature[name].default, name


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1e-3), dict(lr=torch.tensor([1e-3, 1e-3])), dict(eps=-1e-8),
    dict(weight_decay=-1), dict(betas=(1.0, 0.0)), dict(betas=(0.0, 1.0)),
    dict(betas=(0.9, torch.tensor(0.99))), dict(betas=(torch.tensor(0.9), 0.99)),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("with_params", [False, True], ids=["params=None", "params"])
def test_bad_adamw_hyperparameter_gets_adamws_error(kwargs, with_params):
    """The same error type and message as AdamW (ours goes on to give the range), also
    with ``params=None``: the hyperparameters are checked first."""
    with pytest.raises(ValueError) as adamw_error:
        torch.optim.AdamW(None, **kwargs)
    params = twins()[0] if with_params else None
    with pytest.raises(ValueError) as ours:
        DPSAdamW(params, update_steps=US, **kwargs)
    assert str(ours.value).startswith(str(adamw_error.value)), (ours.value, adamw_error.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), r"Invalid learning rate: -1.0 \(lr must be a finite number in \[0.0, inf\)\)"),
    (dict(lr=float("nan")), r"Invalid learning rate: nan \(lr must be"),
    (dict(lr=torch.tensor(-1.0)), r"Invalid learning rate: -1.0 \(lr must be"),
    (dict(eps=float("inf")), r"Invalid epsilon value: inf \(eps must be"),
    (dict(betas=(0.9, -0.5)), r"Invalid beta parameter at index 1: -0.5 \(betas\[1\] must"),
    (dict(betas=(0.9,)), r"betas must be a pair \(beta1, beta2\), got \(0.9,\)"),
    (dict(betas=(torch.ones(2), torch.ones(1))), r"Tensor betas\[0\] must be 1-element, got a "
                                                  r"tensor of shape \(2,\)"),
    (dict(p=1.0), r"p must be a finite number in \[0.0, 1.0\), got 1.0"),
    (dict(mode="sparse"), r"mode must be one of .*, got 'sparse'"),
    (dict(seed=-1), r"seed must be an int in \[0, 2\*\*64\), got -1"),
])
def test_bad_hyperparameter_names_argument_and_value_before_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPSAdamW(None, update_steps=US, **kwargs)


def test_tensor_betas_become_floats_as_in_adamw():
    betas = (torch.tensor(0.8), torch.tensor(0.9))
    ours = DPSAdamW(twins()[0], update_steps=US, betas=betas)
    theirs = torch.optim.AdamW(twins()[1], betas=betas)
    assert ours.defaults["betas"] == theirs.defaults["betas"] == (pytest.approx(0.8),
                                                                  pytest.approx(0.9))
    assert all(type(b) is float for b in ours.defaults["betas"])


@pytest.mark.parametrize("key, value", [
    ("mode", "mix"), ("update_steps", 5), ("total_steps", 100), ("update_ratio", 0.1),
    ("adamw_style", "hf_legacy"), ("seed", 3), ("backend", "torch"), ("fp32_moments", True),
    ("reserve_p", 0.5), ("amsgrad", True), ("maximize", True),
])
def test_optimizer_setting_in_a_param_group_is_refused(key, value):
    params = twins()[0]
    with pytest.raises(ValueError, match=rf"{key}={re.escape(repr(value))} .*param group"):
        DPSAdamW([{"params": params, key: value}], update_steps=US)
    opt = DPSAdamW([params[0]], update_steps=US)
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [params[1]], key: value})
    assert len(opt.param_groups) == 1 and opt.param_groups[0].keys() == before[0].keys()
    # ... and the refused parameter can still be added
    opt.add_param_group({"params": [params[1]]})


def test_own_and_default_group_keys_are_kept_as_in_torch():
    params = twins()[0]
    opt = DPSAdamW([{"params": params, "name": "mine", "amsgrad": False, "maximize": False}],
                   update_steps=US)
    assert opt.param_groups[0]["name"] == "mine"


def test_failed_add_param_group_changes_nothing():
    params = twins()[0]
    opt = DPSAdamW([params[0]], update_steps=US)
    with pytest.raises(ValueError, match=r"Tensor lr must be 1-element"):
        opt.add_param_group({"params": [params[1]], "lr": torch.ones(3)})
    assert len(opt.param_groups) == 1
    set_grads(params, 0)
    opt.step()
    assert params[1] not in opt.state


# ---- the step: hooks, closures, AdamW's trajectory ---------------------------------------------

def test_dps_with_p0_steps_like_adamw(backend):
    ours, theirs = twins()
    opt, ref = dps(ours, backend), torch.optim.AdamW(theirs)   # both at their defaults
    for step in range(5):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
    assert_close(ours, theirs)
    assert {s["step"] for s in opt.state.values()} == {5}


def test_step_hooks(backend):
    params = twins()[0]
    opt = dps(params, backend)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o, args)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o, args)))
    glob = register_optimizer_step_pre_hook(
        lambda o, args, kwargs: calls.append(("global", o, args)))
    try:
        set_grads(params, 0)
        opt.step()
    finally:
        glob.remove()
    assert [c[0] for c in calls] == ["global", "pre", "post"]
    assert all(c[1] is opt for c in calls)
    assert opt.state[params[0]]["step"] == 1
    pre.remove()
    post.remove()
    opt.step()
    assert len(calls) == 3


def test_step_pre_hook_may_replace_the_arguments(backend):
    params = twins()[0]
    opt = dps(params, backend)
    # as in torch, args holds the optimizer itself
    opt.register_step_pre_hook(lambda o, args, kwargs: ((o,), {"closure": lambda: 7.0}))
    set_grads(params, 0)
    assert opt.step() == 7.0


def test_closure(backend):
    ours, theirs = twins()
    opt, ref = dps(ours, backend), torch.optim.AdamW(theirs)
    target = torch.arange(20.0).reshape(5, 4)

    def closure_for(params, optimizer, calls):
        def closure():
            calls.append(torch.is_grad_enabled())
            optimizer.zero_grad()
            loss = ((params[0] - target) ** 2).sum() + params[1].pow(2).sum()
            loss.backward()
            return loss
        return closure

    ours_calls, theirs_calls = [], []
    for _ in range(5):
        loss = opt.step(closure_for(ours, opt, ours_calls))
        ref_loss = ref.step(closure_for(theirs, ref, theirs_calls))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert ours_calls == theirs_calls == [True] * 5   # once per step, with grad enabled
    assert_close(ours, theirs)


def test_parameter_without_grad_is_skipped(backend):
    ours, theirs = twins()
    opt, ref = dps(ours, backend), torch.optim.AdamW(theirs)
    frozen, before = ours[1], ours[1].detach().clone()
    for step in range(3):
        set_grads(ours[:1], step)
        set_grads(theirs[:1], step)
        opt.step()
        ref.step()
    assert frozen not in opt.state and theirs[1] not in ref.state
    assert torch.equal(frozen, before)
    assert_close(ours[:1], theirs[:1], steps=3)
    # a gradient now: it starts at its own step 1, as in AdamW
    set_grads(ours, 3)
    set_grads(theirs, 3)
    opt.step()
    ref.step()
    assert opt.state[frozen]["step"] == 1 and opt.state[ours[0]]["step"] == 4
    assert_close(ours, theirs, steps=4)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(backend, set_to_none):
    params = twins()[0]
    opt = dps(params, backend)
    set_grads(params, 0)
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=set_to_none)
    for param, grad in zip(params, grads):
        if set_to_none:
            assert param.grad is None
        else:
            assert param.grad is grad and not grad.any()   # zeroed in place, as torch does
    opt.step()   # no gradient (None) or a zero gradient: both step without error
    assert (params[0] in opt.state) is (not set_to_none)


# ---- tensor lr and LR schedulers ---------------------------------------------------------------

def test_tensor_lr(backend):
    ours, theirs = twins()
    lr = 3e-3
    opt = dps(ours, backend, lr=torch.tensor(lr))
    ref = torch.optim.AdamW(theirs, lr=torch.tensor(lr))
    assert torch.is_tensor(opt.param_groups[0]["lr"])   # kept a tensor, as AdamW keeps it
    for step in range(4):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        for optimizer in (opt, ref):   # what a scheduler does to a tensor lr: in place
            optimizer.param_groups[0]["lr"].fill_(lr / (step + 2))
    assert_close(ours, theirs, steps=4)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (e + 1)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_lr_scheduler(backend, name, tensor_lr):
    """The same LRs (OneCycleLR also cycles beta1) and the same weights as AdamW, across a
    DPS selection (p=0: every element kept)."""
    ours, theirs = twins()
    def lr():   # one tensor each: a scheduler updates it in place
        return torch.tensor(0.01) if tensor_lr else 0.01
    opt, ref = dps(ours, backend, lr=lr()), torch.optim.AdamW(theirs, lr=lr())
    sched, ref_sched = SCHEDULERS[name](opt), SCHEDULERS[name](ref)
    for step in range(6):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        assert list(map(float, sched.get_last_lr())) == pytest.approx(
            list(map(float, ref_sched.get_last_lr())))
        assert opt.param_groups[0]["betas"] == pytest.approx(ref.param_groups[0]["betas"])
    assert_close(ours, theirs, steps=6)


def test_reduce_lr_on_plateau(backend):
    params = twins()[0]
    opt = dps(params, backend, lr=0.01)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for step in range(3):
        set_grads(params, step)
        opt.step()
        sched.step(1.0)   # never improves
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 2)


# ---- state_dict, load_state_dict and their hooks ----------------------------------------------

def trained(backend, steps=3, **kwargs):
    params = twins()[0]
    opt = dps(params, backend, **kwargs)
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return params, opt


def test_state_dict_hooks(backend):
    _, opt = trained(backend)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(("post", "dps" in sd)))

    def replace(o, sd):
        seen.append("replace")
        return {**sd, "extra": 1}
    handle = opt.register_state_dict_post_hook(replace)
    state = opt.state_dict()
    # the post hooks see the whole DPS state and what they return is the state dict
    assert seen == ["pre", ("post", True), "replace"] and state["extra"] == 1
    handle.remove()
    assert "extra" not in opt.state_dict()


def test_load_state_dict_hooks(backend):
    _, opt = trained(backend)
    saved = opt.state_dict()
    params = twins()[0]
    fresh = dps(params, backend)
    seen = []

    def pre(o, sd):
        seen.append(("pre", "dps" in sd))
        sd["param_groups"][0]["lr"] = 0.002   # edits the loader's copy, not `saved`

    def pre_copy(o, sd):
        seen.append("pre_copy")
        mine = copy.deepcopy(sd)
        mine["param_groups"][0]["lr"] *= 1000
        return mine

    def post(o):   # runs once the DPS state is restored
        seen.append(("post", o.param_groups[0]["lr"], o.state[params[0]]["gam"].dtype))
    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_pre_hook(pre_copy)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(saved)
    assert seen == [("pre", True), "pre_copy", ("post", pytest.approx(2.0), torch.float32)]
    assert fresh.param_groups[0]["lr"] == pytest.approx(2.0)


def test_load_pre_hook_output_is_checked_and_a_refused_load_runs_no_post_hook(backend):
    _, opt = trained(backend)
    saved = opt.state_dict()
    fresh = dps(twins()[0], backend)
    posts = []
    fresh.register_load_state_dict_pre_hook(
        lambda o, sd: {**sd, "param_groups": [{**sd["param_groups"][0], "lr": -1.0}]})
    fresh.register_load_state_dict_post_hook(lambda o: posts.append(o))
    with pytest.raises(ValueError, match=r"param group #0 of the state: Invalid learning rate"):
        fresh.load_state_dict(saved)
    assert posts == [] and not fresh.state and fresh.param_groups[0]["lr"] == 1e-3


def test_non_parameter_key_in_state(backend):
    """torch's suite puts ``optimizer.state["test"]`` in a state_dict pre hook; AdamW keeps
    such a key through state_dict and load_state_dict."""
    params, opt = trained(backend)
    ref = torch.optim.AdamW(twins()[1])
    for optimizer in (opt, ref):
        optimizer.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
    saved, ref_saved = opt.state_dict(), ref.state_dict()
    assert saved["state"]["test"] == ref_saved["state"]["test"] == 1
    fresh = dps(twins()[0], backend)
    fresh.load_state_dict(saved)
    assert fresh.state["test"] == 1
    assert fresh.state_bytes() == opt.state_bytes()
    set_grads(fresh.param_groups[0]["params"], 9)
    fresh.step()   # the stray key does not disturb the step
    assert fresh.state[fresh.param_groups[0]["params"][0]]["step"] == 4


def test_resume_continues_like_adamw(backend):
    """state_dict mid-run, load into a fresh optimizer on copies of the weights: the rest of
    the run is AdamW's (p=0), as an uninterrupted one."""
    ours, theirs = twins()
    opt, ref = dps(ours, backend), torch.optim.AdamW(theirs)
    for step in range(6):
        if step == 3:
            saved = copy.deepcopy(opt.state_dict())
            ours = [nn.Parameter(p.detach().clone()) for p in ours]
            opt = dps(ours, backend)
            opt.load_state_dict(saved)
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
    assert_close(ours, theirs, steps=6)


# ---- copies, printing --------------------------------------------------------------------------

def test_deepcopy_is_independent_and_steps_alike(backend):
    params, opt = trained(backend)
    params_copy, opt_copy = copy.deepcopy((params, opt))
    assert opt_copy.param_groups[0]["params"][0] is params_copy[0]
    for optimizer, ps in ((opt, params), (opt_copy, params_copy)):
        set_grads(ps, 7)
        optimizer.step()
    for a, b in zip(params, params_copy):
        assert torch.equal(a, b)
    assert opt_copy.state[params_copy[0]]["exp_avg"] is not opt.state[params[0]]["exp_avg"]
    opt_copy.param_groups[0]["lr"] = 5.0
    assert opt.param_groups[0]["lr"] == 1e-3


def test_repr(backend):
    params = twins()[0]
    opt = DPSAdamW([{"params": params[:1]}, {"params": params[1:], "dps": False, "lr": 0.5}],
                   update_steps=US, backend=backend, lr=torch.tensor(0.01))
    text = repr(opt)
    ref = repr(torch.optim.AdamW(params, lr=torch.tensor(0.01)))
    assert text.startswith("DPSAdamW (") and ref.startswith("AdamW (")
    for index in (0, 1):
        assert f"Parameter Group {index}" in text
    for key in ("lr", "betas", "eps", "weight_decay", "p", "freeze", "dps"):
        assert re.search(rf"^    {key}: ", text, re.M), key
    lr_line = re.search(r"^    lr: .*$", ref, re.M).group()   # AdamW's print of a tensor lr
    assert "    lr: 0.5" in text.splitlines() and lr_line in text.splitlines()


# ---- non-contiguous parameters -----------------------------------------------------------------

def non_contiguous():
    gen = torch.Generator().manual_seed(3)
    transposed = torch.randn(4, 5, generator=gen).t()    # dense, other strides
    strided = torch.randn(5, 8, generator=gen)[:, ::2]   # not dense
    return [transposed, strided]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_non_contiguous_parameters_step(backend, p):
    """AdamW steps non-contiguous parameters; so does every backend (the fused ones hand
    them to the torch backend, with a warning). p=0: AdamW's trajectory; p=0.3: the torch
    backend's on contiguous copies, across a selection."""
    values = non_contiguous()
    ours = [nn.Parameter(v.clone(memory_format=torch.preserve_format)) for v in values]
    ours[1] = nn.Parameter(torch.empty(5, 8)[:, ::2].copy_(values[1]))
    assert not any(param.is_contiguous() for param in ours)
    theirs = [nn.Parameter(v.contiguous().clone()) for v in values]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = DPSAdamW(ours, update_steps=US, p=p, backend=backend)
    refused = [w for w in caught if "using the torch backend" in str(w.message)]
    assert bool(refused) is (backend != "torch")
    ref = (torch.optim.AdamW(theirs) if p == 0.0
           else DPSAdamW(theirs, update_steps=US, p=p, backend="torch"))
    for step in range(5):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        if p and step == 2:   # the next step is a Stage II one: the same subnetworks
            for a, b in zip(ours, theirs):
                assert torch.equal(opt.subnetwork(a), ref.subnetwork(b))
    assert_close(ours, theirs)
