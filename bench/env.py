"""Run conditions recorded with every benchmark point: machine, versions, commit, command."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess

import torch


def _git(*args: str):
    # Benchmarks run from a checkout most of the time; outside one (an installed copy)
    # the commit is simply unknown, never an error.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def run_conditions(device: torch.device, argv) -> dict:
    """``argv``: the suite's arguments (without the program name), as it was invoked."""
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_description(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": tf_version,
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        # Tracked files modified at run time: the figures may not be the commit's.
        "git_dirty": None if status is None else bool(status),
        "command": " ".join(["python", "-m", "bench", *map(shlex.quote, argv)]),
    }
