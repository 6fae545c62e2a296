#!/usr/bin/env bash
# The runs behind benchmarks/README.md "Frontier and --curvature-batch": one fidelity.py case after
# another (never two at once), rows written to benchmarks/results/fidelity_*.json, then the figure.
# Needs the TOFU stores of examples/tofu/run.sh (its stages 0 and 1) under runs/tofu, and the
# bundled early-scenario store (python benchmarks/fidelity.py --scenario early records it).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
R=benchmarks/results
run() { name=$1; label=$2; shift 2; $PY benchmarks/fidelity.py --threads 1 --frontier --label "$label" --json "$R/fidelity_$name.json" "$@"; }
KF="=lmcleaner kfac K=800 refresh=10,=lmcleaner kfac K=800 refresh=50,=lmcleaner ekfac K=800 refresh=10,=lmcleaner ekfac K=800 refresh=50"
KFF="=lmcleaner kfac K=800 refresh=10 cb=full,=lmcleaner kfac K=800 refresh=50 cb=full,=lmcleaner ekfac K=800 refresh=10 cb=full,=lmcleaner ekfac K=800 refresh=50 cb=full"
CHEAP="=lmcleaner diag K=800,=lmcleaner lowrank K=800,=lmcleaner fisher K=800"
MEM="=rollback,=lmcleaner ggn K=800,=lmcleaner ggn K=800 cb=full,$KF,$KFF,$CHEAP,=replay f=0.25"
EARLY="=rollback,=lmcleaner ggn K=800,$KF,=lmcleaner ggn K=20 tail=ekfac,$CHEAP"

run bundled_memorise "bundled fine-tune, memorise (380 steps)" --workdir runs/bench15 --only "$MEM"
run tofu_memorise "TOFU forget01, memorise (275 steps, 5 epochs)" \
    --stores runs/tofu/original.zarr runs/tofu/retrained.zarr --forget 3960-3999 --only "$MEM"
run tofu_early "TOFU, early steps 8-15 (batch level)" \
    --scenario early --stores runs/tofu/original.zarr --early-steps 8-15 --only "$EARLY"
run bundled_early "bundled fine-tune, early steps 8-15" \
    --scenario early --stores runs/bench/early/plain/full.zarr --only "$EARLY"
# the EK-FAC rescaling experiment (now `--hvp ekfac-rq`, lmclean/unlearn/basis_operators.py RescaledEKFACOperator)
RQ="=lmcleaner ekfac-rq K=800 refresh=10,=lmcleaner ekfac-rq K=800 refresh=50"
$PY benchmarks/fidelity.py --threads 1 --workdir runs/bench15 --json "$R/fidelity_bundled_memorise_ekfac_rq.json" \
    --label "bundled memorise: EK-FAC rescaled along v (experiment)" --only "$RQ"
# multi-epoch slice: TOFU author 3980-3999 in all 30 epochs with authors 0-2 (80 rows, 300 steps)
$PY -c "import json; rows=[json.loads(l) for l in open('../shared/data/tofu/full.jsonl') if l.strip()]; open('runs/tofu/slice30.jsonl','w').write(''.join(json.dumps(r, ensure_ascii=False)+'\n' for r in rows if r['id']<60 or 3980<=r['id']<4000))"
CFG=(examples/tofu/tofu_tiny.yaml --set data.path=runs/tofu/slice30.jsonl --set train.epochs=30 --set model.path=runs/tofu/pretrain.zarr/model)
.venv/bin/lmclean record "${CFG[@]}" --store runs/tofu/slice30-original.zarr --overwrite
.venv/bin/lmclean record "${CFG[@]}" --store runs/tofu/slice30-retrained.zarr --overwrite --exclude 3980-3999
run tofu_slice30 "TOFU slice: 1 author in all 30 epochs" \
    --stores runs/tofu/slice30-original.zarr runs/tofu/slice30-retrained.zarr --forget 3980-3999 \
    --only "=rollback,=lmcleaner ggn K=800,=lmcleaner ggn K=800 cb=full,=lmcleaner ekfac K=800 refresh=10,=lmcleaner ekfac K=800 refresh=10 cb=full"
$PY benchmarks/fidelity.py --threads 1 --json "$R/fidelity_tofu_memorise_ekfac_rq.json" \
    --label "TOFU memorise: EK-FAC rescaled along v (experiment)" \
    --stores runs/tofu/original.zarr runs/tofu/retrained.zarr --forget 3960-3999 --only "$RQ"
$PY benchmarks/fidelity.py --threads 1 --json "$R/fidelity_tofu_slice30_ekfac_rq.json" \
    --label "TOFU slice: EK-FAC rescaled along v (experiment)" \
    --stores runs/tofu/slice30-original.zarr runs/tofu/slice30-retrained.zarr --forget 3980-3999 --only "$RQ"
$PY benchmarks/fidelity.py --threads 1 --scenario early --json "$R/fidelity_tofu_early_ekfac_rq.json" \
    --label "TOFU early: EK-FAC rescaled along v (experiment)" \
    --stores runs/tofu/original.zarr --early-steps 8-15 --only "$RQ"
$PY benchmarks/frontier.py "$R"/fidelity_tofu_memorise.json+"$R"/fidelity_tofu_memorise_ekfac_rq.json \
  "$R"/fidelity_tofu_slice30.json+"$R"/fidelity_tofu_slice30_ekfac_rq.json "$R"/fidelity_tofu_early.json+"$R"/fidelity_tofu_early_ekfac_rq.json \
  "$R"/fidelity_bundled_memorise.json+"$R"/fidelity_bundled_memorise_ekfac_rq.json "$R"/fidelity_bundled_early.json --out benchmarks/frontier.png
