""" `python -m timm_rc plots`: the paper's figures from run folders.

    python -m timm_rc plots bn RUN_DIR [--epoch N] [--out DIR]     # Figures 1(b), 3 and 4 (default RUN_DIR/plots)
    python -m timm_rc plots curves RUN_DIR [RUN_DIR ...] [--out F]  # Figure 2 (default RUN_DIR/plots/curves.png)
    python -m timm_rc eval RUN_DIR [RUN_DIR ...] --steps 1,2,4,8 --plot F  # error against FLOPs per image
    python -m timm_rc plots tradeoff ROOT [ROOT ...] --out F        # test error against parameters, a point per
                                                                    # row of python -m timm_rc results ROOT ...

A thin layer over `timm_rc.reports.figures` (`plot_bn`, `plot_curves`, `plot_tradeoff`) and `timm_rc.reports.tables`.
"""
from pathlib import Path
from typing import Sequence

import sys

from ..errors import UserError
from ..reports.figures import plot_bn, plot_curves, plot_tradeoff
from ..reports.tables import collect, result_rows
from .common import ArgumentParser, command, run

__all__ = ['main']


@command
def main(argv: Sequence[str]) -> None:
    parser = ArgumentParser(prog='python -m timm_rc plots', description=__doc__.split('\n\n')[0].split(': ', 1)[1],
                            epilog='examples:\n' + __doc__.split('\n\n')[1])
    sub = parser.add_subparsers(dest='cmd', required=True, parser_class=ArgumentParser)
    p_bn = sub.add_parser('bn', help="per-step BN statistics (the paper's Figures 1(b), 3, 4)")
    p_bn.add_argument('run_dir', type=Path)
    p_bn.add_argument('--epoch', type=int, default=None, help='default: the last saved epoch')
    p_bn.add_argument('--out', type=Path, default=None, help='default: RUN_DIR/plots')
    p_c = sub.add_parser('curves', help="training loss and test error against epochs (Figure 2)")
    p_c.add_argument('run_dirs', type=Path, nargs='+')
    p_c.add_argument('--out', type=Path, default=None, help='default: plots/curves.png in the first run folder')
    p_t = sub.add_parser('tradeoff', help='test error against unique parameters: a point per results-table row, a line per network across widths')
    p_t.add_argument('roots', type=Path, nargs='+', help='run folders, or folders below which runs lie')
    p_t.add_argument('--out', type=Path, required=True, help='the PNG to write')
    args = parser.parse_args(argv)
    missing = [str(d) for d in ([args.run_dir] if args.cmd == 'bn' else args.run_dirs if args.cmd == 'curves' else [])
               if not d.exists()]
    if missing:
        raise UserError(f'{", ".join(missing)} do{"es" * (len(missing) == 1)} not exist')
    if args.cmd == 'tradeoff':
        def say(line):
            print(line, file=sys.stderr)
        print(plot_tradeoff(result_rows(collect(args.roots, on_skip=say), on_warning=say), args.out))
    elif args.cmd == 'bn':
        for p in plot_bn(args.run_dir, args.epoch, args.out):
            print(p)
    else:
        print(plot_curves(args.run_dirs, args.out or args.run_dirs[0] / 'plots' / 'curves.png'))


if __name__ == '__main__':
    run(main)
