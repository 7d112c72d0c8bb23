""" One way to build a timm model from a name and kwargs, with a clear message for what does not build.

The trainer, every command and the loaders of weights files call `create_model`, so an unknown name
gets the same "similar names" line everywhere and a kwarg the model rejects is one line, not a traceback.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from ..errors import UserError

__all__ = ['create_model', 'is_registered', 'similar_models', 'model_kwarg_names', 'INIT_KWARGS']

# model_kwargs that say where a model's starting weights come from (timm.create_model's), not what the model is:
# left out of a run's config.json and of what identifies its network
INIT_KWARGS = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir', 'init')


def is_registered(name: str) -> bool:
    """ Whether `name` (with or without a `.tag`) is a registered timm model, timm_rc's included. """
    import timm
    from . import rc_cifar, rc_timm  # noqa: F401  registers the RC models
    return timm.is_model(name.split('.')[0])


def similar_models(name: str) -> str:
    """ Up to ten registered names that look like `name`: the closest spellings (a typo such as resnt18 finds
    resnet18), then names holding its first word; the RC models where none does. """
    import difflib
    import timm
    from . import rc_cifar, rc_timm  # noqa: F401  registers the RC models
    base = name.split('.')[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.75)
    close += [m for m in timm.list_models(f'*{base.split("_")[0]}*') if m not in close]
    return ', '.join(close[:10] or timm.list_models('rc*_cifar'))


def create_model(name: str, kwargs: Optional[Dict[str, Any]] = None, hint: str = '') -> nn.Module:
    """ `timm.create_model(name, **kwargs)` with timm_rc's models registered. An unknown name, kwargs the
    model rejects, and starting weights (pretrained_cfg_overlay file) that are missing or do not fit are
    `UserError`s naming the problem; `hint` is added to the message for rejected kwargs. """
    import timm
    kwargs = dict(kwargs or {})
    if not name.startswith('local-dir:') and not is_registered(name):
        raise UserError(f'unknown model {name!r}; similar names: {similar_models(name)}')
    overlay = kwargs.get('pretrained_cfg_overlay')
    file = overlay.get('file') if isinstance(overlay, dict) else None
    if kwargs.get('pretrained') and file and not Path(file).is_file():
        raise UserError(f'the starting weights {file} (model_kwargs pretrained_cfg_overlay) do not exist; give the file '
                        f'written by python -m timm_rc convert or a training run\'s model.safetensors')
    shown = name.removeprefix('local-dir:')
    base, _, tag = name.partition('.')
    if tag and not name.startswith('local-dir:'):
        from timm.models import get_arch_pretrained_cfgs
        tags = [t.partition('.')[2] for t in get_arch_pretrained_cfgs(base)]
        if tag not in tags:
            raise UserError(f'{base} has no pretrained tag {tag!r}; its tags: {", ".join(tags)}' if tags else
                            f'{base} has no pretrained tags; give the name alone')
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise UserError(f'cannot build {shown} with model_kwargs {kwargs}: {e}{_valid_keys(name, str(e))}{hint}') from None
    except (ValueError, KeyError, AssertionError) as e:
        raise UserError(f'cannot build {shown} with model_kwargs {kwargs}: {e}{hint}') from None
    except (RuntimeError, OSError) as e:
        if not kwargs.get('pretrained'):
            if isinstance(e, RuntimeError):
                raise UserError(f'cannot build {shown} with model_kwargs {kwargs}: {e}{hint}') from None
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and 'Error(s) in loading state_dict' in lines[0] else (lines or [repr(e)])[0]
        arch = {k: v for k, v in kwargs.items() if k not in INIT_KWARGS}
        raise UserError(f'the starting weights {file or "(pretrained)"} do not fit {shown} with model_kwargs {arch}: '
                        f'{detail[:300]}; give the model and kwargs they were written for') from None


def model_kwarg_names(name: str, cls_name: Optional[str] = None) -> List[str]:
    """ The keyword arguments the timm model `name` takes by name: its entrypoint's (timm_rc's RC options
    among them) and, given `cls_name` (the class a TypeError named), that class's `__init__`'s, found in the
    entrypoint's module or another of timm's or timm_rc's model modules. """
    import inspect
    import sys
    import timm.models
    fn = timm.models.model_entrypoint(name.split('.')[0])
    sources = [fn]
    if cls_name:
        mods = [sys.modules.get(fn.__module__)] + [m for k, m in list(sys.modules.items())
                                                   if k.startswith(('timm.models.', 'timm_rc.models.'))]
        cls = next((getattr(m, cls_name) for m in mods if inspect.isclass(getattr(m, cls_name, None))), None)
        if cls is not None:
            sources.append(cls.__init__)
    names = []
    for f in sources:
        try:
            params = inspect.signature(f).parameters.values()
        except (TypeError, ValueError):
            continue
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in ('self', 'pretrained') and p.name not in names]
    return names


def _valid_keys(name: str, error: str) -> str:
    """ For "X.__init__() got an unexpected keyword argument 'k'": the closest valid key and the valid ones. """
    import difflib
    import re
    m = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", error)
    if m is None:
        return ''
    if name.startswith('local-dir:'):  # a run folder: the model its config.json names
        try:
            name = json.loads((Path(name.removeprefix('local-dir:')) / 'config.json').read_text())['architecture']
        except (OSError, ValueError, KeyError, TypeError):
            return ''
    try:
        names = model_kwarg_names(name, m.group(1))
    except RuntimeError:  # not a registered name
        return ''
    if not names:
        return ''
    close = difflib.get_close_matches(m.group(2), names, n=1)
    lead = f"; did you mean '{close[0]}'? valid keys: " if close else '; valid keys: '
    return lead + ', '.join(sorted(names))
