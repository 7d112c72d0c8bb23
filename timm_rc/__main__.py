""" `python -m timm_rc <command> ...` (installed as `timm-rc <command> ...`): the one door to every command.

Each command lives in `timm_rc.cli.<command>`, a thin layer over the library; this module only dispatches
to it (imported when asked for, so that `--help` is instant). The old module paths
(`python -m timm_rc.eval`, ...) keep working until 0.4.0.
"""
import importlib
import os
import sys
from typing import Optional, Sequence

__all__ = ['COMMANDS', 'main', 'run', 'version']

# command: (module, one line for --help)
COMMANDS = {
    'train': ('timm_rc.cli.train', "train a network with the paper's protocol (GPUs: accelerate launch -m timm_rc train)"),
    'eval': ('timm_rc.cli.eval', "test error of a run, weights file or timm name; other step counts (--steps)"),
    'sweep': ('timm_rc.cli.sweep', 'run a W&B grid sweep file without a W&B server; resumes what was interrupted'),
    'results': ('timm_rc.cli.results', "the paper's tables beside this project's runs"),
    'plots': ('timm_rc.cli.plots', "the paper's figures (BN statistics, learning curves, error against parameters)"),
    'compress': ('timm_rc.cli.compress', 'compression report, weight-only int8/int4, static int8 on the CPU'),
    'convert': ('timm_rc.cli.convert', 'turn a trained plain network into an RC network (convert_to_rc)'),
    'export': ('timm_rc.cli.export', 'ONNX or torch.export (.pt2) file that keeps the sharing, checked in onnxruntime'),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ['usage: python -m timm_rc <command> [options]   (or: timm-rc <command> [options])', '',
             'commands:']
    lines += [f'  {name:<{width}}  {text}' for name, (_, text) in COMMANDS.items()]
    lines += ['', 'python -m timm_rc <command> --help describes one; --version prints the versions in use.']
    return '\n'.join(lines)


def version() -> str:
    """ 'timm_rc X (torch Y, timm Z, accelerate W)', from the installed packages' metadata (no torch import). """
    from importlib.metadata import PackageNotFoundError, version as installed

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return 'not installed'
    try:
        own = installed('timm_rc')
    except PackageNotFoundError:  # run from a source tree that was not installed
        from . import __version__ as own
    return f'timm_rc {own} (torch {of("torch")}, timm {of("timm")}, accelerate {of("accelerate")})'


def main(argv: Optional[Sequence[str]] = None):
    """ Dispatch to the command's own `main` (its exit code is returned). """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        print(f'error: no command given; name one of {", ".join(COMMANDS)}', file=sys.stderr)
        return 2
    if argv[0] in ('-h', '--help', 'help'):
        print(_usage())
        return 0
    if argv[0] in ('-V', '--version'):
        print(version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, [*COMMANDS, '--help', '--version'], n=1)
        mean = f'did you mean {close[0]}? ' if close else ''
        print(f'error: unknown command {name!r}; {mean}the commands are {", ".join(COMMANDS)} '
              f'(python -m timm_rc --help)', file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if name == 'train':  # the trainer names itself in --help and in its resume hint as the user called it
        console = os.path.basename(sys.argv[0]) == 'timm-rc' if sys.argv else False
        saved, sys.argv = sys.argv, ['timm-rc train' if console else 'python -m timm_rc train', *rest]
        try:
            return module.main(rest)
        finally:
            sys.argv = saved
    return module.main(rest)


def run() -> None:
    """ Console entry point (`timm-rc`). """
    from .cli.common import run as run_command
    run_command(main)


if __name__ == '__main__':
    run()
