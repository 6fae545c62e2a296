#!/usr/bin/env bash
# The main job on the bundled example: record a tiny Llama learning 300 facts about fictitious
# people, inspect the store, make the model forget two samples, and prove it with the audit trail.
set -euo pipefail
cd "$(dirname "$0")/.."
LM=.venv/bin/lmclean
STORE=runs/tiny.zarr
OUT=runs/tiny-forget
$LM record examples/tiny.yaml --store "$STORE" --overwrite
$LM inspect-log "$STORE" --sample 3
$LM unlearn "$STORE" --forget 3,4 --method lmcleaner --hvp ggn --K 800 --out "$OUT" \
    --reason "demo: deletion request for samples 3 and 4" --requested-by demo
$LM audit show "$STORE"
$LM audit verify "$STORE" --model "$OUT"
