"""DPS under the Hugging Face ``Trainer``: one argument away, resumable, AMP- and accumulation-safe.

Two entry points, sharing one builder:

* :class:`DPSTrainer` -- a ``Trainer`` whose ``create_optimizer`` builds a
  :class:`~dps_kernels.DPSAdamW`. Use it by default: it also works where ``Trainer`` refuses
  ``optimizers=`` or creates the optimizer late (FSDP, SageMaker MP), and it reads the
  stage length from the Trainer's own ``max_steps``.
* :func:`create_dps_optimizer` -- the optimizer alone, for ``Trainer(optimizers=(opt, None))``
  or a hand-written loop; you pass the number of optimizer steps yourself.

Why the Trainer's behaviour is already right for DPS (each point is checked by
``python_tests/test_transformers_integration.py``):

* Schedule position = optimizer steps. ``DPSAdamW`` counts calls to ``step()``; the Trainer
  (through accelerate) calls it once per ``gradient_accumulation_steps`` micro-batches, and
  ``max_steps`` is counted in optimizer steps, so ``total_steps * update_ratio`` means the
  same with and without accumulation. Mix micro-batches of one step share one mask.
* GradScaler (fp16): when the unscaled gradients hold inf/nan, ``GradScaler.step`` does not
  call ``optimizer.step()`` at all, so GAM, FAM, the moments and the step counter stay as
  they were; the Trainer then also holds the LR scheduler back. The Trainer's
  ``global_step`` still advances, so after skips the DPS step lags ``global_step``.
* Checkpoints: ``optimizer.pt`` is ``optimizer.state_dict()``, which carries every DPS
  buffer (GAM, threshold, and for Mix the anchors W0/W' and FAM) plus the DPS
  configuration, and is loaded with ``torch.load(weights_only=True)``. Resuming rebuilds
  the optimizer from the model (so Mix's W0 first holds the checkpoint weight) and then
  restores the saved state over it.
* accelerate wraps the optimizer in ``AcceleratedOptimizer``; the wrapper forwards
  ``step``/``state_dict``/``param_groups`` to DPSAdamW. Use :func:`unwrap_dps_optimizer`
  to reach DPS-specific methods (``stage()``, ``subnetwork()``...).

Distributed (``docs/distributed.md``): DDP and FSDP2 select exactly what one process
selects; DeepSpeed ZeRO and FSDP1 flat parameters are refused when the optimizer is built.
accelerate's FSDP2 ``prepare`` swaps the optimizer's parameters after it is built, which
DPSAdamW adopts (state is created lazily); Mix then needs ``attach`` on the prepared model.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Iterable, Optional, Sequence, Union

try:
    from transformers import Trainer, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "dps_kernels.integrations.transformers needs the `transformers` package "
        "(pip install transformers accelerate)") from exc

from torch import nn

from ..child_tuning import child_tuning_fisher
from ..mix import WIRED_MODES, attach
from ..model_groups import dps_parameters, no_dps_target_message, refuse_unwired_mix_targets
from ..optim import CYCLIC_MODES, MODES, DPSAdamW

__all__ = ["DPSConfig", "DPSTrainer", "create_dps_optimizer", "unwrap_dps_optimizer",
           "PAPER_UPDATE_RATIO"]

logger = logging.getLogger(__name__)

# The paper's stage length (update_ratio=0.05, i.e. 20 stages over a run), used when
# neither update_ratio nor update_steps is given.
PAPER_UPDATE_RATIO = 0.05
# Trainer optimizers whose update DPSAdamW(adamw_style="torch") reproduces; any other
# choice of `--optim` is replaced, so say so instead of ignoring it silently.
_ADAMW_EQUIVALENT = ("adamw_torch", "adamw_torch_fused")


@dataclasses.dataclass
class DPSConfig:
    """DPS options of :class:`DPSTrainer` / :func:`create_dps_optimizer`.

    lr, betas, eps and weight decay come from ``TrainingArguments``; these are the rest.

    Args:
        mode: ``"dense"`` or ``"mix"`` (Mix changes the forward; the model is wired for you),
            or a baseline: ``"mixout"`` (wired too), ``"childtuning_d"`` (:class:`DPSTrainer`
            runs the Fisher pass over the training set when it builds the optimizer, as the
            official code does before training) or ``"childtuning_f"``.
        p: fraction of each DPS tensor NOT updated in Stage II (Mixout: the mixout
            probability); default 0.3. Not for the CHILD-TUNING modes.
        reserve_p: CHILD-TUNING modes: the fraction KEPT; default 0.3.
        fisher_batches: ``"childtuning_d"``: at most this many training batches in the
            Fisher pass (default: one epoch, as the official code).
        update_ratio: stage length as a fraction of the Trainer's max steps
            (``int(max_steps * update_ratio)``); default 0.05 (the paper) when
            ``update_steps`` is not given either. Dense and Mix only.
        update_steps: stage length in optimizer steps (exclusive with ``update_ratio``).
        freeze: leave unselected elements (weight and moments) untouched.
        adamw_style: ``"torch"`` or ``"hf_legacy"`` (transformers 4.7 AdamW, the paper's runs).
        seed: seed of the Mix Stage I masks; default ``TrainingArguments.seed``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpu"``.
        targets: which weights are DPS: ``nn.Module`` subclasses (their ``weight``) and/or
            ``fnmatch`` patterns on full parameter names; default as ``DPSAdamW.from_model``
            (``nn.Linear``, transformers ``Conv1D``, ``nn.MultiheadAttention`` projections).
    """

    mode: str = "dense"
    p: Optional[float] = None
    reserve_p: Optional[float] = None
    fisher_batches: Optional[int] = None
    update_ratio: Optional[float] = None
    update_steps: Optional[int] = None
    freeze: bool = False
    adamw_style: str = "torch"
    seed: Optional[int] = None
    backend: str = "auto"
    targets: Optional[Union[str, type, Sequence[Union[str, type]]]] = None

    def __post_init__(self):
        # Fail when the Trainer is built, not minutes later when train() creates the optimizer.
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.update_ratio is not None and self.update_steps is not None:
            raise ValueError(
                f"give update_ratio or update_steps, not both (got update_ratio="
                f"{self.update_ratio!r}, update_steps={self.update_steps!r})")

    def stage_length(self) -> dict:
        if self.mode not in CYCLIC_MODES:
            if self.update_ratio is not None or self.update_steps is not None:
                raise ValueError(f"mode={self.mode!r} has no stages; drop update_ratio / "
                                 f"update_steps")
            return {}
        if self.update_steps is not None:
            return {"update_steps": self.update_steps}
        ratio = PAPER_UPDATE_RATIO if self.update_ratio is None else self.update_ratio
        return {"update_ratio": ratio}


def _as_config(dps_config) -> DPSConfig:
    if dps_config is None:
        return DPSConfig()
    if isinstance(dps_config, DPSConfig):
        return dps_config
    if isinstance(dps_config, dict):
        return DPSConfig(**dps_config)
    raise TypeError(f"dps_config must be a DPSConfig, a dict or None, got {type(dps_config).__name__}")


def unwrap_dps_optimizer(optimizer) -> DPSAdamW:
    """The :class:`DPSAdamW` inside accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    seen = optimizer
    for _ in range(8):  # wrappers nest at most a couple of levels; bound the walk anyway
        if isinstance(seen, DPSAdamW):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise TypeError(f"no DPSAdamW inside {type(optimizer).__name__}")


def _default_decay_names(model: nn.Module) -> list[str]:
    # Trainer.get_decay_parameter_names does not use `self` (it filters LayerNorm modules
    # and bias/norm names); calling it unbound keeps this helper on the exact rule the
    # Trainer uses, in whichever transformers version is installed.
    return Trainer.get_decay_parameter_names(None, model)


def _build(model: nn.Module, args: TrainingArguments, num_training_steps: Optional[int],
           config: DPSConfig, decay_names: Iterable[str]) -> DPSAdamW:
    if args.optim not in _ADAMW_EQUIVALENT or args.optim_args:
        warnings.warn(
            f"TrainingArguments.optim={args.optim!r} (optim_args={args.optim_args!r}) is replaced "
            f"by DPSAdamW (adamw_style={config.adamw_style!r}); lr, betas, eps and weight_decay "
            "are taken from TrainingArguments", stacklevel=3)
    stage = config.stage_length()
    if "update_ratio" in stage and (num_training_steps is None or num_training_steps < 1):
        raise ValueError(
            f"DPS needs the number of optimizer steps to size its stages from update_ratio="
            f"{stage['update_ratio']}, got num_training_steps={num_training_steps!r}; pass "
            "update_steps instead, or build the optimizer inside Trainer.train()")
    dps_ids = dps_parameters(model, config.targets)   # by identity: tied weights once
    if not dps_ids:
        raise ValueError(no_dps_target_message(model, config.targets))
    if config.mode in WIRED_MODES:
        refuse_unwired_mix_targets(model, dps_ids, config.mode)
    decay_names = set(decay_names)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():  # tied weights appear once
        if param.requires_grad:
            buckets.setdefault((id(param) in dps_ids, name in decay_names), []).append(param)
    groups = [{"params": buckets[key], "dps": key[0],
               "weight_decay": args.weight_decay if key[1] else 0.0}
              for key in ((True, True), (True, False), (False, True), (False, False))
              if key in buckets]
    optimizer = DPSAdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon, weight_decay=args.weight_decay, mode=config.mode, p=config.p,
        reserve_p=config.reserve_p, freeze=config.freeze, adamw_style=config.adamw_style,
        seed=args.seed if config.seed is None else config.seed, backend=config.backend,
        **({"total_steps": num_training_steps, **stage} if stage else {}))
    if config.mode in WIRED_MODES:
        attach(model, optimizer)
    n_dps = sum(p.numel() for g in groups if g["dps"] for p in g["params"])
    n_all = sum(p.numel() for g in groups for p in g["params"])
    logger.info("DPSAdamW(mode=%s, p=%s, update_steps=%s, total_steps=%s): %d DPS tensors, "
                "%.1f%% of %d trainable elements", config.mode, config.p, optimizer.update_steps,
                num_training_steps, len(dps_ids), 100.0 * n_dps / max(n_all, 1), n_all)
    return optimizer


