"""Ahead-of-time compile gate of the Triton kernels: record, compile, analyse, without a GPU.

    python -m bench.aot [--out bench/results] [--targets sm_70 sm_80 sm_90a] [--check]
    python -m bench aot ...                      (the same)

1. **record** (a subprocess with ``TRITON_INTERPRET=1``): ``InterpretedFunction.run`` is
   patched at class level, so every kernel launch the package makes is recorded, whatever
   the kernel: its id ``module:qualname`` and, per argument, what Triton specialises on
   (tensors: dtype and ``data_ptr() % 16 == 0``; ints, floats, bools, None, strings: the
   value; triton dtypes: the name) plus the launch options (``num_warps``,
   ``enable_fp_fusion``, ...). Launches come from real training: ``DPSAdamW.from_model`` on a
   tiny MLP (one weight with full 1024-element blocks and a tail, one of odd size),
   ``update_steps=2``, 6 steps (Stage I -> II -> I, two selections), over mode dense/mix x
   freeze x param dtype fp32/bf16/fp16 (x ``capturable`` when ``DPSAdamW`` has it), plus the
   single-tensor ``select_threshold`` (Dense, Mix column factor, ``approx=True``).
2. **compile** (one fresh subprocess per target, no ``TRITON_INTERPRET``): a fake driver
   makes Triton compile for ``GPUTarget("cuda", cc, 32)``; each recorded launch is rebuilt
   (CPU tensors of the recorded dtype, 16-byte aligned or offset by one element; the same
   scalars) and passed to ``JITFunction.warmup(..., grid=(1,))``. Triton's own cache key
   deduplicates: launches that specialise alike give one compiled kernel (one row).
   ``GPU_CONSTEXPRS`` replaces the constexprs whose recorded value is the interpreter's
   (``EMULATE_RNE``) or the CPU launcher's (``TILES``) by what a CUDA launch passes.
   A launch that fails to compile is a recorded failure (its error text), not a crash.
3. **analyse** each (specialisation, target): registers and local memory
   (``cuobjdump -res-usage`` of Triton's cubin), spill store/load bytes (``ptxas -v`` rerun
   on Triton's PTX with Triton's flags), shared memory (``metadata.shared``), global loads
   and stores by width (SASS of the cubin, ``cuobjdump -sass``; sm_70 cubins disassemble to
   nothing here, so the PTX is counted for them: ``ld.global.v4.b32`` = 128 bits), atomics,
   and the resident warps per SM:

       regs/warp   = ceil(regs * 32 / 256) * 256          (allocation unit: 256 registers)
       blocks_regs = floor(floor(65536 / regs/warp) / num_warps)
       blocks_smem = floor(smem_SM / (shared + reserved))  (reserved 1 KiB/block on sm_80+)
       blocks      = min(blocks_regs, floor(64 / num_warps), blocks_smem, 32)
       resident warps / SM = blocks * num_warps
       smem_SM: 96 KiB (sm_70), 164 KiB (sm_80), 228 KiB (sm_90); 64 warps, 32 blocks max.

   (148 registers x 4 warps -> 12 warps; 64 -> 32; 32 -> 64.)
4. **write** ``aot.md`` and ``aot.json`` in ``--out``.

The checks (``gate_failures``; ``--check`` exits 1 on any; python_tests/test_aot_gate.py
runs them in CI) are configured in the block below. Compiled, never run: these are
static properties of the code a GPU would execute, not measurements.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import inspect
import json
import math
import os
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- configuration (one place)
TARGETS = {"sm_70": 70, "sm_80": 80, "sm_90a": 90}   # name -> compute capability
STEP_KERNEL = "_dps_step_kernel"
HIST_KERNELS = ("_multi_hist_kernel", "_radix_hist_kernel")
PICK_KERNELS = ("_multi_pick_kernel", "_radix_pick_kernel")   # one small program each
MIX_KERNELS = ("_mix_weight_kernel", "_mix_grad_kernel")
STREAMING_KERNELS = (STEP_KERNEL,) + HIST_KERNELS + MIX_KERNELS
VECTORIZED_KERNELS = (STEP_KERNEL,) + HIST_KERNELS   # full-block path needs 128-bit loads
CAPTURABLE_KERNELS = ("_capturable_factor_kernel",)
REQUIRED_KERNELS = STREAMING_KERNELS + PICK_KERNELS + CAPTURABLE_KERNELS  # each must be launched
MIN_RESIDENT_WARPS = 16
OCCUPANCY_TARGETS = ("sm_80", "sm_90a")
SASS_TARGETS = ("sm_80", "sm_90a")      # where widths come from SASS (sm_70: from PTX)
# Constexprs whose recorded value is not what a CUDA launch passes: kernel name (or "*")
# -> {name: value on CUDA}.
GPU_CONSTEXPRS = {
    "*": {"EMULATE_RNE": False},          # interpreter-only bf16 rounding (rounding.py)
    "_multi_hist_kernel": {"TILES": 8},   # radix_select.select_thresholds: 8 on CUDA, 2 on CPU
}
ALIGNED_CONSTEXPR = "ALIGNED"       # a bool constexpr that says the table addresses are aligned
PARAM_DTYPE_CONSTEXPR = "PARAM_DTYPE"
KIND_CONSTEXPR = "KIND"             # int code, fused_step.KIND_CODE
FREEZE_CONSTEXPR = "FREEZE"
BLOCK_CONSTEXPR = "BLOCK"
# Per compute capability: register file, shared memory per SM, reserved shared memory per
# block, max resident warps and blocks per SM.
SM_LIMITS = {
    70: dict(regs=65536, smem=96 * 1024, reserved=0, max_warps=64, max_blocks=32),
    80: dict(regs=65536, smem=164 * 1024, reserved=1024, max_warps=64, max_blocks=32),
    90: dict(regs=65536, smem=228 * 1024, reserved=1024, max_warps=64, max_blocks=32),
}
# Where a triton version cannot meet a check: the failures a row matching an entry gives
# for that check are listed as waived, with the reason, instead of failing the gate.
# ``triton``: (oldest, newest) major.minor the entry covers, inclusive; ``where``: constexpr
# values a row must have (a tuple: any of them); ``targets``: None = all. Measured on
# triton 3.6 (bench/results/aot_triton36/aot.md, in CI) and 3.8 (aot_triton38/, by hand);
# 3.7 is not measured.
GATE_EXCEPTIONS = (
    dict(check="atomics", triton=((3, 0), (3, 8)), kernels=HIST_KERNELS, targets=("sm_70",),
         where={}, unused_result_only=True,
         why="triton 3.6 writes the histogram flush as atom.global whose result nothing reads "
             "(3.9 writes red.global); sm_70 widths come from the PTX (no SASS here), while "
             "the same flush on sm_80/sm_90a is REDG in the SASS: ptxas drops the dead result"),
    dict(check="occupancy", triton=((3, 0), (3, 8)), kernels=(STEP_KERNEL,), targets=None,
         where={"PARAM_DTYPE": ("bf16", "fp16"), "KIND": 2, "STAGE": (0, 1)},
         unused_result_only=False,
         why="16-bit Mix Stage I / capturable Mix: triton 3.6 needs 136-151 registers for "
             "the keep-mask hash (3.8: 141-150 on sm_90a), 12 warps/SM; capped at 128 "
             "(maxnreg) ptxas spills 8-88 B on sm_70/sm_80 (3.6), so "
             "fused_step.launch_options leaves it uncapped"),
)
RECORD_DTYPES = ("fp32", "bf16", "fp16")
RECORD_STEPS = 6
RECORD_UPDATE_STEPS = 2


def kernel_name(kernel_id: str) -> str:
    return kernel_id.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


# ---------------------------------------------------------------- parsing and occupancy
def resident_warps(regs: int, num_warps: int, shared: int, cc: int) -> dict:
    """Resident warps per SM of a kernel (formula in the module docstring) and what limits it."""
    lim = SM_LIMITS[cc]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    per_block = shared + lim["reserved"]
    candidates = {
        "registers": (lim["regs"] // regs_per_warp) // num_warps,
        "warps": lim["max_warps"] // num_warps,
        "shared": lim["smem"] // per_block if per_block else lim["max_blocks"],
        "blocks": lim["max_blocks"],
    }
    blocks = min(candidates.values())
    limiter = "+".join(k for k, v in candidates.items() if v == blocks)
    return {"warps": blocks * num_warps, "blocks": blocks, "limiter": limiter}


# Global atomics: ATOMG / ATOM.E return a value, REDG / RED.E do not (REDUX and ATOMS are
# warp and shared-memory operations, not global memory).
_SASS_OP = re.compile(r"\b(LDGSTS|LDG|STG|ATOMG|REDG|RED(?=\.E\b)|ATOM(?=\.E\b))"
                      r"((?:\.[A-Z0-9_]+)*)")
_PTX_OP = re.compile(r"\b(ld|st|atom|red)\.global((?:\.[A-Za-z0-9_:]+)*)")
_PTX_CP_ASYNC = re.compile(
    r"\bcp\.async\.(?:ca|cg)\.shared\.global[^\[]*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def _empty_counts() -> dict:
    return {"loads": {}, "stores": {}, "atomics": 0, "returning_atomics": 0,
            "unused_result_atomics": 0}


def _add(d: dict, bits: int) -> None:
    d[str(bits)] = d.get(str(bits), 0) + 1


def sass_widths(sass: str) -> dict:
    """Global memory instructions of a SASS listing: ``{"loads": {bits: n}, "stores": {...},
    "atomics": n}``. LDG/STG width from the modifiers (.128, .64, .U16/.S16, .U8/.S8, else
    32); LDGSTS (async global -> shared copy) counts as a load."""
    out = _empty_counts()
    for op, mods in _SASS_OP.findall(sass):
        toks = set(mods.strip(".").split(".")) if mods else set()
        if op in ("ATOMG", "REDG", "RED", "ATOM"):
            out["atomics"] += 1
            out["returning_atomics"] += op in ("ATOMG", "ATOM")
            continue
        if "128" in toks:
            bits = 128
        elif "64" in toks:
            bits = 64
        elif toks & {"U16", "S16", "16"}:
            bits = 16
        elif toks & {"U8", "S8", "8"}:
            bits = 8
        else:
            bits = 32
        _add(out["stores"] if op == "STG" else out["loads"], bits)
    return out


def ptx_widths(ptx: str) -> dict:
    """The same counts from PTX: ``ld.global[.qualifiers][.vN].<type>`` has width
    N x bits(type) (``ld.global.v4.b32`` = 128, ``ld.global.v2.b16`` = 32); ``cp.async``
    global -> shared copies count as loads of their byte size."""
    out = _empty_counts()
    read = _ptx_registers_read(ptx)
    for line in ptx.splitlines():
        m = _PTX_ATOM_DEST.search(line)
        if m and m.group(1) not in read:
            out["unused_result_atomics"] += 1
    for op, mods in _PTX_OP.findall(ptx):
        if op in ("atom", "red"):
            out["atomics"] += 1
            out["returning_atomics"] += op == "atom"
            continue
        toks = mods.strip(".").split(".") if mods else []
        vec = 1
        bits = None
        for tok in toks:
            m = re.fullmatch(r"v(\d+)", tok)
            if m:
                vec = int(m.group(1))
            m = re.fullmatch(r"[bsuf](\d+)", tok)
            if m:
                bits = int(m.group(1))
        if bits is None:
            continue
        _add(out["stores"] if op == "st" else out["loads"], vec * bits)
    for size in _PTX_CP_ASYNC.findall(ptx):
        _add(out["loads"], int(size, 0) * 8)
    return out


_PTX_ATOM_DEST = re.compile(r"\batom\.global\S*\s+(%\w+)\s*,")
_PTX_REG = re.compile(r"%\w+")


def _ptx_registers_read(ptx: str) -> set:
    """Registers a PTX listing reads: every register operand but an instruction's first
    (its destination, or a vector of them; stores and reductions, whose first operand is
    an address in brackets, read all of theirs), and predicate guards."""
    read = set()
    for line in ptx.splitlines():
        code = line.split("//", 1)[0].strip()
        if not code or code.startswith((".", "{", "}")) or code.endswith(":"):
            continue
        if code.startswith("@"):             # predicate guard: read
            guard, _, code = code.partition(" ")
            read.update(_PTX_REG.findall(guard))
        _, _, operands = code.partition(" ")
        operands = operands.strip()
        if operands.startswith("{"):         # a vector destination { %r1, %r2 }
            operands = operands.partition("}")[2]
        elif not operands.startswith("["):
            operands = operands.partition(",")[2]
        read.update(_PTX_REG.findall(operands))
    return read


def parse_ptxas_v(log: str) -> dict:
    """``ptxas -v`` output -> registers, stack, spill store/load bytes, shared memory bytes."""
    out = {}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                  log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    m = re.search(r"(\d+) bytes smem", log)
    out["smem"] = int(m.group(1)) if m else 0
    return out


def parse_res_usage(text: str) -> dict:
    """``cuobjdump -res-usage`` -> {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..} of the
    (single) function in the cubin."""
    out = {}
    for line in text.splitlines():
        if "REG:" in line:
            for key, val in re.findall(r"([A-Z_\[\]0-9]+):(\d+)", line):
                out[key] = int(val)
    return out


# ---------------------------------------------------------------- 1. record
def _describe(value):
    """JSON description of one launch argument: what Triton specialises on."""
    import torch

    if hasattr(value, "value") and type(value).__name__ == "constexpr":
        value = value.value
    if isinstance(value, torch.Tensor) or (hasattr(value, "data_ptr") and hasattr(value, "dtype")):
        return {"t": "tensor", "dtype": str(value.dtype).replace("torch.", ""),
                "aligned": value.data_ptr() % 16 == 0}
    if value is None:
        return {"t": "none"}
    if isinstance(value, bool):
        return {"t": "bool", "v": value}
    if isinstance(value, int):
        return {"t": "int", "v": value}
    if isinstance(value, float):
        return {"t": "float", "v": value}
    if isinstance(value, str):
        return {"t": "str", "v": value}
    if isinstance(value, (tuple, list)):
        return {"t": "tuple", "v": [_describe(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"t": "torch_dtype", "v": str(value).replace("torch.", "")}
    import triton.language as tl
    if isinstance(value, tl.dtype):
        return {"t": "tl_dtype", "v": str(value)}
    return {"t": "unsupported", "v": repr(value)[:200]}


def _tiny_model(dtype):
    import torch
    from torch import nn

    # 41x48 = 1968 elements: one full 1024-element block and a tail; 3x5 = 15: odd size.
    model = nn.Sequential(nn.Linear(41, 48), nn.GELU(), nn.Linear(48, 3), nn.GELU(),
                          nn.Linear(3, 5))
    return model.to(dtype)


def record(out_path: str) -> dict:
    """Train the tiny model over every configuration under the interpreter and record every
    launch; writes ``{"launches": [...], "configs": [...], "errors": [...]}`` to out_path."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("record() needs TRITON_INTERPRET=1")
    import torch
    from triton.runtime import interpreter

    from dps_kernels import DPSAdamW
    from dps_kernels.backends import get_backend

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    launches: dict = {}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        kid = f"{fn.__module__}:{fn.__qualname__}"
        names = list(self.arg_names)
        bound = dict(zip(names, args))
        options = {}
        for key, val in kwargs.items():
            if key in names:
                bound[key] = val
            else:
                options[key] = val
        try:
            desc = {"kernel": kid,
                    "args": {k: _describe(bound[k]) for k in names if k in bound},
                    "options": {k: _describe(v) for k, v in sorted(options.items())}}
        except Exception as exc:   # never break the launch; the gate reports it
            desc = {"kernel": kid, "args": {}, "options": {},
                    "record_error": f"{type(exc).__name__}: {exc}"}
        key = json.dumps(desc, sort_keys=True)
        if key in launches:
            launches[key]["launches"] += 1
        else:
            desc["launches"] = 1
            launches[key] = desc
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    configs, errors = [], []
    has_capturable = "capturable" in inspect.signature(DPSAdamW.__init__).parameters
    try:
        for mode in ("dense", "mix"):
            for freeze in (False, True):
                for dname in RECORD_DTYPES:
                    for capturable in ((False, True) if has_capturable else (None,)):
                        cfg = dict(mode=mode, freeze=freeze, dtype=dname)
                        extra = {}
                        if capturable is not None:
                            cfg["capturable"] = extra["capturable"] = capturable
                        try:
                            _train(mode, freeze, dtypes[dname], extra)
                        except Exception as exc:   # record and go on: the gate reports it
                            errors.append(f"{cfg}: {type(exc).__name__}: {exc} "
                                          f"({_where(exc)})"[:2000])
                        configs.append(cfg)
        backend = get_backend("triton")
        gen = torch.Generator().manual_seed(1)
        gam = torch.rand(5 * 1024, generator=gen)        # 4 programs x 2 tiles on CPU
        factor = torch.rand(64, generator=gen)
        for label, args, kw in (("select_threshold dense", (gam, None, 1000), {}),
                                ("select_threshold mix", (gam, factor, 1000), {}),
                                ("select_threshold approx", (gam, None, 1000), {"approx": True}),
                                ("select_threshold mix approx", (gam, factor, 1000),
                                 {"approx": True})):
            try:
                backend.select_threshold(*args, **kw)
            except Exception as exc:
                errors.append(f"{label}: {type(exc).__name__}: {exc} ({_where(exc)})"[:2000])
            configs.append({"op": label})
    finally:
        interpreter.InterpretedFunction.run = original
    result = {"launches": list(launches.values()), "configs": configs, "errors": errors,
              "capturable_option": has_capturable}
    Path(out_path).write_text(json.dumps(result, indent=1))
    return result


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame that raised ``exc``."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return f"at {frames[-1].filename}:{frames[-1].lineno}" if frames else "no traceback"


