#!/usr/bin/env bash
# Fixed cost of each lmclean command: min over 3 runs of wall and CPU (user+sys) seconds.
# Needs a store from `make demo` (runs/demo/facts.zarr). Prints a Markdown table.
#   bash benchmarks/cli_costs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
LM=.venv/bin/lmclean
S=runs/demo/facts.zarr
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
measure() {  # measure "label" cmd...
  local label=$1; shift
  local best_w=999 best_c=999
  for i in 1 2 3; do
    rm -rf "$T/out" "$T/s.zarr"
    /usr/bin/time -f "%e %U %S" -o "$T/t" "$@" > /dev/null 2>&1 || true
    read -r w u s < "$T/t"
    c=$(echo "$u + $s" | bc)
    best_w=$(echo "if ($w < $best_w) $w else $best_w" | bc)
    best_c=$(echo "if ($c < $best_c) $c else $best_c" | bc)
  done
  printf '| `%s` | %.2f | %.2f |\n' "$label" "$best_w" "$best_c"
}
echo "| command | wall s | CPU s |"
echo "|---|---|---|"
measure "lmclean --help" $LM --help
measure "lmclean record --help" $LM record --help
measure "lmclean record examples/demo.yaml --store S --set train.steps=1" $LM record examples/demo.yaml --store "$T/s.zarr" --set train.steps=1
measure "lmclean inspect-log STORE" $LM inspect-log $S
measure "lmclean unlearn --help" $LM unlearn --help
measure "lmclean unlearn STORE --forget 4 --dry-run" $LM unlearn $S --forget 4 --dry-run
measure "lmclean audit show STORE" $LM audit show $S
measure "lmclean audit verify STORE" $LM audit verify $S
measure "lmclean check STORE --no-replay" $LM check $S --no-replay
measure "lmclean export STORE --step 0 --out DIR" $LM export $S --step 0 --out "$T/out"
