#!/usr/bin/env bash
# `make demo`: what lmclean is for, in under two minutes on 2 CPU cores (76 s measured). A tiny Llama
# memorises 24 facts about 12 fictitious people (examples/demo.yaml); Bram Holt asks to be
# forgotten (samples 2 and 3); the unlearned model is shown next to the original and next to a
# model retrained without his facts, then the audit trail proves what was done.
#
# Which method: replay, because it is the one that wins on this run. Measured on it (forget 2,3;
# residual ratio = ‖θ - θ_retrained‖ / ‖θ_original - θ_retrained‖: 0 = retrained, 1 = untouched;
# cost in the same session, 2 loaded CPU cores):
#   replay            2.6e-08   re-runs training from Bram's first sample (step 0) without him: the
#                               retrained model up to float rounding, and it answers like it (16 s)
#   rollback          0.9998    barely moves: still answers "In Lima." and "A tortoise." (8 s)
#   lmcleaner (ggn)   130       diverges (‖Δθ‖ 2.8e3, answers "kkkk…"), 199 curvature products (36 s)
# AdamW memorising facts is far from the near-linear regime lmcleaner's propagation relies on:
# dropping two of 24 facts moves the retrained weights by 22 in norm. Replay costs about one
# training run here; lmcleaner's window K is the cheap option on long runs with late deletions
# (benchmarks/README.md).
#
# Every run starts afresh: runs/demo/ is this script's own output directory.
set -euo pipefail
cd "$(dirname "$0")/.."
# One thread per op: a 131k-parameter model gains nothing from more, and with two on 2 shared cores
# OpenMP's spinning threads made every step 27x slower in a measured run (1.1 vs 30 steps/s).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
LM=.venv/bin/lmclean
OUT=runs/demo
FORGET=2,3                                # Bram Holt: where he was born, which pet he keeps
TEMPLATE=$'Q: {question}\nA: {answer}\n'  # the row template of examples/demo.yaml
say() { printf '\n== %s\n' "$*" >&2; }

rm -rf "$OUT"
say "record: train the model on all 24 facts, recording its trajectory"
$LM record examples/demo.yaml --store "$OUT/facts.zarr"
$LM inspect-log "$OUT/facts.zarr"

say "record --exclude $FORGET: the exact retraining reference, trained without Bram's facts"
$LM record examples/demo.yaml --store "$OUT/retrained.zarr" --exclude "$FORGET"

say "unlearn: Bram Holt's deletion request, with replay"
$LM unlearn "$OUT/facts.zarr" --forget "$FORGET" --method replay --out "$OUT/unlearned" \
    --reason "deletion request: every fact about Bram Holt" --requested-by "Bram Holt"

say "original vs unlearned vs retrained: Bram's facts are gone, the others stay"
$LM eval original="$OUT/facts.zarr/model" unlearned="$OUT/unlearned" \
    --reference retrained="$OUT/retrained.zarr/model" --data examples/data/facts.jsonl \
    --forget "$FORGET" --template "$TEMPLATE" --generate 2 --max-new-tokens 24

say "audit: what was done, and proof that $OUT/unlearned is its output"
$LM audit show "$OUT/facts.zarr"
$LM audit verify "$OUT/facts.zarr" --model "$OUT/unlearned"
