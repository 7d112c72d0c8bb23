""" `timm_rc.train.config` of timm_rc 0.2.0: moved to `timm_rc.config` (every name still reachable here, with a
DeprecationWarning, until 0.4.0). """
from .._deprecated import alias

__getattr__ = alias(__name__, ['timm_rc.config'])
