"""The bit-packed Stage II subnetwork (dps_kernels/mask_bits.py) on every backend.

* The reference layout against a Python loop (element i = bit i % 32 of int32 word i // 32,
  LSB first, tail bits zero), on odd sizes.
* ``Backend.pack_mask`` of each backend available here (torch; cpu when the C++ extension
  is built; triton under ``TRITON_INTERPRET=1``) EXACTLY equals the reference: Dense and
  Mix scores, ties at the threshold, sizes around a word, a Triton block and a C++ chunk.
* Stage II consumers: a fused step (Dense, Mix with freeze and without; freeze on and off;
  every param dtype the backend supports) with ``mask_bits`` set and GAM, the column factor
  and the threshold left out gives EXACTLY the params and moments of the same step with
  GAM (same backend); likewise ``mix_weight`` / ``mix_grad`` with a bits-only ``MixMask``,
  and the group API (``step_group`` with ``TensorEntry.mask_bits``). Inverting the bits
  must change the result, so the bits are really read.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dps_kernels import mask_bits as mb
from dps_kernels import reference as ref
from dps_kernels.backends import get_backend, unavailable_reason
from dps_kernels.mask_hash import columns_of
from dps_kernels.schedule import selected_count
from dps_kernels.step_types import GroupStep, MixMask, StepKind, TensorEntry, TensorStep
from triton_device import device_for

DTYPES = {"torch": (torch.float32, torch.bfloat16, torch.float16),
          "cpu": (torch.float32, torch.bfloat16),
          "triton": (torch.float32, torch.bfloat16, torch.float16)}
# 1, around one word, odd 2-d, more than one Triton block (1024 elements); the cpu backend
# also gets more than one C++ chunk (32768 elements: 2 threads split words and elements at
# odd offsets). The interpreter is slow, so triton stays below that.
PACK_SHAPES = [(1,), (31,), (32,), (33,), (7, 13), (1000,), (3, 1100)]
STEP_SHAPES = [(1,), (7, 13), (33, 70)]
BIG = [(129, 385)]


def _big(name):
    return BIG if name == "cpu" else []


def _backend(name):
    reason = unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"{name} backend unavailable: {reason}")
    return get_backend(name)


backends = pytest.mark.parametrize("name", ["torch", "cpu", "triton"])


def _case(name, dtype):
    if dtype not in DTYPES[name]:
        pytest.skip(f"the {name} backend does not support {dtype}")


# ------------------------------------------------------------------ the reference layout
def _python_pack(mask):
    flat = [bool(x) for x in mask.reshape(-1).tolist()]
    words = [0] * ((len(flat) + 31) // 32)
    for i, bit in enumerate(flat):
        if bit:
            words[i // 32] |= 1 << (i % 32)
    return words   # uint32 values


@pytest.mark.parametrize("shape", [(1,), (31,), (32,), (33,), (7, 13), (1000,)], ids=str)
def test_reference_layout_is_the_python_loop(shape):
    gen = torch.Generator().manual_seed(1)
    score = torch.randint(0, 3, shape, generator=gen).float()
    thr = torch.tensor(1.0)
    words = mb.pack_mask(score, thr)
    n = score.numel()
    assert words.dtype == torch.int32 and words.shape == (mb.num_words(n),)
    assert [w & 0xFFFFFFFF for w in words.tolist()] == _python_pack(score >= thr)
    assert torch.equal(mb.unpack_mask(words, shape), score >= thr)
    # tail bits past n are zero (also when every element is selected)
    full = mb.pack_mask(torch.ones(shape), torch.tensor(0.0))
    tail = n % 32
    last = full[-1].item() & 0xFFFFFFFF
    assert last == (0xFFFFFFFF if tail == 0 else (1 << tail) - 1)


def test_reference_bit_order():
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[0, 2, 31, 32]] = True
    words = mb.pack_bool(mask)
    # element 0 is the LSB; element 31 is bit 31 (the int32 sign bit); element 32 word 1
    assert words.tolist() == [1 + 4 - 2**31, 1]
    with pytest.raises(ValueError, match="int32 words"):
        mb.unpack_mask(words, (65,))


# ------------------------------------------------------------------ pack on each backend
def _scores(shape, gen, ties):
    if ties:    # integer-valued GAM: the threshold is tied with many elements
        return torch.randint(0, 4, shape, generator=gen).float()
    return torch.rand(shape, generator=gen).pow(3)


@backends
@pytest.mark.parametrize("mix", [False, True], ids=["dense", "mix"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_pack_equals_reference(name, mix, ties):
    backend, dev = _backend(name), device_for(name)
    gen = torch.Generator().manual_seed(2)
    for shape in PACK_SHAPES + _big(name):
        gam = _scores(shape, gen, ties).to(dev)
        cols = columns_of(shape)
        factor = None
        if mix:
            fam = torch.randint(0, 4, (cols,), generator=gen).float().to(dev)
            factor = ref.mix_column_factor(fam, 3)
        score = gam if factor is None else ref.mix_score(gam, factor)
        n = gam.numel()
        for k in sorted({1, selected_count(n, 0.3), n}):
            thr = ref.kth_largest(score, k)
            want = mb.pack_mask(score, thr)
            got = backend.pack_mask(gam, factor, thr)
            assert got.dtype == torch.int32 and torch.equal(got, want), (shape, k)
            assert torch.equal(mb.unpack_mask(got, shape), score >= thr)
            # in place into a buffer full of garbage
            out = torch.full((mb.num_words(n),), -1, dtype=torch.int32, device=dev)
            assert backend.pack_mask(gam, factor, thr, out=out) is out
            assert torch.equal(out, want), (shape, k)
        # thresholds tied with elements keep all ties; above everything selects nothing
        assert torch.equal(backend.pack_mask(gam, factor, score.reshape(-1)[0].clone()),
                           mb.pack_mask(score, score.reshape(-1)[0]))
        nothing = backend.pack_mask(gam, factor, torch.tensor(float("inf"), device=dev))
        assert not bool(nothing.any())


@backends
def test_pack_rejects_bad_out(name):
    backend, dev = _backend(name), device_for(name)
    gam, thr = torch.rand(5, 13, device=dev), torch.tensor(0.5, device=dev)
    with pytest.raises(ValueError, match="int32"):
        backend.pack_mask(gam, None, thr, out=torch.zeros(2, dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match="int32"):
        backend.pack_mask(gam, None, thr, out=torch.zeros(3, device=dev))


# ------------------------------------------------------------------ the fused step
def _stage_two_state(shape, dtype, mix, gen, dev):
    """Built with ``gen`` on the CPU (the same numbers everywhere), then moved to ``dev``."""
    cols = columns_of(shape)
    st = dict(param=(torch.randn(shape, generator=gen) * 0.5).to(dtype),
              exp_avg=(torch.randn(shape, generator=gen) * 0.1).to(dtype),
              exp_avg_sq=(torch.rand(shape, generator=gen) * 0.01).to(dtype),
              grad=torch.randn(shape, generator=gen).to(dtype),
              gam=torch.randint(0, 5, shape, generator=gen).float(),   # ties
              fam=torch.randint(0, 4, (cols,), generator=gen).float())
    st = {k: v.to(dev) for k, v in st.items()}
    st["cols"] = cols
    st["factor"] = ref.mix_column_factor(st["fam"], 3) if mix else None
    score = st["gam"] if not mix else ref.mix_score(st["gam"], st["factor"])
    st["threshold"] = ref.kth_largest(score, selected_count(score.numel(), 0.4))
    return st


def _run_step(backend, states, kind, freeze, bits, scalars, plain):
    """One step() of every state (cloned) plus a plain tensor; returns the new tensors.
    ``bits``: None (GAM path) or the words per state; with bits, GAM, the factor and the
    threshold are not handed over at all."""
    out = [{k: st[k].clone() for k in ("param", "exp_avg", "exp_avg_sq")} for st in states]
    tasks = []
    for st, o, words in zip(states, out, bits or [None] * len(states)):
        task = TensorStep(kind, o["param"], st["grad"], o["exp_avg"], o["exp_avg_sq"], scalars,
                          gam=st["gam"].clone(), threshold=st["threshold"], fam=st["fam"],
                          column_factor=st["factor"], cols=st["cols"])
        if words is not None:
            task = dataclasses.replace(task, gam=None, threshold=None, column_factor=None,
                                       mask_bits=words)
        tasks.append(task)
    p = {k: plain[k].clone() for k in ("param", "exp_avg", "exp_avg_sq")}
    tasks.append(TensorStep(StepKind.PLAIN, p["param"], plain["grad"], p["exp_avg"],
                            p["exp_avg_sq"], scalars))
    backend.step(tasks, freeze)
    return out + [p]


def _assert_same(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        for key in x:
            assert torch.equal(x[key], y[key]), f"{what}: tensor {i} {key} differs"


def _differs(a, b):
    return any(not torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", [StepKind.DENSE_STAGE2, StepKind.MIX_STAGE2],
                         ids=lambda k: k.value)
@pytest.mark.parametrize("freeze", [False, True], ids=["nofreeze", "freeze"])
def test_stage_two_step_with_bits_equals_gam_path(name, dtype, kind, freeze):
    _case(name, dtype)
    backend, dev = _backend(name), device_for(name)
    gen = torch.Generator().manual_seed(3)
    mix = kind is StepKind.MIX_STAGE2
    states = [_stage_two_state(s, dtype, mix, gen, dev) for s in STEP_SHAPES + _big(name)]
    plain = _stage_two_state((5,), dtype, False, gen, dev)
    style = "hf_legacy" if freeze else "torch"   # both AdamW styles, alternately
    scalars = ref.adamw_scalars(2e-2, 0.8, 0.95, 1e-6, 0.1, 4, style)
    bits = [backend.pack_mask(st["gam"], st["factor"], st["threshold"]) for st in states]
    with_gam = _run_step(backend, states, kind, freeze, None, scalars, plain)
    with_bits = _run_step(backend, states, kind, freeze, bits, scalars, plain)
    _assert_same(with_bits, with_gam, f"{name} {kind.value} freeze={freeze}")
    if kind is StepKind.DENSE_STAGE2 or freeze:
        # the bits are read: inverted bits (tail bits aside) give another step
        inverted = [~w for w in bits]
        assert _differs(_run_step(backend, states, kind, freeze, inverted, scalars, plain),
                        with_gam)


@backends
@pytest.mark.parametrize("mode", ["dense", "mix"])
@pytest.mark.parametrize("freeze", [False, True], ids=["nofreeze", "freeze"])
def test_group_step_with_bits_equals_gam_path(name, mode, freeze):
    """``step_group`` (the optimizer's API; Triton: cached address tables with the
    ``mask_bits`` column) with ``TensorEntry.mask_bits`` set equals the GAM path."""
    backend, dev = _backend(name), device_for(name)
    gen = torch.Generator().manual_seed(4)
    dtype = torch.float32
    states = [_stage_two_state(s, dtype, mode == "mix", gen, dev)
              for s in STEP_SHAPES + _big(name)]
    scalars = ref.adamw_scalars(2e-2, 0.8, 0.95, 1e-6, 0.1, 4, "torch")
    results = []
    for use_bits in (False, True):
        entries, grads, outs = [], [], []
        for i, st in enumerate(states):
            o = {k: st[k].clone() for k in ("param", "exp_avg", "exp_avg_sq")}
            words = backend.pack_mask(st["gam"], st["factor"], st["threshold"])
            entries.append(TensorEntry(o["param"], o["exp_avg"], o["exp_avg_sq"], index=i,
                                       cols=st["cols"], gam=st["gam"].clone(), fam=st["fam"],
                                       column_factor=st["factor"], threshold=st["threshold"],
                                       mask_bits=words if use_bits else None))
            grads.append(st["grad"])
            outs.append(o)
        cache = {}
        for _ in range(2):   # the second step runs on the cached tables
            backend.step_group(GroupStep(mode, entries, grads, freeze, "torch", t=4, stage=2,
                                         scalars=scalars, cache=cache))
        results.append(outs)
    _assert_same(results[1], results[0], f"{name} group {mode} freeze={freeze}")


# ------------------------------------------------------------------ Mix weight and gradient
@backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_factor", [True, False], ids=["mix", "dense_score"])
def test_mix_weight_and_grad_with_bits_equal_gam_path(name, dtype, with_factor):
    _case(name, dtype)
    backend = _backend(name)
    if name != "triton" and not with_factor:
        pytest.skip(f"the {name} mix ops take a Mix (factor) mask only")
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    # cpu: 2 threads split the 49665 elements of BIG at 24833, not a word boundary
    torch.set_num_threads(2)
    try:
        _mix_cases(backend, device_for(name), dtype, with_factor, gen,
                   [(1,), (7, 13), (3, 1100)] + _big(name))
    finally:
        torch.set_num_threads(threads)


def _mix_cases(backend, dev, dtype, with_factor, gen, shapes):
    for shape in shapes:
        st = _stage_two_state(shape, dtype, with_factor, gen, dev)
        mask = MixMask(st["cols"], gam=st["gam"], column_factor=st["factor"],
                       threshold=st["threshold"])
        words = backend.pack_mask(st["gam"], st["factor"], st["threshold"])
        bits_mask = MixMask(st["cols"], mask_bits=words)
        anchor = torch.randn(shape, generator=gen).to(dev, dtype)
        grad = st["grad"]
        assert torch.equal(backend.mix_grad(grad, bits_mask), backend.mix_grad(grad, mask))
        for p in (0.0, 0.3):
            for out_dtype in (None, torch.float32):
                got = backend.mix_weight(st["param"], anchor, bits_mask, p, out_dtype)
                want = backend.mix_weight(st["param"], anchor, mask, p, out_dtype)
                assert got.dtype == want.dtype and torch.equal(got, want), (shape, p)
        if shape != (1,) and 0 < int(words.ne(0).sum()):
            inverted = MixMask(st["cols"], mask_bits=~words)
            assert not torch.equal(backend.mix_grad(grad, inverted),
                                   backend.mix_grad(grad, mask))


@backends
def test_mix_rejects_bad_bits(name):
    backend, dev = _backend(name), device_for(name)
    grad = torch.randn(4, 40, device=dev)
    bad = MixMask(40, mask_bits=torch.zeros(4, dtype=torch.int32, device=dev))   # needs 5 words
    with pytest.raises((ValueError, RuntimeError), match="int32"):
        backend.mix_grad(grad, bad)


def test_triton_rejects_bits_when_capturable():
    backend, dev = _backend("triton"), device_for("triton")
    grad = torch.randn(4, 40, device=dev)
    words = mb.pack_bool(torch.ones(4, 40, dtype=torch.bool, device=dev))
    mask = MixMask(40, gam=torch.rand(4, 40, device=dev), column_factor=torch.ones(40, device=dev),
                   threshold=torch.tensor(0.5, device=dev), device_step=torch.zeros((), device=dev),
                   key_base=1, keep_threshold=1 << 23, update_steps=2, mask_bits=words)
    with pytest.raises(ValueError, match="capturable"):
        backend.mix_grad(grad, mask)


def test_triton_group_rejects_mixed_bits():
    backend, dev = _backend("triton"), device_for("triton")
    gen = torch.Generator().manual_seed(6)
    states = [_stage_two_state(s, torch.float32, False, gen, dev) for s in [(7, 13), (33, 70)]]
    entries = [TensorEntry(st["param"], st["exp_avg"], st["exp_avg_sq"], index=i,
                           cols=st["cols"], gam=st["gam"], threshold=st["threshold"],
                           mask_bits=mb.pack_mask(st["gam"], st["threshold"]) if i else None)
               for i, st in enumerate(states)]
    scalars = ref.adamw_scalars(2e-2, 0.8, 0.95, 1e-6, 0.1, 4, "torch")
    with pytest.raises(ValueError, match="every tensor of a group or for none"):
        backend.step_group(GroupStep("dense", entries, [st["grad"] for st in states], False,
                                     "torch", t=4, stage=2, scalars=scalars, cache={}))


# ------------------------------------------------------------------ DPSAdamW uses the bits
@pytest.mark.parametrize("mode", ["dense", "mix"])
def test_optimizer_packs_the_subnetwork_and_reloads_without_bits(mode):
    """DPSAdamW packs ``score >= thr`` into ``state["mask_bits"]`` at every selection; a
    Dense state dict without the bits (saved before they existed) gets them packed on load,
    and training continues exactly as the uninterrupted run; a Mix one is refused."""
    from torch import nn

    from dps_kernels import DPSAdamW

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(40, 33), nn.Tanh(), nn.Linear(33, 3))

    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 40, generator=gen), torch.randn(8, 3, generator=gen))
            for _ in range(7)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    kw = dict(mode=mode, p=0.4, update_steps=2, lr=1e-2, backend="torch")
    full = make()
    full_opt = DPSAdamW.from_model(full, **kw)
    train(full, full_opt, data[:2])            # the selection follows step 2
    for m in (full[0], full[2]):
        st = full_opt.state[m.weight]
        assert torch.equal(full_opt.subnetwork(m.weight),
                           mb.unpack_mask(st["mask_bits"], m.weight.shape))
        if mode == "dense":
            assert torch.equal(st["mask_bits"], mb.pack_mask(st["gam"], st["threshold"]))
        else:
            # the hand-over: GAM was read for the last time; its buffer now holds W'
            # (the bits themselves are checked against the oracle in test_optimizer.py)
            assert torch.equal(st["gam"], m.weight.detach())
    train(full, full_opt, data[2:3])           # into Stage II
    sd = copy.deepcopy(full_opt.state_dict())   # state_dict() shares the live state dicts
    for state in sd["state"].values():
        state.pop("mask_bits", None)           # a checkpoint from before the bits
    resumed = make()
    resumed.load_state_dict(full.state_dict())
    resumed_opt = DPSAdamW.from_model(resumed, **kw)
    if mode == "mix":
        # Mix Stage II keeps W' in the GAM buffer: without the bits the subnetwork is gone.
        # (A state with a separate stage_anchor, i.e. format 1 or capturable, is upgraded:
        # test_capturable.py::test_capturable_state_dict_resumes_host_scheduled.)
        with pytest.raises(ValueError, match="mask_bits"):
            resumed_opt.load_state_dict(sd)
        return
    resumed_opt.load_state_dict(sd)
    train(full, full_opt, data[3:])
    train(resumed, resumed_opt, data[3:])
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
