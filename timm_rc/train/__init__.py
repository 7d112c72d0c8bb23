""" Training RC networks (and any timm model) on CIFAR through Hugging Face Accelerate. """
from .config import TrainConfig, UserError, load_config
from .loop import Diverged, main, reset_accelerate_state, train
