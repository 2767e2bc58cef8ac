#!/usr/bin/env bash
# The p sweep (the paper's Figure 2) at Table 3's 1K setting on CPU with the offline MiniLM:
# DPS Dense, DPS Mix and Mixout at p = 0.1, 0.3, 0.5, CHILD-TUNING_D at reserve_p = 1 - p,
# 5 seeds, at the vanilla lr the task's Table 3 store chose (bench/results/glue_minilm/
# runs_TASK.jsonl, run `bash examples/minilm_table3.sh TASK` first). That store is read only:
# its vanilla runs are the baseline (failed runs = below their mean) and its runs with the
# same key (Dense, Mix, Mixout at p=0.3) are reused, not rerun. New runs go to
# p_sweep/runs_TASK.jsonl, the report (summary.md, TASK_1000_p_sweep.png) to p_sweep/TASK/.
# Resumable: rerun the same command to continue.
#   bash examples/minilm_p_sweep.sh CoLA                 # THREADS=1 by default
#   BASE=... STORE=... REPORT=... bash examples/minilm_p_sweep.sh CoLA --smoke   # extra args last
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TASK="${1:?usage: minilm_p_sweep.sh TASK [extra glue_dps.py args]}"
shift
BASE="${BASE:-bench/results/glue_minilm/runs_${TASK}.jsonl}"
STORE="${STORE:-bench/results/glue_minilm/p_sweep/runs_${TASK}.jsonl}"
REPORT="${REPORT:-bench/results/glue_minilm/p_sweep/${TASK}}"
if [[ ! -f "$BASE" ]]; then
    echo "no $BASE: run bash examples/minilm_table3.sh $TASK first (its vanilla lr and runs)" >&2
    exit 2
fi
python examples/glue_dps.py --tasks "$TASK" --subset 1000 --store "$STORE" --report "$REPORT" \
    --base-store "$BASE" --lr-from-store --seeds 1 2 3 4 5 --threads "${THREADS:-1}" \
    --methods vanilla mixout childtuning_d dense mix --p-sweep 0.1 0.3 0.5 "$@"
