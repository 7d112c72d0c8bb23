""" `python -m timm_rc sweep FILE [--dry-run] [--parallel N] [--gpus 0,1]`: run a W&B grid sweep file without a
W&B server. A thin layer over `timm_rc.train.sweeps` (`load_sweep`, `plan`, `run_sweep`), whose docstring is
this command's --help, and `timm_rc.reports.tables`.
"""
import argparse
import os
import shlex
from pathlib import Path
from typing import List, Sequence

from ..train import sweeps
from ..train.sweeps import cpu_threads_per_run, launch, load_sweep, plan, run_sweep
from ..reports.tables import collect, table
from .common import ArgumentParser, command, run

__all__ = ['main']


def _gpu_list(text: str) -> List[str]:
    """ GPU ids as CUDA_VISIBLE_DEVICES takes them: indices (0,1) or UUIDs as nvidia-smi -L prints them
    (GPU-<hex and dashes>, which CUDA also takes shortened to a unique prefix; MIG-<...>). """
    import re
    gpus = [g.strip() for g in text.split(',')]
    uuid = re.compile(r'^(GPU-[0-9a-fA-F][0-9a-fA-F-]*|MIG-(GPU-)?[0-9a-fA-F][0-9a-fA-F-]*(/\d+/\d+)?)$')
    bad = [g for g in gpus if not (g.isdigit() or uuid.match(g))]
    if not gpus or bad:
        what = f'{bad[0]!r} is not one' if bad and bad[0] else 'an empty entry is not one'
        raise argparse.ArgumentTypeError(f'--gpus takes a comma list of GPU indices such as 0,1 (or GPU-/MIG- UUIDs '
                                         f'as nvidia-smi -L prints them); {what}, in {text!r}')
    return gpus


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f'--parallel takes a number >= 1, got {text!r}')
    return n


@command(returns_code=True)
def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog='python -m timm_rc sweep', description=sweeps.__doc__)
    parser.add_argument('sweep', help='a W&B sweep file (method: grid), e.g. train_configs/sweeps/table2_cifar10.yaml')
    parser.add_argument('--dry-run', action='store_true', help='print the commands (and what each run would do)')
    parser.add_argument('--parallel', type=_positive, default=None,
                        help='runs at once (default: the number of --gpus, else 1)')
    parser.add_argument('--gpus', type=_gpu_list, default=None,
                        help='GPU ids, e.g. 0,1: run slot i gets gpus[i %% len(gpus)] as CUDA_VISIBLE_DEVICES')
    args = parser.parse_args(argv)
    name = Path(args.sweep).stem
    sweep = load_sweep(args.sweep)
    runs = plan(sweep, name)
    trainer = any(r.output_dir is not None for r in runs)
    states = {s: sum(r.state == s for r in runs) for s in ('complete', 'interrupted', 'new')}
    if trainer:
        head = (f'# {args.sweep}: grid of {len(runs)} runs: {states["complete"]} complete (skipped), '
                f'{states["interrupted"]} interrupted (resumed), {states["new"]} new')
    else:
        head = (f'# {args.sweep}: grid of {len(runs)} runs; its program {sweep.get("program")!r} is not timm_rc\'s '
                f'trainer, so runs are not checked for completion: all are run')
    print(head, flush=True)
    parallel = args.parallel or (len(args.gpus) if args.gpus else 1)
    if args.dry_run:
        threads = cpu_threads_per_run(parallel, args.gpus, os.environ)
        share = (f'; each gets {threads} CPU thread{"s" * (threads != 1)} (its share of the cores)' if threads
                 else f'; run slot i gets GPU gpus[i % {len(args.gpus)}] as the slots free up' if args.gpus else '')
        if parallel > 1:
            print(f'# {parallel} at once{share}')
        for i, r in enumerate(runs):
            command, env, _ = launch(r, i % parallel, args.gpus, threads)
            note = f'{r.state}: {r.output_dir}' if r.output_dir is not None else f'log {r.log_file}'
            print(''.join(f'{k}={v} ' for k, v in sorted(env.items())) + f'{shlex.join(command)}  # {note}')
        return 0
    again = shlex.join(['python', '-m', 'timm_rc', 'sweep', *argv])
    code = run_sweep(runs, name, parallel=parallel, gpus=args.gpus, again=again)
    if trainer and code != 130:
        found = collect([r.output_dir for r in runs if (r.output_dir / 'summary.json').is_file()])
        if found:
            print(f'\nresults of this sweep\'s {len(found)} runs:\n{table(found)}', flush=True)
    return code


if __name__ == '__main__':
    run(main)
