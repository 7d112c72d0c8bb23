""" Evaluation: one routine measures a model for the trainer and every command (`evaluate`, its error, loss and
per-step costs), and BN re-estimation after weights change (`recalibration`). """
from .evaluate import *  # noqa: F401,F403
from .evaluate import __all__ as _evaluate_all
from .recalibration import DEFAULT_RECALIBRATION_BATCH, recalibrate_bn, recalibrate_from_split, recalibration_batches

__all__ = [*_evaluate_all, 'recalibrate_bn', 'recalibration_batches', 'recalibrate_from_split',
           'DEFAULT_RECALIBRATION_BATCH']
