"""PREDICTED optimizer-step times from a byte model (roofline), and a check of the model
against the compiled kernels.

    python -m bench.roofline [--fwd-bwd-ms 100] [--us 50] [--out bench/results] [--aot PATH]
    python -m bench roofline ...                 (the same)

Every figure this writes is PREDICTED: bytes each kernel must move (``BYTE_MODEL``) over
BERT-large's tensors, divided by a GPU's peak DRAM bandwidth (100% and 80% of it). Nothing
is measured; launch overheads, caches and the time a kernel spends not streaming are
ignored. The byte model per element (P = param/grad bytes, O = Mix output bytes, GAM fp32):

    AdamW step (PLAIN)      read w, g, m, v; write w, m, v                     7P
    Dense / Mix Stage I     + read and write GAM                               7P + 8
    Dense Stage II          + read GAM                                         7P + 4
    Mix Stage II            nothing more (g was masked in backward)            7P
    Mix Stage II + freeze   + read GAM (the per-column factor is cached)       7P + 4
    selection               3 histogram passes, each reads GAM                 3 x 4
    mix_weight              read W and the anchor, write W~ (Stage II + GAM)   2P + O (+4)
    mix_grad                read g, write g*M (Stage II + GAM)                 2P (+4)

Tensors: every parameter of ``BertForSequenceClassification`` at BERT-large size (hidden
1024, 24 layers, 16 heads, intermediate 4096, vocabulary 28996), built on the meta device
(no download); the DPS tensors are the ``nn.Linear`` weights, the rest take the plain AdamW
step, as ``DPSAdamW.from_model`` does.

End-to-end overhead (PREDICTED): per cycle of ``2 us`` steps, ``us`` Stage I and ``us``
Stage II steps and one selection; Mix adds ``mix_weight`` + ``mix_grad`` per DPS tensor per
step. Overhead = (mean DPS step time - AdamW step time) / (fwd+bwd time + AdamW step time),
on an A100-80GB at 80% of peak, with the fwd+bwd time an ASSUMPTION (``--fwd-bwd-ms``,
default 100 ms for BERT-large, batch 16, sequence 128).

``compare_with_gate`` checks the model against ``bench/aot.py``'s output: for each compiled
``_dps_step_kernel`` specialisation whose kind the constexprs identify, the bytes per element
of its 128-bit SASS accesses, ``(#LDG.E.128 + #STG.E.128) x 16 B x (32 x num_warps) / BLOCK``
(the tail path uses scalar masked accesses, so 128-bit accesses are the full-block path's),
next to the model's bytes per element.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the byte model (one place)
# Per element: how many P-byte values (param dtype; the gradient too), O-byte values (Mix
# output dtype), fp32 values (GAM) and bits (the packed Stage II subnetwork, mask_bits.py)
# each kernel reads and writes. "_bits" keys: what DPSAdamW runs by default (it packs the
# subnetwork at the selection); the GAM keys: capturable=True (the mask from GAM each step).
BYTE_MODEL = {
    "plain":             dict(read_p=4, write_p=3),
    "dense_stage1":      dict(read_p=4, write_p=3, read_f32=1, write_f32=1),
    "dense_stage2":      dict(read_p=4, write_p=3, read_f32=1),
    "mix_stage1":        dict(read_p=4, write_p=3, read_f32=1, write_f32=1),
    "mix_stage2":        dict(read_p=4, write_p=3),
    "mix_stage2_freeze": dict(read_p=4, write_p=3, read_f32=1),
    "hist_pass":         dict(read_f32=1),              # x HIST_PASSES per selection
    "mix_weight_stage1": dict(read_p=2, write_o=1),
    "mix_weight_stage2": dict(read_p=2, write_o=1, read_f32=1),
    "mix_grad_stage1":   dict(read_p=1, write_p=1),
    "mix_grad_stage2":   dict(read_p=1, write_p=1, read_f32=1),
    "dense_stage2_bits":      dict(read_p=4, write_p=3, read_bits=1),
    "mix_stage2_freeze_bits": dict(read_p=4, write_p=3, read_bits=1),
    "mix_weight_stage2_bits": dict(read_p=2, write_o=1, read_bits=1),
    "mix_grad_stage2_bits":   dict(read_p=1, write_p=1, read_bits=1),
    "pack_bits":              dict(read_f32=1, write_bits=1),   # once per selection
}
HIST_PASSES = 3
GPUS = {"V100": 900e9, "A100-80GB": 2.0e12, "H100 SXM": 3.35e12}   # peak DRAM bytes/s
EFFICIENCIES = (1.0, 0.8)
E2E_GPU, E2E_EFFICIENCY = "A100-80GB", 0.8
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def bytes_per_element(key: str, p: int, o: int = None, streamed_only: bool = False) -> float:
    """Bytes per element of ``BYTE_MODEL[key]`` for P-byte params and O-byte Mix output.

    ``streamed_only``: without the bit reads (a word per 32 elements, loaded as 32-bit
    scalars, not as the 128-bit streams the compile gate counts)."""
    m = BYTE_MODEL[key]
    o = p if o is None else o
    bits = 0 if streamed_only else (m.get("read_bits", 0) + m.get("write_bits", 0)) / 8
    return ((m.get("read_p", 0) + m.get("write_p", 0)) * p
            + (m.get("read_o", 0) + m.get("write_o", 0)) * o
            + 4 * (m.get("read_f32", 0) + m.get("write_f32", 0)) + bits)


def step_key(kind: str, freeze: bool, bits: bool = False) -> str:
    """BYTE_MODEL key of a fused-step kind (``StepKind.value``) with or without freeze, and
    with the Stage II mask read from packed bits (``MASK_BITS``)."""
    key = "mix_stage2_freeze" if (kind == "mix_stage2" and freeze) else kind
    if bits and key in ("dense_stage2", "mix_stage2_freeze"):
        key += "_bits"
    return key


# ---------------------------------------------------------------- predictions
def bert_large_counts() -> dict:
    """Elements of BERT-large's DPS tensors (nn.Linear weights) and of all its parameters."""
    from bench.triton_step import bert_shapes

    dps = total = tensors = dps_tensors = 0
    for _, shape, is_dps in bert_shapes(toy=False):
        n = 1
        for s in shape:
            n *= s
        total += n
        tensors += 1
        if is_dps:
            dps += n
            dps_tensors += 1
    return {"dps_elements": dps, "total_elements": total, "plain_elements": total - dps,
            "tensors": tensors, "dps_tensors": dps_tensors}


