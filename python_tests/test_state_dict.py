"""Checkpoints: a run saved mid Stage I or mid Stage II and resumed in a fresh process-like
setting (new model, new optimizer, torch.save/torch.load) continues bit-identically."""
import io

import pytest
import torch

from dps_kernels import DPSAdamW
from test_optimizer import batches, make, mse

US = 3


def train(model, opt, data):
    for batch in data:
        model.train()
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# Steps 1-3 Stage I, 4-6 Stage II, 7-9 Stage I... Saved after step 8 (mid Stage I), after
# step 4 (mid Stage II; an earlier version used 2 * US + 2 = 8 here too) and right after the
# selection at step 3 (bits packed, Mix's GAM buffer just handed over to W').
@pytest.mark.parametrize("stop_at", [US + 2 * US - 1, US + 1, US],
                         ids=["mid-stage1", "mid-stage2", "at-selection"])
@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_resume_is_bit_identical(mode, stop_at, dtype):
    kw = dict(mode=mode, p=0.4, update_steps=US, weight_decay=0.02, lr=2e-2, seed=5,
              adamw_style="hf_legacy")
    data = batches(4 * US, dtype)

    full = make(dtype)
    full_opt = DPSAdamW.from_model(full, **kw)
    train(full, full_opt, data)

    first = make(dtype)
    first_opt = DPSAdamW.from_model(first, **kw)
    train(first, first_opt, data[:stop_at])
    checkpoint = roundtrip({"model": first.state_dict(), "opt": first_opt.state_dict()})

    resumed = make(dtype, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = DPSAdamW.from_model(resumed, **kw)
    resumed_opt.load_state_dict(checkpoint["opt"])
    for p in resumed.parameters():
        st = resumed_opt.state[p]
        if "gam" in st:
            assert st["gam"].dtype == torch.float32 and st["threshold"].dtype == torch.float32
            assert st["exp_avg"].dtype == dtype
        if "fam" in st:
            assert st["fam"].dtype == torch.float32 and st["anchor"].dtype == dtype
    train(resumed, resumed_opt, data[stop_at:])

    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_gam_is_not_rounded_to_bf16_on_load():
    model = make(torch.bfloat16)
    opt = DPSAdamW.from_model(model, update_steps=US)
    train(model, opt, batches(2, torch.bfloat16))
    gam = opt.state[model.hidden.weight]["gam"].clone()
    assert not torch.equal(gam, gam.to(torch.bfloat16).float())  # bf16 would lose bits
    opt.load_state_dict(roundtrip(opt.state_dict()))
    assert torch.equal(opt.state[model.hidden.weight]["gam"], gam)


@pytest.mark.parametrize("field, value", [("mode", "mix"), ("update_steps", 4), ("seed", 1),
                                          ("adamw_style", "hf_legacy")])
def test_loading_into_a_differently_built_optimizer_is_refused(field, value):
    model = make(torch.float32)
    kw = dict(mode="dense", update_steps=US, seed=0, adamw_style="torch")
    sd = DPSAdamW.from_model(model, **kw).state_dict()
    kw[field] = value
    other = DPSAdamW.from_model(make(torch.float32), **kw)
    with pytest.raises(ValueError, match=f"saved with {field}="):
        other.load_state_dict(sd)


def test_plain_adamw_state_is_refused():
    model = make(torch.float32)
    sd = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="not saved by DPSAdamW"):
        DPSAdamW.from_model(model, update_steps=US).load_state_dict(sd)
