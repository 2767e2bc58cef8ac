"""pytest plugin (``-p emulate_gpu``): the GPU run's device rules on a CPU machine.

On a GPU machine the triton backend gets CUDA tensors and a test that builds CPU ones for it
fails there, while passing here under the interpreter. This plugin makes that failure show on
CPU: ``triton_device.compiled_triton()`` answers True (so the tests pick "cuda"), a
``TorchFunctionMode`` creates every "cuda" tensor on CPU and tracks its storage as emulated
CUDA (outputs of ops on such tensors are tracked too), and

* every public method of the triton backend raises :class:`HostTensorError` when it is handed
  a tensor with data that is not emulated CUDA (the kernels really run, interpreted);
* an op outside dps_kernels mixing emulated CUDA with CPU tensors of more than one element
  raises :class:`HostTensorError`, as CUDA would ("Expected all tensors to be on the same
  device"); so does a CPU generator for a CUDA factory.

An emulated tensor's ``.device`` reads ``cuda:0`` outside the backend, so ``device=p.device``
and ``x.to(p.device)`` follow it (in the tests and in dps_kernels); a Python dispatch mode
tracks what never reaches Python, e.g. the gradients autograd computes. Limits: no
torch.compile (it refuses Python dispatch modes), no real ``torch.cuda`` calls. Needs
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import triton_device

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    raise RuntimeError("emulate_gpu runs the kernels interpreted: set TRITON_INTERPRET=1")


class HostTensorError(RuntimeError):
    """A CPU tensor where the GPU run has a CUDA one."""


PACKAGE = os.sep + "dps_kernels" + os.sep
TORCH_DIR = os.path.dirname(torch.__file__)
# CUDA accepts CPU operands here: copies, indexing a CUDA tensor with CPU indices, and
# nn.Module.to's type check before it swaps a parameter's data.
MIXING_ALLOWED = {torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__,
                  torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda,
                  torch._has_compatible_shallow_copy_type, torch.Tensor.data.__set__}


DEVICE, CUDA = torch.Tensor.device, torch.device("cuda", 0)   # the descriptor of x.device


def _is_cuda(device) -> bool:
    if isinstance(device, bool):   # Tensor.to's positional non_blocking
        return False
    if isinstance(device, int):    # a CUDA ordinal
        return True
    return device is not None and torch.device(device).type == "cuda"


def _tensors(obj, depth=0):
    """The tensors in args: nested lists, tuples, dicts and dataclasses."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 3:
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, field.name), depth + 1)


class EmulatedCuda(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.storages = {}   # StorageImpl address -> storage, kept alive (never reused)
        self.paused = 0      # inside a backend call: the interpreter's own ops

    def tracked(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or t.layout != torch.strided:
            return True      # meta, sparse: no storage to follow (the check stays silent)
        # the StorageImpl's address, kept alive in self.storages: views share it, resizes
        # keep it, and empty tensors have one too (their data_ptr is 0)
        return t.untyped_storage()._cdata in self.storages

    def track(self, out):
        for t in _tensors(out):
            if t.device.type == "cpu" and t.layout == torch.strided:
                storage = t.untyped_storage()
                self.storages[storage._cdata] = storage
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self.paused:
            return func(*args, **kwargs)
        if getattr(func, "__self__", None) is DEVICE:   # x.device
            return CUDA if self.tracked(args[0]) else func(*args, **kwargs)
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        to_cuda = _is_cuda(kwargs.get("device"))
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            positional = [a for a in args[1:] if isinstance(a, (str, torch.device, int))]
            to_cuda = func is torch.Tensor.cuda or to_cuda or any(map(_is_cuda, positional))
            if to_cuda:   # already "on" CUDA: the tensor itself, as CUDA's .to returns it
                out = args[0] if self.tracked(args[0]) else args[0].clone()
                dtype = kwargs.get("dtype") or next(
                    (a for a in args[1:] if isinstance(a, torch.dtype)), None)
                return self.track(out if dtype is None else out.to(dtype))
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and not to_cuda and any(
                isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                for a in list(args[1:]) + [kwargs.get("device")] if a is not None)):
            self.paused += 1   # a host copy: not tracked
            try:
                return func(*args, **kwargs).clone()
            finally:
                self.paused -= 1
        frame = self._caller()
        in_package = frame is not None and PACKAGE in frame.f_code.co_filename
        if to_cuda:
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type != "cuda" and not in_package:
                raise HostTensorError(f"{func.__name__}: a CPU generator for a CUDA tensor")
            kwargs["device"] = "cpu"
        data = [t for t in inputs if t.numel()]
        tracked = [self.tracked(t) for t in data]
        if not in_package and func not in MIXING_ALLOWED and any(tracked) and not all(tracked):
            host = [t for t, ok in zip(data, tracked) if not ok and t.numel() > 1]
            if host:   # CUDA takes 1-element CPU operands (scalars), nothing larger
                raise HostTensorError(
                    f"{getattr(func, '__name__', func)} mixes emulated CUDA tensors with a CPU "
                    f"tensor of shape {tuple(host[0].shape)}")
        out = func(*args, **kwargs)
        return self.track(out) if to_cuda or any(tracked) else out

    @staticmethod
    def _caller():
        """The frame that called torch: the first one outside torch and this plugin."""
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR)
                                     or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        return frame


class Propagate(TorchDispatchMode):
    """Tracks the outputs of every aten op with a tracked input, also the ops that never
    reach Python's torch functions: the autograd engine's backward, hooks' C++ calls."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not MODE.paused and any(MODE.tracked(t) for t in _tensors(args)):
            MODE.track(out)
        return out


MODE, PROPAGATE = EmulatedCuda(), Propagate()
BACKEND_METHODS = ("step", "step_group", "select_threshold", "select_thresholds",
                   "select_capturable", "pack_mask", "mix_weight", "mix_grad")


def _checked(name, method):
    def call(self, *args, **kwargs):
        for t in _tensors(args) if not MODE.paused else ():
            if not MODE.tracked(t):
                raise HostTensorError(
                    f"triton backend {name}() got a CPU tensor of shape {tuple(t.shape)}: the "
                    "GPU run hands it CUDA tensors (take the device from triton_device.py)")
        MODE.paused += 1
        try:
            out = method(self, *args, **kwargs)
        finally:
            MODE.paused -= 1
        return MODE.track(out)
    return call


def pytest_configure(config):
    from dps_kernels.backends.triton_backend import TritonBackend
    for name in BACKEND_METHODS:
        setattr(TritonBackend, name, _checked(name, getattr(TritonBackend, name)))
    triton_device.compiled_triton = lambda: True
    MODE.__enter__()
    PROPAGATE.__enter__()


def pytest_unconfigure(config):
    PROPAGATE.__exit__(None, None, None)
    MODE.__exit__(None, None, None)
