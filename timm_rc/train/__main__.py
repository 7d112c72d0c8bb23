""" `python -m timm_rc.train ...`: the trainer's command line, as `python -m timm_rc train ...` runs it. """
import sys

from ..__main__ import main
from ..cli.common import run

if __name__ == '__main__':
    run(lambda: main(['train', *sys.argv[1:]]))
