""" `python -m timm_rc.convert`: the command lives in `timm_rc.cli.convert`; this module keeps its old name
working (and, for one release, the library names it used to hold, with a DeprecationWarning). """
from ._deprecated import alias
from .cli.convert import main

__all__ = ['main']
__getattr__ = alias(__name__, ['timm_rc.convert_weights'])

if __name__ == '__main__':
    from .cli.common import run
    run(main)
