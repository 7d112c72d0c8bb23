""" Plain-text and Markdown tables, for the commands' reports and the results table. """
from typing import Any, Optional, Sequence

__all__ = ['format_table']


def format_table(head: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False,
                 numeric: Optional[Sequence[bool]] = None) -> str:
    """ A text table (columns padded; `numeric` columns right-aligned, by default all but the first) or a
    Markdown one. """
    rows = [[str(x) for x in row] for row in rows]
    head = [str(h) for h in head]
    numeric = list(numeric) if numeric is not None else [False] + [True] * (len(head) - 1)
    if markdown:
        lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---:' if n else '---' for n in numeric) + '|']
        return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def fmt(row):
        return '  '.join(x.rjust(w) if n else x.ljust(w) for x, w, n in zip(row, widths, numeric)).rstrip()
    return '\n'.join([fmt(head)] + [fmt(row) for row in rows])
