""" Static int8 (PT2E) on weight-shared convolutions: the BN-folding problem and timm_rc's fix.

PT2E folds each BN into the weight of the convolution in front of it, in place; in an RC network one
convolution weight feeds k calls, each followed by its own per-step BN, so every BN is folded into the
same tensor (pytorch/ao pull request 2795). This script measures the relative L2 error of the int8
output against fp32 with and without `timm_rc.quantize.pt2e.untie_shared_weights`, on width-8 post-activation
models whose per-step BN statistics were made distinct by 30 training-mode batches, on random inputs.

    python benchmarks/int8_bn_folding.py [--json benchmarks/results/int8_bn_folding_cpu.json]
"""
import argparse
import json
from unittest import mock

import timm
import torch

import timm_rc  # noqa: F401
from timm_rc.quantize import static_int8


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--json', help='also write the rows to this file')
    args = p.parse_args()
    rows = []
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(32, 3, 32, 32, generator=g) for _ in range(4)]
    x = torch.randn(64, 3, 32, 32, generator=g)
    print(f'{"model":<20}{"untied calls":>14}{"rel. L2 error, upstream":>26}{"with untie":>12}')
    for name in ('rc4_cifar', 'rc2_cifar', 'rc4_unshared_cifar', 'rc1_cifar'):
        torch.manual_seed(0)
        model = timm.create_model(name, width=8, block='postact').train()
        with torch.no_grad():
            for _ in range(30):
                model(torch.randn(32, 3, 32, 32, generator=g))
        model.eval()
        with torch.no_grad():
            ref = model(x)
            fixed = static_int8(model, calib, compile=False)
            err_fixed = ((fixed(x) - ref).norm() / ref.norm()).item()
            with mock.patch('timm_rc.quantize.pt2e.untie_shared_weights', lambda gm: 0):
                upstream = static_int8(model, calib, compile=False)
            err_upstream = ((upstream(x) - ref).norm() / ref.norm()).item()
        rows.append(dict(model=name, untied_calls=fixed.untied, rel_l2_upstream=err_upstream, rel_l2_untied=err_fixed,
                         torch=torch.__version__))
        print(f'{name:<20}{fixed.untied:>14}{err_upstream:>26.4f}{err_fixed:>12.4f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
