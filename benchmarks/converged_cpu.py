""" The converged campaign (issue 22): run a sweep's runs that have no committed result yet, and commit what finishes.

    python benchmarks/converged_cpu.py train_configs/sweeps/converged_w8.yaml --parallel 2
    python benchmarks/converged_cpu.py train_configs/sweeps/converged_w8.yaml --collect   # copy finished runs only
    python benchmarks/converged_cpu.py train_configs/sweeps/converged_w16.yaml --dry-run  # what it would do
    OMP_NUM_THREADS=1 python benchmarks/converged_cpu.py SWEEP --only rc1_,sharedbn      # one lane: these runs in turn

Each run of the sweep writes to runs/<path> (e.g. runs/converged/w8/rc4_cifar10/seed0); a finished run's
summary.json, metrics.jsonl and run_config.json are copied to benchmarks/results/<path>, which git keeps. A run
whose committed summary has every epoch is not run again, on any machine; the sweep runner resumes an
interrupted run from its newest checkpoint in runs/ (kept there, never committed: a machine that keeps runs/
resumes it, a fresh clone starts it again). `--parallel 2` on 2 cores gives each run one thread (its share).
"""
import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from timm_rc.train.sweeps import load_sweep, plan, run_sweep

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results'
FILES = ('summary.json', 'metrics.jsonl', 'run_config.json')


def finished(folder: Path) -> bool:
    """ Whether `folder` holds the summary of a run that trained every epoch. """
    try:
        s = json.loads((folder / 'summary.json').read_text())
    except (OSError, ValueError):
        return False
    return s.get('epochs_completed') == s.get('epochs')


def committed(output_dir: Path) -> Path:
    return RESULTS / Path(output_dir).relative_to('runs')


def collect(runs) -> list:
    """ Copy every finished run's small files to benchmarks/results/; returns the folders written. """
    written = []
    for r in runs:
        if finished(r.output_dir) and (r.output_dir / 'model.safetensors').is_file():
            dest = committed(r.output_dir)
            dest.mkdir(parents=True, exist_ok=True)
            for name in FILES:
                shutil.copyfile(r.output_dir / name, dest / name)
            written.append(dest)
    return written


def dry_run(runs, done) -> list:
    """ One line per run: skipped (committed, with its error), resumed (from which epoch) or started. """
    lines = []
    for r in runs:
        if r in done:
            s = json.loads((committed(r.output_dir) / 'summary.json').read_text())
            what = f"skip: committed, test err {s.get('test_top1_error', float('nan')):.2f}%"
        elif r.state == 'interrupted':
            r.refresh_metrics()
            what = (f'resume after epoch {r.last_epoch}/{r.epochs}' if r.last_epoch is not None
                    else 'resume (no epoch finished yet)')
        elif r.state == 'complete':
            what = 'finished, not yet committed: --collect copies it'
        else:
            what = f'start ({r.epochs} epochs)' if r.epochs else 'start'
        lines.append(f'#{r.index} {r.output_dir}: {what}')
    return lines


def again(args) -> str:
    """ The command that continues this one, as the user gave it (the thread setting included). """
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if 'OMP_NUM_THREADS' in os.environ else ''
    argv = ['python', 'benchmarks/converged_cpu.py', args.sweep, '--parallel', str(args.parallel)]
    return env + shlex.join(argv + (['--only', args.only] if args.only else []))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('sweep')
    p.add_argument('--parallel', type=int, default=1)
    p.add_argument('--collect', action='store_true', help='only copy the finished runs\' files')
    p.add_argument('--dry-run', action='store_true', help='say what each run would do (skipped, resumed, started)')
    p.add_argument('--only', default='', help='comma-separated parts of output folders: run only the runs whose '
                   'folder contains one (e.g. resnet18_cifar10/seed1); two such lanes with OMP_NUM_THREADS=1 '
                   'share 2 cores like --parallel 2, each in its own order')
    args = p.parse_args()
    name = Path(args.sweep).stem
    runs = plan(load_sweep(args.sweep), name)
    if args.only:
        parts = [x for x in args.only.split(',') if x]
        runs = [r for r in runs if any(x in str(r.output_dir) for x in parts)]
        if not runs:
            sys.exit(f'--only {args.only}: no run of {args.sweep} has a folder containing it')
        if 'OMP_NUM_THREADS' not in os.environ and args.parallel == 1:
            # measured: an RC-4 epoch took 125 s instead of 32 s with two such lanes on 2 cores
            print('note: --only without OMP_NUM_THREADS: this lane takes every core; beside a second lane, '
                  'start both with OMP_NUM_THREADS=1', file=sys.stderr, flush=True)
    done = [r for r in runs if finished(committed(r.output_dir))]
    print(f'{args.sweep}: {len(runs)} runs, {len(done)} committed under benchmarks/results/', flush=True)
    if args.dry_run:
        for line in dry_run(runs, done):
            print(line)
        return
    code = 0
    if not args.collect:
        todo = [r for r in runs if r not in done]
        code = run_sweep(todo, name, parallel=args.parallel, again=again(args)) if todo else 0
    for dest in collect(runs):
        print(f'committed-ready: {dest.relative_to(REPO)}')
    sys.exit(code)


if __name__ == '__main__':
    main()
