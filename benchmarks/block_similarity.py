""" How far apart the blocks of an unshared network are: the room `convert_to_rc` has to share them.

For each unrolled cell of a network with unshared weights (e.g. the ResNet-18 graph, rc4_unshared_cifar) and
each of its convolutions: the cosine similarity of block i's weight with block 0's, and the distance of each
block's weight from the blocks' mean relative to its own norm (what `init='average'` leaves as the step's
error). Near-zero cosines mean the blocks share no structure that one weight could keep.

    python benchmarks/block_similarity.py runs/cpu_w8/resnet18_postact/seed0 [--json FILE]
"""
import argparse
import json

import torch
import torch.nn.functional as F

from timm_rc.layers import Unrolled
from timm_rc.runs.source import load_model


def block_similarity(model) -> list:
    rows = []
    for cell_name, cell in model.named_modules():
        if not isinstance(cell, Unrolled) or cell.share_weights:
            continue
        convs = [n for n, m in cell.steps[0].named_modules() if isinstance(m, torch.nn.Conv2d)]
        for conv in convs:
            w = torch.stack([s.get_submodule(conv).weight.detach() for s in cell.steps])
            mean = w.mean(0)
            rows.append(dict(cell=cell_name, conv=conv,
                             cosine_to_block0=[F.cosine_similarity(w[0].flatten(), x.flatten(), 0).item() for x in w],
                             distance_to_mean=[((x - mean).norm() / x.norm()).item() for x in w]))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('run')
    p.add_argument('--json')
    args = p.parse_args()
    rows = block_similarity(load_model(args.run))
    print(f'{"cell":<6} {"conv":<6} {"cos(W_0, W_i), i = 0..":<28} |W_i - mean| / |W_i|')
    for r in rows:
        print(f'{r["cell"]:<6} {r["conv"]:<6} {" ".join(f"{c:5.2f}" for c in r["cosine_to_block0"]):<28} '
              f'{" ".join(f"{d:.2f}" for d in r["distance_to_mean"])}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(run=args.run, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
