#!/usr/bin/env bash
# One prepared GPU check (H100/H200): throughput of the real loop at batch 128 and 512 (eager,
# compiled, CUDA graphs), the total of 1, 2 and 4 processes sharing the GPU, then a real run of the
# fast recipe on CIFAR-10. Prints a short table; whole logs go to $OUT (or ./gpu_check).
#
#   DATA=path/to/cifar10 bash benchmarks/gpu_check.sh [EPOCHS_OF_FAST_RECIPE]
#
# Needs torch, timm, accelerate, datasets, safetensors, pyyaml, tqdm importable (PYTHONPATH may point
# at unpacked wheels) and the package importable from the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
EPOCHS=${1:-40}
LOGS=${OUT:-gpu_check}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

echo "== throughput (bf16, gpu-resident data, channels_last); best epoch after the first =="
python benchmarks/bench_train.py --data_dir "$DATA" --batch_sizes 128 512 --precision bf16 --epochs 3 \
    2>&1 | tee "$LOGS/bench_eager.log" | grep -E '^(rc4_cifar +[0-9]|decode|device)'
python benchmarks/bench_train.py --data_dir "$DATA" --batch_sizes 128 512 --precision bf16 --epochs 3 --compile \
    2>&1 | tee "$LOGS/bench_compile.log" | grep -E '^rc4_cifar +[0-9]'
python benchmarks/bench_train.py --data_dir "$DATA" --batch_sizes 128 --precision bf16 --epochs 3 --compile \
    --compile_mode reduce-overhead 2>&1 | tee "$LOGS/bench_cudagraphs.log" | grep -E '^rc4_cifar +[0-9]'

echo "== 1, 2 and 4 training processes sharing the GPU (batch 128 each, bf16, eager): total images/s =="
for n in 1 2 4; do
    for i in $(seq "$n"); do
        python benchmarks/bench_train.py --data_dir "$DATA" --batch_sizes 128 --precision bf16 --epochs 3 \
            > "$LOGS/share_${n}_${i}.log" 2>&1 &
    done
    wait
    python - "$n" "$LOGS"/share_"$n"_*.log <<'EOF'
import sys
rates = [float(line.split()[-1].replace(',', '')) for f in sys.argv[2:] for line in open(f)
         if line.startswith('rc4_cifar ') and line.split()[1].isdigit()]
print(f"{sys.argv[1]} process(es): {' + '.join(f'{r:,.0f}' for r in rates)} = {sum(rates):,.0f} images/s in total")
EOF
done

echo "== fast recipe, $EPOCHS epochs =="
python train.py --config train_configs/fast_rc4_cifar10.yaml --data_dir "$DATA" --epochs "$EPOCHS" \
    --lr_milestones "$((EPOCHS / 2)),$((EPOCHS * 3 / 4))" --output_dir "$LOGS/fast_rc4" \
    > "$LOGS/fast_rc4.log" 2>&1
python - "$LOGS/fast_rc4/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{s['model']} on {s['device_name']}: {s['epochs_completed']} epochs, test top-1 error "
      f"{s['test_top1_error']:.2f}% (best {s['best_test_top1_error']:.2f}%), {s['images_per_sec']:,.0f} img/s "
      f"averaged over all epochs, wall {s['wall_time_s']:.0f} s")
EOF
