"""Compute kernels, one subpackage per backend technology (loaded lazily by the backends)."""
