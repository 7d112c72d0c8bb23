""" RC versions of timm's families: `timm.create_model('rc_resnet50')` is timm's resnet50 turned into an RC
network by `timm_rc.convert_to_rc` (each run of identical blocks of a stage shares one block's weights, every
step keeping its own BN layers).

Every registered name takes the base model's kwargs (num_classes, drop_path_rate, features_only, ...) and
`bn_sharing` ('independent', 'shared', 'none'), `steps` (an int for every run, or one per run) and
`bn_policy` (convert_to_rc's). The pretrained configs (tags, mean, std, input size, hub ids) are the base
model's: `pretrained=True` loads the base model's weights first and then converts, so step i of a run starts
from block i's BN statistics and the run's first block's weights. `model.rc_conversion` says what was shared.
"""
import sys
from typing import Any, Dict, Optional

from timm.models import generate_default_cfgs, get_arch_pretrained_cfgs, get_pretrained_cfg, register_model

from ..conversion import convert_to_rc
from ..layers.unroll import DEFAULT_BN_POLICY

__all__ = ['RC_FAMILIES']

RC_FAMILIES = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'efficientnet_b0', 'mobilenetv2_100')


def _base_cfgs(base: str) -> Dict[str, Dict[str, Any]]:
    """ The base's pretrained cfgs as rc_{base}.{tag}, the base's default tag first. """
    cfgs = get_arch_pretrained_cfgs(base)
    default = get_pretrained_cfg(base)
    names = sorted(cfgs, key=lambda n: cfgs[n] != default)  # stable: the default first, the rest in order
    return {f'rc_{name}': dict(cfgs[name].to_dict(), architecture=f'rc_{base}') for name in names}


default_cfgs = generate_default_cfgs({k: v for base in RC_FAMILIES for k, v in _base_cfgs(base).items()})


def _create_rc(base: str, pretrained: bool = False, bn_sharing: str = 'independent', steps=None,
               bn_policy: str = DEFAULT_BN_POLICY, pretrained_cfg: Optional[Any] = None, **kwargs):
    import timm
    # create_model hands the entrypoint the tag of 'rc_resnet50.a1_in1k' as pretrained_cfg='a1_in1k'; a
    # dict or PretrainedCfg given by the user goes to the base model as it is
    name = base
    if isinstance(pretrained_cfg, str):
        name, pretrained_cfg = f'{base}.{pretrained_cfg}', None
    model = timm.create_model(name, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **kwargs)
    model.rc_conversion = convert_to_rc(model, bn_sharing=bn_sharing, steps=steps, bn_policy=bn_policy)
    cfg = dict(model.pretrained_cfg, architecture=f'rc_{base}')
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def _entrypoint(base: str):
    def fn(pretrained: bool = False, **kwargs):
        return _create_rc(base, pretrained, **kwargs)
    fn.__name__ = fn.__qualname__ = f'rc_{base}'
    fn.__module__ = __name__
    fn.__doc__ = (f'timm\'s {base} as an RC network (timm_rc.convert_to_rc): each run of identical blocks shares '
                  f'the first block\'s weights, every step keeping its own BN layers.')
    return fn


for _base in RC_FAMILIES:
    setattr(sys.modules[__name__], f'rc_{_base}', register_model(_entrypoint(_base)))
