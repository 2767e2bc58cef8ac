"""dps_kernels: Dynamic Parameter Selection (Zhang et al., NeurIPS 2022) as a drop-in optimizer.

Importing this package never probes devices, imports Triton or compiles anything; backends
load on first use.
"""
from .backends import available_backends
from .child_tuning import child_tuning_fisher
from .mix import attach, detach
from .optim import DPSAdamW

__version__ = "0.1.0"

__all__ = ["DPSAdamW", "attach", "detach", "available_backends", "child_tuning_fisher", "__version__"]