def predicted_bytes(counts: dict, p: int) -> dict:
    """Bytes per optimizer step (or per selection / per training step of Mix wiring)."""
    dps, plain, total = counts["dps_elements"], counts["plain_elements"], counts["total_elements"]
    step = lambda kind: dps * bytes_per_element(kind, p) + plain * bytes_per_element("plain", p)
    return {
        "AdamW (fused)": total * bytes_per_element("plain", p),
        "Dense Stage I": step("dense_stage1"),
        "Dense Stage II": step("dense_stage2_bits"),
        "Mix Stage I": step("mix_stage1"),
        "Mix Stage II": step("mix_stage2"),
        "Mix Stage II + freeze": step("mix_stage2_freeze_bits"),
        "selection (3 histogram passes + pack)":
            dps * (HIST_PASSES * bytes_per_element("hist_pass", p)
                   + bytes_per_element("pack_bits", p)),
        "Mix wiring Stage I (mix_weight + mix_grad)":
            dps * (bytes_per_element("mix_weight_stage1", p)
                   + bytes_per_element("mix_grad_stage1", p)),
        "Mix wiring Stage II (mix_weight + mix_grad)":
            dps * (bytes_per_element("mix_weight_stage2_bits", p)
                   + bytes_per_element("mix_grad_stage2_bits", p)),
        "capturable: Dense Stage II (mask from GAM)": step("dense_stage2"),
    }


def ms(nbytes: float, gpu: str, efficiency: float) -> float:
    return nbytes / (GPUS[gpu] * efficiency) * 1e3


def end_to_end(b: dict, fwd_bwd_ms: float, us: int) -> dict:
    """Predicted mean step overhead of DPS over fused AdamW (module docstring)."""
    t = {k: ms(v, E2E_GPU, E2E_EFFICIENCY) for k, v in b.items()}
    sel = t["selection (3 histogram passes + pack)"] / (2 * us)
    dense = (t["Dense Stage I"] + t["Dense Stage II"]) / 2 + sel
    mix = ((t["Mix Stage I"] + t["Mix Stage II"]) / 2 + sel
           + (t["Mix wiring Stage I (mix_weight + mix_grad)"]
              + t["Mix wiring Stage II (mix_weight + mix_grad)"]) / 2)
    base = fwd_bwd_ms + t["AdamW (fused)"]
    return {"AdamW step ms": t["AdamW (fused)"], "DPS Dense mean step ms": dense,
            "DPS Mix mean step ms": mix,
            "Dense overhead %": 100 * (dense - t["AdamW (fused)"]) / base,
            "Mix overhead %": 100 * (mix - t["AdamW (fused)"]) / base}


