#!/usr/bin/env bash
# Issue 16's reduced-scale measurements (width 8, JPEG CIFAR-10, one CPU thread): RC-4 with per-step low-rank
# corrections (rank r) from scratch, the ResNet-18 graph converted with rank r (SVD init, BN re-estimated) and
# fine-tuned 5 epochs, and rank 2 distilled from the ResNet-18 graph. Usage:
#   bash benchmarks/relaxed_cpu.sh [RANKS...]                from scratch and converted (default: 1 2 4)
#   bash benchmarks/relaxed_cpu.sh --distilled [RANKS...]    from scratch, distilled from the ResNet-18 graph
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
TEACHER=runs/cpu_w8/resnet18_postact/seed0
OUT=benchmarks/results/cpu_w8
COMMON=(--data_dir "$DATA" --num_threads 1)
DISTILLED=; [ "${1:-}" = --distilled ] && { DISTILLED=1; shift; }
RANKS=("${@:-1 2 4}"); RANKS=(${RANKS[*]})
keep() { mkdir -p "$OUT/$1"; cp "runs/cpu_w8/$1"/{summary.json,run_config.json,metrics.jsonl} "$OUT/$1/"; }
scratch() {  # rank, extra args...
  local R=rc4_rank$1${3:+_distilled}_postact/seed0
  [ -f runs/cpu_w8/$R/summary.json ] || python3 train.py --model rc4_cifar \
      --model_kwargs '{"width": 8, "block": "postact", "rank": '$1'}' "${COMMON[@]}" --epochs 15 --lr_milestones 8,12 \
      --seed 0 ${2:+$2 $3} --output_dir runs/cpu_w8/$R
  keep $R
}
if [ -n "$DISTILLED" ]; then
  for RANK in "${RANKS[@]}"; do scratch $RANK --teacher $TEACHER; done
  exit 0
fi
for RANK in "${RANKS[@]}"; do scratch $RANK; done
mkdir -p runs/converted
for RANK in "${RANKS[@]}"; do
  FILE=runs/converted/rc4_average_rank${RANK}_recal.safetensors
  python3 -m timm_rc convert $TEACHER --init average --rank $RANK --recalibrate 50 --num_threads 1 --json \
      --output $FILE > $OUT/convert_average_rank${RANK}_recal50.json
  R=rc4_rank${RANK}_from_resnet18_average_recal_ft5/seed0
  START='{"width": 8, "block": "postact", "rank": '$RANK', "pretrained": true, "pretrained_cfg_overlay": {"file": "'$FILE'"}}'
  [ -f runs/cpu_w8/$R/summary.json ] || python3 train.py --model rc4_cifar --model_kwargs "$START" "${COMMON[@]}" \
      --epochs 5 --lr 0.01 --lr_milestones 3 --seed 0 --output_dir runs/cpu_w8/$R
  keep $R
done