def _train(mode: str, freeze: bool, dtype, extra: dict) -> None:
    import torch

    from dps_kernels import DPSAdamW

    torch.manual_seed(0)
    model = _tiny_model(dtype)
    opt = DPSAdamW.from_model(model, lr=1e-3, weight_decay=0.01, mode=mode, p=0.3,
                              update_steps=RECORD_UPDATE_STEPS, freeze=freeze,
                              backend="triton", **extra)
    x = torch.randn(4, 41).to(dtype)
    model.train()
    for _ in range(RECORD_STEPS):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


# ---------------------------------------------------------------- 2. compile + 3. analyse
class _FakeDriver:
    """Just enough of a Triton driver for ``warmup`` to compile for ``target``."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def is_active(self):
        return True


def _rebuild(desc: dict):
    import torch
    import triton.language as tl

    t = desc["t"]
    if t == "tensor":
        dtype = getattr(torch, desc["dtype"])
        buf = torch.zeros(64, dtype=dtype)   # allocator memory: 64-byte aligned at least
        return buf if desc["aligned"] else buf[1:]
    if t == "tl_dtype":
        return tl.dtype(desc["v"])
    if t == "torch_dtype":
        return getattr(torch, desc["v"])
    if t == "none":
        return None
    if t == "tuple":
        return tuple(_rebuild(v) for v in desc["v"])
    if t == "unsupported":
        raise TypeError(f"argument {desc['v']} cannot be rebuilt")
    return desc["v"]


def _constexpr_names(jit_fn) -> list:
    return [p.name for p in jit_fn.params if p.is_constexpr]


def _label_value(desc: dict):
    if desc["t"] in ("tl_dtype", "torch_dtype", "str", "int", "float", "bool"):
        return desc["v"]
    return desc["t"]


def _spec(jit_fn, args: dict) -> str:
    """Non-constexpr arguments Triton specialises on, compactly: misaligned pointers, ints
    equal to 1 or divisible by 16."""
    parts = []
    for p in jit_fn.params:
        if p.is_constexpr or p.name not in args:
            continue
        d = args[p.name]
        if p.do_not_specialize:
            continue
        if d["t"] == "tensor" and not d["aligned"] and not p.do_not_specialize_on_alignment:
            parts.append(f"{p.name}:misaligned")
        elif d["t"] == "int" and d["v"] == 1:
            parts.append(f"{p.name}=1")
        elif (d["t"] == "int" and d["v"] % 16 == 0
              and not p.do_not_specialize_on_alignment):
            parts.append(f"{p.name}%16")
    return " ".join(parts)


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def cubin_text_sections(cubin: bytes) -> list:
    """The code (``.text.*`` sections) of a 64-bit little-endian ELF cubin, in file order."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize)
                for i in range(shnum)]
    _, _, _, _, str_off, str_size = sections[shstrndx]
    names = cubin[str_off:str_off + str_size]
    out = []
    for name_off, _, _, _, offset, size in sections:
        name = names[name_off:names.index(b"\0", name_off)].decode()
        if name.startswith(".text."):
            out.append(cubin[offset:offset + size])
    return out


