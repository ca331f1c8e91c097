#!/usr/bin/env bash
# One-call GPU check (issue 18): `bash scripts/gpu_check.sh OUTDIR` on one GPU, from a checkout
# installed as README.md says, in under 8 minutes; the report is OUTDIR/gpu_check.md.
#
#   1. pytest -m gpu: tests/test_gpu.py (bf16 networks, torch.compile, fused Adam, flash, JVP)
#   2. the device's bf16 matmul peak (measured: the denominator of MFU)
#   3. cm bench train, configs/ct_imagenet64.yaml, synthetic data: eager vs torch.compile
#   4. cm bench sample, the same config, bf16: one step vs 79-NFE Heun
# They run in the order 2, 1, 4, 3: the compilation of the 64 px ADM, the longest, comes last.
#
# Each part runs under `timeout` inside one time budget; a part that fails or times out is marked
# so in the report, the others still run, and the exit status is 1. Without CUDA, or with
# CM_GPU_CHECK_CPU=1, the CPU form runs in about a minute: the GPU tests are collected and
# skipped, cm bench runs configs/quickstart.yaml at tiny sizes, and the report marks the CUDA
# parts SKIPPED.
#
# Settings (environment): BATCH (training batch per GPU, 128), SAMPLE_BATCH (128), TRAIN_WARMUP
# (5), TRAIN_STEPS (20), COMPILE_MODE (default: max-autotune-no-cudagraphs autotunes for minutes),
# HEUN_STEPS (40, i.e. 79 NFE), BUDGET_S (450: all parts together), PYTHON (python).
set -euo pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
  echo "usage: bash scripts/gpu_check.sh OUTDIR   (the report is OUTDIR/gpu_check.md)" >&2
  exit 2
fi
if [[ -e $1 && ! -d $1 ]] || [[ -d $1 && -n $(ls -A "$1") ]]; then
  echo "error: $1 exists and is not an empty directory: give a new or empty OUTDIR." >&2
  exit 2
fi
mkdir -p "$1/logs"
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python}
BATCH=${BATCH:-128}
SAMPLE_BATCH=${SAMPLE_BATCH:-128}
TRAIN_WARMUP=${TRAIN_WARMUP:-5}
TRAIN_STEPS=${TRAIN_STEPS:-20}
COMPILE_MODE=${COMPILE_MODE:-default}
HEUN_STEPS=${HEUN_STEPS:-40}
BUDGET_S=${BUDGET_S:-450}
deadline=$((SECONDS + BUDGET_S))
failed=0 last_status="" interrupted=0 child=""

on_signal() {  # Ctrl-C or TERM: stop the running part (and its process group), then report
  interrupted=1
  [[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true
}
trap on_signal INT TERM

record() {  # KEY TITLE STATUS SECONDS LIMIT COMMAND: one row of OUT/parts.tsv
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$OUT/parts.tsv"
  printf '[gpu_check] %s: %s (%s s)\n' "$1" "$3" "$4" >&2
}

skip() {  # KEY TITLE: a CUDA part the CPU form leaves out
  record "$1" "$2" "SKIPPED: no CUDA" 0 0 ""
}

run_part() {  # KEY TITLE LIMIT_S COMMAND...: run under timeout, log to OUT/logs/KEY.log
  local key=$1 title=$2 limit=$3 start=$SECONDS rc=0 status=ok
  shift 3
  local left=$((deadline - SECONDS)) command
  command=$(printf '%q ' "$@")
  command=${command% }
  ((limit < left)) || limit=$left
  if ((interrupted || limit < 10)); then
    failed=1 last_status="NOT RUN"
    status="NOT RUN: the time budget BUDGET_S=$BUDGET_S is spent"
    ((!interrupted)) || status="NOT RUN: interrupted"
    record "$key" "$title" "$status" 0 0 "$command"
    return 1
  fi
  # In the background, so that a signal reaches on_signal at once; timeout runs the part in its
  # own process group and kills all of it (compile workers too) at the limit.
  timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$key.log" 2>&1 &
  child=$!
  wait "$child" || rc=$?
  ((!interrupted)) || { wait "$child" || true; }  # wait returned at the signal: reap the part
  child=""
  case $rc in
    0) ;;
    124 | 137) status="TIMEOUT after $limit s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  ((!interrupted)) || status="INTERRUPTED"
  [[ $status == ok ]] || failed=1
  last_status=$status
  record "$key" "$title" "$status" $((SECONDS - start)) "$limit" "$command"
  [[ $status == ok ]]
}

json_value() {  # FILE KEY: one value of a JSON file written by scripts/gpu_report.py, or nothing
  "$PYTHON" -c 'import json, sys; v = json.load(open(sys.argv[1])).get(sys.argv[2])
print("" if v is None else v)' "$1" "$2" 2>/dev/null || true
}

