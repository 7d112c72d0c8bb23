""" The paper's tables beside this project's runs.

    python -m timm_rc.results runs/ [--markdown]

Reads every `summary.json` below the given folders, groups the runs by (model, BN sharing, dataset),
and prints the mean and standard deviation of the final test top-1 error over seeds next to the
paper's number (mean of 3 runs on the lossless CIFAR; ours on whatever data the runs used).
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ['PAPER', 'collect', 'paper_row', 'table']

# (model, bn_sharing) -> {dataset: test error %}; paper-notes.md, Tables 1 and 2
PAPER: Dict[Tuple[str, str], Dict[str, float]] = {
    ('rc4_cifar', 'none'): {'cifar10': 10.37, 'cifar100': 38.56},
    ('rc4_cifar', 'shared'): {'cifar10': 21.00, 'cifar100': 54.52},
    ('rc4_cifar', 'independent'): {'cifar10': 7.65, 'cifar100': 30.44},
    ('rc1_cifar', 'independent'): {'cifar10': 14.77, 'cifar100': 40.28},
    ('rc2_cifar', 'independent'): {'cifar10': 8.44, 'cifar100': 32.51},
    ('rc2_unshared_cifar', 'independent'): {'cifar10': 7.87, 'cifar100': 30.74},
    ('rc4_unshared_cifar', 'independent'): {'cifar10': 6.92, 'cifar100': 28.10},
}
PAPER_NAMES = {
    ('rc4_cifar', 'none'): 'RC-4, no BN', ('rc4_cifar', 'shared'): 'RC-4, shared BN',
    ('rc4_cifar', 'independent'): 'RC-4', ('rc1_cifar', 'independent'): 'RC-1',
    ('rc2_cifar', 'independent'): 'RC-2', ('rc2_unshared_cifar', 'independent'): 'ResNet-10',
    ('rc4_unshared_cifar', 'independent'): 'ResNet-18',
}


def paper_row(model: str, model_kwargs: dict) -> Tuple[str, str]:
    base = model.split('.')[0]
    bn = model_kwargs.get('bn_sharing', 'independent')
    if base == 'rc1_cifar':  # one step: BN sharing makes no difference
        bn = 'independent' if bn == 'shared' else bn
    return base, bn


def collect(roots: Sequence[Path]) -> List[dict]:
    runs = []
    for root in roots:
        for path in sorted(Path(root).rglob('summary.json')):
            try:
                runs.append(dict(json.loads(path.read_text()), path=str(path.parent)))
            except (OSError, json.JSONDecodeError):
                print(f'skipping unreadable {path}', file=sys.stderr)
    return runs


def table(runs: List[dict], markdown: bool = False) -> str:
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in runs:
        key = paper_row(r['model'], r.get('model_kwargs') or {})
        extra = {k: v for k, v in (r.get('model_kwargs') or {}).items() if k != 'bn_sharing'}
        dataset = Path(r.get('data_dir') or r['dataset']).name
        groups[(key, json.dumps(extra, sort_keys=True), dataset)].append(r)
    header = ['model', 'kwargs', 'dataset', 'runs', 'epochs', 'params', 'test err % (ours)', 'paper']
    rows = []
    for (key, extra, dataset), rs in sorted(groups.items()):
        errs = [r['test_top1_error'] for r in rs]
        spread = f' ± {statistics.stdev(errs):.2f}' if len(errs) > 1 else ''
        paper: Optional[float] = PAPER.get(key, {}).get(dataset) if extra == '{}' else None
        epochs = sorted({f"{r['epochs_completed']}/{r['epochs']}" for r in rs})
        rows.append([PAPER_NAMES.get(key, f'{key[0]} ({key[1]} BN)'), '' if extra == '{}' else extra, dataset,
                     str(len(rs)), ','.join(epochs), f"{rs[0]['params']:,}",
                     f'{statistics.mean(errs):.2f}{spread}', '' if paper is None else f'{paper:.2f}'])
    if markdown:
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
        return '\n'.join(lines)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = '  '.join(f'{{:<{w}}}' for w in widths)
    return '\n'.join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('roots', nargs='+', type=Path, help='folders holding run folders (summary.json)')
    parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
    args = parser.parse_args(argv)
    runs = collect(args.roots)
    if not runs:
        parser.exit(2, f'error: no summary.json below {", ".join(map(str, args.roots))}\n')
    print(table(runs, markdown=args.markdown))


if __name__ == '__main__':
    main()
