""" Conversion: a trained network's runs of identical blocks turned into weight-shared recurrent ones
(`convert_to_rc`, `init` 'first' or 'average', relaxed sharing with `rank`). Depends on `timm_rc.layers` only;
converting a run folder and measuring the result is `timm_rc.deploy.convert`. """
from .convert import INITS, RCConversion, SharedRun, convert_to_rc, find_runs

__all__ = ['convert_to_rc', 'RCConversion', 'SharedRun', 'find_runs', 'INITS']
