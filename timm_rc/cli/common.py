""" What every `python -m timm_rc.<command>` shares: the parser, the error contract, tables.

The contract: a problem with the user's input is a `UserError`, printed as one line `error: ...` on
stderr with exit code 2 (no traceback, nothing written); output piped into a reader that stops early
(`| head`) ends quietly, as for any Unix tool.
"""
import argparse
import functools
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import UserError
from ..reports.formatting import format_table

__all__ = ['ArgumentParser', 'command', 'run', 'fail', 'add_threads_option', 'set_threads', 'json_object', 'int_list', 'positive', 'format_table']


class ArgumentParser(argparse.ArgumentParser):
    """ argparse whose errors are `UserError`s naming the command's --help, not a usage block. """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f'{message} (see {self.prog} --help)')

    def parse_known_args(self, args=None, namespace=None):
        # an unknown option is named first: argparse would otherwise report a required option that a typo
        # (--ouput) left out, and never the typo
        args = list(sys.argv[1:] if args is None else args)
        if self._subparsers is None:  # a command with sub-commands leaves this to the sub-command's parser
            for token in args:
                if token == '--':
                    break
                if not token.startswith('--'):
                    continue
                name = token.split('=', 1)[0]
                if not any(known.startswith(name) for known in self._option_string_actions):
                    import difflib
                    close = difflib.get_close_matches(name, [o for o in self._option_string_actions
                                                             if o.startswith('--')], n=1)
                    hint = f'; did you mean {close[0]}?' if close else ''
                    self.error(f'unknown option {name}{hint}')
        return super().parse_known_args(args, namespace)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--num_threads', type=int, default=None,
                        help='CPU threads (default: torch\'s, every core); on a busy machine give this command its share')


def set_threads(num_threads: Optional[int]) -> None:
    """ --num_threads: torch's CPU threads for this command (timings depend on it). """
    if num_threads is not None:
        positive(num_threads=num_threads)
        import torch
        torch.set_num_threads(num_threads)


def fail(message: str, code: int = 2):
    """ Print `error: message` on stderr and exit with `code`. """
    print(f'error: {message}', file=sys.stderr)
    raise SystemExit(code)


def command(main: Optional[Callable] = None, *, returns_code: bool = False) -> Callable:
    """ A command's `main(argv=None)` (argv None: sys.argv[1:]): a `UserError` becomes one line on stderr
    and exit code 2, raised as SystemExit, or returned (`returns_code`: a main that returns its exit
    code, as the sweep runner does). """
    if main is None:
        return functools.partial(command, returns_code=returns_code)

    @functools.wraps(main)
    def wrapped(argv: Optional[Sequence[str]] = None):
        try:
            return main(list(sys.argv[1:] if argv is None else argv))
        except UserError as e:
            if returns_code:
                print(f'error: {e}', file=sys.stderr)
                return 2
            fail(str(e))
    return wrapped


def run(main: Callable) -> None:
    """ Run a command's main() as `python -m`: an int it returns is the exit code; output piped into a
    reader that stops early ends quietly instead of with a BrokenPipeError traceback; Ctrl-C (outside the
    trainer, which says how to resume) is one line and exit code 130. """
    try:
        code = main()
        sys.stdout.flush()
    except KeyboardInterrupt:
        print('\ninterrupted.', file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit
        sys.exit(1)
    if isinstance(code, int) and not isinstance(code, bool):
        sys.exit(code)


def json_object(text: Optional[str], option: str = '--model_kwargs') -> Optional[Dict[str, Any]]:
    """ A JSON object given on the command line (None stays None). """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f'{option} needs a JSON object, e.g. \'{{"width": 16}}\'; {text!r} is not valid '
                        f'JSON ({e})') from None
    if not isinstance(value, dict):
        raise UserError(f'{option} needs a JSON object, e.g. \'{{"width": 16}}\'; got {text!r}')
    return value


def int_list(text: str, option: str, example: str, allowed: Optional[Sequence[int]] = None,
             what: str = 'counts >= 1') -> List[int]:
    """ A comma list of ints >= 1 (or of the `allowed` values), e.g. --steps 1,2,4. """
    try:
        values = [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1 or (allowed is not None and any(v not in allowed for v in values)):
        what = ' or '.join(map(str, allowed)) if allowed is not None else what
        raise UserError(f'{option} needs a comma list of {what}, e.g. {example}; got {text!r}')
    return values


def positive(**values: Optional[int]) -> None:
    """ Every given option (None: not given) is >= 1. """
    for key, value in values.items():
        if value is not None and value < 1:
            raise UserError(f'--{key} must be >= 1, got {value}')


RECALIBRATION_DATA = ('plain', 'augmented')


def add_recalibrate_options(parser: argparse.ArgumentParser, default_data: str, what: str) -> None:
    """ --recalibrate N and --recalibrate_data (the command's measured default, docs/compression.md). """
    parser.add_argument('--recalibrate', type=int, metavar='N',
                        help=f're-estimate every BN layer\'s running statistics from N training batches {what}')
    parser.add_argument('--recalibrate_data', choices=RECALIBRATION_DATA,
                        help=f'with --recalibrate: training images as they are (plain) or with the trainer\'s crop '
                             f'and flip (augmented); default {default_data}, the better one measured here')


def recalibration(args: argparse.Namespace, default_data: str):
    """ (N or None, augmented) from the options of `add_recalibrate_options`. """
    if args.recalibrate_data is not None and args.recalibrate is None:
        raise UserError('--recalibrate_data applies to BN re-estimation: add --recalibrate N (training batches)')
    return args.recalibrate, (args.recalibrate_data or default_data) == 'augmented'
