""" The trainer: the paper's protocol through Hugging Face Accelerate (`train`). Its command line is
`timm_rc.cli.train` (`python train.py`, `accelerate launch train.py`, `timm-rc-train`). """
from .._deprecated import alias
from ..runs.config import TrainConfig, load_config
from ..errors import UserError
from .loop import Diverged, reset_accelerate_state, train

__all__ = ['TrainConfig', 'UserError', 'load_config', 'Diverged', 'reset_accelerate_state', 'train']

# `from timm_rc.train import main` (train.py of timm_rc 0.2.0) still runs the trainer's command line
__getattr__ = alias(__name__, {'main': 'timm_rc.cli.train'})
