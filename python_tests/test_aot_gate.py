"""AOT compile gate of the Triton kernels (bench/aot.py) and its byte-model check
(bench/roofline.py), without a GPU.

The gate runs once per session (module fixture): it records every kernel launch of a short
training run under the interpreter, compiles each recorded specialisation for sm_70, sm_80
and sm_90a with a fake driver (its compile subprocesses drop ``TRITON_INTERPRET``, which CI
sets), and analyses the cubins. The tests below turn its checks into failures: compile
errors, spills, missing 128-bit loads on the full-block path of the streaming kernels, too
few resident warps, kernels the recording never launched, and the step kernel's 128-bit
traffic disagreeing with the roofline's byte model. The parsing and formula tests at the
end need no compiler.
"""
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:   # bench/ is not part of the installed package
    sys.path.insert(0, ROOT)

from bench import aot, roofline  # noqa: E402


def _gate_unavailable():
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton's NVIDIA backend cannot be imported: {exc}"
    missing = [t for t in ("cuobjdump",) if not Path(aot._tool(t)).exists()]
    if missing:
        return f"the triton wheel ships no {missing}"
    return None


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    reason = _gate_unavailable()
    if reason:
        pytest.skip(reason)
    return aot.run_gate(tmp_path_factory.mktemp("aot"), list(aot.TARGETS),
                        argv=["--out", "<tmp>"])


def _fail(failures):
    if failures:
        pytest.fail(f"{len(failures)} failure(s):\n" + "\n".join(failures[:40]))


def test_recording_launched_every_kernel(gate):
    _fail(aot.check_recorded(gate))


def test_every_specialisation_compiles_on_every_target(gate):
    _fail(aot.check_compiled(gate))


def test_nothing_spills(gate):
    _fail(aot.check_spills(gate))


def test_full_block_loads_are_128_bit(gate):
    _fail(aot.check_vectorized(gate))


def test_histograms_use_non_returning_atomics(gate):
    _fail(aot.check_atomics(gate))


def test_streaming_kernels_keep_16_warps_resident(gate):
    _fail(aot.check_occupancy(gate))


def test_gate_writes_its_report(gate):
    assert gate["rows"], "nothing compiled"
    assert set(gate["targets"]) == set(aot.TARGETS)
    md = aot.render_markdown(gate)
    assert "| kernel specialisation | target |" in md and aot.STEP_KERNEL in md
    # the gate's wall time is reported (aot.md), not asserted: a timed unit test fails on a
    # busy machine (the triton 3.8 gate took 650 s under load) and proves nothing about kernels
    assert gate["seconds"]["total"] > 0


def test_step_kernel_traffic_matches_byte_model(gate):
    cmp = roofline.compare_with_gate(gate)
    if not cmp["rows"]:
        pytest.skip("no step-kernel specialisation identifies its kind: "
                    + (cmp["skipped"][0] if cmp["skipped"] else "no step-kernel rows"))
    dtypes = {r["dtype"] for r in cmp["rows"]}
    assert {"fp32", "bf16"} <= dtypes, f"identified dtypes {dtypes}; skipped: {cmp['skipped']}"
    bad = [f"{r['label']} on {r['target']} ({r['kind']}): model {r['model_bytes']} B/elem, "
           f"compiled 128-bit accesses {r['gate_bytes']} B/elem "
           f"({r['ldg128']} LDG.128 + {r['stg128']} STG.128)"
           for r in cmp["rows"] if r["gate_bytes"] != r["model_bytes"]]
    _fail(bad)


# ---------------------------------------------------------------- no compiler needed
SASS = """
        /*0050*/                   LDG.E R0, [R2.64] ;                       /* 0x0000000e02007981 */
        /*0060*/              @!P0 LDG.E.128 R4, [R2.64+0x10] ;
        /*0070*/                   LDG.E.64 R8, [R6.64] ;
        /*0080*/                   LDG.E.U16 R9, [R6.64] ;
        /*0090*/                   LDG.E.128.CONSTANT R12, [R6.64] ;
        /*00a0*/                   STG.E.128 [R2.64], R4 ;
        /*00b0*/                   STG.E [R2.64], R4 ;
        /*00c0*/                   STG.E.U16 [R2.64], R4 ;
        /*00d0*/                   RED.E.ADD.STRONG.GPU [R2.64], R4 ;
        /*00e0*/                   ATOMG.E.ADD.STRONG.GPU PT, R3, [R4.64], R5 ;
        /*00f0*/                   LDGSTS.E.BYPASS.128 [R7], [R2.64] ;
        /*0100*/                   LDS R3, [R4] ;
        /*0110*/                   REDG.E.ADD.STRONG.GPU [R2.64], R4 ;
        /*0120*/                   REDUX.SUM.S32 UR4, R5 ;
        /*0130*/                   ATOMS.POPC.INC.32 RZ, [R6+UR4] ;
"""

