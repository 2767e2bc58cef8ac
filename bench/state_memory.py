"""Optimizer-state bytes per parameter, measured from the tensors the optimizers allocate.

Builds a small BERT from a config (no download), takes one full DPS cycle with each
optimizer and sums the bytes of every state tensor, separately for DPS parameters (every
nn.Linear weight) and the rest. The state is allocated by DPSAdamW itself, identically
for every backend, so the figure holds for torch, cpu and triton alike.

    python -m bench.state_memory            # Markdown table on stdout
"""
from __future__ import annotations

import argparse
import json

import torch
import transformers

from dps_kernels import DPSAdamW


def tensor_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def measure(mode: str, dtype: torch.dtype, fp32_moments: bool = False) -> dict:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128)
    model = transformers.BertForSequenceClassification(config).to(dtype)
    if mode == "adamw":
        opt = torch.optim.AdamW(model.parameters(), foreach=False)
        dps_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    else:
        opt = DPSAdamW.from_model(model, mode=mode, update_steps=2, backend="torch",
                                  fp32_moments=fp32_moments)
        dps_ids = {id(p) for g in opt.param_groups if g["dps"] for p in g["params"]}
    ids = torch.randint(0, 500, (2, 16))
    for _ in range(4):  # Stage I, selection, Stage II: every state tensor exists by now
        opt.zero_grad()
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
    dps_bytes = dps_n = other_bytes = other_n = 0
    for p in model.parameters():
        b = tensor_bytes(opt.state[p])
        if id(p) in dps_ids:
            dps_bytes, dps_n = dps_bytes + b, dps_n + p.numel()
        else:
            other_bytes, other_n = other_bytes + b, other_n + p.numel()
    return {"mode": mode + (" + fp32_moments" if fp32_moments else ""),
            "dtype": str(dtype).replace("torch.", ""),
            "bytes_per_dps_param": dps_bytes / dps_n,
            "bytes_per_other_param": other_bytes / other_n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write JSON lines here")
    args = parser.parse_args()
    rows = [measure(mode, dtype) for dtype in (torch.float32, torch.bfloat16)
            for mode in ("adamw", "dense", "mix")]
    rows += [measure(mode, torch.bfloat16, fp32_moments=True) for mode in ("dense", "mix")]
    print("| optimizer | param dtype | state bytes / DPS param | extra over AdamW | "
          "state bytes / other param |")
    print("|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["mode"] == "adamw" and x["dtype"] == r["dtype"])

        print(f"| {r['mode']} | {r['dtype']} | {r['bytes_per_dps_param']:.2f} | "
              f"{r['bytes_per_dps_param'] - base['bytes_per_dps_param']:+.2f} | "
              f"{r['bytes_per_other_param']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
