"""Package build. Pure Python unless the C++ CPU backend can be built (see csrc/README.md)."""
from setuptools import find_packages, setup

setup(
    name="dps_kernels",
    version="0.1.0",
    description="Dynamic Parameter Selection (DPS) fine-tuning as a fused drop-in optimizer",
    packages=find_packages(include=["dps_kernels", "dps_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1"],
    extras_require={
        "triton": ["triton"],
        "transformers": ["transformers", "accelerate"],
        "test": ["pytest", "transformers", "triton", "ninja"],
    },
)