_SASS_OFFSET = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*)")


def batched_sass(cubins: dict, arch: str) -> dict:
    """{key: SASS text} of many cubins in one ``nvdisasm -b SMxy`` run over their
    concatenated code (nvdisasm costs ~0.2 s per call, mostly start-up); {} if that fails."""
    spans, blobs, offset = [], [], 0
    for key, cubin in cubins.items():
        try:
            code = b"".join(cubin_text_sections(cubin))
        except (struct.error, ValueError, IndexError):
            return {}
        spans.append((offset, offset + len(code), key))
        blobs.append(code)
        offset += len(code)
    if not offset:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(blobs))
        f.flush()
        proc = _run([_tool("nvdisasm"), "-b", arch.replace("sm_", "SM"), f.name])
    if proc.returncode:
        return {}
    out = {key: [] for _, _, key in spans}
    i = 0
    for line in proc.stdout.splitlines():
        m = _SASS_OFFSET.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        while i < len(spans) and addr >= spans[i][1]:
            i += 1
        if i == len(spans):
            break
        if addr >= spans[i][0]:
            out[spans[i][2]].append(m.group(2))
    return {key: "\n".join(lines) for key, lines in out.items()}


def _analyse_all(kernels: dict, cc: int, target: str, workdir: Path) -> dict:
    """{hash: analysis} of every compiled kernel of one target (see the module docstring)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = sm_arch_from_capability(cc)
    sass = batched_sass({h: k.asm["cubin"] for h, (k, _) in kernels.items()}, arch) \
        if target in SASS_TARGETS else {}
    out = {}
    for h, (kernel, ptxas_log) in kernels.items():
        name = h[:16]
        ptx_path, cubin_path = workdir / f"{name}.ptx", workdir / f"{name}.cubin"
        cubin_path.write_bytes(kernel.asm["cubin"])
        a = {"num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages,
             "shared": kernel.metadata.shared, "arch": arch}
        if "Used" not in ptxas_log:
            # Compiled earlier (Triton's disk cache): rerun ptxas -v with Triton's flags
            # (make_cubin) on Triton's PTX.
            ptx_path.write_text(kernel.asm["ptx"])
            fp_fusion = bool(getattr(kernel.metadata, "enable_fp_fusion", True))
            proc = _run([get_ptxas(cc).path, "-lineinfo",
                         *([] if fp_fusion else ["--fmad=false"]), "-v",
                         "--regAllocOptLevel=2", f"--gpu-name={arch}", str(ptx_path), "-o",
                         str(workdir / f"{name}.o")])
            ptxas_log = proc.stdout + proc.stderr
            if proc.returncode:
                a["ptxas_error"] = ptxas_log[-2000:]
        a["ptxas"] = parse_ptxas_v(ptxas_log)
        res = parse_res_usage(_run([_tool("cuobjdump"), "-res-usage", str(cubin_path)]).stdout)
        a["res_usage"] = res
        a["registers"] = res.get("REG", a["ptxas"].get("registers"))
        a["local"] = res.get("LOCAL", a["ptxas"].get("stack", 0))
        a["spill_stores"] = a["ptxas"].get("spill_stores")
        a["spill_loads"] = a["ptxas"].get("spill_loads")
        counts = None
        if target in SASS_TARGETS:
            text = sass.get(h) or _run([_tool("cuobjdump"), "-sass", str(cubin_path)]).stdout
            counts = sass_widths(text)
            if not (counts["loads"] or counts["stores"] or counts["atomics"]):
                counts = None
        if counts is not None:
            a["widths_from"] = "sass"
        else:   # sm_70: the bundled cuobjdump/nvdisasm print no SASS for it
            counts = ptx_widths(kernel.asm["ptx"])
            a["widths_from"] = "ptx"
        a.update(counts)
        a["occupancy"] = resident_warps(a["registers"] or 255, a["num_warps"], a["shared"], cc)
        out[h] = a
    return out


def compile_target(target: str, record_path: str, out_path: str) -> None:
    """Compile every recorded launch for ``target`` (in this process: call it in a fresh
    subprocess without TRITON_INTERPRET) and write the analysed rows to ``out_path``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_target() must run without TRITON_INTERPRET")
    import contextlib
    import importlib
    import io

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    cc = TARGETS[target]
    driver.set_active(_FakeDriver(GPUTarget("cuda", cc, 32)))
    knobs.nvidia.dump_ptxas_log = True   # Triton prints its own ptxas -v log: keep it
    recorded = json.loads(Path(record_path).read_text())["launches"]
    rows: dict = {}
    kernels: dict = {}
    failures = []
    t0 = time.perf_counter()
    for rec in recorded:
        kid = rec["kernel"]
        name = kernel_name(kid)
        if "record_error" in rec:
            failures.append({"kernel": kid, "name": name, "target": target, "args": {},
                             "options": {}, "error": "could not record the launch: "
                             + rec["record_error"]})
            continue
        args = dict(rec["args"])
        overrides = {**GPU_CONSTEXPRS.get("*", {}), **GPU_CONSTEXPRS.get(name, {})}
        log = io.StringIO()
        try:
            module, qualname = kid.split(":", 1)
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            jit_fn = obj
            constexprs = _constexpr_names(jit_fn)
            for key, val in overrides.items():
                if key in constexprs and key in args:
                    args[key] = _describe(val)
            kwargs = {k: _rebuild(d) for k, d in args.items()}
            options = {k: _rebuild(d) for k, d in rec["options"].items()}
            with contextlib.redirect_stdout(log):
                kernel = jit_fn.warmup(grid=(1,), **kwargs, **options)
        except Exception as exc:
            failures.append({"kernel": kid, "name": name, "target": target,
                             "args": rec["args"], "options": rec["options"],
                             "error": f"{type(exc).__name__}: {exc}"[-4000:]})
            continue
        h = kernel.metadata.hash
        if h not in rows:
            rows[h] = {"kernel": kid, "name": name, "target": target, "hash": h,
                       "constexprs": {k: _label_value(args[k]) for k in constexprs
                                      if k in args},
                       "spec": _spec(jit_fn, args),
                       "aligned": _is_aligned(args, constexprs),
                       "options": {k: _label_value(d) for k, d in rec["options"].items()},
                       "launches": 0, "records": 0}
            kernels[h] = (kernel, log.getvalue())
        rows[h]["launches"] += rec["launches"]
        rows[h]["records"] += 1
    compile_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        for h, a in _analyse_all(kernels, cc, target, Path(tmp)).items():
            rows[h].update(a)
    Path(out_path).write_text(json.dumps(
        {"target": target, "rows": list(rows.values()), "failures": failures,
         "seconds": {"compile": round(compile_s, 2),
                     "analyse": round(time.perf_counter() - t0 - compile_s, 2)}}, indent=1))


