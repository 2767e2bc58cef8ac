"""Stage II selection over all BERT-large DPS tensors: Triton radix select vs torch.sort and topk.

For every ``nn.Linear`` weight of BERT-large (from ``transformers.BertConfig``, meta device,
no download) with a random GAM, selects ``k = ceil(n * (1 - p))`` elements, p = 0.3:

* ``triton``: ``BACKEND.select_threshold`` per tensor (3 histogram passes, threshold on
  device; 7 launches per tensor);
* ``triton_batched``: ``BACKEND.select_thresholds`` over all tensors at once (7 launches);
* ``triton_approx``: the same with ``approx=True`` (first pass only);
* ``sort``: ``torch.sort(score, descending=True)`` and ``thr = sorted[k - 1]`` (what the
  authors' code does, minus their int64 index copies);
* ``topk``: ``torch.topk(score, k, sorted=False)`` and ``thr = values.min()`` (torch's
  exact top-k, unsorted).

Dense scores are GAM; Mix scores are ``GAM * column_factor[col]`` (the factor from a random
FAM). The masks ``score >= thr`` of triton, topk and sort must be identical (checked on every
tensor, not timed); the approximate mask must contain the exact one. Target (issue 3):
triton >= 20x faster than the sort-based selection.

Timing: ``triton.testing.do_bench`` on CUDA (median, 20/80% quantiles), a steady-state timer
on CPU (``--toy`` under ``TRITON_INTERPRET=1``, only to prove the script runs).

    python bench/triton_select.py [--out bench/results/triton_select.jsonl]
    TRITON_INTERPRET=1 python bench/triton_select.py --toy
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.triton_step import bert_shapes, conditions, timer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true",
                        help="toy BERT on CPU under TRITON_INTERPRET=1 (proves the script runs)")
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--out", default=None, help="JSON lines file to append to "
                        "(default bench/results/triton_select.jsonl on CUDA, none with --toy)")
    args = parser.parse_args()
    if args.toy and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from dps_kernels import reference as ref
    from dps_kernels.backends import get_backend
    from dps_kernels.mask_hash import columns_of
    from dps_kernels.schedule import selected_count

    backend = get_backend("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or (None if args.toy else str(ROOT / "bench/results/triton_select.jsonl"))
    bench = timer(device, args.toy)
    cond = conditions(device)
    shapes = [s for _, s, is_dps in bert_shapes(args.toy) if is_dps]
    gen = torch.Generator(device=device).manual_seed(0)
    records = []
    for mode in ("dense", "mix"):
        items = []
        for shape in shapes:
            gam = torch.randn(shape, generator=gen, device=device).pow(2)
            factor = None
            if mode == "mix":
                fam = torch.randint(0, 60, (columns_of(shape),), generator=gen, device=device)
                factor = ref.mix_column_factor(fam.float(), 60)
            items.append((gam, factor, selected_count(gam.numel(), args.p)))

        def triton_all(approx=False):
            return [backend.select_threshold(g, f, k, approx=approx) for g, f, k in items]

        def triton_batched():
            return backend.select_thresholds(items)

        def sort_all():
            out = []
            for g, f, k in items:
                score = g if f is None else ref.mix_score(g, f)
                out.append(torch.sort(score.reshape(-1), descending=True).values[k - 1])
            return out

        def topk_all():
            out = []
            for g, f, k in items:
                score = g if f is None else ref.mix_score(g, f)
                out.append(torch.topk(score.reshape(-1), k, sorted=False).values.min())
            return out

        # correctness first (untimed): identical masks, approx a superset
        identical = superset = True
        for (g, f, k), t, b, a, s, o in zip(items, triton_all(), triton_batched(),
                                            triton_all(True), sort_all(), topk_all()):
            score = g if f is None else ref.mix_score(g, f)
            identical &= bool(torch.equal(score >= t, score >= s))
            identical &= bool(torch.equal(score >= o, score >= s))
            identical &= bool(torch.equal(score >= b, score >= s))
            superset &= bool(((score >= s) <= (score >= a)).all())
        extra = sum(int((ref.mix_score(g, f) if f is not None else g).ge(a).sum()) - k
                    for (g, f, k), a in zip(items, triton_all(True)))
        n = sum(g.numel() for g, _, _ in items)
        timings = {name: bench(fn) for name, fn in (
            ("triton", triton_all), ("triton_batched", triton_batched),
            ("triton_approx", lambda: triton_all(True)),
            ("topk", topk_all), ("sort", sort_all))}
        for name, (med, q20, q80) in timings.items():
            records.append(dict(cond, op=name, mode=mode, tensors=len(items), elements=n,
                                p=args.p, ms=med, ms_q20=q20, ms_q80=q80,
                                speedup_vs_sort=timings["sort"][0] / med,
                                masks_identical=identical, approx_superset=superset,
                                approx_extra_selected_fraction=extra / n))
    print(f"# Stage II selection, {'toy BERT' if args.toy else 'BERT-large'} DPS tensors "
          f"on {cond['device']}\n")
    print(f"torch {cond['torch']}, triton {cond['triton']}, commit {cond['git_commit']}, "
          f"interpreter={cond['interpreter']}\n")
    print("| mode | op | tensors | elements | median ms (20-80%) | x faster than sort | "
          "masks identical | approx: superset, extra selected |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['mode']} | {r['op']} | {r['tensors']} | {r['elements']:,} | "
              f"{r['ms']:.2f} ({r['ms_q20']:.2f}-{r['ms_q80']:.2f}) | "
              f"{r['speedup_vs_sort']:.1f} | {r['masks_identical']} | "
              f"{r['approx_superset']}, {100 * r['approx_extra_selected_fraction']:.3f}% |")
    if out:
        with open(out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"\nappended {len(records)} JSON lines to {out}")
    if not all(r["masks_identical"] and r["approx_superset"] for r in records):
        sys.exit("selection masks differ from torch.sort's")


if __name__ == "__main__":
    main()
