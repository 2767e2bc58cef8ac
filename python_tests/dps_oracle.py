"""An independent DPS implementation for tests, written straight from DPS_SPEC.md.

It shares only the already-validated AdamW arithmetic (``reference.adamw_update``, itself
tested against ``torch.optim.AdamW``) and the Mix mask generator (part of the contract) with
the package. Everything else is redone the slow, obvious way: per-element FAM and masks
materialised as tensors, selection by ``torch.sort`` of float64 scores, the schedule from
``ceil(t / us)``, and the Mix forward through ``torch.func.functional_call`` instead of hooks.
"""
from __future__ import annotations

import copy
import math

import torch

from dps_kernels import reference as ref
from dps_kernels.mask_hash import column_keep_mask, columns_of, keep_threshold, step_key


class OracleDPS:
    def __init__(self, model, dps_names, *, mode, p, us, style, freeze, seed, lr, betas, eps,
                 wd_dps, wd_plain):
        self.model = copy.deepcopy(model)
        self.params = dict(self.model.named_parameters())
        self.dps = set(dps_names)
        self.mode, self.p, self.us, self.style, self.freeze, self.seed = mode, p, us, style, freeze, seed
        self.hyper = (lr, betas[0], betas[1], eps)
        self.wd = {n: (wd_dps if n in self.dps else wd_plain) for n in self.params}
        # optimizer parameter order = DPS group first, then the plain group (as the tests build it)
        order = [n for n in self.params if n in self.dps] + [n for n in self.params if n not in self.dps]
        self.index = {n: i for i, n in enumerate(order)}
        self.t = 0
        self.state = {}
        for n, w in self.params.items():
            s = {"m": torch.zeros_like(w), "v": torch.zeros_like(w)}
            if n in self.dps:
                s["gam"] = torch.zeros_like(w, dtype=torch.float32)
                s["fam"] = torch.zeros_like(w, dtype=torch.float32)
                s["mask"] = None
                s["anchor"] = w.detach().clone()
            self.state[n] = s

    # -- schedule, from the spec's formulas
    def stage_one(self, t):
        return math.ceil(t / self.us) % 2 == 1

    def keep_mask(self, name, t):
        w = self.params[name]
        cols = columns_of(w.shape)
        keep = column_keep_mask(step_key(self.seed, self.index[name], t), keep_threshold(self.p), cols)
        return keep.expand(w.numel() // cols, cols).reshape(w.shape)

    def forward_weights(self):
        """Mix training weights W~ for the next step (leaf tensors, to read their gradient)."""
        t = self.t + 1
        out = {}
        for n in self.dps:
            w, s = self.params[n].detach(), self.state[n]
            mask = self.keep_mask(n, t) if self.stage_one(t) else s["mask"]
            anchor = s["anchor"] if self.stage_one(t) else s["stage_anchor"]
            m = mask.float()
            mixed = (m * w.float() + (1 - m) * anchor.float() - self.p * anchor.float()) / (1 - self.p)
            out[n] = (mixed.to(w.dtype).requires_grad_(), mask)
        return out

    def loss_and_grads(self, loss_fn, batch):
        """Gradients as the optimizer receives them: masked through the Mix backward."""
        for w in self.params.values():
            w.grad = None
        if self.mode == "mix":
            mixed = self.forward_weights()
            loss = loss_fn(lambda x: torch.func.functional_call(
                self.model, {n: v for n, (v, _) in mixed.items()}, (x,)), batch)
            loss.backward()
            for n, (v, mask) in mixed.items():
                self.params[n].grad = v.grad * mask.to(v.grad.dtype)
        else:
            loss = loss_fn(self.model, batch)
            loss.backward()
        return loss

    def step(self):
        self.t += 1
        t = self.t
        first = (t - 1) % self.us == 0
        for n, w in self.params.items():
            if w.grad is None:
                continue
            s = self.state[n]
            scal = ref.adamw_scalars(*self.hyper[:1], self.hyper[1], self.hyper[2], self.hyper[3],
                                     self.wd[n], t, self.style)
            g = w.grad
            with torch.no_grad():
                if n not in self.dps:
                    ref.adamw_update(w, g, s["m"], s["v"], scal)
                    continue
                if self.stage_one(t):
                    if first:
                        s["gam"].zero_()
                        s["fam"].zero_()
                    s["gam"] += g.float() ** 2
                    update_mask = None
                    if self.mode == "mix":
                        keep = self.keep_mask(n, t)
                        s["fam"] += keep.float()
                        update_mask = keep if self.freeze else None
                    ref.adamw_update(w, g, s["m"], s["v"], scal, update_mask)
                    if t % self.us == 0:
                        self.select(n)
                else:
                    mask = s["mask"]
                    if self.mode == "dense" and not self.freeze:
                        ref.adamw_update(w, g * mask.to(g.dtype), s["m"], s["v"], scal)
                    else:
                        ref.adamw_update(w, g, s["m"], s["v"], scal, mask if self.freeze else None)

    def select(self, n):
        s, w = self.state[n], self.params[n]
        score = s["gam"].double()
        if self.mode == "mix":
            f = s["fam"].double().clamp(min=1.0)
            score = score / f
            if self.us >= 50:
                score = score * torch.exp(-f / self.us)
        k = math.ceil(round(w.numel() * (1 - self.p), 9))
        thr = torch.sort(score.flatten(), descending=True).values[k - 1]
        s["mask"] = score >= thr
        s["stage_anchor"] = w.detach().clone()
