#!/usr/bin/env bash
# The main job of the README: set up .venv, then fine-tune a small BERT (built from an embedded
# config, no download) with vanilla AdamW, the authors-style DPS and dps_kernels DPS Dense/Mix,
# printing loss, stage, subnetwork fraction, step time and optimizer bytes per parameter.
# On a CUDA machine the same command runs the BERT-large benchmark. Extra arguments go to
# `python -m bench` (see `--help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m bench "$@"
