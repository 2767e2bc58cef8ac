"""``DPSAdamW``: AdamW with Dynamic Parameter Selection (Dense and Mix), as a drop-in optimizer.

The optimizer owns the schedule (``schedule.py``), the per-parameter state and the Mix
bookkeeping; the arithmetic is delegated to a backend (``backends/``): ``torch`` (portable
reference ops), ``triton`` (fused GPU kernels) or ``cpu`` (fused C++), chosen per device by
``backend="auto"``.

Per DPS parameter and optimizer step ``t`` (1-based, per parameter like torch's AdamW):

* Stage I: ``GAM`` accumulates ``g*g`` (restarting at the stage's first step) and AdamW
  updates every element. Mix also counts in ``FAM`` how often each column was kept.
* right after the last Stage I step: the subnetwork is chosen, ``thr = k-th largest``
  of the score (``GAM``, or ``GAM * column_factor`` for Mix); Mix also snapshots ``W'``.
  The per-element mask is never stored: it is ``score >= thr``.
* Stage II: AdamW on the masked gradient (Dense), or on the gradient the Mix backward
  already masked; ``freeze=True`` leaves unselected elements untouched instead.

State per DPS parameter: ``exp_avg``/``exp_avg_sq`` (param dtype, as ``torch.optim.AdamW``),
``gam`` (fp32), ``threshold`` (0-d fp32); Mix adds ``anchor`` (W0) and ``stage_anchor``
(W', both param dtype), ``fam`` and ``column_factor`` (fp32 per column).
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Optional

import torch

from . import reference as ref
from .backends import BACKEND_NAMES, auto_backend_name, get_backend, unavailable_reason
from .backends.base import MixMask, StepKind, TensorStep
from .mask_hash import column_keep_mask, columns_of, keep_threshold, step_key
from .schedule import (STAGE_ONE, is_last_of_stage_one, is_stage_start, resolve_update_steps,
                       selected_count, stage_of)

MODES = ("dense", "mix")
# State that is fp32 whatever the parameter dtype: restored as saved by load_state_dict,
# where torch would cast it to the parameter's dtype.
FP32_STATE_KEYS = ("gam", "fam", "threshold", "column_factor")
STATE_FORMAT = 1


def _check_number(name, value, low, high=None, low_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
        raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")


class DPSAdamW(torch.optim.Optimizer):
    """AdamW with Dynamic Parameter Selection (Zhang et al., NeurIPS 2022).

    Args:
        params: parameters or param groups. A group may carry ``"dps": False`` to get plain
            AdamW (default True), and its own ``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``p`` and ``freeze``.
        mode: ``"dense"`` (DPS Dense) or ``"mix"`` (DPS Mix; the model must be wired with
            :func:`dps_kernels.attach`, which :meth:`from_model` does).
        p: fraction of each DPS tensor NOT updated in Stage II, in ``[0, 1)``.
        total_steps, update_ratio, update_steps: stage length ``us`` = ``update_steps`` or
            ``int(total_steps * update_ratio)``.
        freeze: leave unselected elements (weight and moments) untouched instead of masking
            their gradient.
        adamw_style: ``"torch"`` (``torch.optim.AdamW``) or ``"hf_legacy"`` (transformers 4.7
            AdamW, as in the paper's runs).
        seed: seed of the Mix Stage I keep-masks (counter-based, identical on every backend).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpu"``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 mode="dense", p=0.3, total_steps=None, update_ratio=None, update_steps=None,
                 freeze=False, adamw_style="torch", seed=0, backend="auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if adamw_style not in ref.ADAMW_STYLES:
            raise ValueError(f"adamw_style must be one of {ref.ADAMW_STYLES}, got {adamw_style!r}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if backend != "auto":
            reason = unavailable_reason(backend)
            if reason is not None:
                raise RuntimeError(f"backend={backend!r} is not available here: {reason}")
        self.mode = mode
        self.update_steps = resolve_update_steps(total_steps, update_ratio, update_steps)
        self.adamw_style = adamw_style
        self.seed = seed
        self.backend_request = backend
        self._param_index: dict[int, int] = {}   # id(param) -> index (hash key, messages)
        self._group_index: dict[int, int] = {}   # id(param) -> index into param_groups
        self._backend_cache: dict[int, object] = {}
        self._fallback_warned: set[tuple[str, str]] = set()
        self._wired: dict[int, object] = {}  # id(param) -> wiring handle (Mix)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, p=p,
                        freeze=freeze, dps=True)
        super().__init__(params, defaults)
        if mode == "mix":
            # W0 is the weight when the optimizer is built; the first forward needs it.
            for group in self.param_groups:
                if group["dps"]:
                    for param in group["params"]:
                        self._init_state(param, group)

    # ------------------------------------------------------------------ groups, state
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_number("lr", group["lr"], 0.0)
        _check_number("eps", group["eps"], 0.0)
        _check_number("weight_decay", group["weight_decay"], 0.0)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_number("betas[0]", betas[0], 0.0, 1.0)
        _check_number("betas[1]", betas[1], 0.0, 1.0)
        _check_number("p", group["p"], 0.0, 1.0)
        for flag in ("freeze", "dps"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"{flag} must be a bool, got {group[flag]!r}")
        for param in group["params"]:
            self._param_index.setdefault(id(param), len(self._param_index))
            self._group_index[id(param)] = len(self.param_groups) - 1
            if group["dps"] and not param.is_floating_point():
                raise TypeError(
                    f"DPS parameter #{self._param_index[id(param)]} (shape {tuple(param.shape)}) "
                    f"must be floating point, got dtype {param.dtype}; put it in a group "
                    f"with 'dps': False")
            if param.is_complex():
                raise TypeError(f"parameter #{self._param_index[id(param)]} is complex "
                                f"({param.dtype}); DPSAdamW supports real parameters only")

    def _group_of(self, param) -> dict:
        index = self._group_index.get(id(param))
        if index is None:
            raise ValueError(
                f"parameter of shape {tuple(param.shape)} is not managed by this optimizer")
        return self.param_groups[index]

    def _init_state(self, param, group) -> dict:
        state = self.state[param]
        if "step" in state:
            return state
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["dps"]:
            state["gam"] = torch.zeros_like(param, dtype=torch.float32,
                                            memory_format=torch.contiguous_format)
            state["threshold"] = torch.zeros((), dtype=torch.float32, device=param.device)
            if self.mode == "mix":
                cols = columns_of(param.shape)
                state["fam"] = torch.zeros(cols, dtype=torch.float32, device=param.device)
                state["column_factor"] = torch.ones(cols, dtype=torch.float32,
                                                    device=param.device)
                state["anchor"] = param.detach().clone(memory_format=torch.contiguous_format)
                state["stage_anchor"] = state["anchor"].clone()
        return state

    # ------------------------------------------------------------------ backends
    def _backend_for(self, param):
        backend = self._backend_cache.get(id(param))
        if backend is not None:
            return backend
        request = self.backend_request
        name = auto_backend_name(param.device.type) if request == "auto" else request
        backend = get_backend(name)
        reason = backend.supports(param)
        if reason is not None:
            where = (f"parameter #{self._param_index[id(param)]} ({tuple(param.shape)}, "
                     f"{param.dtype}, {param.device})")
            if request != "auto":
                raise ValueError(f"backend={request!r} cannot step {where}: {reason}")
            if (name, reason) not in self._fallback_warned:
                self._fallback_warned.add((name, reason))
                warnings.warn(f"dps_kernels: backend {name!r} cannot step {where} ({reason}); "
                              f"using the torch backend for it and for every other parameter "
                              f"refused for the same reason", stacklevel=3)
            backend = get_backend("torch")
        self._backend_cache[id(param)] = backend
        return backend

    # ------------------------------------------------------------------ the step
    def _check_grad(self, param, group):
        grad = param.grad
        where = f"parameter #{self._param_index[id(param)]} (shape {tuple(param.shape)})"
        if grad.is_sparse:
            raise RuntimeError(f"DPSAdamW does not support sparse gradients ({where})")
        if grad.is_complex():
            raise RuntimeError(f"DPSAdamW does not support complex gradients ({where})")
        if self.mode == "mix" and group["dps"] and id(param) not in self._wired:
            raise RuntimeError(
                f"DPSAdamW(mode='mix') was stepped, but DPS {where} is not wired to a model: "
                f"call dps_kernels.attach(model, optimizer) or build the optimizer with "
                f"DPSAdamW.from_model(model, mode='mix', ...)")

    def _task(self, param, group, state, t) -> TensorStep:
        beta1, beta2 = group["betas"]
        scalars = ref.adamw_scalars(group["lr"], beta1, beta2, group["eps"],
                                    group["weight_decay"], t, self.adamw_style)
        task = TensorStep(StepKind.PLAIN, param, param.grad, state["exp_avg"],
                          state["exp_avg_sq"], scalars)
        if not group["dps"]:
            return task
        task.gam = state["gam"]
        task.cols = columns_of(param.shape)
        first_stage = stage_of(t, self.update_steps) == STAGE_ONE
        task.reset = first_stage and is_stage_start(t, self.update_steps)
        if self.mode == "dense":
            task.kind = StepKind.DENSE_STAGE1 if first_stage else StepKind.DENSE_STAGE2
            task.threshold = state["threshold"]
            return task
        task.fam = state["fam"]
        if first_stage:
            task.kind = StepKind.MIX_STAGE1
            task.mix_key = step_key(self.seed, self._param_index[id(param)], t)
            task.keep_threshold = keep_threshold(group["p"])
        else:
            task.kind = StepKind.MIX_STAGE2
            task.threshold = state["threshold"]
            task.column_factor = state["column_factor"]
        return task

    def _select(self, due: list) -> None:
        """Choose the Stage II subnetworks right after the last Stage I step.

        ``due`` holds ``(param, group, state, backend)`` of every tensor that just closed
        Stage I; each backend gets all of its tensors in one ``select_thresholds`` call.
        """
        by_backend: dict[int, tuple[object, list]] = {}
        for param, group, state, backend in due:
            if self.mode == "mix":
                state["column_factor"] = ref.mix_column_factor(state["fam"], self.update_steps)
                state["stage_anchor"].copy_(param.detach())
            by_backend.setdefault(id(backend), (backend, []))[1].append((param, group, state))
        for backend, entries in by_backend.values():
            items = [(state["gam"], state["column_factor"] if self.mode == "mix" else None,
                      selected_count(param.numel(), group["p"]))
                     for param, group, state in entries]
            for (_, _, state), threshold in zip(entries, backend.select_thresholds(items)):
                state["threshold"] = threshold

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            batches: dict[int, tuple[object, list[TensorStep]]] = {}
            stepped = []
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._check_grad(param, group)
                state = self._init_state(param, group)
                t = state["step"] + 1
                backend = self._backend_for(param)
                batches.setdefault(id(backend), (backend, []))[1].append(
                    self._task(param, group, state, t))
                stepped.append((param, state, t, backend))
            for backend, tasks in batches.values():
                backend.step(tasks, group["freeze"])
            due = []
            for param, state, t, backend in stepped:
                state["step"] = t
                if group["dps"] and is_last_of_stage_one(t, self.update_steps):
                    due.append((param, group, state, backend))
            if due:
                self._select(due)
        return loss

    # ------------------------------------------------------------------ Mix forward support
    def _mix_mask(self, param) -> MixMask:
        """The mask of the Mix forward for the step about to be taken (state step + 1)."""
        group = self._group_of(param)
        state = self._init_state(param, group)
        t = state["step"] + 1
        cols = columns_of(param.shape)
        if stage_of(t, self.update_steps) == STAGE_ONE:
            return MixMask(cols, column_key=step_key(self.seed, self._param_index[id(param)], t),
                           keep_threshold=keep_threshold(group["p"]))
        return MixMask(cols, gam=state["gam"], column_factor=state["column_factor"],
                       threshold=state["threshold"])

    def _mix_anchor(self, param) -> torch.Tensor:
        state = self.state[param]
        if stage_of(state["step"] + 1, self.update_steps) == STAGE_ONE:
            return state["anchor"]
        return state["stage_anchor"]

    def is_mix_param(self, param) -> bool:
        """True when ``param`` is a DPS parameter of this optimizer in Mix mode."""
        if self.mode != "mix" or id(param) not in self._param_index:
            return False
        return self._group_of(param)["dps"]

    # ------------------------------------------------------------------ introspection
    def stage(self, param=None) -> int:
        """Stage (1 or 2) of the next step of ``param`` (default: the first parameter)."""
        if param is None:
            param = self.param_groups[0]["params"][0]
        state = self.state.get(param, {})
        return stage_of(state.get("step", 0) + 1, self.update_steps)

    def stage_one_mask(self, param, step: int) -> torch.Tensor:
        """Mix keep-mask (bool, one entry per input feature) of 1-based Stage I ``step``."""
        if not self.is_mix_param(param):
            raise ValueError("stage_one_mask needs a DPS parameter of an optimizer in mode='mix'")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be a 1-based int, got {step!r}")
        if stage_of(step, self.update_steps) != STAGE_ONE:
            raise ValueError(f"step {step} is in Stage II (update_steps={self.update_steps}); "
                             f"Stage I keep-masks exist only for Stage I steps")
        group = self._group_of(param)
        key = step_key(self.seed, self._param_index[id(param)], step)
        return column_keep_mask(key, keep_threshold(group["p"]), columns_of(param.shape),
                                param.device)

    def subnetwork(self, param) -> Optional[torch.Tensor]:
        """Bool mask (param's shape) the next step uses if it is in Stage II, else None."""
        group = self._group_of(param)
        if not group["dps"]:
            raise ValueError("subnetwork() needs a DPS parameter (its group has 'dps': False)")
        state = self.state.get(param, {})
        if stage_of(state.get("step", 0) + 1, self.update_steps) == STAGE_ONE:
            return None
        score = state["gam"]
        if self.mode == "mix":
            score = ref.mix_score(score, state["column_factor"])
        return ref.selection_mask(score, state["threshold"])

    def selected_fraction(self) -> Optional[float]:
        """Fraction of DPS elements in the current subnetwork (None while in Stage I)."""
        selected = total = 0
        for group in self.param_groups:
            if not group["dps"]:
                continue
            for param in group["params"]:
                mask = self.subnetwork(param) if param in self.state else None
                if mask is not None:
                    selected += int(mask.sum())
                    total += mask.numel()
        return selected / total if total else None

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, GAM, masks, anchors...)."""
        return sum(v.numel() * v.element_size() for s in self.state.values()
                   for v in s.values() if torch.is_tensor(v))

    # ------------------------------------------------------------------ checkpoints
    def _config(self) -> dict:
        return {"format": STATE_FORMAT, "mode": self.mode, "update_steps": self.update_steps,
                "seed": self.seed, "adamw_style": self.adamw_style}

    def state_dict(self):
        sd = super().state_dict()
        sd["dps"] = self._config()
        return sd

    def load_state_dict(self, state_dict):
        saved = state_dict.get("dps")
        if saved is None:
            raise ValueError("this state_dict was not saved by DPSAdamW (no 'dps' entry)")
        mine = self._config()
        for key, value in saved.items():
            if mine.get(key) != value:
                raise ValueError(f"cannot load a DPSAdamW state saved with {key}={value!r} into "
                                 f"an optimizer built with {key}={mine.get(key)!r}")
        state_dict = {k: v for k, v in state_dict.items() if k != "dps"}
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to the parameter's dtype; GAM, FAM and
        # the thresholds must stay fp32 (a bf16 GAM would change the selection).
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            saved_state = state_dict["state"].get(saved_id, {})
            for key in FP32_STATE_KEYS:
                if key in saved_state:
                    self.state[param][key] = saved_state[key].to(device=param.device,
                                                                 dtype=torch.float32, copy=True)

    # ------------------------------------------------------------------ construction helper
    @classmethod
    def from_model(cls, model: torch.nn.Module, *, targets=None, no_decay=None,
                   weight_decay: float = 0.0, **kwargs) -> "DPSAdamW":
        """Build the optimizer for ``model``: DPS on the targeted weights, HF-style decay groups.

        ``targets``: module types whose ``weight`` is DPS and/or ``fnmatch`` patterns on full
        parameter names (default: every ``nn.Linear`` weight). ``no_decay``: ``fnmatch``
        patterns of parameters without weight decay (default: biases and norm-layer weights).
        In ``mode="mix"`` the model is wired (:func:`dps_kernels.attach`).
        """
        from .model_groups import build_param_groups
        from .mix import attach

        groups = build_param_groups(model, targets=targets, no_decay=no_decay,
                                    weight_decay=weight_decay)
        optimizer = cls(groups, **kwargs)
        if optimizer.mode == "mix":
            attach(model, optimizer)
        return optimizer
