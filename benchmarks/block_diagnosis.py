""" What happens inside RC-4 in its first few hundred steps, for each block style (issue 6, part 1).

    python benchmarks/block_diagnosis.py --data_dir ../shared/data/cifar10 --width 16 --steps 300 \
        --json benchmarks/results/block_diagnosis_cpu.json

Trains `rc4_cifar` with the paper's protocol (SGD 0.1, momentum 0.9, wd 1e-4, clipping by value
0.1, batch 128, the trainer's augmentation) once per block style, from the same seed, and records
every `--every` steps:
  - the RMS of the residual stream entering each unrolled step and leaving the cell, per cell;
  - the RMS of the logits, and the training loss of that batch;
and at the end each step's first-BN running mean/var (channel means) and gamma/beta (channel means).
A pre-activation block adds its residual branch to an un-normalised stream and the network has no
BN between the last step and the classifier, so the stream, and with it the logits, can grow from
step to step; a post-activation block ends every step in BN + ReLU (timm's BasicBlock). This shows
which happens, in numbers.
"""
import argparse
import json

import timm
import torch
from torch import nn

import timm_rc  # noqa: F401  registers the models
from timm_rc.data import augment, epoch_generator, load_image_splits, normalize


def rms(x: torch.Tensor) -> float:
    return x.detach().float().pow(2).mean().sqrt().item()


def diagnose(block: str, split, args) -> dict:
    torch.manual_seed(args.seed)
    model = timm.create_model('rc4_cifar', width=args.width, block=block)
    mean = torch.tensor(model.pretrained_cfg['mean']).view(1, -1, 1, 1) * 255
    std = torch.tensor(model.pretrained_cfg['std']).view(1, -1, 1, 1) * 255
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[f'{name}.in'] = rms(inputs[0])
            seen[f'{name}.out'] = rms(output)
        return hook

    for cell in ('cell1', 'cell2'):
        for i, step in enumerate(getattr(model, cell).steps):
            step.register_forward_hook(record(f'{cell}.step{i}'))
    gen = epoch_generator(args.seed, 0, 'cpu')
    perm = torch.randperm(len(split), generator=gen)
    rows = []
    model.train()
    for step in range(args.steps + 1):
        idx = perm[(step * 128) % (len(split) - 128):][:128]
        x = normalize(augment(split.images[idx], gen), mean, std, False)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, split.labels[idx])
        if step % args.every == 0:
            rows.append(dict(step=step, loss=loss.item(), logits_rms=rms(logits), **seen))
            print(f'{block:8s} step {step:4d}  loss {loss.item():7.3f}  logits rms {rms(logits):9.3f}  '
                  + '  '.join(f'{c}: ' + ' '.join(f'{seen[f"{c}.step{i}.in"]:.2f}' for i in range(4))
                              + f' -> {seen[f"{c}.step3.out"]:.2f}' for c in ('cell1', 'cell2')), flush=True)
        if step == args.steps:
            break
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_value_(model.parameters(), 0.1)
        opt.step()
    bn = {}
    for cell in ('cell1', 'cell2'):
        for i, step in enumerate(getattr(model, cell).steps):
            first = step.bn1
            bn[f'{cell}.step{i}.bn1'] = dict(
                running_mean=first.running_mean.mean().item(), running_var=first.running_var.mean().item(),
                gamma=first.weight.mean().item(), beta=first.bias.mean().item())
    return dict(block=block, trace=rows, first_bn_per_step=bn)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_dir', required=True)
    p.add_argument('--width', type=int, default=16)
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--every', type=int, default=50)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, help='write the traces here')
    args = p.parse_args()
    split, _, _, _ = load_image_splits('cifar10', args.data_dir, args.steps * 128 + 128, 1)
    print('stream RMS entering steps 0-3 of each cell -> leaving the cell')
    out = dict(width=args.width, steps=args.steps, seed=args.seed,
               results=[diagnose(block, split, args) for block in ('preact', 'postact')])
    for r in out['results']:
        print(f"{r['block']}: first BN of each step after {args.steps} steps (channel means): " + '; '.join(
            f"{k.split('.bn1')[0]} mean {v['running_mean']:.2f} var {v['running_var']:.2f}"
            for k, v in r['first_bn_per_step'].items()))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
