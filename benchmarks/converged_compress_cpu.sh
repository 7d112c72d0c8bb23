#!/usr/bin/env bash
# Compression at convergence (issue 22, item 4), from the converged runs of converged_w8.yaml (WIDTH=8, the
# default) or converged_w16.yaml (WIDTH=16):
#   int8  weight-only int8 of the converged RC-4 and of the ResNet-18 graph (per output channel)
#   convert  the ResNet-18 graph converted to RC-4: average init, BN re-estimated on 50 batches, distilled
#            10 epochs from the ResNet-18 graph (lr 0.01, / 10 at epoch 6), then int8 of the result
#   relaxed  the same conversion with per-step rank-r corrections, r = 1, 2, 4, each distilled 10 epochs
# One CPU thread per command, so that a second run can share the 2 cores. Every step skips what is done, so
# a second copy can take other steps at the same time (e.g. `... convert` beside `... relaxed`). Usage:
#   [WIDTH=16] [RANKS="1 2 4"] bash benchmarks/converged_compress_cpu.sh [int8] [convert] [relaxed]   (default: all three)
# Small results go to benchmarks/results/converged/w${WIDTH}_compress/; weights stay in runs/converged/w${WIDTH}_compress/.
set -euo pipefail
cd "$(dirname "$0")/.."
WIDTH=${WIDTH:-8}
case $WIDTH in 8|16) ;; *) echo "WIDTH=$WIDTH: the converged campaigns have widths 8 and 16" >&2; exit 2 ;; esac
RUNS=runs/converged/w$WIDTH
TEACHER=$RUNS/resnet18_cifar10/seed0
RC4=$RUNS/rc4_cifar10/seed0
WORK=runs/converged/w${WIDTH}_compress
OUT=benchmarks/results/converged/w${WIDTH}_compress
COMMON=(--num_threads 1)
STEPS=("${@:-int8 convert relaxed}"); STEPS=(${STEPS[*]})
for f in "$TEACHER" "$RC4"; do
  [ -f "$f/model.safetensors" ] || { echo "needs the converged run $f (converged_w$WIDTH.yaml)" >&2; exit 2; }
done
mkdir -p "$WORK" "$OUT"
complete() {  # whether a run folder holds a finished run (a partial one is resumed, not skipped)
  python3 -c 'import sys; from timm_rc.runs import Run; sys.exit(Run(sys.argv[1]).state() != "complete")' "$1"; }
json() {  # a command's JSON output into $OUT/NAME, written only when the command succeeds (a rerun redoes a failed step)
  local NAME=$1; shift
  [ -s "$OUT/$NAME" ] && return 0
  "$@" > "$OUT/$NAME.part" && mv "$OUT/$NAME.part" "$OUT/$NAME" || { rm -f "$OUT/$NAME.part"; return 1; }; }
keep() {  # a run's small files into benchmarks/results
  mkdir -p "$OUT/$1"; cp "$WORK/$1"/{summary.json,run_config.json,metrics.jsonl} "$OUT/$1/"; }
int8() {  # run folder, name of the JSON written
  json "$2" python3 -m timm_rc compress quantize "$1" --bits 8 --overwrite --json "${COMMON[@]}"; }
distilled() {  # rank ('' for none): convert, re-estimate BN, distill 10 epochs, int8
  local TAG=rc4_average${1:+_rank$1}_recal50 FILE R
  FILE=$WORK/converted/$TAG.safetensors
  mkdir -p "$WORK/converted"
  json "convert_$TAG.json" python3 -m timm_rc convert "$TEACHER" --init average ${1:+--rank $1} \
      --recalibrate 50 --json --output "$FILE" "${COMMON[@]}"
  R=${TAG}_kd10/seed0
  local START='{"width": '$WIDTH${1:+', "rank": '$1}', "pretrained": true, "pretrained_cfg_overlay": {"file": "'$FILE'"}}'
  complete "$WORK/$R" || python3 train.py --config train_configs/rc4_cifar10.yaml --model_kwargs "$START" \
      --log_with none "${COMMON[@]}" --epochs 10 --lr 0.01 --lr_milestones 6 --seed 0 --teacher "$TEACHER" \
      --resume auto --output_dir "$WORK/$R"
  keep "$R"
  int8 "$WORK/$R" "int8_$TAG.json"
}
for STEP in "${STEPS[@]}"; do
  case $STEP in
    int8) int8 "$RC4" int8_rc4.json; int8 "$TEACHER" int8_resnet18.json ;;
    convert) distilled '' ;;
    relaxed) for RANK in ${RANKS:-1 2 4}; do distilled $RANK; done ;;
    *) echo "unknown step $STEP: int8, convert or relaxed" >&2; exit 2 ;;
  esac
done
