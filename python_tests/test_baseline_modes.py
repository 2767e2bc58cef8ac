"""The paper's subnetwork baselines as DPSAdamW modes, against references written from the
official code, on every backend available here (triton under the interpreter).

* ``mixout``: ``bloodwass/mixout``'s ``Mixout`` function (mask over input features, one row
  repeated over the output rows; forward ``((1-M)*W0 + M*W - p*W0)/(1-p)``; backward
  ``grad * M``) in ``MixLinear`` plus ``torch.optim.AdamW``. The official code draws M with
  ``bernoulli_``; the reference takes M from ``opt.stage_one_mask`` (our counter hash), so
  the two runs are comparable step by step.
* ``childtuning_d``: AliceMind's ``calculate_fisher`` (per-parameter clipping, ``g**2 / N``,
  ``np.percentile`` over the concatenation) and ``ChildTuningAdamW`` (``grad *= mask`` then
  the transformers-4.x AdamW, our ``adamw_style="hf_legacy"``).
* ``childtuning_f``: ``ChildTuningAdamW``'s F branch (``grad *= Bernoulli(reserve_p) /
  reserve_p``) with the Bernoulli draw replaced by our per-element counter hash.

Tolerances: weights within rtol 1e-5 / atol 1e-7 after every step, as in
``test_cross_backend.py``: the fused kernels and torch's AdamW differ by the rounding of
sqrt and of the operation order (~1 ulp per step), which the gradients carry to later steps.
Masks are compared exactly.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from dps_kernels import DPSAdamW, child_tuning_fisher
from dps_kernels.mask_hash import column_keep_mask, keep_threshold_of_fraction, step_key

from test_cross_backend import backend_params

STEPS = 7
TOL = dict(rtol=1e-5, atol=1e-7)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(11, 24)
        self.b = nn.Linear(24, 7)    # odd sizes

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def make_pair(seed=0):
    torch.manual_seed(seed)
    net = Net()
    ref = Net()
    ref.load_state_dict(net.state_dict())
    return net, ref


def batches(n=STEPS, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 11, generator=g), torch.randn(16, 7, generator=g)) for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def ref_groups(ref, lr, wd):
    """from_model's groups on the reference copy: Linear weights decay, biases do not."""
    weights = [ref.a.weight, ref.b.weight]
    biases = [ref.a.bias, ref.b.bias]
    return [{"params": weights, "weight_decay": wd}, {"params": biases, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- Mixout
class OfficialMixout(torch.autograd.Function):
    """bloodwass/mixout ``Mixout``, with the noise handed in (see module docstring)."""

    @staticmethod
    def forward(ctx, weight, target, p, column_noise):
        noise = column_noise.to(weight.dtype).repeat(weight.size(0), 1)
        ctx.save_for_backward(noise)
        return ((1 - noise) * target + noise * weight - p * target) / (1 - p)

    @staticmethod
    def backward(ctx, grad_output):
        (noise,) = ctx.saved_tensors
        return grad_output * noise, None, None, None


def ref_mixout_forward(ref, targets, masks, p, x):
    wa = OfficialMixout.apply(ref.a.weight, targets[0], p, masks[0])
    wb = OfficialMixout.apply(ref.b.weight, targets[1], p, masks[1])
    h = torch.tanh(nn.functional.linear(x, wa, ref.a.bias))
    return nn.functional.linear(h, wb, ref.b.bias)


@pytest.mark.parametrize("backend", backend_params())
def test_mixout_matches_official_mixout(backend):
    p, lr, wd = 0.4, 1e-2, 0.01
    net, ref = make_pair()
    opt = DPSAdamW.from_model(net, mode="mixout", p=p, lr=lr, weight_decay=wd, seed=5,
                              backend=backend)
    ref_opt = torch.optim.AdamW(ref_groups(ref, lr, wd), lr=lr)
    targets = [ref.a.weight.detach().clone(), ref.b.weight.detach().clone()]
    for t, (x, y) in enumerate(batches(), start=1):
        masks = [opt.stage_one_mask(net.a.weight, t), opt.stage_one_mask(net.b.weight, t)]
        assert 0 < int(masks[0].sum()) < masks[0].numel()
        opt.zero_grad()
        out = net(x)
        ((out - y) ** 2).mean().backward()
        ref_opt.zero_grad()
        ref_out = ref_mixout_forward(ref, targets, masks, p, x)
        ((ref_out - y) ** 2).mean().backward()
        torch.testing.assert_close(out, ref_out, **TOL)
        torch.testing.assert_close(net.a.weight.grad, ref.a.weight.grad, **TOL)
        opt.step()
        ref_opt.step()
        for mine, theirs in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(mine, theirs, **TOL)
        assert opt.stage(net.a.weight) == 1 and opt.subnetwork(net.a.weight) is None
    # W0 never moves: Mixout mixes with the pretrained weight at every step
    torch.testing.assert_close(opt.state[net.a.weight]["anchor"], targets[0], rtol=0, atol=0)
    net.eval()
    torch.testing.assert_close(net(x), ref(x), **TOL)   # eval uses W itself


def test_mixout_reference_detects_a_one_step_shift():
    """The check above is sharp: the mask of step t+1 instead of t fails it."""
    p = 0.4
    net, ref = make_pair()
    opt = DPSAdamW.from_model(net, mode="mixout", p=p, seed=5, backend="torch")
    targets = [ref.a.weight.detach().clone(), ref.b.weight.detach().clone()]
    x, _ = batches(1)[0]
    net(x)                  # the first training forward takes W0 (state is created lazily)
    with torch.no_grad():   # W away from W0, as after training (at W = W0, W~ = W0)
        for mine, theirs in zip(net.parameters(), ref.parameters()):
            mine.add_(0.05 * torch.randn_like(mine))
            theirs.copy_(mine)
    x, _ = batches(1)[0]
    masks = [opt.stage_one_mask(net.a.weight, 1), opt.stage_one_mask(net.b.weight, 1)]
    torch.testing.assert_close(net(x), ref_mixout_forward(ref, targets, masks, p, x), **TOL)
    masks = [opt.stage_one_mask(net.a.weight, 2), opt.stage_one_mask(net.b.weight, 2)]
    with torch.no_grad():
        assert not torch.allclose(net(x), ref_mixout_forward(ref, targets, masks, p, x), **TOL)


# ----------------------------------------------------------------------------- CHILD-TUNING_D
def official_fisher(model, data, params, max_grad_norm):
    """AliceMind ChildTuning ``calculate_fisher``: per-parameter clip, ``g**2 / N``."""
    mask = {p: p.new_zeros(p.size()) for p in params}
    n = len(data)
    model.train()
    for batch in data:
        loss_of(model, batch).backward()
        for p in params:
            torch.nn.utils.clip_grad_norm_(p, max_grad_norm)
            mask[p] += (p.grad ** 2) / n
        model.zero_grad()
    return mask


def official_percentile_mask(fisher, reserve_p):
    r = np.concatenate([v.view(-1).cpu().numpy() for v in fisher.values()])
    polar = np.percentile(r, (1 - reserve_p) * 100)
    return {p: v >= float(polar) for p, v in fisher.items()}


def hf_legacy_adamw_step(params_groups, state, lr, betas, eps, masks=None, t=1):
    """transformers 4.x ``AdamW`` (correct_bias=True) as ChildTuningAdamW runs it."""
    with torch.no_grad():
        for group in params_groups:
            for p in group["params"]:
                grad = p.grad.clone()
                if masks is not None and p in masks:
                    grad *= masks[p]
                st = state.setdefault(p, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
                st["m"].mul_(betas[0]).add_(grad, alpha=1 - betas[0])
                st["v"].mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
                denom = st["v"].sqrt().add_(eps)
                step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
                p.addcdiv_(st["m"], denom, value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-lr * group["weight_decay"])


@pytest.mark.parametrize("backend", backend_params())
def test_childtuning_d_matches_official(backend):
    reserve_p, lr, wd, clip = 0.3, 1e-2, 0.01, 1.0
    net, ref = make_pair()
    fisher_data = batches(5, seed=11)
    fisher = child_tuning_fisher(net, fisher_data, loss_of,
                                 params=[net.a.weight, net.b.weight], max_grad_norm=clip)
    ref_fisher = official_fisher(ref, fisher_data, [ref.a.weight, ref.b.weight], clip)
    for mine, theirs in zip(fisher.values(), ref_fisher.values()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)   # same ops, same order
    assert net.a.weight.grad is None

    opt = DPSAdamW.from_model(net, mode="childtuning_d", reserve_p=reserve_p, lr=lr,
                              weight_decay=wd, adamw_style="hf_legacy", backend=backend)
    kept = opt.set_child_network(fisher)
    n = sum(v.numel() for v in fisher.values())
    k = math.ceil(n * reserve_p)
    assert kept == k / n                                   # exact top-k (no ties here)
    ours = {p: opt.subnetwork(p) for p in (net.a.weight, net.b.weight)}
    official = official_percentile_mask(ref_fisher, reserve_p)
    diff = sum(int((a != b).sum()) for a, b in zip(ours.values(), official.values()))
    assert diff <= 1   # np.percentile interpolates between neighbours: at most one element
    # the union threshold is global, not per tensor: the tensors keep different fractions
    fractions = [float(m.float().mean()) for m in ours.values()]
    assert abs(fractions[0] - fractions[1]) > 0.01

    ref_masks = {rp: ours[p].to(rp.dtype) for rp, p in zip((ref.a.weight, ref.b.weight),
                                                           (net.a.weight, net.b.weight))}
    ref_state: dict = {}
    for t, batch in enumerate(batches(), start=1):
        opt.zero_grad()
        loss_of(net, batch).backward()
        ref.zero_grad()
        loss_of(ref, batch).backward()
        opt.step()
        hf_legacy_adamw_step(ref_groups(ref, lr, wd), ref_state, lr, (0.9, 0.999), 1e-8,
                             ref_masks, t)
        for mine, theirs in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(mine, theirs, **TOL)
        assert torch.equal(opt.subnetwork(net.a.weight), ours[net.a.weight])   # fixed
    # unselected elements moved only by weight decay (gradient masked, moments zero)
    assert opt.state[net.a.weight]["exp_avg"][~ours[net.a.weight]].abs().max() == 0


def test_childtuning_d_needs_its_network_and_checks_it():
    net, _ = make_pair()
    opt = DPSAdamW.from_model(net, mode="childtuning_d", reserve_p=0.2)
    loss_of(net, batches(1)[0]).backward()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="set_child_network"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match=r"parameter #1 \(shape \(7, 24\)\)"):
        opt.set_child_network({net.a.weight: torch.rand(24, 11)})
    with pytest.raises(ValueError, match="shape"):
        opt.set_child_network({net.a.weight: torch.rand(24, 11), net.b.weight: torch.rand(7)})
    with pytest.raises(ValueError, match=">= 0"):
        opt.set_child_network({net.a.weight: -torch.rand(24, 11), net.b.weight: torch.rand(7, 24)})
    assert not opt.state or all("mask_bits" not in s for s in opt.state.values())
    opt.set_child_network({net.a.weight: torch.rand(24, 11), net.b.weight: torch.rand(7, 24)})
    # every parameter has its state now, the non-DPS ones too: torch.distributed.checkpoint
    # takes an optimizer with any state for a whole one (and skips its init step)
    assert all(opt.state[p]["step"] == 0 for p in net.parameters())
    opt.step()
    with pytest.raises(RuntimeError, match="already stepped"):
        opt.set_child_network({net.a.weight: torch.rand(24, 11), net.b.weight: torch.rand(7, 24)})


# ----------------------------------------------------------------------------- CHILD-TUNING_F
@pytest.mark.parametrize("backend", backend_params())
def test_childtuning_f_matches_official(backend):
    reserve_p, lr, wd, seed = 0.35, 1e-2, 0.01, 9
    net, ref = make_pair()
    opt = DPSAdamW.from_model(net, mode="childtuning_f", reserve_p=reserve_p, lr=lr,
                              weight_decay=wd, adamw_style="hf_legacy", seed=seed,
                              backend=backend)
    index = {p: opt._param_index[id(p)] for p in (net.a.weight, net.b.weight)}
    ref_state: dict = {}
    thr = keep_threshold_of_fraction(reserve_p)
    for t, batch in enumerate(batches(), start=1):
        opt.zero_grad()
        loss_of(net, batch).backward()
        grad_before = net.a.weight.grad.clone()
        ref.zero_grad()
        loss_of(ref, batch).backward()
        masks = {}
        for rp, p in zip((ref.a.weight, ref.b.weight), (net.a.weight, net.b.weight)):
            keep = column_keep_mask(step_key(seed, index[p], t), thr, p.numel())
            masks[rp] = keep.reshape(p.shape).to(p.dtype) / reserve_p
        opt.step()
        assert torch.equal(net.a.weight.grad, grad_before)   # param.grad left as it was
        hf_legacy_adamw_step(ref_groups(ref, lr, wd), ref_state, lr, (0.9, 0.999), 1e-8,
                             masks, t)
        for mine, theirs in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(mine, theirs, **TOL)


def test_childtuning_f_masks_are_bernoulli_and_fresh_every_step():
    reserve_p, n = 0.3, 200_000
    thr = keep_threshold_of_fraction(reserve_p)
    m1 = column_keep_mask(step_key(0, 0, 1), thr, n)
    m2 = column_keep_mask(step_key(0, 0, 2), thr, n)
    sd = math.sqrt(reserve_p * (1 - reserve_p) / n)
    for m in (m1, m2):
        assert abs(float(m.float().mean()) - reserve_p) < 5 * sd
    overlap = float((m1 & m2).float().mean())            # independent draws: ~ r^2
    assert abs(overlap - reserve_p ** 2) < 5 * math.sqrt(reserve_p ** 2 / n)


# ----------------------------------------------------------------------------- arguments
def test_mode_arguments_are_not_confused():
    net, _ = make_pair()
    with pytest.raises(ValueError, match="takes reserve_p"):
        DPSAdamW(net.parameters(), mode="childtuning_f", p=0.3)
    with pytest.raises(ValueError, match="takes p"):
        DPSAdamW(net.parameters(), mode="dense", reserve_p=0.3, update_steps=2)
    with pytest.raises(ValueError, match=r"reserve_p must be .* got 1.5"):
        DPSAdamW(net.parameters(), mode="childtuning_d", reserve_p=1.5)
    with pytest.raises(ValueError, match="has no stages; drop update_steps"):
        DPSAdamW(net.parameters(), mode="mixout", update_steps=3)
    with pytest.raises(ValueError, match="freeze"):
        DPSAdamW(net.parameters(), mode="childtuning_f", freeze=True)
    with pytest.raises(ValueError, match="capturable"):
        DPSAdamW(net.parameters(), mode="mixout", capturable=True)


def test_mixout_needs_wiring():
    net, _ = make_pair()
    opt = DPSAdamW(net.parameters(), mode="mixout", p=0.2)
    loss_of(net, batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="mode='mixout'.*not wired"):
        opt.step()


@pytest.mark.parametrize("mode,extra", [("mixout", {"p": 0.2}),
                                        ("childtuning_d", {"reserve_p": 0.4}),
                                        ("childtuning_f", {"reserve_p": 0.4})])
def test_modes_resume_bit_exact(mode, extra):
    """state_dict mid-run -> fresh model and optimizer -> the same trajectory, bit for bit."""
    def build(net):
        opt = DPSAdamW.from_model(net, mode=mode, lr=1e-2, backend="torch", **extra)
        if mode == "childtuning_d" and not opt.state:
            opt.set_child_network({p: torch.rand(p.shape, generator=torch.Generator()
                                                 .manual_seed(3)) for p in
                                   (net.a.weight, net.b.weight)})
        return opt

    data = batches()
    net, _ = make_pair()
    opt = build(net)
    for batch in data[:3]:
        opt.zero_grad()
        loss_of(net, batch).backward()
        opt.step()
    saved_model = {k: v.clone() for k, v in net.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())   # state_dict() shares the live tensors
    assert saved_opt["dps"]["mode"] == mode
    for batch in data[3:]:
        opt.zero_grad()
        loss_of(net, batch).backward()
        opt.step()

    net2, _ = make_pair(seed=1)
    net2.load_state_dict(saved_model)
    opt2 = DPSAdamW.from_model(net2, mode=mode, lr=1e-2, backend="torch", **extra)
    opt2.load_state_dict(saved_opt)
    if mode == "mixout":   # W0 comes from the checkpoint, not from the resumed weight
        assert torch.equal(opt2.state[net2.a.weight]["anchor"], opt.state[net.a.weight]["anchor"])
    for batch in data[3:]:
        opt2.zero_grad()
        loss_of(net2, batch).backward()
        opt2.step()
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_state_bytes_match_the_readme_table():
    """README: beyond AdamW's 8 B, Mixout keeps W0 (4 B), CHILD-TUNING_D the Fisher (4 B)
    plus the packed mask (1 bit) and a threshold, CHILD-TUNING_F nothing."""
    def extra_bytes(mode, **kw):
        net, _ = make_pair()
        opt = DPSAdamW.from_model(net, mode=mode, backend="torch", **kw)
        if mode == "childtuning_d":
            opt.set_child_network({p: torch.rand(p.shape) for p in (net.a.weight, net.b.weight)})
        loss_of(net, batches(1)[0]).backward()
        opt.step()
        adamw = sum(8 * p.numel() for p in net.parameters())
        return opt.state_bytes() - adamw

    words = lambda n: 4 * -(-n // 32)   # noqa: E731
    assert extra_bytes("mixout", p=0.2) == 4 * (264 + 168)
    assert extra_bytes("childtuning_f", reserve_p=0.5) == 0
    assert extra_bytes("childtuning_d", reserve_p=0.5) == (4 * (264 + 168) + words(264)
                                                           + words(168) + 2 * 4)
