"""Optional integrations with training frameworks.

Each submodule imports its framework, so import it explicitly, e.g.
``from dps_kernels.integrations.transformers import DPSTrainer``; importing
``dps_kernels`` or this package never imports transformers.
"""
