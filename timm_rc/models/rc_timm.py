""" RC versions of timm's families: `timm.create_model('rc_resnet50')` is timm's resnet50 turned into an RC
network by `timm_rc.convert_to_rc` (each run of identical blocks of a stage shares one block's weights, every
step keeping its own BN layers).

Every registered name takes the base model's kwargs (num_classes, drop_path_rate, features_only, ...) and
`bn_sharing` ('independent', 'shared', 'none'), `steps` (an int for every run, or one per run) and
`bn_policy`, `rank` (relaxed sharing: per-step low-rank corrections, initialised from the SVD of each block's
difference to the shared weights) and `init` ('first' or 'average': the shared weights, convert_to_rc's).
The pretrained configs (tags, mean, std, input size, hub ids) are the base
model's: `pretrained=True` loads the base model's weights first and then converts, so step i of a run starts
from block i's BN statistics and the run's first block's weights. `model.rc_conversion` says what was shared.
"""
import inspect
import os
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
               bn_policy: str = DEFAULT_BN_POLICY, pretrained_cfg: Optional[Any] = None, rank: Optional[int] = None,
               init: str = 'first', **kwargs):
    import timm
    # create_model hands the entrypoint the tag of 'rc_resnet50.a1_in1k' as pretrained_cfg='a1_in1k'; a
    # dict or PretrainedCfg given by the user goes to the base model as it is
    name = base
    if isinstance(pretrained_cfg, str):
        name, pretrained_cfg = f'{base}.{pretrained_cfg}', None
    converted = _converted_file(pretrained, pretrained_cfg, kwargs.get('pretrained_cfg_overlay'))
    if converted is not None:  # weights of the RC network itself (a trained run, python -m timm_rc convert)
        kwargs.pop('pretrained_cfg_overlay', None)
        model = timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **kwargs)
    else:  # the base's weights (hub, file), converted below
        model = timm.create_model(name, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **kwargs)
    model.rc_conversion = convert_to_rc(model, bn_sharing=bn_sharing, steps=steps, bn_policy=bn_policy, init=init,
                                        rank=rank, return_report=True)
    cfg = dict(model.pretrained_cfg, architecture=f'rc_{base}')
    model.pretrained_cfg = model.default_cfg = cfg
    if converted is not None:
        from timm.models import load_checkpoint
        try:
            load_checkpoint(model, converted, strict=True)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            raise ValueError(f'{converted} holds RC weights that do not fit rc_{base} with these kwargs '
                             f'(bn_sharing={bn_sharing!r}, steps={steps!r}, rank={rank!r}): {(lines or [str(e)])[0][:300]}') from None
    return model


def _converted_file(pretrained: bool, pretrained_cfg, overlay) -> Optional[str]:
    """ The weights file to load, if it holds an RC network's weights (unrolled cells: '.steps.0.' keys)
    rather than the base model's: then it is loaded after the conversion, not before. """
    if not pretrained:
        return None
    files = [(overlay or {}).get('file')]
    if pretrained_cfg is not None:
        files.append(pretrained_cfg.get('file') if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, 'file', None))
    for file in files:
        if file and os.path.isdir(file):  # 'local-dir:' sources: the folder's weights, as timm looks for them
            file = next((os.path.join(file, n) for n in ('model.safetensors', 'pytorch_model.bin')
                         if os.path.isfile(os.path.join(file, n))), None)
        if not file or not os.path.isfile(file):
            continue
        if str(file).endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(str(file), framework='pt') as f:
                keys = list(f.keys())
        else:
            import torch
            state = torch.load(file, map_location='cpu', weights_only=True)
            keys = list((state.get('state_dict', state) if isinstance(state, dict) else {}).keys())
        if any('.steps.0.' in k for k in keys):
            return str(file)
    return None


def _entrypoint(base: str):
    def fn(pretrained: bool = False, **kwargs):
        return _create_rc(base, pretrained, **kwargs)
    fn.__name__ = fn.__qualname__ = f'rc_{base}'
    fn.__module__ = __name__
    sig = inspect.signature(_create_rc)  # the RC options by name, for help and for messages about a misspelled one
    fn.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != 'base'])
    fn.__doc__ = (f'timm\'s {base} as an RC network (timm_rc.convert_to_rc): each run of identical blocks shares '
                  f'the first block\'s weights, every step keeping its own BN layers.')
    return fn


for _base in RC_FAMILIES:
    setattr(sys.modules[__name__], f'rc_{_base}', register_model(_entrypoint(_base)))
