""" The trainer's command line: `python train.py`, `accelerate launch train.py`, `timm-rc-train`.

    accelerate launch train.py --config train_configs/rc4_cifar10.yaml [--key value ...]
    python train.py --model rc4_cifar --data_dir ../shared/data/cifar10 --epochs 1
    python train.py --help                                   # every key, from timm_rc.runs.config.TrainConfig

A thin layer over `timm_rc.train.train`: parses the config (`timm_rc.runs.config.load_config`), runs, and
turns what stops a run into an exit code: a user error is one line (from the main process only) and
exit code 2, a diverged run 3, Ctrl-C or SIGTERM 130 with where to resume.
"""
import os
import signal
import sys
import threading
import time
from typing import Optional, Sequence

from ..runs.config import TrainConfig, config_help, wants_help
from ..errors import UserError
from ..runs import Run, load_run_config
from ..train.loop import Diverged, train
from .common import run as run_command

__all__ = ['main', 'run']


def _is_main_process() -> bool:
    """ Rank 0, read from the launcher's environment: true before any process group exists. """
    return int(os.environ.get('RANK', '0')) == 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    """ Console entry point: `timm-rc-train` / `python train.py` / `accelerate launch train.py`.

    User errors print one line (from the main process only) and exit with code 2; a diverged run exits
    with 3; Ctrl-C or SIGTERM says where the newest complete checkpoint is and exits with 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(config_help(program()))
        return
    cfg = None

    def stop(signum, frame):  # `kill PID` (SIGTERM, also a scheduler's) stops the run as Ctrl-C does
        raise KeyboardInterrupt
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        cfg = load_run_config(argv)
        train(cfg)
    except UserError as e:
        if _is_main_process():
            print(f'error: {e}', file=sys.stderr, flush=True)
        else:  # every process finds the same error; the launcher stops the others when the first one exits,
            time.sleep(5)  # so the main process gets its line out first
        raise SystemExit(2)
    except Diverged as e:
        if _is_main_process():
            print(f'error: training diverged: {e}. Stopped before saving this epoch; the newest complete '
                  f'checkpoint is untouched. Start again in a new output_dir with a lower lr or with clipping (a resumed run keeps its settings).', file=sys.stderr)
        raise SystemExit(3)
    except KeyboardInterrupt:
        if _is_main_process():
            print(f'\ninterrupted. {_resume_hint(cfg, argv)}', file=sys.stderr)
        raise SystemExit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def program() -> str:
    """ How the user started the trainer, for --help and the resume hint: `python -m timm_rc train`,
    `timm-rc train`, `timm-rc-train` or (the default) `python train.py`. """
    name = sys.argv[0] if sys.argv else ''
    if name.endswith(' train'):  # set by timm_rc.__main__
        return name
    return 'timm-rc-train' if os.path.basename(name) == 'timm-rc-train' else 'python train.py'


def _resume_hint(cfg: Optional[TrainConfig], argv: Sequence[str]) -> str:
    if cfg is None:
        return 'Nothing was started.'
    try:
        out = cfg.resolved_output_dir()
    except UserError:
        return 'Nothing was started.'
    newest = Run(out).newest_checkpoint()
    if newest is None:
        return f'No epoch was completed, so {out} holds no checkpoint to resume from.'
    import shlex
    kept, skip = [], False
    for i, a in enumerate(argv):  # drop an earlier --resume [value]
        if skip:
            skip = False
            continue
        if a == '--resume':
            skip = i + 1 < len(argv) and not argv[i + 1].startswith('--')
            continue
        if not a.startswith('--resume='):
            kept.append(a)
    args = shlex.join(kept)
    return (f'The newest complete checkpoint is {newest}; continue with: {program()} {args} --resume '
            f'(or the same through accelerate launch)')


def run() -> None:
    """ The console script's and `python -m timm_rc.cli.train`'s entry point. """
    run_command(main)


if __name__ == '__main__':
    run()
