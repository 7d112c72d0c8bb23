""" `python -m timm_rc results RUNS_DIR [...] [--markdown]`: the paper's tables beside this project's runs.

Pools the runs below the given folders that differ in the seed alone, one row per configuration, the
paper's number beside it. A thin layer over `timm_rc.reports.tables` (`collect`, `table`), whose docstring says
what is compared and how.
"""
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..reports.tables import collect, table
from .common import ArgumentParser, command, run

__all__ = ['main']


def _warn(text: str) -> None:
    print(text, file=sys.stderr)


@command
def main(argv: Sequence[str]) -> None:
    intro, more = __doc__.split('\n\n')[:2]
    parser = ArgumentParser(prog='python -m timm_rc results', description=intro.split(': ', 1)[1] + '\n\n'
                            + more.split(' A thin layer')[0])
    parser.add_argument('roots', nargs='+', type=Path, help='folders holding run folders (summary.json)')
    parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
    args = parser.parse_args(argv)
    skipped = []

    def skip(text: str) -> None:
        skipped.append(text)
        _warn(text)

    runs = collect(args.roots, on_skip=skip)
    if not runs:
        raise UserError(f'no run summary below {", ".join(map(str, args.roots))}'
                        + (f' that could be read ({len(skipped)} skipped, said above)' if skipped else
                           ' (a run folder holds summary.json)'))
    print(table(runs, markdown=args.markdown, on_warning=_warn))


if __name__ == '__main__':
    run(main)
