#!/usr/bin/env bash
# The runs behind benchmarks/README.md "Krylov curvature": every case of the frontier (frontier_runs.sh
# records the stores) with the krylov rows beside exact replay and EK-FAC in the same run, one case
# after another (never two at once); rows to benchmarks/results/fidelity_<case>_krylov.json, then the
# figure with every case's earlier rows merged in.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
R=benchmarks/results
KRY="=lmcleaner krylov K=800 refresh=8 k=4 af=0.25,=lmcleaner krylov K=800 refresh=8 k=4 af=0.5,=lmcleaner krylov K=800 refresh=16 k=4 af=0.5,=lmcleaner krylov K=800 refresh=32 k=4 af=0.5,=lmcleaner ekfac K=800 refresh=10"
run() { name=$1; label=$2; shift 2; $PY benchmarks/fidelity.py --threads 1 --label "$label" --json "$R/fidelity_${name}_krylov.json" "$@"; }
run tofu_memorise "TOFU memorise: krylov" --stores runs/tofu/original.zarr runs/tofu/retrained.zarr --forget 3960-3999 --only "$KRY,=replay f=0.25"
# other seeds of the anchor subsample on TOFU memorise, refresh 8 at af 0.25 and 0.5 and the defaults
SEEDS=$(for s in 1 2; do printf '=lmcleaner krylov K=800 refresh=8 k=4 af=0.25 seed=%s,=lmcleaner krylov K=800 refresh=8 k=4 af=0.5 seed=%s,=lmcleaner krylov K=800 refresh=16 k=4 af=0.5 seed=%s,' $s $s $s; done)
$PY benchmarks/fidelity.py --threads 1 --label "TOFU memorise: krylov seeds" --json "$R/fidelity_tofu_memorise_krylov_seeds.json" \
  --stores runs/tofu/original.zarr runs/tofu/retrained.zarr --forget 3960-3999 --only "${SEEDS%,}"
run tofu_early "TOFU early: krylov" --scenario early --stores runs/tofu/original.zarr --early-steps 8-15 --only "$KRY"
run bundled_memorise "bundled memorise: krylov" --workdir runs/bench15 --only "$KRY"
run bundled_early "bundled early: krylov" --scenario early --stores runs/bench/early/plain/full.zarr --only "$KRY"
if [ ! -e runs/tofu/slice30-retrained.zarr ]; then  # the multi-epoch slice of frontier_runs.sh
  $PY -c "import json; rows=[json.loads(l) for l in open('../shared/data/tofu/full.jsonl') if l.strip()]; open('runs/tofu/slice30.jsonl','w').write(''.join(json.dumps(r, ensure_ascii=False)+'\n' for r in rows if r['id']<60 or 3980<=r['id']<4000))"
  CFG=(examples/tofu/tofu_tiny.yaml --set data.path=runs/tofu/slice30.jsonl --set train.epochs=30 --set model.path=runs/tofu/pretrain.zarr/model)
  .venv/bin/lmclean record "${CFG[@]}" --store runs/tofu/slice30-original.zarr --overwrite
  .venv/bin/lmclean record "${CFG[@]}" --store runs/tofu/slice30-retrained.zarr --overwrite --exclude 3980-3999
fi
run tofu_slice30 "TOFU slice: krylov" --stores runs/tofu/slice30-original.zarr runs/tofu/slice30-retrained.zarr --forget 3980-3999 --only "$KRY"
$PY benchmarks/frontier.py "$R"/fidelity_tofu_memorise.json+"$R"/fidelity_tofu_memorise_ekfac_rq.json+"$R"/fidelity_tofu_memorise_krylov.json \
  "$R"/fidelity_tofu_slice30.json+"$R"/fidelity_tofu_slice30_ekfac_rq.json+"$R"/fidelity_tofu_slice30_krylov.json \
  "$R"/fidelity_tofu_early.json+"$R"/fidelity_tofu_early_ekfac_rq.json+"$R"/fidelity_tofu_early_krylov.json \
  "$R"/fidelity_bundled_memorise.json+"$R"/fidelity_bundled_memorise_ekfac_rq.json+"$R"/fidelity_bundled_memorise_krylov.json \
  "$R"/fidelity_bundled_early.json+"$R"/fidelity_bundled_early_krylov.json --out benchmarks/frontier.png
