#!/usr/bin/env bash
# The main job on the bundled example: record a tiny Llama learning 300 facts, then inspect the store.
set -euo pipefail
cd "$(dirname "$0")/.."
LM=.venv/bin/lmclean
STORE=runs/tiny.zarr
$LM record examples/tiny.yaml --store "$STORE" --overwrite
$LM inspect-log "$STORE" --sample 3
