""" Training throughput of the real timm_rc loop, and the time to decode the data.

    python benchmarks/bench_train.py --data_dir ../shared/data/cifar10 --batch_sizes 128 512 \
        --precision bf16 --compile            # on a GPU
    python benchmarks/bench_train.py --data_dir ../shared/data/cifar10 --width 8 \
        --train_samples 2048 --batch_sizes 64  # a quick look on the CPU

Each configuration runs `timm_rc.train.train` itself (same data path, augmentation, clipping,
scheduler, checkpoints) for a few epochs and reads the per-epoch images/s it measured: the time from
an epoch's first batch to its end-of-epoch host sync, evaluation excluded. The first epoch carries
compilation and warm-up, so the table reports the best of the later epochs and shows the first apart.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from timm_rc.train import load_config, reset_accelerate_state, train
from timm_rc.data import load_image_splits


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_dir', required=True)
    p.add_argument('--model', default='rc4_cifar')
    p.add_argument('--width', type=int, default=None, help='model width (default: the model\'s own)')
    p.add_argument('--batch_sizes', type=int, nargs='+', default=[128, 512])
    p.add_argument('--precision', default='auto', choices=['auto', 'no', 'bf16', 'fp16'])
    p.add_argument('--compile', action='store_true')
    p.add_argument('--compile_mode', default=None, help="e.g. 'reduce-overhead' (CUDA graphs)")
    p.add_argument('--loader', default='auto', choices=['auto', 'gpu', 'dataloader'])
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--train_samples', type=int, default=None, help='default: the whole training split')
    p.add_argument('--num_threads', type=int, default=None,
                   help='CPU threads (default: torch\'s, every core); give each of several CPU jobs its share')
    args = p.parse_args()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)  # the decode below too

    t = time.perf_counter()
    train_split, test_split, _, _ = load_image_splits('cifar10', args.data_dir)
    decode_s = time.perf_counter() - t
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
    print(f'device: {device}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads')
    print(f'decode: {len(train_split) + len(test_split):,} images in {decode_s:.2f} s '
          f'({(len(train_split) + len(test_split)) / decode_s:,.0f} images/s)')
    print(f'{"model":<12} {"batch":>6} {"precision":>9} {"compile":>16} {"loader":>10} '
          f'{"epoch 1 img/s":>14} {"best later img/s":>17}')
    for batch in args.batch_sizes:
        with tempfile.TemporaryDirectory() as out:
            argv = ['--model', args.model, '--data_dir', args.data_dir, '--batch_size', str(batch),
                    '--epochs', str(args.epochs), '--mixed_precision', args.precision, '--loader', args.loader,
                    '--output_dir', out, '--log_with', 'none', '--keep_checkpoints', '1',
                    '--log_interval', '1000000', '--max_eval_samples', '1000']
            if args.width:
                argv += ['--model_kwargs', json.dumps({'width': args.width})]
            if args.train_samples:
                argv += ['--max_train_samples', str(args.train_samples)]
            if args.num_threads is not None:
                argv += ['--num_threads', str(args.num_threads)]
            if args.compile:
                argv += ['--compile']
                if args.compile_mode:
                    argv += ['--compile_mode', args.compile_mode]
            summary = train(load_config(argv))
            reset_accelerate_state()
            lines = (Path(out) / 'metrics.jsonl').read_text().splitlines()
            rates = [json.loads(line)['images_per_sec'] for line in lines]
        later = max(rates[1:]) if len(rates) > 1 else float('nan')
        compiled = (args.compile_mode or 'default') if args.compile else 'no'
        print(f'{args.model:<12} {batch:>6} {summary["mixed_precision"]:>9} {compiled:>16} {summary["loader"]:>10} '
              f'{rates[0]:>14,.0f} {later:>17,.0f}')
        sys.stdout.flush()


if __name__ == '__main__':
    main()
