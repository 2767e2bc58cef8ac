"""The GPU run's device rules, checked on CPU (issue 21): a test that runs the triton backend
must put its tensors on ``triton_device.py``'s device (CUDA on a GPU machine), or skip there
saying why it needs CPU tensors. ``emulate_gpu.py`` makes "cuda" tensors on CPU and fails a
test that hands the triton backend a CPU tensor, or mixes CPU and "cuda" tensors in an op.

Not in the emulated run: ``test_compile.py`` (torch.compile refuses Python dispatch modes),
``test_opcheck.py`` (opcheck runs the ops under its own fake-tensor modes),
``test_triton_backend.py`` (parametrized over devices itself; its CUDA variant runs GPU
sizes the interpreter cannot run in CI time) and ``test_distributed.py`` (its triton runs
are in spawned processes). All four take their devices from ``triton_device.py`` or
explicit device parameters; the GPU suite (``scripts/gpu.sh tests``) runs them on CUDA.
"""
import os
import re
import subprocess
import sys

import pytest

from dps_kernels.backends import interpreter_enabled, unavailable_reason

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKED = ["test_mask_bits.py", "test_hardening.py", "test_fp32_moments.py",
           "test_cross_backend.py", "test_baseline_modes.py", "test_capturable.py"]

pytestmark = pytest.mark.skipif(
    unavailable_reason("triton") is not None or not interpreter_enabled(),
    reason="the emulation runs the kernels in the Triton interpreter (TRITON_INTERPRET=1)")


def run_emulated(*args, cwd=HERE):
    env = dict(os.environ, TRITON_INTERPRET="1", COLUMNS="250",   # untruncated -rA lines
               PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "emulate_gpu",
                           "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def test_triton_tests_put_their_tensors_on_the_triton_device():
    code, out = run_emulated(*CHECKED, "-k", "triton")
    assert code == 0, out[-6000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= 35, out[-3000:]   # the emulation ran them, it did not skip them all


PLANTED = '''
import torch
from torch import nn

from dps_kernels import DPSAdamW
from dps_kernels import mask_bits as mb
from dps_kernels.backends import get_backend
from triton_device import triton_device


def pack(thr_on_device, compare_on_host=False):
    dev = triton_device()
    gam = torch.rand(5, 13, device=dev)
    thr = torch.tensor(0.5, device=dev) if thr_on_device else torch.tensor(0.5)
    got = get_backend("triton").pack_mask(gam, None, thr)
    want = mb.pack_mask(gam.cpu(), thr.cpu()) if compare_on_host else mb.pack_mask(gam, thr)
    assert torch.equal(got, want)


def test_device_tensors():
    pack(True)


def test_planted_cpu_threshold():
    pack(False)


def test_planted_host_comparison():
    pack(True, compare_on_host=True)


def train(move_model):
    dev = triton_device()
    model = nn.Linear(6, 3)
    if move_model:
        model.to(dev)
    opt = DPSAdamW.from_model(model, mode="mix", update_steps=1, backend="triton")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6, device=dev)).pow(2).mean().backward()
        opt.step()


def test_model_on_device():
    train(True)


def test_planted_cpu_model():
    train(False)
'''


def test_a_planted_cpu_tensor_fails(tmp_path):
    (tmp_path / "test_planted.py").write_text(PLANTED)
    code, out = run_emulated("test_planted.py", cwd=tmp_path)
    outcome = {name: result for result, name in
               re.findall(r"^(PASSED|FAILED) test_planted\.py::(\w+)", out, re.M)}
    assert outcome == {"test_device_tensors": "PASSED", "test_model_on_device": "PASSED",
                       "test_planted_cpu_threshold": "FAILED",
                       "test_planted_host_comparison": "FAILED",
                       "test_planted_cpu_model": "FAILED"}, out[-4000:]
    # each failure is the emulation's, not a crash of the planted test itself
    failed = re.findall(r"^FAILED test_planted\.py::\w+ - (\S+)", out, re.M)
    assert failed == ["emulate_gpu.HostTensorError:"] * 3 and code != 0, out[-4000:]
