""" Two CPU training runs one after the other against `python -m timm_rc sweep --parallel 2` (issue 17, item 5).

    python benchmarks/bench_parallel.py --data_dir ../shared/data/cifar10

A grid of the same run over seeds 0 and 1 (the issue's command: rc4_cifar width 16, 4,096 training and 256
test images, batch 64, 1 epoch), run by the sweep runner sequentially and with --parallel 2 (which gives each
run its share of the cores), from fresh output folders. Prints the wall time of each and their ratio. Time
nothing else while it runs.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_dir', required=True)
    p.add_argument('--width', type=int, default=16)
    p.add_argument('--train_samples', type=int, default=4096)
    args = p.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    rows = []
    for parallel in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            sweep = Path(tmp) / 'bench.yaml'
            sweep.write_text(yaml.safe_dump(dict(
                program=str(REPO / 'train.py'), method='grid',
                parameters=dict(seed={'values': [0, 1]}, model={'value': 'rc4_cifar'},
                                model_kwargs={'value': f'{{"width": {args.width}}}'}, data_dir={'value': data_dir},
                                log_with={'value': 'none'}, max_train_samples={'value': args.train_samples},
                                max_eval_samples={'value': 256}, batch_size={'value': 64}, epochs={'value': 1},
                                output_dir={'value': str(Path(tmp) / 'runs' / 'seed{seed}')}))))
            env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, '-m', 'timm_rc', 'sweep', str(sweep), '--parallel', str(parallel)],
                                 cwd=tmp, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                sys.exit(f'the sweep failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}')
            rows.append((parallel, wall))
    print(f'{os.cpu_count()} CPU cores; 2 runs of rc4_cifar width {args.width}, {args.train_samples} images, 1 epoch')
    print(f'{"mode":<24}{"wall s":>8}')
    for parallel, wall in rows:
        print(f'{"one after the other" if parallel == 1 else "--parallel 2":<24}{wall:>8.1f}')
    print(f'--parallel 2 / sequential: {rows[1][1] / rows[0][1]:.2f}')


if __name__ == '__main__':
    main()
