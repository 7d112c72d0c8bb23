#!/usr/bin/env bash
# docs/figures/tradeoff_cpu_w8.png: test error against parameters of the reduced-scale runs (width 8, CPU)
cd "$(dirname "$0")/.."
R=benchmarks/results/cpu_w8
python3 -m timm_rc plots tradeoff $R/rc1_postact $R/rc2_postact $R/rc4_postact $R/resnet10_postact $R/resnet18_postact \
    $R/rc4_rank1_postact $R/rc4_rank2_postact $R/rc4_rank4_postact $R/rc4_rank2_distilled_postact \
    $R/rc4_distilled_a05_postact $R/rc4_from_resnet18_average_recal_kd5 \
    $R/rc4_rank1_from_resnet18_average_recal_ft5 $R/rc4_rank2_from_resnet18_average_recal_ft5 \
    $R/rc4_rank4_from_resnet18_average_recal_ft5 --out docs/figures/tradeoff_cpu_w8.png
