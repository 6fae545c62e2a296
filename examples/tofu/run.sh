#!/usr/bin/env bash
# TOFU on a laptop CPU: record a tiny byte-level Llama on 22 TOFU authors, retrain it without the
# forget01 authors (the exact reference), unlearn them three ways, and evaluate every model with
# TOFU's metrics. Usage: examples/tofu/run.sh TOFU_DIR   (e.g. ../shared/data/tofu)
# TOFU is read from TOFU_DIR at run time; only a subset file under $RUN is written.
set -euo pipefail
TOFU=$(cd "${1:?usage: examples/tofu/run.sh TOFU_DIR}" && pwd)
cd "$(dirname "$0")/../.."
LM=${LM:-.venv/bin/lmclean}
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/tofu}
FORGET=3960-3999                    # TOFU forget01: the last 1% of full.jsonl (2 authors)
CONFIG=(examples/tofu/tofu_tiny.yaml --set "data.path=$RUN/subset.jsonl")

mkdir -p "$RUN"
"$PY" examples/tofu/make_subset.py "$TOFU/full.jsonl" "$RUN/retain.jsonl" --retain-only
"$PY" examples/tofu/make_subset.py "$TOFU/full.jsonl" "$RUN/subset.jsonl"

# 0. stage 1: a base model that has never seen the forget authors
"$LM" record examples/tofu/tofu_pretrain.yaml --set "data.path=$RUN/retain.jsonl" --store "$RUN/pretrain.zarr" --overwrite
CONFIG+=(--set "model.path=$RUN/pretrain.zarr/model")

# 1. the recorded fine-tuning run, and the exact-retraining reference: the same run without the forget rows
"$LM" record "${CONFIG[@]}" --store "$RUN/original.zarr" --overwrite
"$LM" record "${CONFIG[@]}" --store "$RUN/retrained.zarr" --overwrite --exclude "$FORGET"

# 2. unlearn the forget01 authors from the recorded run, three ways
# (--keep-data on the first two: the default scrub would make the store refuse the next request)
"$LM" unlearn "$RUN/original.zarr" --forget "$FORGET" --method rollback --out "$RUN/rollback" --keep-data
"$LM" unlearn "$RUN/original.zarr" --forget "$FORGET" --method lmcleaner --hvp ggn --out "$RUN/lmcleaner-ggn" --keep-data
"$LM" unlearn "$RUN/original.zarr" --forget "$FORGET" --method replay --out "$RUN/replay" --reason "TOFU forget01"
"$LM" audit verify "$RUN/original.zarr" --model "$RUN/replay"

# 3. everything side by side with TOFU's metrics; the report also goes to $RUN/eval.json
"$LM" eval original="$RUN/original.zarr/model" rollback="$RUN/rollback" lmcleaner-ggn="$RUN/lmcleaner-ggn" \
    replay="$RUN/replay" --reference retrained="$RUN/retrained.zarr/model" \
    --data "$RUN/subset.jsonl" --forget "$FORGET" --tofu "$TOFU" --out "$RUN/eval.json"