PTX = """
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ld.global.L1::evict_last.b32 %r5, [ %rd2 + 0 ];
	@%p2 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
	ld.global.v2.b32 { %r6, %r7 }, [ %rd4 + 0 ];
	ld.global.b64 %rd9, [ %rd4 + 0 ];
	@%p3 st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
	st.global.b16 [ %rd6 + 0 ], { %rs1 };
	@%p4 atom.global.gpu.acq_rel.add.u32 %r8, [ %rd7 + 0 ], %r9;
	red.global.add.s32 [ %rd8 ], %r9;
	ld.shared.b32 %r10, [ %r11 ];
	cp.async.cg.shared.global [ %r12 + 0 ], [ %rd10 + 0 ], 0x10, %r13;
	cp.async.cg.shared.global [ %r12 + 0 ], [ %rd10 + 0 ], 16, %r13;
"""


def test_sass_width_counts():
    c = aot.sass_widths(SASS)
    assert c["loads"] == {"32": 1, "128": 3, "64": 1, "16": 1}
    assert c["stores"] == {"128": 1, "32": 1, "16": 1}
    # RED.E and REDG do not return, ATOMG does; REDUX (warp) and ATOMS (shared) are not global
    assert c["atomics"] == 3 and c["returning_atomics"] == 1


def test_ptx_width_counts():
    c = aot.ptx_widths(PTX)
    assert c["loads"] == {"128": 3, "32": 1, "16": 1, "64": 2}   # cp.async 16 B: 128 bits
    assert c["stores"] == {"128": 1, "16": 1}
    assert c["atomics"] == 2 and c["returning_atomics"] == 1
    assert c["unused_result_atomics"] == 1          # %r8 is never read


def test_ptx_atomic_whose_result_is_read():
    ptx = """
	mov.u32 %r8, 0x0;
	@%p4 atom.global.gpu.relaxed.add.u32 %r8, [ %rd7 + 0 ], %r9;
	@%p5 atom.global.gpu.relaxed.add.u32 %r10, [ %rd8 + 0 ], %r9;
	add.s32 %r11, %r3, %r8;
	@%p6 st.global.v2.b32 [ %rd9 + 0 ], { %r12, %r10 };
	ld.global.v2.b32 { %r13, %r14 }, [ %rd4 + 0 ];
	@%p7 atom.global.gpu.relaxed.add.u32 %r13, [ %rd8 + 0 ], %r9;
"""
    c = aot.ptx_widths(ptx)
    # %r8 read by the add, %r10 by the store; %r13 only written (by the load and the atom)
    assert c["returning_atomics"] == 3 and c["unused_result_atomics"] == 1


def _fake_gate(triton, rows):
    return {"meta": {"triton": triton}, "rows": rows}


def _hist_row(target, returning, unused):
    return {"name": "_multi_hist_kernel", "target": target, "constexprs": {"NUM_BINS": 1024},
            "spec": "", "returning_atomics": returning, "unused_result_atomics": unused}


def test_gate_exceptions_are_keyed_by_triton_version_and_row():
    rows = [_hist_row("sm_70", 4, 4)]
    old, new = _fake_gate("3.6.0", rows), _fake_gate("3.9.0", rows)
    assert aot.check_atomics(old) == [] and len(old["waived"]["atomics"]) == 1
    assert "waived for triton 3.6.0" in old["waived"]["atomics"][0]
    assert len(aot.check_atomics(new)) == 1 and new["waived"]["atomics"] == []
    # a read result, or another target, is never waived
    assert len(aot.check_atomics(_fake_gate("3.6.0", [_hist_row("sm_70", 4, 3)]))) == 1
    assert len(aot.check_atomics(_fake_gate("3.6.0", [_hist_row("sm_80", 4, 4)]))) == 1
    step = {"name": aot.STEP_KERNEL, "target": "sm_80", "spec": "", "registers": 146,
            "num_warps": 4, "shared": 0, "occupancy": {"warps": 12, "limiter": "registers"},
            "constexprs": {"PARAM_DTYPE": "bf16", "KIND": 2, "STAGE": 1, "FREEZE": True}}
    assert aot.check_occupancy(_fake_gate("3.6.0", [step])) == []
    assert len(aot.check_occupancy(_fake_gate("3.9.0", [step]))) == 1
    step["constexprs"] = {**step["constexprs"], "KIND": 1}     # Dense: no exception
    assert len(aot.check_occupancy(_fake_gate("3.6.0", [step]))) == 1
    step["constexprs"] = {**step["constexprs"], "KIND": 2, "STAGE": 2}
    assert len(aot.check_occupancy(_fake_gate("3.6.0", [step]))) == 1


