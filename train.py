""" Train an RC network with the paper's protocol.

    accelerate launch train.py --config train_configs/rc4_cifar10.yaml [--key value ...]
    python train.py --model rc4_cifar --data_dir ../shared/data/cifar10 --epochs 1

The command line lives in `timm_rc.cli.train` (also installed as `timm-rc-train`), the loop in
`timm_rc.train`.
"""
import signal
import sys

# torch takes seconds to import, and Ctrl-C (or a sweep runner stopping its runs) may come meanwhile: an
# import interrupted halfway leaves modules broken (a RecursionError traceback, not a clean stop), so the
# signal is only noted during the import and acted on after it
_interrupted = []
_previous = signal.signal(signal.SIGINT, lambda signum, frame: _interrupted.append(signum))
from timm_rc.cli.train import main, run  # noqa: E402, F401  (main: for `from train import main`)
signal.signal(signal.SIGINT, _previous)
if _interrupted:
    print('\ninterrupted while starting; nothing was started.', file=sys.stderr)
    raise SystemExit(130)

if __name__ == '__main__':
    run()
