"""DPSAdamW against the independent oracle (dps_oracle.py) over several full DPS cycles.

Matrix: mode dense/mix x freeze x AdamW style x fp32/bf16, non-default hyperparameters
(betas, eps, weight decay on the DPS group), a model whose DPS weights have 1, 65, 429 and
2145 elements. Every step compares all parameters; every Stage II step compares the
subnetwork mask with the oracle's sort-based one; every Mix Stage I step the keep-mask.

Tolerance: none. The torch backend and the oracle evaluate the same fp32 element-wise
formulas in the same order (the oracle only materialises masks and sorts instead of
selecting), so parameters must be bit-identical; any schedule, mask or threshold slip of
one step or one element shows up as a difference.
"""

import pytest
import torch
from torch import nn

from dps_kernels import DPSAdamW
from dps_oracle import OracleDPS

LR, BETAS, EPS, WD = 3e-2, (0.85, 0.99), 1e-7, 0.05


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(13, 33)       # 429 weights, odd
        self.norm = nn.LayerNorm(33)
        self.hidden = nn.Linear(33, 65)    # 2145 weights, more than one 1024 block
        self.out = nn.Linear(65, 1)        # one row
        self.scale = nn.Linear(1, 1)       # a single weight

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)))
        h = torch.tanh(self.hidden(h))
        return self.scale(self.out(h))


DPS_NAMES = ["inp.weight", "hidden.weight", "out.weight", "scale.weight"]


def mse(model, batch):
    x, y = batch
    return (model(x).float() - y).pow(2).mean()


def make(dtype, seed=0):
    torch.manual_seed(seed)
    return Net().to(dtype)


def batches(n, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 13, generator=g).to(dtype), torch.randn(8, 1, generator=g))
            for _ in range(n)]


def build(model, **kw):
    named = dict(model.named_parameters())
    groups = [{"params": [named[n] for n in DPS_NAMES], "weight_decay": WD},
              {"params": [p for n, p in named.items() if n not in DPS_NAMES], "dps": False,
               "weight_decay": 0.0}]
    opt = DPSAdamW(groups, lr=LR, betas=BETAS, eps=EPS, **kw)
    if kw.get("mode") == "mix":
        from dps_kernels import attach
        attach(model, opt)
    return opt


def run_against_oracle(mode, freeze, style, dtype, us=3, cycles=3, p=0.3, backend="torch",
                       seed=11, check_params=None):
    model = make(dtype)
    oracle = OracleDPS(model, DPS_NAMES, mode=mode, p=p, us=us, style=style, freeze=freeze,
                       seed=seed, lr=LR, betas=BETAS, eps=EPS, wd_dps=WD, wd_plain=0.0)
    opt = build(model, mode=mode, p=p, update_steps=us, freeze=freeze, adamw_style=style,
                seed=seed, backend=backend)
    named = dict(model.named_parameters())
    check = check_params or (lambda a, b, name, t: torch.testing.assert_close(
        a, b, rtol=0, atol=0, msg=lambda m: f"{name} after step {t}: {m}"))
    steps = 2 * us * cycles
    stage_two_steps = 0
    for t, batch in enumerate(batches(steps, dtype), start=1):
        model.train()
        opt.zero_grad()
        mse(model, batch).backward()
        oracle.loss_and_grads(mse, batch)
        if mode == "mix" and oracle.stage_one(t):
            for n in DPS_NAMES:
                keep = opt.stage_one_mask(named[n], t)
                expect = oracle.keep_mask(n, t).reshape(keep.numel() and -1, keep.numel())[0]
                assert torch.equal(keep, expect), f"{n} keep-mask at step {t}"
        if not oracle.stage_one(t):
            stage_two_steps += 1
            for n in DPS_NAMES:
                assert torch.equal(opt.subnetwork(named[n]), oracle.state[n]["mask"]), \
                    f"{n} subnetwork at step {t}"
        opt.step()
        oracle.step()
        for n, w in named.items():
            check(w.detach(), oracle.params[n].detach(), n, t)
    assert stage_two_steps == us * cycles
    return model, opt, oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("style", ["torch", "hf_legacy"])
@pytest.mark.parametrize("freeze", [False, True], ids=["mask", "freeze"])
@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_matches_oracle_over_three_cycles(mode, freeze, style, dtype):
    run_against_oracle(mode, freeze, style, dtype)


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_frequency_penalty_regime_us_at_least_50(mode):
    # us = 50 switches on the exp(-FAM/us) penalty of the Mix score; two full cycles.
    run_against_oracle(mode, freeze=False, style="torch", dtype=torch.float32, us=50, cycles=1,
                       p=0.5)


@pytest.mark.parametrize("p", [0.0, 0.9])
def test_extreme_selection_fractions(p):
    model, opt, _ = run_against_oracle("dense", False, "torch", torch.float32, us=2, cycles=1, p=p)


def test_p_zero_is_plain_adamw():
    model = make(torch.float32)
    twin = make(torch.float32)
    opt = DPSAdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, p=0.0,
                   update_steps=2)
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                foreach=False)
    for batch in batches(8, torch.float32):
        for m, o in ((model, opt), (twin, ref_opt)):
            o.zero_grad()
            mse(m, batch).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # lerp vs mul-add rounding


def test_stage_two_really_restricts_updates():
    """Not a tautology check: outside the subnetwork, Stage II moves weights only by decay
    and momentum (mask mode) or not at all (freeze mode)."""
    for freeze in (False, True):
        model = make(torch.float32)
        opt = build(model, mode="dense", p=0.5, update_steps=2, freeze=freeze)
        data = batches(3, torch.float32)
        for batch in data[:2]:
            opt.zero_grad()
            mse(model, batch).backward()
            opt.step()
        w = model.hidden.weight
        mask = opt.subnetwork(w)
        assert 0.45 < mask.float().mean() < 0.55
        before = w.detach().clone()
        opt.zero_grad()
        mse(model, data[2]).backward()
        opt.step()
        moved = (w.detach() != before)
        if freeze:
            assert not moved[~mask].any() and moved[mask].all()
        else:
            assert moved.all()  # momentum still moves unselected weights


def test_grad_none_params_are_skipped_like_torch():
    model = make(torch.float32)
    opt = build(model, mode="dense", update_steps=2)
    x, y = batches(1, torch.float32)[0]
    model.scale.weight.requires_grad_(False)
    mse(model, (x, y)).backward()
    before = model.scale.weight.detach().clone()
    opt.step()
    assert torch.equal(model.scale.weight, before)
    assert "step" not in opt.state.get(model.scale.weight, {})
    assert opt.state[model.inp.weight]["step"] == 1


def test_auto_fallback_to_torch_warns_once_per_reason(recwarn):
    from dps_kernels import available_backends
    if "cpu" not in available_backends():
        pytest.skip("the cpu backend is not built here, so auto picks torch and never falls back")
    model = make(torch.float64)  # the cpu backend takes fp32/bf16 only
    opt = DPSAdamW.from_model(model, update_steps=2)
    for batch in batches(3, torch.float64):
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    fallbacks = [w for w in recwarn if "cannot step" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
