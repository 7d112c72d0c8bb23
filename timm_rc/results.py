""" `python -m timm_rc.results`: the command lives in `timm_rc.cli.results`; this module keeps its old name
working (and, for one release, the library names it used to hold, with a DeprecationWarning). """
from ._deprecated import alias
from .cli.results import main

__all__ = ['main']
__getattr__ = alias(__name__, ['timm_rc.tables'])

if __name__ == '__main__':
    from .cli.common import run
    run(main)