def _is_aligned(args: dict, constexprs: list) -> bool:
    """Every pointer argument 16-byte aligned, and the table addresses too (ALIGNED)."""
    if any(d["t"] == "tensor" and not d["aligned"] for d in args.values()):
        return False
    flag = args.get(ALIGNED_CONSTEXPR)
    return not (ALIGNED_CONSTEXPR in constexprs and flag is not None and flag.get("v") is False)


# ---------------------------------------------------------------- the gate's checks
def _rows(result: dict, names=None, targets=None):
    for row in result["rows"]:
        if (names is None or row["name"] in names) and (targets is None
                                                        or row["target"] in targets):
            yield row


def label(row: dict) -> str:
    """Kernel name and constexprs (True bools by name, False bools left out; BLOCK and the
    interpreter switch omitted), then the non-constexpr specialisation in brackets."""
    parts = []
    for k, v in row["constexprs"].items():
        if k in (BLOCK_CONSTEXPR, "EMULATE_RNE") or v is False:
            continue
        parts.append(k if v is True else f"{k}={v}")
    if row.get("spec"):
        parts.append(f"[{row['spec']}]")
    return " ".join([row["name"], *parts])


def param_dtype(row: dict):
    """fp32 / bf16 / fp16 of a row: the PARAM_DTYPE constexpr, else the first float dtype
    constexpr, else None (dtype-independent kernels such as the histograms)."""
    cx = row["constexprs"]
    if PARAM_DTYPE_CONSTEXPR in cx:
        return cx[PARAM_DTYPE_CONSTEXPR]
    for v in cx.values():
        if v in ("fp32", "bf16", "fp16"):
            return v
    return None


