"""The methods of the DPS paper's Table 1, plus the two controls its protocol lacks.

A method is: whether the checkpoint's dropout stays on, which optimizer (AdamW, or a
``DPSAdamW`` mode through ``DPSTrainer``), and an optional loss recipe (R3F, R-Dropout) or
initialisation recipe (Re-init). The recipes are small functions, written from the papers:

* R3F (Aghajanyan et al., 2021): ``loss + lambda * symKL(f(x), f(x + noise))`` with noise
  ``N(0, sigma^2)`` or ``U(-sigma, sigma)`` on the input embeddings. Classification only
  (the DPS paper reports vanilla for R3F on STS-B; so does this harness, as ``n/a``).
* R-Dropout (Wu et al., 2021): two dropout forwards, ``mean task loss + alpha * symKL``
  (regression: ``alpha * MSE`` between the two predictions).
* Re-init (Zhang et al., 2021): re-draw the pooler and the top ``L`` encoder layers from the
  model's own initialisation (``N(0, 0.02^2)`` for BERT).

The controls (issue 12): the paper runs DPS without dropout and vanilla with it, so
``vanilla_nodrop`` (AdamW, dropout off; ``p=0`` DPS is exactly AdamW) and ``dense_dropout``
(DPS Dense with the checkpoint's dropout) separate what selection does from what switching
dropout off does.

``SEARCH_SPACES`` are the paper's Appendix D grids (hyperparameters other than lr); a run
uses ``DEFAULTS`` unless the harness is asked for the grid.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    dropout: bool                    # keep the checkpoint's hidden/attention dropout
    dps_mode: Optional[str] = None   # a DPSAdamW mode; None: the Trainer's AdamW
    recipe: Optional[str] = None     # "r3f", "rdrop", "reinit"
    label: str = ""


METHODS = {m.name: m for m in (
    Method("vanilla", True, label="vanilla (dropout on)"),
    Method("vanilla_nodrop", False, label="vanilla, dropout off (control)"),
    Method("mixout", True, "mixout", label="Mixout"),
    Method("r3f", True, recipe="r3f", label="R3F"),
    Method("rdrop", True, recipe="rdrop", label="R-Dropout"),
    Method("childtuning_d", True, "childtuning_d", label="CHILD-TUNING_D"),
    Method("reinit", True, recipe="reinit", label="Re-init"),
    Method("dense", False, "dense", label="DPS Dense (dropout off)"),
    Method("mix", False, "mix", label="DPS Mix (dropout off)"),
    Method("dense_dropout", True, "dense", label="DPS Dense, dropout on (control)"),
    Method("mix_dropout", True, "mix", label="DPS Mix, dropout on (control)"),
)}

# Appendix D of the paper (lr is searched separately by the harness).
SEARCH_SPACES = {
    "mixout": {"p": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]},
    "r3f": {"noise": ["normal", "uniform"], "sigma": [1e-5], "lam": [0.1, 0.5, 1.0, 5.0]},
    "reinit": {"layers": [1, 2, 3, 4, 5, 6, 7]},
    "childtuning_d": {"reserve_p": [0.1, 0.2, 0.3]},
    "rdrop": {"alpha": [0.1, 0.5, 1.0, 3.0, 5.0]},
    "dense": {"p": [0.1, 0.2, 0.3, 0.4, 0.5], "update_ratio": [0.05, 0.1, 0.2]},
    "mix": {"p": [0.1, 0.2, 0.3, 0.4, 0.5], "update_ratio": [0.05, 0.1, 0.2]},
}
SEARCH_SPACES["dense_dropout"] = SEARCH_SPACES["dense"]
SEARCH_SPACES["mix_dropout"] = SEARCH_SPACES["mix"]

# One point per method when no grid is asked for (documented in examples/README.md).
DEFAULTS = {
    "mixout": {"p": 0.3},
    "r3f": {"noise": "normal", "sigma": 1e-5, "lam": 1.0},
    "reinit": {"layers": 1},
    "childtuning_d": {"reserve_p": 0.3},
    "rdrop": {"alpha": 1.0},
    "dense": {"p": 0.3, "update_ratio": 0.05},
    "mix": {"p": 0.3, "update_ratio": 0.05},
}
DEFAULTS["dense_dropout"] = DEFAULTS["dense"]
DEFAULTS["mix_dropout"] = DEFAULTS["mix"]


def grid(method: str) -> list[dict]:
    """Every hyperparameter point of ``method``'s Appendix D space (``[{}]`` if none)."""
    space = SEARCH_SPACES.get(method, {})
    points = [{}]
    for key, values in space.items():
        points = [{**point, key: value} for point in points for value in values]
    return points


def applicable(method: Method, regression: bool) -> bool:
    """R3F is not defined for regression (the paper reports vanilla for it on STS-B)."""
    return not (regression and method.recipe == "r3f")


# ----------------------------------------------------------------------------- recipes
def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """``KL(a||b) + KL(b||a)`` of the softmax distributions, summed, over the batch size."""
    la = F.log_softmax(logits_a.float(), dim=-1)
    lb = F.log_softmax(logits_b.float(), dim=-1)
    kl = F.kl_div(la, lb, log_target=True, reduction="sum") + \
        F.kl_div(lb, la, log_target=True, reduction="sum")
    return kl / logits_a.size(0)


def r3f_loss(model, inputs: dict, noise: str = "normal", sigma: float = 1e-5,
             lam: float = 1.0) -> torch.Tensor:
    """R3F: task loss on the clean input + ``lam`` * symKL(clean, noised embeddings)."""
    inputs = dict(inputs)
    input_ids = inputs.pop("input_ids")
    embeds = model.get_input_embeddings()(input_ids)
    clean = model(inputs_embeds=embeds, **inputs)
    if noise == "normal":
        eps = torch.randn_like(embeds) * sigma
    else:
        eps = (torch.rand_like(embeds) * 2 - 1) * sigma
    noised = model(inputs_embeds=embeds + eps, **{k: v for k, v in inputs.items() if k != "labels"})
    return clean.loss + lam * symmetric_kl(clean.logits, noised.logits)


def rdrop_loss(model, inputs: dict, alpha: float = 1.0) -> torch.Tensor:
    """R-Dropout: two dropout forwards; mean task loss + ``alpha`` * their divergence."""
    first = model(**inputs)
    second = model(**inputs)
    task = 0.5 * (first.loss + second.loss)
    if first.logits.size(-1) == 1:   # regression
        return task + alpha * F.mse_loss(first.logits.float(), second.logits.float())
    return task + alpha * 0.5 * symmetric_kl(first.logits, second.logits)


def reinit_top_layers(model, layers: int) -> None:
    """Re-init: re-draw the pooler and the top ``layers`` encoder layers as BERT initialises
    them: Linear weights ``N(0, initializer_range^2)`` (0.02), zero biases, unit LayerNorms.
    (Written out: recent transformers' ``_init_weights`` skips modules already marked
    initialised, so calling it after ``from_pretrained`` changes nothing.)"""
    base = getattr(model, model.base_model_prefix)
    encoder_layers = base.encoder.layer
    if not 1 <= layers <= len(encoder_layers):
        raise ValueError(f"reinit layers must be in [1, {len(encoder_layers)}] for this model, "
                         f"got {layers}")
    modules = list(encoder_layers[-layers:].modules())
    if getattr(base, "pooler", None) is not None:
        modules += list(base.pooler.modules())
    std = model.config.initializer_range
    with torch.no_grad():
        for module in modules:
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
