"""Baselines the benchmark compares dps_kernels against, measured in the same process."""
from .authors_style import AuthorsStyleDPS

__all__ = ["AuthorsStyleDPS"]