def check_recorded(result: dict) -> list:
    seen = {kernel_name(k) for k in result["record"]["kernels"]}
    out = [f"recording launched no {name}" for name in REQUIRED_KERNELS if name not in seen]
    out += [f"recording error: {e}" for e in result["record"]["errors"]]
    return out


def check_compiled(result: dict) -> list:
    out = [f"{f['name']} on {f['target']} failed to compile: {f['error'][:500]}"
           for f in result["failures"]]
    missing = set(result["targets"]) - {r["target"] for r in result["rows"]}
    out += [f"nothing compiled for {t}" for t in sorted(missing)]
    return out


def triton_version(result: dict) -> tuple:
    """(major, minor) of the triton that compiled ``result``."""
    return tuple(int(x) for x in re.findall(r"\d+", result["meta"]["triton"])[:2])


def gate_exception(result: dict, check: str, row: dict):
    """The GATE_EXCEPTIONS entry that waives ``check`` for ``row`` under this result's
    triton, or None."""
    version = triton_version(result)
    for exc in GATE_EXCEPTIONS:
        lo, hi = exc["triton"]
        if exc["check"] != check or not lo <= version <= hi or row["name"] not in exc["kernels"]:
            continue
        if exc["targets"] is not None and row["target"] not in exc["targets"]:
            continue
        cx = row["constexprs"]
        if any(cx.get(k) not in (v if isinstance(v, tuple) else (v,))
               for k, v in exc["where"].items()):
            continue
        if exc["unused_result_only"] and (row.get("returning_atomics", 0)
                                          > row.get("unused_result_atomics", 0)):
            continue   # an atomic whose old value is read: a real failure
        return exc
    return None