def create_dps_optimizer(model: nn.Module, args: TrainingArguments,
                         num_training_steps: Optional[int] = None, *,
                         decay_parameter_names: Optional[Iterable[str]] = None,
                         **dps_options) -> DPSAdamW:
    """A :class:`DPSAdamW` for ``model`` configured from ``args`` (see :class:`DPSConfig`).

    ``num_training_steps`` is the number of optimizer steps of the run (``max_steps``; with
    gradient accumulation, batches / accumulation steps); it sizes the stages through
    ``update_ratio``. Param groups follow the Trainer: decay on the parameters of
    ``Trainer.get_decay_parameter_names`` (or ``decay_parameter_names``), none on biases
    and LayerNorm. In Mix mode the model is wired to the optimizer.
    """
    config = DPSConfig(**dps_options)
    if decay_parameter_names is None:
        decay_parameter_names = _default_decay_names(model)
    return _build(model, args, num_training_steps, config, decay_parameter_names)


class DPSTrainer(Trainer):
    """``Trainer`` that optimizes with DPS: ``DPSTrainer(..., dps_config=DPSConfig(mode="mix"))``.

    Everything else (LR schedule, clipping, AMP, accumulation, checkpoints, resume) is the
    Trainer's own. ``dps_config`` may also be a dict of :class:`DPSConfig` fields.
    """

    def __init__(self, *args, dps_config: Union[DPSConfig, dict, None] = None, **kwargs):
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and optimizers[0] is not None:
            raise ValueError("DPSTrainer builds its optimizer itself; pass optimizers=(None, "
                             "scheduler) or use Trainer with create_dps_optimizer(...)")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("DPSTrainer builds its optimizer itself; drop optimizer_cls_and_kwargs")
        self.dps_config = _as_config(dps_config)
        self._dps_training_steps: Optional[int] = None
        super().__init__(*args, **kwargs)

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        # Called by users (and older Trainer versions) before train(): remember the length.
        self._dps_training_steps = num_training_steps
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            # Inside train(), TrainerState.max_steps (optimizer steps) is set before the
            # optimizer is created, on a fresh run and on resume alike.
            steps = self.state.max_steps if self.state.max_steps > 0 else self._dps_training_steps
            self.optimizer = _build(opt_model, self.args, steps, self.dps_config,
                                    self.get_decay_parameter_names(opt_model))
            if self.dps_config.mode == "childtuning_d":
                self._choose_child_network(opt_model)
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        # The Trainer resumes its global step from trainer_state.json but loads the
        # optimizer only when optimizer.pt exists; without one (save_only_model=True) DPS
        # would restart its stages at step 0 in the middle of the run, without a word.
        if checkpoint is None or self.optimizer is None or self.state.global_step == 0:
            return
        dps = unwrap_dps_optimizer(self.optimizer)
        if not any(isinstance(s, dict) and s.get("step", 0) for s in dps.state.values()):
            warnings.warn(
                f"DPSTrainer resumes from {checkpoint} at global step "
                f"{self.state.global_step}, but the checkpoint holds no optimizer state (saved "
                f"with save_only_model=True?): DPSAdamW starts afresh at DPS step 0, so its "
                f"stages, GAM and selection restart mid-run. To resume DPS, save checkpoints "
                f"with save_only_model=False; otherwise start a new run from the saved model",
                stacklevel=2)

    def _choose_child_network(self, model) -> None:
        """CHILD-TUNING_D: the Fisher pass over the training set (at most ``fisher_batches``
        batches), then the fixed subnetwork. Runs before the first step (on resume too;
        the loaded optimizer state then replaces it)."""
        import itertools

        loader = self.get_train_dataloader()
        limit = self.dps_config.fisher_batches
        batches = loader if limit is None else list(itertools.islice(loader, limit))

        def loss_fn(m, inputs):
            return self.compute_loss(m, self._prepare_inputs(inputs))

        targets = [p for g in self.optimizer.param_groups if g["dps"] for p in g["params"]]
        fisher = child_tuning_fisher(model, batches, loss_fn, params=targets,
                                     max_grad_norm=self.args.max_grad_norm or None)
        kept = self.optimizer.set_child_network(fisher)
        logger.info("CHILD-TUNING_D: Fisher over %d batches, %.2f%% of DPS elements kept",
                    len(batches), 100.0 * kept)

    @property
    def dps_optimizer(self) -> DPSAdamW:
        """The DPSAdamW behind the (possibly accelerate-wrapped) ``self.optimizer``."""
        if self.optimizer is None:
            raise RuntimeError("the optimizer is created by train() (or create_optimizer())")
        return unwrap_dps_optimizer(self.optimizer)
