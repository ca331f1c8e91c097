#!/usr/bin/env bash
# Time README's first command for two checkouts back to back, alternating, and score each run.
#
#   bash scripts/quickstart_race.sh OLD_CHECKOUT NEW_CHECKOUT RUNS OUT_DIR
#
# Each checkout is a repository root with its project installed in its own `.venv` (README's
# `pip install -e ".[dev]"`). Run i of OLD then run i of NEW execute from fresh folders under
# OUT_DIR, so neither finds the other's run directory or a warm `runs/` folder; the wall time is
# from process start to exit (imports included). Every samples.npz is scored with DigitsFeatures
# FID against all 1797 digits (`cm eval`, as docs/benchmarks.md); OUT_DIR/race.csv gets one row
# per run and the medians and their ratio are printed. Keep the machine otherwise idle.
set -euo pipefail
if [ "$#" -ne 4 ]; then
  echo "usage: bash scripts/quickstart_race.sh OLD_CHECKOUT NEW_CHECKOUT RUNS OUT_DIR" >&2
  exit 2
fi
old=$(cd "$1" && pwd)
new=$(cd "$2" && pwd)
runs=$3
mkdir -p "$4"
out=$(cd "$4" && pwd)
for side in "$old" "$new"; do
  if [ ! -x "$side/.venv/bin/cm" ]; then
    echo "$side has no .venv/bin/cm: install it there with README's pip command first." >&2
    exit 2
  fi
done
(cd "$out" && "$new/.venv/bin/cm" eval ref --data "$new/configs/quickstart.yaml" \
  --feature cm.metrics.digits.DigitsFeatures --out "$out/digits_ref.npz" --overwrite >/dev/null)
echo "side,run,wall_s,fid" > "$out/race.csv"
for i in $(seq 1 "$runs"); do
  for side in old new; do
    root=$old
    [ "$side" = new ] && root=$new
    dir="$out/$side-$i"
    rm -rf "$dir" && mkdir -p "$dir"
    start=$(date +%s.%N)
    (cd "$dir" && "$root/.venv/bin/cm" fit --config "$root/configs/quickstart.yaml" \
      >"$dir/fit.log" 2>&1)
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    samples=$(ls "$dir"/runs/quickstart/version_0/samples/samples.npz)
    fid=$("$new/.venv/bin/cm" eval "$samples" --ref "$out/digits_ref.npz" \
      --feature cm.metrics.digits.DigitsFeatures --metrics fid | awk '$1 == "fid" {print $2}')
    printf '%s,%s,%.1f,%s\n' "$side" "$i" "$wall" "$fid" | tee -a "$out/race.csv"
  done
done
python3 - "$out/race.csv" <<'EOF'
import csv, statistics, sys

rows = list(csv.DictReader(open(sys.argv[1])))
med = {
    side: statistics.median(float(r["wall_s"]) for r in rows if r["side"] == side)
    for side in ("old", "new")
}
fid = {
    side: statistics.median(float(r["fid"]) for r in rows if r["side"] == side)
    for side in ("old", "new")
}
print(f"median wall: old {med['old']:.1f} s, new {med['new']:.1f} s, "
      f"ratio {med['old'] / med['new']:.2f}x; median FID old {fid['old']:.2f}, new {fid['new']:.2f}")
EOF
