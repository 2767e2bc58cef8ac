"""Small CUDA programs for the GPU profilers (``scripts/gpu.sh profile`` and ``sanitize``).

``profile``: the fused step (Dense and Mix, Stage I and II, fp32) over BERT-large's
parameter list and the batched selection's histogram kernels over its DPS tensors, each
launched once between ``cudaProfilerStart``/``Stop``, after an unprofiled warm-up that
compiles the kernels and caches the launch tables (``ncu --profile-from-start off`` then
sees only the measured launches).

``cycle``: one small DPS run per mode (Dense, Mix; host-scheduled and capturable) through a
whole cycle and into the next (update_steps 2, 5 steps: Stage I, the selection, Stage II,
Stage I), for ``compute-sanitizer``. Prints one line per run.

    python bench/gpu_targets.py profile|cycle [--toy]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def profile(toy: bool) -> None:
    from bench.triton_step import bert_shapes, make_tasks
    from dps_kernels.backends import get_backend
    from dps_kernels.schedule import selected_count

    backend, device = get_backend("triton"), torch.device("cuda")
    shapes = bert_shapes(toy)
    runs = []
    for mode in ("dense", "mix"):
        for stage in (1, 2):
            tasks = make_tasks(shapes, torch.float32, device, mode, stage)
            runs.append((f"step {mode} stage {stage}", lambda t=tasks: backend.step(t, False)))
            del tasks
    gen = torch.Generator(device=device).manual_seed(0)
    gams = [torch.rand(s, generator=gen, device=device) for _, s, dps in shapes if dps]
    items = [(g, None, selected_count(g.numel(), 0.3)) for g in gams]
    runs.append(("select dense", lambda: backend.select_thresholds(items)))
    for _, run in runs:   # compile, cache the tables
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, run in runs:
        run()
        torch.cuda.synchronize()
        print(f"profiled: {name}")
    torch.cuda.cudart().cudaProfilerStop()


def cycle() -> None:
    from torch import nn

    from dps_kernels import DPSAdamW

    for mode, capturable in (("dense", False), ("mix", False), ("dense", True), ("mix", True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 10)).cuda()
        opt = DPSAdamW.from_model(model, mode=mode, p=0.3, update_steps=2, lr=1e-3,
                                  backend="triton", capturable=capturable)
        x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 10, device="cuda")
        for step in range(1, 6):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            if step == 2:   # the selection: Stage II next
                frac = opt.selected_fraction()
        torch.cuda.synchronize()
        finite = all(bool(w.isfinite().all()) for w in model.parameters())
        print(f"cycle {mode} capturable={capturable}: 5 steps, Stage II selected {frac:.3f} "
              f"(1 - p = 0.7), weights finite: {finite}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("profile", "cycle"))
    ap.add_argument("--toy", action="store_true", help="profile a toy BERT (quick check)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_targets.py needs a CUDA device")
    profile(args.toy) if args.what == "profile" else cycle()


if __name__ == "__main__":
    main()