def _waive(result: dict, check: str, found: list) -> list:
    """Failures of ``found`` ((row, message) pairs) not waived by GATE_EXCEPTIONS; the
    waived ones go to ``result["waived"][check]`` with their reason."""
    failures, waived = [], []
    for row, msg in found:
        exc = gate_exception(result, check, row)
        if exc is None:
            failures.append(msg)
        else:
            waived.append(f"{msg} -- waived for triton {result['meta']['triton']}: "
                          f"{exc['why']}")
    result.setdefault("waived", {})[check] = waived
    return failures


def check_spills(result: dict) -> list:
    found = []
    for row in _rows(result):
        spills = (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0)
        if spills or row.get("local") or row.get("spill_stores") is None:
            found.append((row, f"{label(row)} on {row['target']}: spill stores "
                               f"{row.get('spill_stores')} B, loads {row.get('spill_loads')} B, "
                               f"LOCAL {row.get('local')}"))
    return _waive(result, "spills", found)


def has_128_bit_loads(row: dict) -> bool:
    return row["loads"].get("128", 0) > 0


def check_vectorized(result: dict) -> list:
    """Every aligned specialisation of the VECTORIZED_KERNELS has 128-bit global loads on
    every target (SASS LDG.E.128 on sm_80/sm_90a, PTX ld.global.v4 on sm_70), and the
    step kernel has aligned specialisations for fp32 and for a 16-bit param dtype."""
    out = []
    for target in result["targets"]:
        for name in VECTORIZED_KERNELS:
            rows = [r for r in _rows(result, (name,), (target,)) if r["aligned"]]
            if not rows:
                out.append(f"{name} on {target}: no aligned specialisation compiled")
            for row in rows:
                if not has_128_bit_loads(row):
                    out.append(f"{label(row)} on {target}: no 128-bit global load "
                               f"(loads by width {row['loads']}, from {row['widths_from']})")
        dtypes = {param_dtype(r) for r in _rows(result, (STEP_KERNEL,), (target,))
                  if r["aligned"]}
        for need, ok in (("fp32", "fp32" in dtypes), ("16-bit", bool(dtypes & {"bf16", "fp16"}))):
            if not ok:
                out.append(f"{STEP_KERNEL} on {target}: no aligned {need} specialisation")
    return out


