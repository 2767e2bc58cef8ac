"""Which weights are DPS, for the models people fine-tune, and no silent plain AdamW.

Found by trying a GPT-2 built from its config: its projections are transformers
``Conv1D``, not ``nn.Linear``, and its ``lm_head`` is tied to the earlier-registered
``wte``, so ``named_parameters()`` calls the tied tensor ``transformer.wte.weight`` and the
name-based selection matched nothing: every group got ``"dps": False``, no warning, and
``stage()`` said 1 forever. ``nn.MultiheadAttention``'s ``in_proj_weight`` (torch's
``nn.Transformer*``) was never DPS either."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dps_kernels import DPSAdamW
from dps_kernels.model_groups import dps_parameters


def dps_names(opt, model):
    ids = {id(p) for g in opt.param_groups if g["dps"] for p in g["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def train(model, opt, inputs, steps=6):
    for _ in range(steps):
        opt.zero_grad()
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        loss = out.loss if hasattr(out, "loss") else out.float().pow(2).mean()
        loss.backward()
        opt.step()


def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=61,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_is_trained_by_dps_dense():
    model = gpt2()
    opt = DPSAdamW.from_model(model, mode="dense", p=0.3, update_steps=2, backend="torch")
    names = dps_names(opt, model)
    # 4 Conv1D per block and the tied head/embedding, once
    assert len(names) == 9 and "transformer.wte.weight" in names, names
    assert sum("c_attn" in n for n in names) == 2
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(1))
    train(model, opt, {"input_ids": ids, "labels": ids}, steps=3)
    assert opt.stage() == 2
    head = model.lm_head.weight
    assert head is model.transformer.wte.weight
    mask = opt.subnetwork(head)
    assert mask is not None and 0 < mask.float().mean() < 1


def test_gpt2_mix_is_refused_with_the_reason():
    model = gpt2()
    with pytest.raises(ValueError, match=r"tied into several modules|Conv1D"):
        DPSAdamW.from_model(model, mode="mix", p=0.3, update_steps=2)
    with pytest.raises(ValueError, match=r"transformers Conv1D .*axis 0"):
        DPSAdamW.from_model(model, mode="mix", p=0.3, update_steps=2,
                            targets=["*.c_fc.weight"])


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_transformer_encoder_attention_projections_are_dps(mode):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    opt = DPSAdamW.from_model(model, mode=mode, p=0.4, update_steps=2, backend="torch",
                              seed=1)
    names = dps_names(opt, model)
    assert sum(n.endswith("in_proj_weight") for n in names) == 2, names
    assert len(names) == 8, names   # in_proj, out_proj, linear1, linear2 per layer
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    if mode == "mix":   # the attention's forward reads W~ (in_proj_weight is not a Linear)
        attn = model.layers[0].self_attn
        seen = []
        handle = attn.register_forward_pre_hook(
            lambda mod, args: seen.append(mod.in_proj_weight.detach().clone()))
        model.train()
        model(x)
        handle.remove()
        assert not torch.equal(seen[0], attn.in_proj_weight.detach())
        keep = opt.stage_one_mask(attn.in_proj_weight, 1)
        # a dropped input feature takes the pretrained (here: initial) weight's mix
        assert keep.shape == (16,) and not bool(keep.all())
    train(model, opt, x)   # steps 1-6; step 7 is in Stage II
    in_proj = model.layers[1].self_attn.in_proj_weight
    assert opt.stage(in_proj) == 2
    mask = opt.subnetwork(in_proj)
    assert mask is not None and 0.55 < mask.float().mean() < 0.65


def test_a_model_with_nothing_to_select_is_refused_with_the_remedy():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match=r"Sequential: targets=.* select no trainable "
                                         r"parameter.*Conv2d.*targets=\[nn\.Conv2d\]"):
        DPSAdamW.from_model(cnn, mode="dense", update_steps=2)
    opt = DPSAdamW.from_model(cnn, mode="dense", update_steps=2, targets=[nn.Conv2d])
    assert dps_names(opt, cnn) == ["0.weight"]


def test_an_optimizer_without_dps_parameters_warns_and_has_no_stage():
    model = nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="has no DPS parameter .* trains as plain AdamW"):
        opt = DPSAdamW([{"params": model.parameters(), "dps": False}], mode="dense",
                       update_steps=2)
    with pytest.raises(ValueError, match="no DPS parameter"):
        opt.stage()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixed = DPSAdamW([{"params": [model.weight]}, {"params": [model.bias], "dps": False}],
                         mode="dense", update_steps=2)
    with pytest.raises(ValueError, match="needs a DPS parameter"):
        mixed.stage(model.bias)
    assert mixed.stage() == mixed.stage(model.weight) == 1


def test_a_tied_linear_head_is_dps_once_whatever_its_name():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.body = nn.Linear(6, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight

    model = TiedLM()
    chosen = dps_parameters(model)
    assert sorted(chosen.values()) == ["body.weight", "emb.weight"]
    by_pattern = dps_parameters(model, targets=["head.weight"])   # its second name
    assert list(by_pattern.values()) == ["emb.weight"]
