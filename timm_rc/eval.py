""" `python -m timm_rc.eval`: the command lives in `timm_rc.cli.eval`; this module keeps its old name
working (and, for one release, the library names it used to hold, with a DeprecationWarning). """
from ._deprecated import alias
from .cli.eval import main

__all__ = ['main']
__getattr__ = alias(__name__, {**dict.fromkeys(('EvalResult', 'evaluate', 'evaluate_over_steps', 'flops_per_image', 'model_mean_std', 'PRECISIONS'), 'timm_rc.evaluation'), **dict.fromkeys(('load_model',), 'timm_rc.loading'), **dict.fromkeys(('load_split', 'split_loader'), 'timm_rc.data')})

if __name__ == '__main__':
    from .cli.common import run
    run(main)