def check_occupancy(result: dict) -> list:
    return _waive(result, "occupancy", [
        (row, f"{label(row)} on {row['target']}: {row['occupancy']['warps']} resident warps/SM "
              f"< {MIN_RESIDENT_WARPS} ({row['registers']} registers x {row['num_warps']} "
              f"warps, {row['shared']} B shared; limited by {row['occupancy']['limiter']})")
        for row in _rows(result, STREAMING_KERNELS, OCCUPANCY_TARGETS)
        if row["occupancy"]["warps"] < MIN_RESIDENT_WARPS])


def check_atomics(result: dict) -> list:
    """The histogram kernels add their counts with non-returning reductions (SASS REDG, PTX
    red.global): nothing reads an atomic's old value back, so none may wait for one."""
    return _waive(result, "atomics", [
        (row, f"{label(row)} on {row['target']}: {row['returning_atomics']} returning global "
              f"atomics (ATOMG / atom.global), {row.get('unused_result_atomics', 0)} of them "
              f"with a result nothing reads")
        for row in _rows(result)
        if row["name"] in HIST_KERNELS and row.get("returning_atomics", 0)])


CHECKS = {"recorded": check_recorded, "compiled": check_compiled, "spills": check_spills,
          "vectorized": check_vectorized, "occupancy": check_occupancy,
          "atomics": check_atomics}


def gate_failures(result: dict) -> dict:
    """{check name: [failure, ...]} (empty lists when the check passes)."""
    return {name: fn(result) for name, fn in CHECKS.items()}


# ---------------------------------------------------------------- driver and report
def _env(interpret: bool) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _subprocess(args, interpret: bool, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.aot", *args], cwd=ROOT,
                          env=_env(interpret), capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"`python -m bench.aot {' '.join(args)}` failed "
                           f"(rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def run_gate(out_dir, targets=None, jobs=None, write=True, argv=None) -> dict:
    """Record, compile for every target (in parallel subprocesses), analyse; returns the
    result dict and, with ``write``, writes aot.json and aot.md to ``out_dir``."""
    targets = list(targets or TARGETS)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}; known: {list(TARGETS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rec_path = Path(tmp) / "record.json"
        record_s = _subprocess(["_record", str(rec_path)], interpret=True)
        jobs = jobs or min(len(targets), os.cpu_count() or 1)
        paths = {t: Path(tmp) / f"compile_{t}.json" for t in targets}
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futs = {t: pool.submit(_subprocess, ["_compile", t, str(rec_path), str(paths[t])],
                                   False) for t in targets}
            compile_s = {t: round(f.result(), 1) for t, f in futs.items()}
        recorded = _record_summary(json.loads(rec_path.read_text()))
        compiled = [json.loads(p.read_text()) for p in paths.values()]
    result = {
        "meta": _meta(argv, targets),
        "targets": targets,
        "record": recorded,
        "rows": [r for c in compiled for r in c["rows"]],
        "failures": [f for c in compiled for f in c["failures"]],
        "seconds": {"record": round(record_s, 1), "compile": compile_s,
                    "total": round(time.perf_counter() - t0, 1)},
    }
    result["rows"].sort(key=lambda r: (r["name"], label(r), list(TARGETS).index(r["target"])))
    result["checks"] = gate_failures(result)
    if write:
        (out_dir / "aot.json").write_text(_dump(result))
        (out_dir / "aot.md").write_text(render_markdown(result))
    return result


def _record_summary(recorded: dict) -> dict:
    """The recording without its per-launch argument descriptions (they only feed the
    compile step): launches and distinct signatures per kernel id."""
    by_kernel: dict = {}
    for rec in recorded["launches"]:
        entry = by_kernel.setdefault(rec["kernel"], {"launches": 0, "signatures": 0})
        entry["launches"] += rec["launches"]
        entry["signatures"] += 1
    return {"kernels": by_kernel, "configs": recorded["configs"], "errors": recorded["errors"],
            "capturable_option": recorded["capturable_option"]}


def _meta(argv, targets) -> dict:
    import triton

    from bench.env import _git

    status = _git("status", "--porcelain", "--untracked-files=no", "--", "dps_kernels")
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton": triton.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "kernels_dirty": None if status is None else bool(status),
        "command": " ".join(["python", "-m", "bench.aot", *map(shlex.quote, argv or [])]),
        "targets": targets,
    }


def _widths(d: dict) -> str:
    return " ".join(f"{k}:{d[k]}" for k in sorted(d, key=int, reverse=True)) or "-"


def _dump(result: dict) -> str:
    """aot.json: indented, except one line per row."""
    head = {k: v for k, v in result.items() if k != "rows"}
    text = json.dumps(head, indent=1)[:-2]
    rows = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in result["rows"])
    return f'{text},\n "rows": [\n  {rows}\n ]\n}}\n'