def test_ptxas_and_res_usage_parsing():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_dps_step_kernel' for 'sm_80'
ptxas info    : Function properties for _dps_step_kernel
    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 148 registers, used 0 barriers, 408 bytes cmem[0]
"""
    assert aot.parse_ptxas_v(log) == {"registers": 148, "stack": 0, "spill_stores": 8,
                                      "spill_loads": 12, "smem": 0}
    res = """
Resource usage:
 Common:
  GLOBAL:0
 Function _dps_step_kernel:
  REG:148 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:408 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    r = aot.parse_res_usage(res)
    assert (r["REG"], r["STACK"], r["SHARED"], r["LOCAL"]) == (148, 0, 0, 0)


@pytest.mark.parametrize("regs,warps,shared,cc,expected,limiter", [
    (148, 4, 0, 80, 12, "registers"),      # 4864 regs/warp: 13 warps -> 3 blocks of 4
    (148, 4, 0, 90, 12, "registers"),
    (64, 4, 0, 80, 32, "registers"),       # 2048 regs/warp: 32 warps
    (32, 4, 0, 80, 64, "registers+warps"),
    (32, 4, 0, 70, 64, "registers+warps"),
    (32, 1, 0, 80, 32, "blocks"),           # 32 blocks/SM of one warp
    (40, 4, 16384, 80, 36, "shared"),       # 164 KiB / (16 KiB + 1 KiB) = 9 blocks
    (40, 4, 16384, 70, 24, "shared"),       # 96 KiB / 16 KiB = 6 blocks
    (255, 8, 0, 80, 8, "registers"),        # 8192 regs/warp: 8 warps, one block of 8
])
def test_resident_warps(regs, warps, shared, cc, expected, limiter):
    occ = aot.resident_warps(regs, warps, shared, cc)
    assert (occ["warps"], occ["limiter"]) == (expected, limiter)


def test_byte_model():
    b = roofline.bytes_per_element
    assert [b(k, 4) for k in ("plain", "dense_stage1", "dense_stage2", "mix_stage1",
                               "mix_stage2", "mix_stage2_freeze")] == [28, 36, 32, 36, 28, 32]
    assert [b(k, 2) for k in ("plain", "dense_stage1", "dense_stage2")] == [14, 22, 18]
    assert b("hist_pass", 4) == b("hist_pass", 2) == 4
    assert (b("mix_weight_stage1", 4), b("mix_weight_stage2", 4)) == (12, 16)
    assert (b("mix_weight_stage1", 2, 4), b("mix_grad_stage1", 2), b("mix_grad_stage2", 2)) \
        == (8, 4, 8)
    assert roofline.step_key("mix_stage2", True) == "mix_stage2_freeze"
    assert roofline.step_key("dense_stage2", True) == "dense_stage2"
    # the packed subnetwork: 1/8 byte per element instead of GAM's 4 (mask_bits.py)
    assert roofline.step_key("dense_stage2", False, bits=True) == "dense_stage2_bits"
    assert b("dense_stage2_bits", 4) == 28.125 and b("mix_stage2_freeze_bits", 2) == 14.125
    assert roofline.bytes_per_element("dense_stage2_bits", 4, streamed_only=True) == 28


def test_gate_bytes_per_element_formula():
    # fp32 Stage I, BLOCK 1024, 4 warps: w, g, m, v, GAM loaded (2 x 128-bit each per
    # thread), w, m, v, GAM stored: 18 x 16 B x 128 threads / 1024 = 36 B/elem
    row = {"constexprs": {"BLOCK": 1024}, "num_warps": 4,
           "loads": {"128": 10, "32": 3}, "stores": {"128": 8}}
    assert roofline.gate_bytes_per_element(row) == 36
    row["constexprs"] = {}
    assert roofline.gate_bytes_per_element(row) is None


def test_kind_identification_from_constexprs():
    assert roofline.identify_kind({})[0] is None
    assert "KIND" in roofline.identify_kind({})[1]
    pytest.importorskip("triton")
    try:
        from dps_kernels.ops.triton.fused_step import KIND_CODE
    except ImportError as exc:
        pytest.skip(f"fused_step cannot be imported: {exc}")
    for kind, code in KIND_CODE.items():
        cx = {"KIND": code[0], "STAGE": code[1]} if isinstance(code, tuple) else {"KIND": code}
        assert roofline.identify_kind(cx) == (kind.value, None)


def test_bench_dispatch_keeps_e2e_default():
    src = (Path(ROOT) / "bench" / "__main__.py").read_text()
    assert '["aot"]' in src and '["roofline"]' in src and "from bench.e2e import main" in src