# ---------------------------------------------------------------- check against the gate
def identify_kind(constexprs: dict):
    """(StepKind value, None) of a step-kernel specialisation from its constexprs, or
    (None, why not). Uses ``fused_step.KIND_CODE``: StepKind -> KIND code, or -> (KIND, STAGE)."""
    from bench.aot import KIND_CONSTEXPR

    if KIND_CONSTEXPR not in constexprs:
        return None, (f"no {KIND_CONSTEXPR} constexpr: one specialisation serves every kind "
                      "(the kind is read at run time)")
    try:
        from dps_kernels.ops.triton.fused_step import KIND_CODE
    except Exception as exc:   # noqa: BLE001 - any import problem means: cannot identify
        return None, f"fused_step.KIND_CODE unavailable ({type(exc).__name__}: {exc})"
    for kind, code in KIND_CODE.items():
        if isinstance(code, tuple):
            kind_code, stage = code
            if (constexprs.get(KIND_CONSTEXPR) == kind_code
                    and constexprs.get("STAGE", stage) == stage):
                return kind.value, None
        elif constexprs.get(KIND_CONSTEXPR) == code:
            return kind.value, None
    return None, (f"constexprs {KIND_CONSTEXPR}={constexprs.get(KIND_CONSTEXPR)} "
                  f"STAGE={constexprs.get('STAGE')} match no entry of KIND_CODE "
                  "(e.g. STAGE 0: decided on the device)")


def gate_bytes_per_element(row: dict):
    """Bytes/element of the 128-bit accesses of a compiled row, or None without BLOCK."""
    from bench.aot import BLOCK_CONSTEXPR

    block = row["constexprs"].get(BLOCK_CONSTEXPR)
    if not isinstance(block, int) or block <= 0:
        return None
    n128 = row["loads"].get("128", 0) + row["stores"].get("128", 0)
    return n128 * 16 * 32 * row["num_warps"] / block


def compare_with_gate(aot: dict) -> dict:
    """{"rows": [...], "skipped": [...]} for every ``_dps_step_kernel`` row of an aot.json
    result compiled to SASS (sm_80 / sm_90a)."""
    from bench.aot import (FREEZE_CONSTEXPR, SASS_TARGETS, STEP_KERNEL, label, param_dtype)

    rows, skipped = [], []
    for row in aot.get("rows", []):
        if row["name"] != STEP_KERNEL or row["target"] not in SASS_TARGETS:
            continue
        cx = row["constexprs"]
        kind, why = identify_kind(cx)
        dtype = param_dtype(row)
        grad = cx.get("GRAD_DTYPE", dtype)
        if kind is None:
            skipped.append(f"{label(row)} on {row['target']}: {why}")
            continue
        if dtype not in DTYPE_BYTES or grad != dtype:
            skipped.append(f"{label(row)} on {row['target']}: param/grad dtype {dtype}/{grad} "
                           "not in the model (grad in the param dtype)")
            continue
        freeze = bool(cx.get(FREEZE_CONSTEXPR, False))
        key = step_key(kind, freeze, bool(cx.get("MASK_BITS", False)))
        model = bytes_per_element(key, DTYPE_BYTES[dtype], streamed_only=True)
        rows.append({"label": label(row), "target": row["target"], "kind": kind,
                     "dtype": dtype, "freeze": freeze, "model_bytes": model,
                     "gate_bytes": gate_bytes_per_element(row),
                     "ldg128": row["loads"].get("128", 0),
                     "stg128": row["stores"].get("128", 0)})
    return {"rows": rows, "skipped": skipped}


# ---------------------------------------------------------------- report
def build(fwd_bwd_ms: float, us: int, aot_path=None) -> dict:
    counts = bert_large_counts()
    result = {"counts": counts, "fwd_bwd_ms": fwd_bwd_ms, "us": us,
              "gpus_bytes_per_s": GPUS, "efficiencies": list(EFFICIENCIES),
              "byte_model": BYTE_MODEL, "dtypes": {}}
    for dtype in ("fp32", "bf16"):
        b = predicted_bytes(counts, DTYPE_BYTES[dtype])
        result["dtypes"][dtype] = {
            "bytes": b,
            "ms": {k: {f"{g} @{int(e * 100)}%": ms(v, g, e) for g in GPUS for e in EFFICIENCIES}
                   for k, v in b.items()},
            "end_to_end": end_to_end(b, fwd_bwd_ms, us),
        }
    if aot_path is not None and Path(aot_path).exists():
        result["gate"] = compare_with_gate(json.loads(Path(aot_path).read_text()))
        result["gate"]["source"] = str(aot_path)
    return result


