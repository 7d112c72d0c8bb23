""" `python -m timm_rc.eval`: the command lives in `timm_rc.cli.eval`; this module keeps its old name
working (and, for one release, the library names it used to hold, with a DeprecationWarning). """
from ._deprecated import alias
from .cli.eval import main

__all__ = ['main']
__getattr__ = alias(__name__, ['timm_rc.evaluation', 'timm_rc.loading', 'timm_rc.data', 'timm_rc.runs', 'timm_rc.cli.eval'])

if __name__ == '__main__':
    from .cli.common import run
    run(main)