why="no CUDA device (torch.cuda.is_available() is False)"
if [[ ${CM_GPU_CHECK_CPU:-0} == 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""
  why="CM_GPU_CHECK_CPU=1"
fi
run_part env "environment: device, versions, git commit" 60 \
  "$PYTHON" scripts/gpu_report.py env "$OUT/env.json" || why="the environment part failed"
form=cpu
[[ $(json_value "$OUT/env.json" cuda) == True ]] && form=gpu

if [[ $form == gpu ]]; then
  peak=""
  if run_part peak "bf16 matmul peak, 8192^3" 60 "$PYTHON" scripts/gpu_report.py peak \
    "$OUT/peak.json"; then
    peak=$(json_value "$OUT/peak.json" peak_tflops)
  fi
else
  skip peak "bf16 matmul peak (the MFU denominator)"
fi
# The CPU form collects only tests/test_gpu.py (a GPU test elsewhere would be skipped anyway).
tests=tests
[[ $form == gpu ]] || tests=tests/test_gpu.py
run_part tests "the gpu-marked tests in $tests" 150 \
  "$PYTHON" -m pytest -m gpu "$tests" -v -rfEs --durations=5 -p no:cacheprovider || true

if [[ $form == gpu ]]; then
  distance=() lpips="LPIPS"
  case $(json_value "$OUT/env.json" vgg16) in
    ok | UNCHECKED) ;;
    *)
      distance=(--model.init_args.objective.init_args.distance=cm.objectives.PseudoHuber)
      lpips="pseudo-Huber (no VGG16 weights for LPIPS)"
      ;;
  esac
  config=(--config configs/ct_imagenet64.yaml "${distance[@]}")
  run_part sample_imagenet64 "configs/ct_imagenet64.yaml, bf16 autocast, channels-last, batch \
$SAMPLE_BATCH, random weights: one step vs $((2 * HEUN_STEPS - 1))-NFE Heun" 120 \
    "$PYTHON" -m cm bench sample "${config[@]}" --batch_size "$SAMPLE_BATCH" \
    --heun_steps "$HEUN_STEPS" --precision bf16 --channels_last true --warmup 1 --repeats 3 \
    --out "$OUT/sample_imagenet64.csv" || true
  run_part train_imagenet64 "configs/ct_imagenet64.yaml, ADM 192 ch, bf16-mixed, $lpips, batch \
$BATCH per GPU, synthetic data, $TRAIN_WARMUP + $TRAIN_STEPS steps: eager vs torch.compile \
(inductor, mode $COMPILE_MODE)" 240 \
    "$PYTHON" -m cm bench train "${config[@]}" --trainer.devices=1 --trainer.strategy=auto \
    "--data.init_args.batch_size=$BATCH" --synthetic true --warmup "$TRAIN_WARMUP" \
    --steps "$TRAIN_STEPS" --compile "$COMPILE_MODE" ${peak:+--peak_tflops "$peak"} \
    --out "$OUT/train_imagenet64.csv" || {
    # A compile error leaves no figures at all: time the eager step alone if time is left.
    [[ $last_status != FAILED* ]] || run_part train_imagenet64_eager "the same, eager \
only (the run with torch.compile failed)" 120 \
      "$PYTHON" -m cm bench train "${config[@]}" --trainer.devices=1 --trainer.strategy=auto \
      "--data.init_args.batch_size=$BATCH" --synthetic true --warmup "$TRAIN_WARMUP" \
      --steps "$TRAIN_STEPS" --compile none ${peak:+--peak_tflops "$peak"} \
      --out "$OUT/train_imagenet64_eager.csv" || true
  }
else
  skip sample_imagenet64 "configs/ct_imagenet64.yaml on CUDA, bf16: one step vs Heun"
  run_part sample_quickstart "configs/quickstart.yaml on CPU, float32, batch 8, random \
weights: one step vs $((2 * HEUN_STEPS - 1))-NFE Heun" 60 \
    "$PYTHON" -m cm bench sample --config configs/quickstart.yaml --device cpu --batch_size 8 \
    --heun_steps "$HEUN_STEPS" --warmup 1 --repeats 2 --out "$OUT/sample_quickstart.csv" || true
  skip train_imagenet64 "configs/ct_imagenet64.yaml on CUDA: eager vs torch.compile (inductor)"
  run_part train_quickstart "configs/quickstart.yaml on CPU, batch 16, synthetic data, 2 + 3 \
steps: eager vs torch.compile with the aot_eager backend (tracing only; compile on CUDA SKIPPED)" \
    120 "$PYTHON" -m cm bench train --config configs/quickstart.yaml --trainer.accelerator=cpu \
    --data.init_args.batch_size=16 --synthetic true --warmup 2 --steps 3 --compile default \
    --backend aot_eager --out "$OUT/train_quickstart.csv" || true
fi

"$PYTHON" scripts/gpu_report.py report "$OUT" --form "$form" --why "$why" --budget "$BUDGET_S" \
  --elapsed "$SECONDS"
cat "$OUT/gpu_check.md"
((!interrupted)) || exit 130
exit "$failed"
