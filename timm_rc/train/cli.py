""" `python -m timm_rc.train.cli` and the `timm-rc-train` script of timm_rc 0.2.0: the trainer's command line is
`timm_rc.cli.train` now (`main` is still reachable here, with a DeprecationWarning, until 0.4.0). """
from .._deprecated import alias

__getattr__ = alias(__name__, {'main': 'timm_rc.cli.train'})

if __name__ == '__main__':
    import importlib
    importlib.import_module('timm_rc.cli.train').run()
