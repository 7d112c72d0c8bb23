""" The run folder and what names a model.

`folder` (`Run`: a run folder's files), `config` (`TrainConfig`: a run's recipe, run_config.json),
`checkpoints` (atomic checkpoint and weights files), `source` (`ModelSource`: a timm name, a run folder, a
weights file or a quantized file, resolved in one place for every command).
"""
from .checkpoints import complete_checkpoints, latest_checkpoint
from .config import TrainConfig, load_config
from .folder import PAPER_RC_MODELS, Run, load_run_config, walk_runs
from .source import ModelSource, load_model, load_source

__all__ = ['Run', 'walk_runs', 'load_run_config', 'PAPER_RC_MODELS', 'TrainConfig', 'load_config',
           'complete_checkpoints', 'latest_checkpoint', 'ModelSource', 'load_model', 'load_source']
