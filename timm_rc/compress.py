""" `python -m timm_rc.compress`: the command lives in `timm_rc.cli.compress`; this module keeps its old name
working (and, for one release, the library names it used to hold, with a DeprecationWarning). """
from ._deprecated import alias
from .cli.compress import main

__all__ = ['main']
__getattr__ = alias(__name__, ['timm_rc.compression', 'timm_rc.quantize', 'timm_rc.cli.compress'])

if __name__ == '__main__':
    from .cli.common import run
    run(main)
