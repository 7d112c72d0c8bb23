#!/usr/bin/env bash
# Issue 15's reduced-scale measurements (width 8, JPEG CIFAR-10, one CPU thread so that a second run can share
# the machine): RC-4 distilled from the ResNet-18 graph, and the ResNet-18 graph converted to RC-4 with each
# init, BN re-estimated (with and without augmentation), fine-tuned or distilled 5 epochs.
# Needs the teacher run: runs/cpu_w8/resnet18_postact/seed0 (see docs/compression.md). Usage:
#   bash benchmarks/distill_convert_cpu.sh [SEEDS...]     (default: 0)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
TEACHER=runs/cpu_w8/resnet18_postact/seed0
OUT=benchmarks/results/cpu_w8
W8='{"width": 8, "block": "postact"}'
COMMON=(--data_dir "$DATA" --num_threads 1)
keep() {  # the run's small files into benchmarks/results
  mkdir -p "$OUT/$1"; cp "runs/cpu_w8/$1"/{summary.json,run_config.json,metrics.jsonl} "$OUT/$1/"; }
for SEED in "${@:-0}"; do
  R=rc4_distilled_postact/seed$SEED
  [ -f runs/cpu_w8/$R/summary.json ] || python3 train.py --model rc4_cifar --model_kwargs "$W8" "${COMMON[@]}" \
      --epochs 15 --lr_milestones 8,12 --seed "$SEED" --teacher $TEACHER --output_dir runs/cpu_w8/$R
  keep $R
  R=rc4_distilled_a05_postact/seed$SEED  # a weaker distillation term for the underfitting student
  [ -f runs/cpu_w8/$R/summary.json ] || python3 train.py --model rc4_cifar --model_kwargs "$W8" "${COMMON[@]}" \
      --epochs 15 --lr_milestones 8,12 --seed "$SEED" --teacher $TEACHER --distill_alpha 0.5 --output_dir runs/cpu_w8/$R
  keep $R
done
mkdir -p runs/converted
for INIT in first average; do
  for AUG in plain augmented; do
    python3 -m timm_rc convert $TEACHER --init $INIT --recalibrate 50 --recalibrate_data $AUG --num_threads 1 --json \
        --output runs/converted/rc4_${INIT}_recal_$AUG.safetensors > $OUT/convert_${INIT}_recal50_$AUG.json
  done
  FILE=runs/converted/rc4_${INIT}_recal_plain.safetensors
  START='{"width": 8, "block": "postact", "pretrained": true, "pretrained_cfg_overlay": {"file": "'$FILE'"}}'
  for HOW in ft5 kd5; do
    R=rc4_from_resnet18_${INIT}_recal_${HOW}/seed0
    EXTRA=(); [ $HOW = kd5 ] && EXTRA=(--teacher $TEACHER)
    [ -f runs/cpu_w8/$R/summary.json ] || python3 train.py --model rc4_cifar --model_kwargs "$START" "${COMMON[@]}" \
        --epochs 5 --lr 0.01 --lr_milestones 3 --seed 0 "${EXTRA[@]}" --output_dir runs/cpu_w8/$R
    keep $R
  done
done