def render_markdown(r: dict, command: str) -> str:
    c = r["counts"]
    cols = [f"{g} @{int(e * 100)}%" for g in GPUS for e in EFFICIENCIES]
    lines = [
        "# PREDICTED optimizer-step times (roofline; nothing here is measured)",
        "",
        f"`{command}`, {datetime.date.today().isoformat()}. Byte model: bench/roofline.py "
        "`BYTE_MODEL`; time = bytes / (peak DRAM bandwidth x efficiency), no launch overhead. "
        "Peaks: " + ", ".join(f"{g} {v / 1e12:.2f} TB/s" for g, v in GPUS.items()) + ".",
        "",
        f"BERT-large (BertForSequenceClassification, meta device): {c['tensors']} tensors, "
        f"{c['total_elements']:,} parameters, of which {c['dps_elements']:,} in "
        f"{c['dps_tensors']} DPS tensors (nn.Linear weights); the rest take the AdamW step.",
        "",
    ]
    for dtype, d in r["dtypes"].items():
        lines += [f"## {dtype} parameters: PREDICTED ms", "",
                  "| kernel pass | GB | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for k, v in d["ms"].items():
            lines.append(f"| {k} | {d['bytes'][k] / 1e9:.3f} | "
                         + " | ".join(f"{v[c]:.3f}" for c in cols) + " |")
        lines.append("")
    lines += [f"## PREDICTED end-to-end overhead ({E2E_GPU} at {int(E2E_EFFICIENCY * 100)}% "
              "of peak)", "",
              f"Assumptions: forward+backward {r['fwd_bwd_ms']} ms per step (BERT-large, "
              f"batch 16, sequence 128; an assumed figure, `--fwd-bwd-ms`), us = {r['us']} "
              "(one selection per 2 us steps), Mix output dtype = param dtype.", "",
              "| dtype | AdamW step ms | DPS Dense mean step ms | Dense overhead | "
              "DPS Mix mean step ms | Mix overhead |", "|---|---|---|---|---|---|"]
    for dtype, d in r["dtypes"].items():
        e = d["end_to_end"]
        lines.append(f"| {dtype} | {e['AdamW step ms']:.3f} | {e['DPS Dense mean step ms']:.3f} "
                     f"| {e['Dense overhead %']:+.2f}% | {e['DPS Mix mean step ms']:.3f} | "
                     f"{e['Mix overhead %']:+.2f}% |")
    gate = r.get("gate")
    if gate is not None:
        lines += ["", "## Byte model vs the compiled step kernel (bench/aot.py)", "",
                  f"From `{gate['source']}`: bytes/element of the full-block path's 128-bit "
                  "accesses = (#LDG.E.128 + #STG.E.128) x 16 B x (32 x num_warps) / BLOCK.", ""]
        if gate["rows"]:
            lines += ["| specialisation | target | kind | model B/elem | compiled B/elem "
                      "(LDG.128 + STG.128) | agree |", "|---|---|---|---|---|---|"]
            for g in gate["rows"]:
                lines.append(f"| {g['label']} | {g['target']} | {g['kind']} | "
                             f"{g['model_bytes']} | {g['gate_bytes']} ({g['ldg128']} + "
                             f"{g['stg128']}) | {'yes' if g['gate_bytes'] == g['model_bytes'] else 'NO'} |")
        for s in gate["skipped"]:
            lines.append(f"- skipped: {s}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.roofline",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--fwd-bwd-ms", type=float, default=100.0,
                    help="ASSUMED forward+backward ms per step on the A100 (default 100)")
    ap.add_argument("--us", type=int, default=50, help="stage length us (default 50)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--aot", default=None,
                    help="aot.json of bench/aot.py to compare with (default OUT/aot.json)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "-m", "bench.roofline", *map(shlex.quote, argv)])
    r = build(args.fwd_bwd_ms, args.us, args.aot or out / "aot.json")
    r["command"] = command
    md = render_markdown(r, command)
    (out / "roofline.md").write_text(md)
    (out / "roofline.json").write_text(json.dumps(r, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
