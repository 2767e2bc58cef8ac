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
``gam`` (fp32; in host-scheduled Mix it holds W' during Stage II), ``threshold`` (0-d fp32),
``mask_bits`` (the packed subnetwork; host-scheduled only); Mix adds ``anchor`` (W0, param
dtype), ``fam`` and ``column_factor`` (fp32 per column), and capturable Mix ``stage_anchor``
(W', param dtype).

The paper's subnetwork baselines are modes on the same kernels (``docs/baselines.md``):
``mixout`` (Mix Stage I forever, plain AdamW step; state: ``anchor``), ``childtuning_d``
(Dense Stage II forever with one global subnetwork from ``set_child_network``; state:
``gam`` = the Fisher, ``threshold``, ``mask_bits`` unless sharded) and ``childtuning_f``
(plain AdamW on a gradient masked per step by the counter hash; no extra state).
"""
from __future__ import annotations

import collections
import itertools
import operator
import warnings
from typing import Optional

import torch

from . import checkpoint, hyperparams, selection
from .distributed import first_element, is_sharded, local, refuse_flat, shard_group
from . import reference as ref
from .backends import BACKEND_NAMES, auto_backend_name, get_backend, unavailable_reason
from .group_plan import GroupPlan, mix_factor_table
from .mask_bits import num_words, unpack_mask
from .mask_hash import (column_keep_mask, columns_of, element_keep_mask, key_base,
                        keep_threshold, keep_threshold_of_fraction, step_key)
from .mix import WIRED_MODES, attach, wired_to
from .modes import (CHILD_MODES, CYCLIC_MODES, DEFAULT_P, DEFAULT_RESERVE_P,  # noqa: F401
                    MODES, check_number, mode_fractions)
from .model_groups import build_param_groups, dps_parameters, refuse_unwired_mix_targets
from .schedule import (STAGE_ONE, STAGE_TWO, is_last_of_stage_one, is_stage_start,
                       resolve_update_steps, selected_count, stage_of)
from .step_types import MAX_TENSOR_ELEMENTS, GroupStep, MixMask, StepKind, TensorStep

_check_number = check_number
_GRAD = operator.attrgetter("grad")
# What a copy or a pickle of the optimizer keeps besides torch's defaults/state/groups.
_PICKLED_SETTINGS = ("mode", "update_steps", "adamw_style", "seed", "backend_request",
                     "capturable", "fp32_moments", "reserve_p")
_steps_taken = checkpoint.steps_taken
STATE_FORMAT = checkpoint.STATE_FORMAT            # re-exported (older imports)
FP32_STATE_KEYS = checkpoint.FP32_STATE_KEYS


class DPSAdamW(torch.optim.Optimizer):
    """AdamW with Dynamic Parameter Selection (Zhang et al., NeurIPS 2022).

    Args:
        params: parameters or param groups. A group may carry ``"dps": False`` to get plain
            AdamW (default True), and its own ``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``p`` and ``freeze``; the other settings below are per optimizer, and a group
            that sets one is refused.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``, defaults included
            (``weight_decay=0.01``), checked as it checks them and before ``params``; ``lr``
            may be a one-element tensor (kept, so schedulers update it in place), betas
            one-element tensors (turned into floats).
        mode: ``"dense"`` (DPS Dense) or ``"mix"`` (DPS Mix; the model must be wired with
            :func:`dps_kernels.attach`, which :meth:`from_model` does), or one of the
            paper's subnetwork baselines on the same kernels (``docs/baselines.md``):
            ``"mixout"`` (Mixout: DPS Mix Stage I at every step; wired like Mix),
            ``"childtuning_d"`` (CHILD-TUNING_D: one fixed subnetwork, the top
            ``reserve_p`` of a Fisher pass over all DPS tensors together, chosen by
            :meth:`set_child_network` before the first step) and ``"childtuning_f"``
            (CHILD-TUNING_F: a fresh Bernoulli(``reserve_p``) gradient mask per step,
            scaled by ``1/reserve_p``). In these modes the "DPS parameters" (``dps`` groups)
            are the tensors the method targets.
        p: fraction of each DPS tensor NOT updated in Stage II, in ``[0, 1)`` (default
            0.3); in ``"mixout"`` the probability of replacing an input feature's weights by
            the pretrained ones. Not taken by the CHILD-TUNING modes.
        reserve_p: CHILD-TUNING modes only: the fraction of the targeted elements KEPT
            (updated), in ``(0, 1]`` (default 0.3); the opposite of ``p``.
        total_steps, update_ratio, update_steps: stage length ``us`` = ``update_steps`` or
            ``int(total_steps * update_ratio)`` (``"dense"``/``"mix"`` only; the other modes
            have no stages and refuse them).
        freeze: leave unselected elements (weight and moments) untouched instead of masking
            their gradient (``"dense"``, ``"mix"``, ``"childtuning_d"``).
        adamw_style: ``"torch"`` (``torch.optim.AdamW``) or ``"hf_legacy"`` (transformers 4.7
            AdamW, as in the paper's runs).
        seed: seed of the Mix Stage I keep-masks (counter-based, identical on every backend).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpu"``.
        capturable: keep step counters and hyperparameters on the device and decide the
            stage, the selection, the bias corrections and the Mix keys in the kernels, so
            every ``step()`` (and every Mix forward/backward) launches the same kernels with
            the same arguments and a whole training step can be captured in a CUDA graph.
            Triton backend only. GradScaler's scale and inf flag are then consumed in-kernel
            without a host sync. See ``docs/capturable.md``.
        fp32_moments: keep ``exp_avg``/``exp_avg_sq`` in fp32 for 16-bit parameters (+4 B
            per parameter for bf16/fp16 over torch's AdamW, which keeps them in the
            parameter's dtype); recommended for fp16 parameters. No effect on fp32 ones.
    """

    _is_dps_adamw = True   # what mix.attach() checks (it does not import this module)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler hands a capturable optimizer ``grad_scale``/``found_inf`` instead of
        # syncing; the host-scheduled path keeps GradScaler's usual skip (which accelerate
        # and the Trainer rely on to hold the LR schedule back on skipped steps).
        return self.capturable

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 mode="dense", p=None, total_steps=None, update_ratio=None, update_steps=None,
                 freeze=False, adamw_style="torch", seed=0, backend="auto", capturable=False,
                 fp32_moments=False, reserve_p=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        p, reserve_p = mode_fractions(mode, p, reserve_p)
        # Every hyperparameter is checked before params are looked at, as torch.optim.AdamW
        # does (hyperparams.py): the error names the bad value, whatever params is.
        defaults = dict(lr=lr, betas=hyperparams.scalar_betas(betas), eps=eps,
                        weight_decay=weight_decay, p=p, freeze=freeze, dps=True,
                        capturable=capturable)
        self._check_group_values(defaults)
        if mode not in CYCLIC_MODES:
            given = {name: value for name, value in (("total_steps", total_steps),
                     ("update_ratio", update_ratio), ("update_steps", update_steps))
                     if value is not None}
            if given:
                raise ValueError(f"mode={mode!r} has no stages; drop {', '.join(given)} "
                                 f"(got {given})")
            if capturable:
                raise ValueError(f"capturable=True supports mode 'dense' and 'mix', got "
                                 f"mode={mode!r}")
            if freeze and mode != "childtuning_d":
                raise ValueError(f"freeze=True needs a subnetwork to freeze outside of; "
                                 f"mode={mode!r} has none (modes with one: dense, mix, "
                                 f"childtuning_d)")
        if adamw_style not in ref.ADAMW_STYLES:
            raise ValueError(f"adamw_style must be one of {ref.ADAMW_STYLES}, got {adamw_style!r}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {capturable!r}")
        if backend != "auto":
            reason = unavailable_reason(backend)
            if reason is not None:
                raise RuntimeError(f"backend={backend!r} is not available here: {reason}")
        self.capturable = capturable
        if not isinstance(fp32_moments, bool):
            raise TypeError(f"fp32_moments must be a bool, got {fp32_moments!r}")
        self.fp32_moments = fp32_moments
        self.mode = mode
        self.reserve_p = reserve_p
        self.update_steps = (resolve_update_steps(total_steps, update_ratio, update_steps)
                             if mode in CYCLIC_MODES else None)
        self.adamw_style = adamw_style
        self.seed = seed
        self.backend_request = backend
        self._init_bookkeeping()
        super().__init__(params, defaults)
        if not any(g["dps"] for g in self.param_groups):
            warnings.warn(f"dps_kernels: DPSAdamW(mode={mode!r}) has no DPS parameter (every "
                          f"param group has 'dps': False), so it trains as plain AdamW; give "
                          f"the weights to select from in a group without 'dps': False, or "
                          f"use DPSAdamW.from_model(model, targets=...)", stacklevel=2)
        if not fp32_moments and any(p.dtype == torch.float16 for g in self.param_groups
                                    for p in g["params"]):
            warnings.warn("dps_kernels: fp16 parameters keep fp16 moments, whose exp_avg_sq "
                          "underflows to 0 for small gradients and can blow the weights up "
                          "(as with torch.optim.AdamW on fp16 parameters); pass "
                          "fp32_moments=True to keep the moments in fp32", stacklevel=2)
        # State is created lazily, per parameter, at its first training forward (Mix,
        # Mixout) or its first step: an engine may still swap the parameter objects after
        # the optimizer is built (FSDP2 through accelerate), and
        # torch.distributed.checkpoint builds an empty optimizer's state by one zero-lr
        # step. Mix's W0 is the weight at that moment, before any update: the pre-training
        # weight (docs/distributed.md).

    def _init_bookkeeping(self) -> None:
        """The maps keyed by ``id(param)`` and the caches: never copied or pickled."""
        self._param_index: dict[int, int] = {}   # id(param) -> index (hash key, messages)
        self._group_index: dict[int, int] = {}   # id(param) -> index into param_groups
        self._backend_cache: dict[int, object] = {}
        self._fallback_warned: set[tuple[str, str]] = set()
        self._wired: dict[int, object] = {}  # id(param) -> wiring handle (Mix)
        self._plans: dict[int, GroupPlan] = {}   # group index -> cached step data
        self._factor_table = None                # capturable Mix (group_plan.mix_factor_table)
        self._mixed_shards: dict[int, tuple] = {}  # FSDP2 Mix: id -> (param, saved W shard)

    # ------------------------------------------------------------------ copies, pickles
    def __getstate__(self):
        """torch pickles ``defaults``, ``state`` and ``param_groups`` only; the DPS settings
        and each parameter's index (the Mix hash key) travel with them."""
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in _PICKLED_SETTINGS})
        state["_dps_param_indices"] = [self._param_index[id(p)] for g in self.param_groups
                                       for p in g["params"]]
        return state

    def __setstate__(self, state):
        """A ``copy.deepcopy`` or unpickled optimizer: the id-keyed maps are rebuilt for its
        own parameters; plans and backends are rebuilt at its first step. Mix wiring is not
        copied (the model's is not either): ``attach(copied_model, copied_optimizer)``."""
        state = dict(state)
        indices = state.pop("_dps_param_indices", None)
        super().__setstate__(state)
        if indices is None:
            return   # torch's load_state_dict swapping state and groups: the maps still hold
        self._init_bookkeeping()
        params = ((group_index, param) for group_index, group in enumerate(self.param_groups)
                  for param in group["params"])
        for (group_index, param), index in zip(params, indices, strict=True):
            self._param_index[id(param)] = index
            self._group_index[id(param)] = group_index

    # ------------------------------------------------------------------ groups, state
    def add_param_group(self, param_group):
        """torch's ``add_param_group`` plus DPS validation; a rejected group leaves the
        optimizer exactly as it was."""
        groups_before = len(self.param_groups)
        known = set(self._param_index)
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1], len(self.param_groups) - 1)
        except Exception:
            del self.param_groups[groups_before:]
            for pid in set(self._param_index) - known:
                self._param_index.pop(pid, None)
                self._group_index.pop(pid, None)
                self._backend_cache.pop(pid, None)
            raise
        self._plans.clear()

    @staticmethod
    def _check_group_values(group: dict) -> None:
        """The keys and hyperparameters of a group (also of a group being loaded)."""
        hyperparams.check_group_values(group)

    def _validate_group(self, group: dict, group_index: int) -> None:
        self._check_group_values(group)
        if group["capturable"] != self.capturable:
            raise ValueError(f"capturable is set per optimizer ({self.capturable}); a group "
                             f"cannot set capturable={group['capturable']!r}")
        for param in group["params"]:
            self._param_index.setdefault(id(param), len(self._param_index))
            self._group_index[id(param)] = group_index
            where = f"parameter #{self._param_index[id(param)]} (shape {tuple(param.shape)})"
            if group["dps"] and not param.is_floating_point():
                raise TypeError(f"DPS {where} must be floating point, got dtype {param.dtype}; "
                                f"put it in a group with 'dps': False")
            if param.is_complex():
                raise TypeError(f"{where} is complex ({param.dtype}); DPSAdamW supports real "
                                f"parameters only")
            refuse_flat(param, where)
            owner = wired_to(param)
            if owner is not None and owner is not self:
                # its module's forward would still mix it with that optimizer's state:
                # this optimizer would train through a W~ that never changes
                raise ValueError(
                    f"{where} is wired to the Mix forward of another live DPSAdamW "
                    f"(mode={owner.mode!r}); call dps_kernels.detach(model) first, or "
                    f"delete that optimizer")
            if group["dps"] and is_sharded(param):
                try:
                    shard_group(param)
                except ValueError as error:
                    raise ValueError(f"DPS {where}: {error}") from None
                if self.capturable:
                    raise ValueError(f"capturable=True does not support sharded (FSDP2) "
                                     f"parameters yet; DPS {where} is a DTensor")
                if self.mode in WIRED_MODES and param.dim() < 2:
                    # the Mix kernels hash a shard's columns by their local index; a 1-D
                    # tensor's columns are its elements, which Shard(0) splits
                    raise ValueError(
                        f"mode={self.mode!r} under FSDP2 needs DPS parameters of 2 or more "
                        f"dimensions (a Shard(0) shard holds whole columns only then); DPS "
                        f"{where} is a sharded {param.dim()}-D tensor: put it in a group with "
                        f"'dps': False (from_model's default targets do), or leave it unsharded")
            if param.numel() > MAX_TENSOR_ELEMENTS:
                raise ValueError(f"{where} has {param.numel()} elements, more than the fused "
                                 f"kernels' limit of {MAX_TENSOR_ELEMENTS}; split it, or put "
                                 f"it in a group with 'dps': False and use another optimizer")
            # Resolve the backend now, so a tensor no backend can step fails (or falls back)
            # when the optimizer is built, not in the middle of training.
            backend = self._backend_for(param)
            if self.capturable and backend.name != "triton":
                reason = get_backend("triton").supports(local(param)) \
                    if unavailable_reason("triton") is None else unavailable_reason("triton")
                raise ValueError(f"capturable=True needs the triton backend, but {where} "
                                 f"would be stepped by {backend.name!r} (backend="
                                 f"{self.backend_request!r}, device {param.device}"
                                 f"{'; triton: ' + reason if reason else ''})")

    def _group_of(self, param) -> dict:
        index = self._group_index.get(id(param))
        if index is None:
            self._adopt_swapped_params()
            index = self._group_index.get(id(param))
        if index is None:
            raise ValueError(
                f"parameter of shape {tuple(param.shape)} is not managed by this optimizer")
        return self.param_groups[index]

    def _init_state(self, param, group) -> dict:
        state = self.state[param]
        if "step" in state:
            return state
        state["step"] = (torch.zeros((), dtype=torch.float32, device=param.device)
                         if self.capturable else 0)
        # fp32_moments: 16-bit parameters keep fp32 moments (an fp16 exp_avg_sq underflows
        # to 0 long before exp_avg does, and the step m / (sqrt(0) + eps) then explodes).
        moments = torch.float32 if self.fp32_moments else param.dtype
        state["exp_avg"] = torch.zeros_like(param, dtype=moments,
                                            memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=moments,
                                               memory_format=torch.preserve_format)
        if group["dps"] and self.mode == "mixout":
            state["anchor"] = param.detach().clone(memory_format=torch.contiguous_format)
        # childtuning_d: GAM (the Fisher), threshold and bits come from set_child_network.
        if group["dps"] and self.mode in CYCLIC_MODES:
            state["gam"] = torch.zeros_like(param, dtype=torch.float32,
                                            memory_format=torch.contiguous_format)
            state["threshold"] = torch.zeros((), dtype=torch.float32, device=param.device)
            if not self.capturable and not is_sharded(param):
                # The Stage II subnetwork, packed at the selection (mask_bits.py): Stage II
                # reads 1 bit per element instead of GAM's 4 bytes. (The capturable path
                # and sharded parameters still recompute the mask from GAM: a shard's bits
                # would not survive resharding.)
                state["mask_bits"] = torch.zeros(num_words(param.numel()), dtype=torch.int32,
                                                 device=param.device)
            if self.mode == "mix":
                cols = columns_of(param.shape)
                state["fam"] = torch.zeros(cols, dtype=torch.float32, device=param.device)
                state["column_factor"] = torch.ones(cols, dtype=torch.float32,
                                                    device=param.device)
                state["anchor"] = param.detach().clone(memory_format=torch.contiguous_format)
                # which layout (checkpoint.ANCHOR_IN_GAM): a checkpoint must say, since
                # torch.distributed.checkpoint's helpers mix its keys with the loader's
                state[checkpoint.ANCHOR_IN_GAM] = int(checkpoint.keeps_anchor_in_gam(self, param))
                if self.capturable or is_sharded(param):
                    state["stage_anchor"] = state["anchor"].clone()
                # Host-scheduled: no W' buffer. GAM is dead in Stage II (the subnetwork is
                # in the bits), so the selection copies W into the GAM buffer and it is W'
                # until the next Stage I's first step resets it to g*g (12 -> 8 B/param).
        return state

    # ------------------------------------------------------------------ modes
    def _kernel_mode(self, group: dict) -> str:
        """What the fused step of ``group``'s tensors does: ``"plain"`` AdamW (non-DPS
        groups; Mixout, whose backward already masked the gradient; CHILD-TUNING_F, whose
        gradient is masked just before), ``"dense"`` (DPS Dense; CHILD-TUNING_D = Dense
        Stage II forever) or ``"mix"``."""
        if not group["dps"] or self.mode in ("mixout", "childtuning_f"):
            return "plain"
        return "mix" if self.mode == "mix" else "dense"

    def _stage(self, t: int) -> int:
        """Stage of 1-based step ``t``: the DPS cycle, Stage II forever for CHILD-TUNING_D
        (its subnetwork is fixed), Stage I forever for Mixout (DPS Mix Stage I) and
        CHILD-TUNING_F."""
        if self.mode in CYCLIC_MODES:
            return stage_of(t, self.update_steps)
        return STAGE_TWO if self.mode == "childtuning_d" else STAGE_ONE

    def _closes_stage_one(self, t: int) -> bool:
        return self.mode in CYCLIC_MODES and is_last_of_stage_one(t, self.update_steps)

    def _child_f_grad(self, param, grad: torch.Tensor, t: int) -> torch.Tensor:
        """CHILD-TUNING_F's gradient of step ``t``: ``g * M / reserve_p``, ``M`` a
        Bernoulli(reserve_p) mask per element from the counter hash (every element its own
        "column"), applied by the backend's fused Mix-backward kernel. A new tensor:
        ``param.grad`` is left as it was."""
        if param.numel() == 0:
            return grad
        key = step_key(self.seed, self._param_index[id(param)], t)
        threshold = keep_threshold_of_fraction(self.reserve_p)
        if is_sharded(param):
            # The fused kernels hash the local index; a shard's elements are hashed by their
            # index in the whole tensor (torch ops: one more pass, the same mask bit for bit).
            keep = element_keep_mask(key, threshold, first_element(param), grad.numel(),
                                     grad.device)
            return grad.masked_fill(~keep.view(grad.shape), 0).div_(self.reserve_p)
        mask = MixMask(param.numel(), column_key=key, keep_threshold=threshold)
        masked = self._backend_for(param).mix_grad(grad.contiguous().reshape(-1), mask)
        return masked.div_(self.reserve_p).reshape(grad.shape)

    # ------------------------------------------------------------------ backends
    def _backend_for(self, param):
        backend = self._backend_cache.get(id(param))
        if backend is not None:
            return backend
        request = self.backend_request
        name = auto_backend_name(param.device.type) if request == "auto" else request
        backend = get_backend(name)
        tensor = local(param)
        reason = backend.supports(tensor)
        if reason is not None:
            where = (f"parameter #{self._param_index[id(param)]} ({tuple(param.shape)}, "
                     f"{param.dtype}, {param.device})")
            # The fused kernels walk flat memory; a non-contiguous parameter (which
            # torch.optim.AdamW steps) goes to the torch backend even when a backend was
            # named, with the warning below. Any other refusal of a named backend is an error.
            only_layout = (not tensor.is_contiguous()
                           and backend.supports(tensor.contiguous()) is None)
            if request != "auto" and not only_layout:
                raise ValueError(f"backend={request!r} cannot step {where}: {reason}")
            if (name, reason) not in self._fallback_warned:
                self._fallback_warned.add((name, reason))
                warnings.warn(f"dps_kernels: backend {name!r} cannot step {where} ({reason}); "
                              f"using the torch backend for it and for every other parameter "
                              f"refused for the same reason", stacklevel=3)
            backend = get_backend("torch")
        self._backend_cache[id(param)] = backend
        return backend

    def _recheck_backend(self, param) -> None:
        """The backend chosen when the optimizer was built may no longer take ``param``: a
        model cast after it (``model.half()`` keeps the parameter objects) would reach the
        cpu backend with fp16. Choose again, as if the optimizer were built now (``auto``
        falls back to torch with its warning; a named backend raises)."""
        backend = self._backend_cache.get(id(param))
        if backend is not None and backend.supports(local(param)) is not None:
            del self._backend_cache[id(param)]
            self._backend_for(param)

    def _invalidate_plans(self) -> None:
        """Forget the cached per-group step data (see group_plan.py)."""
        self._plans.clear()

    # ------------------------------------------------------------------ the step
    def _check_grad(self, param, group):
        grad = param.grad
        wired = self.mode not in WIRED_MODES or not group["dps"] or id(param) in self._wired
        has_network = (self.mode != "childtuning_d" or not group["dps"]
                       or "threshold" in self.state.get(param, ()))
        if not grad.is_sparse and not grad.is_complex() and wired and has_network:
            return   # the usual case, every step: no message built
        where = f"parameter #{self._param_index[id(param)]} (shape {tuple(param.shape)})"
        if grad.is_sparse:
            raise RuntimeError(f"DPSAdamW does not support sparse gradients ({where})")
        if grad.is_complex():
            raise RuntimeError(f"DPSAdamW does not support complex gradients ({where})")
        if self.mode in WIRED_MODES and group["dps"] and id(param) not in self._wired:
            raise RuntimeError(
                f"DPSAdamW(mode={self.mode!r}) was stepped, but DPS {where} is not wired to a "
                f"model: call dps_kernels.attach(model, optimizer) or build the optimizer "
                f"with DPSAdamW.from_model(model, mode={self.mode!r}, ...)")
        if (self.mode == "childtuning_d" and group["dps"]
                and "threshold" not in self.state.get(param, {})):
            raise RuntimeError(
                f"DPSAdamW(mode='childtuning_d') has no subnetwork for DPS {where}: choose it "
                f"before the first step with optimizer.set_child_network(fisher), e.g. "
                f"fisher = dps_kernels.child_tuning_fisher(model, batches, loss_fn). "
                f"Resuming with torch.distributed.checkpoint? get_optimizer_state_dict "
                f"takes a step to build the state: call set_child_network before it, with "
                f"any Fisher (the loaded state replaces it)")

    def _task(self, param, group, state, t) -> TensorStep:
        beta1, beta2 = group["betas"]
        scalars = ref.adamw_scalars(float(group["lr"]), beta1, beta2, group["eps"],
                                    group["weight_decay"], t, self.adamw_style)
        task = TensorStep(StepKind.PLAIN, local(param), local(param.grad),
                          local(state["exp_avg"]), local(state["exp_avg_sq"]), scalars)
        if self._kernel_mode(group) == "plain":
            if group["dps"] and self.mode == "childtuning_f":
                task.grad = self._child_f_grad(param, task.grad, t)
            return task
        task.gam = local(state["gam"])
        task.cols = columns_of(param.shape)
        first_stage = self._stage(t) == STAGE_ONE
        task.reset = first_stage and is_stage_start(t, self.update_steps)
        if not first_stage:
            task.mask_bits = state.get("mask_bits")
        if self.mode != "mix":   # dense, childtuning_d
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
        """Choose the Stage II subnetworks right after the last Stage I step
        (``selection.select``)."""
        selection.select(self, due)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None) if self.capturable else None
        found_inf = getattr(self, "found_inf", None) if self.capturable else None
        # Every check before any update: a step refused for one group changes no group.
        routes = [self._route(index, group) for index, group in enumerate(self.param_groups)]
        if self._mixed_shards:
            self._unmix_shards(mask_grads=True)
        for index, (group, (plan, grads)) in enumerate(zip(self.param_groups, routes)):
            if plan is None:
                self._step_general(index, group, grad_scale, found_inf)
            elif plan.capturable:
                self._step_capturable(group, plan, grads, grad_scale, found_inf)
            else:
                self._step_planned(group, plan, grads)
        return loss

    def _route(self, index: int, group: dict):
        """``(plan, grads)`` when the group's cached plan can take this step, else
        ``(None, None)`` once the general path's checks passed. Changes nothing (but may choose
        a parameter's backend again, ``_recheck_backend``)."""
        plan = self._plans.get(index)
        if plan is not None and not plan.still_valid(group):
            plan = None
        if plan is not None and (plan.t is not None or plan.capturable):
            grads = list(map(_GRAD, plan.params))
            if not any(map(operator.is_, grads, itertools.repeat(None))):
                local_grads = list(map(local, grads)) if plan.sharded else grads
                if plan.takes(local_grads):   # else: the general path's checks, as at step 1
                    return plan, local_grads
        self._check_general(group)
        return None, None

    def _adopt_swapped_params(self) -> None:
        """An engine replaced the parameter objects in ``param_groups`` after the optimizer
        was built (accelerate's FSDP2 ``prepare``: ``fsdp2_switch_optimizer_parameters``).
        The i-th parameter keeps index i (its Mix hash key); backends and checks are redone
        for the new objects. Per-parameter state is created lazily, so none exists yet for
        a swap before training; one after training started would orphan it: refused."""
        params = [p for group in self.param_groups for p in group["params"]]
        if all(id(p) in self._param_index for p in params):
            return
        current = {id(p) for p in params}
        # (keys of optimizer.state that are not tensors are the user's, as in torch)
        orphaned = [p for p in self.state if torch.is_tensor(p) and id(p) not in current]
        if all(_steps_taken(self.state[p]) == 0 for p in orphaned):
            for p in orphaned:   # made before any update (e.g. by wiring): remade for the new
                del self.state[p]
            orphaned = []
        if orphaned:
            raise RuntimeError(
                f"the optimizer's parameters were replaced after {len(orphaned)} of them had "
                f"stepped; their optimizer state would be lost. Replace parameters (e.g. "
                f"accelerator.prepare) before training")
        self._param_index.clear()
        self._group_index.clear()
        self._backend_cache.clear()
        self._plans.clear()
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)

    def _check_general(self, group: dict) -> None:
        self._adopt_swapped_params()
        with_grad = [param for param in group["params"] if param.grad is not None]
        for param in with_grad:
            self._check_grad(param, group)
            self._recheck_backend(param)
        if self.capturable and with_grad and len(with_grad) != len(group["params"]):
            missing = next(param for param in group["params"] if param.grad is None)
            raise RuntimeError(
                f"capturable=True needs every parameter of a group to have a gradient at each "
                f"step (or none), but parameter #{self._param_index[id(missing)]} (shape "
                f"{tuple(missing.shape)}) has none")

    def _step_planned(self, group: dict, plan: GroupPlan, grads: list) -> None:
        """The usual step: every parameter of the group has a gradient and one step t."""
        t = plan.t + 1
        beta1, beta2 = group["betas"]
        scalars = ref.adamw_scalars(float(group["lr"]), beta1, beta2, group["eps"],
                                    group["weight_decay"], t, self.adamw_style)
        stage = self._stage(t)
        if self.mode == "childtuning_f" and group["dps"]:
            grads = [self._child_f_grad(p, g, t) for p, g in zip(plan.params, grads)]
        for part in plan.parts:
            part_grads = grads if len(plan.parts) == 1 else [grads[i] for i in part.indices]
            part.backend.step_group(GroupStep(
                plan.mode, part.entries, part_grads, group["freeze"], self.adamw_style,
                keep_threshold=keep_threshold(group["p"]), t=t, stage=stage,
                reset=self.mode in CYCLIC_MODES and stage == STAGE_ONE
                and is_stage_start(t, self.update_steps),
                scalars=scalars, update_steps=self.update_steps, cache=part.cache))
        for state in plan.states:
            state["step"] = t
        plan.t = t
        if plan.mode != "plain" and self._closes_stage_one(t):
            self._select([(param, group, state, self._backend_for(param))
                          for param, state in zip(plan.params, plan.states)])

    def _step_capturable(self, group, plan: GroupPlan, grads, grad_scale, found_inf) -> None:
        """Every launch and argument the same at every step (see docs/capturable.md)."""
        device = plan.params[0].device
        hyper = plan.device_hyper(group, device)
        for part in plan.parts:
            part_grads = grads if len(plan.parts) == 1 else [grads[i] for i in part.indices]
            part.backend.step_group(GroupStep(
                plan.mode, part.entries, part_grads, group["freeze"], self.adamw_style,
                keep_threshold=keep_threshold(group["p"]), capturable=True, hyper=hyper,
                update_steps=self.update_steps, grad_scale=grad_scale, found_inf=found_inf,
                cache=part.cache))
            if plan.mode != "plain":
                if part.selection is None:
                    part.selection = self._capturable_selection(plan, part, group, device)
                part.backend.select_capturable(part.selection, found_inf)
        steps = [state["step"] for state in plan.states]
        torch._foreach_add_(steps, 1.0)
        if found_inf is not None:
            torch._foreach_sub_(steps, [found_inf.to(device)] * len(steps))

    def _capturable_selection(self, plan, part, group, device):
        from .ops.triton.radix_select import CapturableSelection

        table = None
        if self.mode == "mix":
            if self._factor_table is None or self._factor_table.device != device:
                self._factor_table = mix_factor_table(self.update_steps, device)
            table = self._factor_table
        entries = [(e.gam, e.column_factor if self.mode == "mix" else None,
                    selected_count(e.param.numel(), group["p"]), e.threshold, e.device_step,
                    e.fam) for e in part.entries if e.param.numel()]
        return CapturableSelection(entries, self.update_steps, table) if entries else None

    def _step_general(self, index: int, group: dict, grad_scale, found_inf) -> None:
        """Any step: per-parameter steps may differ (a parameter without a gradient at some
        step does not advance). Builds the group's plan for the next steps when it can. The
        gradients were checked (``_check_general``) before any group stepped."""
        self._plans.pop(index, None)
        batches: dict = {}
        stepped = []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self._init_state(param, group)
            backend = self._backend_for(param)
            t = None if self.capturable else state["step"] + 1
            batches.setdefault((id(backend), t), (backend, t, []))[2].append(param)
            stepped.append((param, state, t, backend))
        if self.capturable:
            if stepped:
                plan = self._plans[index] = GroupPlan(self, group)
                self._step_capturable(group, plan, [p.grad for p in plan.params],
                                      grad_scale, found_inf)
            return
        for backend, t, params in batches.values():
            tasks = [self._task(p, group, self.state[p], t) for p in params]
            backend.step(tasks, group["freeze"])
        due = []
        for param, state, t, backend in stepped:
            state["step"] = t
            if group["dps"] and self._closes_stage_one(t):
                due.append((param, group, state, backend))
        if due:
            self._select(due)
        if stepped and len(stepped) == len(group["params"]):
            self._plans[index] = GroupPlan(self, group)

    # ------------------------------------------------------------------ Mix forward support
    def _mix_mask(self, param) -> MixMask:
        """The mask of the Mix forward for the step about to be taken (state step + 1)."""
        group = self._group_of(param)
        state = self._init_state(param, group)
        cols = columns_of(param.shape)
        if self.capturable:   # decided on the device from state["step"]: no host sync
            return MixMask(cols, keep_threshold=keep_threshold(group["p"]), gam=state["gam"],
                           column_factor=state["column_factor"], threshold=state["threshold"],
                           device_step=state["step"],
                           key_base=key_base(self.seed, self._param_index[id(param)]),
                           update_steps=self.update_steps, stage_anchor=state["stage_anchor"])
        t = state["step"] + 1
        if self._stage(t) == STAGE_ONE:   # Mixout: always
            return MixMask(cols, column_key=step_key(self.seed, self._param_index[id(param)], t),
                           keep_threshold=keep_threshold(group["p"]))
        return MixMask(cols, gam=local(state["gam"]), column_factor=state["column_factor"],
                       threshold=state["threshold"], mask_bits=state.get("mask_bits"))

    def _mix_anchor(self, param) -> torch.Tensor:
        """The anchor of the next step's mixed weight (the local shard of a sharded one)."""
        state = self._init_state(param, self._group_of(param))
        if self.capturable or self._stage(state["step"] + 1) == STAGE_ONE:
            return local(state["anchor"])
        if "stage_anchor" in state:   # sharded parameters keep W' apart
            return local(state["stage_anchor"])
        return state["gam"]   # W', held in the GAM buffer during Stage II (see _select)

    @torch.no_grad()
    def _mix_shards(self, params) -> None:
        """FSDP2 Mix: put ``W~`` of the next step into each local shard, in place (the
        all-gathers then hand every forward and backward the mixed weight), keeping ``W``
        aside until :meth:`step` (or an eval forward) puts it back."""
        self._unmix_shards()
        for param in params:
            weight = local(param.detach())
            saved = weight.clone()
            mixed = self._backend_for(param).mix_weight(
                weight.contiguous(), self._mix_anchor(param), self._mix_mask(param),
                self._group_of(param)["p"])
            weight.copy_(mixed.reshape(weight.shape))
            self._mixed_shards[id(param)] = (param, saved)

    @torch.no_grad()
    def _unmix_shards(self, mask_grads: bool = False) -> None:
        """Put ``W`` back into the mixed shards; with ``mask_grads`` (in :meth:`step`), also
        turn their gradient (the all-reduced gradient of ``W~``) into Mix's ``g * M``."""
        for param, saved in self._mixed_shards.values():
            if mask_grads and param.grad is not None:
                grad = local(param.grad)
                masked = self._backend_for(param).mix_grad(grad.contiguous(),
                                                           self._mix_mask(param))
                grad.copy_(masked.reshape(grad.shape))
            local(param.detach()).copy_(saved)
        self._mixed_shards.clear()

    def is_mix_param(self, param) -> bool:
        """True when ``param`` is a DPS parameter of this optimizer in a wired mode (Mix,
        Mixout): its training forward uses the mixed weight."""
        if self.mode not in WIRED_MODES:
            return False
        if id(param) not in self._param_index:
            self._adopt_swapped_params()   # an engine may have replaced the parameters
        if id(param) not in self._param_index:
            return False
        return self._group_of(param)["dps"]

    # ------------------------------------------------------------------ introspection
    def stage(self, param=None) -> int:
        """Stage (1 or 2) of the next step of DPS parameter ``param`` (default: the first
        one). An optimizer without DPS parameters has no stages: that is an error, not a
        stage 1 forever."""
        if param is None:
            dps = [p for group in self.param_groups if group["dps"] for p in group["params"]]
            if not dps:
                raise ValueError("stage(): this optimizer has no DPS parameter (every group "
                                 "has 'dps': False), so it trains as plain AdamW, without "
                                 "stages")
            param = dps[0]
        elif not self._group_of(param)["dps"]:
            raise ValueError("stage() needs a DPS parameter (its group has 'dps': False)")
        return self._stage(_steps_taken(self.state.get(param, {})) + 1)

    def stage_one_mask(self, param, step: int) -> torch.Tensor:
        """Mix (or Mixout) keep-mask (bool, one entry per input feature) of 1-based Stage I
        ``step``."""
        if not self.is_mix_param(param):
            raise ValueError(f"stage_one_mask needs a DPS parameter of an optimizer in mode "
                             f"{WIRED_MODES}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be a 1-based int, got {step!r}")
        if self._stage(step) != STAGE_ONE:
            raise ValueError(f"step {step} is in Stage II (update_steps={self.update_steps}); "
                             f"Stage I keep-masks exist only for Stage I steps")
        group = self._group_of(param)
        key = step_key(self.seed, self._param_index[id(param)], step)
        return column_keep_mask(key, keep_threshold(group["p"]), columns_of(param.shape),
                                param.device)

    def subnetwork(self, param) -> Optional[torch.Tensor]:
        """Bool mask (param's shape) the next step uses if it is in Stage II, else None
        (also None in the modes without a subnetwork, Mixout and CHILD-TUNING_F, and in
        CHILD-TUNING_D before :meth:`set_child_network`)."""
        group = self._group_of(param)
        if not group["dps"]:
            raise ValueError("subnetwork() needs a DPS parameter (its group has 'dps': False)")
        state = self.state.get(param, {})
        if self.mode == "childtuning_d" and "threshold" not in state:   # no network yet
            return None
        if self._stage(_steps_taken(state) + 1) == STAGE_ONE:
            return None
        if "mask_bits" in state:   # what Stage II reads
            return unpack_mask(state["mask_bits"], param.shape)
        score = local(state["gam"])
        if self.mode == "mix":
            score = ref.mix_score(score, state["column_factor"])
        mask = ref.selection_mask(score, state["threshold"])
        if is_sharded(param):   # the local shard's mask, as a DTensor laid out like param
            from torch.distributed.tensor import DTensor
            return DTensor.from_local(mask, param.device_mesh, param.placements,
                                      shape=param.shape, stride=param.stride())
        return mask

    def set_child_network(self, fisher) -> float:
        """CHILD-TUNING_D: fix the subnetwork for the whole run; returns its kept fraction.

        ``fisher`` maps every DPS parameter to its Fisher information (param's shape, e.g.
        from :func:`dps_kernels.child_tuning_fisher`). One threshold is chosen over all DPS
        tensors together: the exact ``k``-th largest value of their union with
        ``k = ceil(n * reserve_p)`` (radix select on summed histograms, nothing
        concatenated; the official code's ``np.percentile`` interpolates, which can move the
        cut by one element). Elements ``>= threshold`` are kept (ties too). Must be called
        before the first step; everything is checked before anything changes.
        """
        return selection.choose_child_network(self, fisher)

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
                   if isinstance(s, dict) for v in s.values() if torch.is_tensor(v))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """torch's ``state_dict`` plus the DPS entries (``checkpoint.state_dict``), added
        before the user's post hooks run, so they see (and may replace) the whole state."""
        user_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = collections.OrderedDict(
            [("dps", checkpoint.state_dict), *user_hooks.items()])
        try:
            return super().state_dict()
        finally:   # the same dict again: the users' hook handles still remove from it
            self._optimizer_state_dict_post_hooks = user_hooks

    def load_state_dict(self, state_dict):
        """Load a state saved by :meth:`state_dict` (checks and conversions: ``checkpoint.py``).

        Everything is checked before anything changes, and a refused state leaves the
        optimizer as it was: the DPS settings (mode, stage length, seed, AdamW style) must
        match; the param groups must match in number, sizes and ``dps`` flag; every saved
        per-parameter state must hold the tensors its group's mode needs (``step``,
        ``exp_avg``, ``exp_avg_sq``; DPS: ``gam``, ``threshold``; Mix: ``fam``,
        ``column_factor``, ``anchor``) with the parameter's shape (``fam`` and
        ``column_factor``: one entry per mask column) and a floating dtype. A parameter
        without a saved state starts afresh, as in torch (one that never had a gradient);
        but one the checkpoint says had state (format 3 lists them) is refused.

        As in torch, the hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``,
        ``p``, ``freeze``) are the checkpoint's, so a state saved with another ``p`` is
        accepted and its ``p`` replaces the optimizer's: the saved thresholds and bits were
        chosen with it. They are checked like the constructor's arguments. ``capturable``
        stays the optimizer's.

        The load hooks run as in torch, but around the whole DPS load: the pre hooks before
        the checks (what they return is what is checked and loaded), the post hooks after
        the DPS state is restored (and not after a refused load).
        """
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for hook in pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        self._optimizer_load_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_post_hooks = collections.OrderedDict()
        try:
            checkpoint.load(self, state_dict, super().load_state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for hook in post_hooks.values():
            hook(self)

    # ------------------------------------------------------------------ construction helper
    @classmethod
    def from_model(cls, model: torch.nn.Module, *, targets=None, no_decay=None,
                   weight_decay: float = 1e-2, **kwargs) -> "DPSAdamW":
        """Build the optimizer for ``model``: DPS on the targeted weights, HF-style decay groups.

        ``targets``: module types whose ``weight`` is DPS and/or ``fnmatch`` patterns on full
        parameter names (default: the weight of every ``nn.Linear`` and transformers
        ``Conv1D``, and ``nn.MultiheadAttention``'s input projections). Selected by
        identity: a tied weight is DPS once. A model with nothing to select is refused,
        naming its layer types; Mix/Mixout refuse ``Conv1D`` and tied DPS weights (reason
        in the error). ``no_decay``: ``fnmatch``
        patterns of parameters without weight decay (default: biases and norm-layer weights).
        ``weight_decay`` (default 0.01, as the constructor and ``torch.optim.AdamW``) is that
        of the decay groups; the no-decay groups get 0.
        In ``mode="mix"`` and ``mode="mixout"`` the model is wired (:func:`dps_kernels.attach`).
        """
        for name, param in model.named_parameters():   # FSDP1 hides the Linear weights
            refuse_flat(param, f"parameter {name!r} (shape {tuple(param.shape)})")
        groups = build_param_groups(model, targets=targets, no_decay=no_decay,
                                    weight_decay=weight_decay)
        if kwargs.get("mode", "dense") in WIRED_MODES:
            refuse_unwired_mix_targets(model, dps_parameters(model, targets), kwargs["mode"])
        optimizer = cls(groups, **kwargs)
        if optimizer.mode in WIRED_MODES:
            attach(model, optimizer)
        return optimizer
