"""A tiny transformers BERT built from a config (no download), trained with from_model."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from dps_kernels import DPSAdamW  # noqa: E402


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37,
                                     max_position_embeddings=64, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 99, (4, 12), generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def test_from_model_groups_follow_the_authors_and_hf():
    model = tiny_bert()
    opt = DPSAdamW.from_model(model, update_steps=2, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    dps = {names[id(p)] for g in opt.param_groups if g["dps"] for p in g["params"]}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert dps == linear and len(dps) == 2 * 6 + 2  # q,k,v,attn-out,inter,out per layer + pooler + classifier
    for g in opt.param_groups:
        for p in g["params"]:
            name = names[id(p)]
            no_decay = name.endswith("bias") or "LayerNorm" in name
            assert g["weight_decay"] == (0.0 if no_decay else 0.01), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_tiny_bert_trains_through_both_stages(mode):
    model = tiny_bert()
    opt = DPSAdamW.from_model(model, mode=mode, update_steps=3, lr=1e-3, weight_decay=0.01)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = data(1)[0]
    losses, stages = [], []
    for _ in range(12):  # two full cycles
        model.train()
        opt.zero_grad()
        out = model(input_ids=batch[0], labels=batch[1])
        out.loss.backward()
        stages.append(opt.stage())
        opt.step()
        losses.append(out.loss.item())
    assert stages == [1, 1, 1, 2, 2, 2] * 2
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # fitting one batch: the loss must go down
    q = model.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(q, initial["bert.encoder.layer.0.attention.self.query.weight"])
    assert opt.subnetwork(q) is None  # the next step (13) is in Stage I
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=batch[0], labels=batch[1]).loss.backward()
        opt.step()
    frac = opt.selected_fraction()
    assert frac is not None and 0.69 < frac < 0.72  # k = ceil(0.7 n) per tensor


def test_tiny_bert_eval_is_deterministic_under_mix():
    model = tiny_bert()
    DPSAdamW.from_model(model, mode="mix", update_steps=3)
    model.eval()
    ids = data(1)[0][0]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