def render_markdown(result: dict) -> str:
    meta = result["meta"]
    rec = result["record"]
    n_launch = sum(k["launches"] for k in rec["kernels"].values())
    n_sig = sum(k["signatures"] for k in rec["kernels"].values())
    lines = [
        "# AOT compile gate of the Triton kernels (compiled, not run)",
        "",
        f"`{meta['command']}` — triton {meta['triton']}, commit `{meta['git_commit']}`"
        + (" (dps_kernels/ modified)" if meta["kernels_dirty"] else "")
        + f", {meta['timestamp']}. Targets: {', '.join(result['targets'])}. "
        f"Wall time: record {result['seconds']['record']} s, compile "
        + ", ".join(f"{t} {s} s" for t, s in result["seconds"]["compile"].items())
        + f" (parallel), total {result['seconds']['total']} s.",
        "",
        f"Recorded under `TRITON_INTERPRET=1`: {n_launch} launches, "
        f"{n_sig} distinct argument signatures of {len(rec['kernels'])} kernels, from "
        f"{len([c for c in rec['configs'] if 'mode' in c])} training runs "
        f"(`DPSAdamW.from_model`, mode dense/mix x freeze x fp32/bf16/fp16"
        + (" x capturable" if rec.get("capturable_option") else "")
        + f", update_steps={RECORD_UPDATE_STEPS}, {RECORD_STEPS} steps) and "
        f"{len([c for c in rec['configs'] if 'op' in c])} `select_threshold` calls. Each "
        "row is one compiled specialisation (Triton's cache key) on one target; constexprs "
        f"replaced for CUDA: `{json.dumps(GPU_CONSTEXPRS)}`.",
        "",
        "Labels: constexprs, True flags by name, False flags omitted, BLOCK omitted; "
        "[brackets]: non-constexpr arguments Triton specialised (ints == 1 or % 16, "
        "misaligned pointers). Columns: registers (cubin), spill store/load bytes (ptxas -v), LOCAL (cubin), "
        "shared bytes, warps per block, resident warps/SM (limiter), global loads and stores "
        "by width in bits (`bits:count`; SASS on sm_80/sm_90a, PTX on sm_70), atomics, "
        "launches recorded.",
        "",
        "## Checks",
        "",
    ]
    for name, fails in result["checks"].items():
        waived = result.get("waived", {}).get(name, [])
        lines.append(f"- **{name}**: " + ("pass" if not fails else f"FAIL ({len(fails)})")
                     + (f", {len(waived)} waived (GATE_EXCEPTIONS)" if waived else ""))
        for f in fails[:40]:
            lines.append(f"  - {f}")
        if len(fails) > 40:
            lines.append(f"  - ... {len(fails) - 40} more in aot.json")
        for w in waived[:40]:
            lines.append(f"  - waived: {w}")
    lines += ["", "## Specialisations", "",
              "| kernel specialisation | target | regs | spill st/ld B | local | shared B "
              "| warps | resident warps/SM | loads (bits:n) | stores (bits:n) | atomics "
              "| launches |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        occ = r["occupancy"]
        lines.append(
            f"| {label(r)} | {r['target']} | {r['registers']} | {r['spill_stores']}/"
            f"{r['spill_loads']} | {r['local']} | {r['shared']} | {r['num_warps']} | "
            f"{occ['warps']} ({occ['limiter']}) | {_widths(r['loads'])} | "
            f"{_widths(r['stores'])} | {r['atomics']} | {r['launches']} |")
    if result["failures"]:
        lines += ["", "## Compile failures", ""]
        for f in result["failures"]:
            lines.append(f"- `{f['name']}` on {f['target']}: `{f['error'][:300]}`")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.aot",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"),
                    help="directory for aot.md and aot.json (default bench/results)")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--jobs", type=int, default=None,
                    help="targets compiled in parallel (default: min(targets, cores))")
    ap.add_argument("--check", action="store_true", help="exit 1 if any check fails")
    return ap.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_record"]:
        record(argv[1])
        return 0
    if argv[:1] == ["_compile"]:
        compile_target(argv[1], argv[2], argv[3])
        return 0
    args = parse_args(argv)
    result = run_gate(args.out, args.targets, args.jobs, argv=argv)
    print(f"{len(result['rows'])} specialisation x target rows, "
          f"{len(result['failures'])} compile failures, {result['seconds']['total']} s; "
          f"wrote {Path(args.out) / 'aot.md'} and aot.json")
    failed = False
    for name, fails in result["checks"].items():
        waived = result.get("waived", {}).get(name, [])
        print(f"check {name}: " + ("pass" if not fails else f"FAIL ({len(fails)})")
              + (f", {len(waived)} waived" if waived else ""))
        for f in fails[:10]:
            print(f"  {f}")
        for w in waived[:10]:
            print(f"  waived: {w}")
        failed |= bool(fails)
    return 1 if (failed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
