""" A model from whatever names it: a timm name, a run folder, a weights file or a quantized file.

    load_model('runs/rc4/seed0')                                   # a run folder (its config.json)
    load_model('runs/rc4/seed0/checkpoints/epoch_0010/model.safetensors')  # a checkpoint of a run
    load_model('weights.safetensors', 'rc4_cifar', {'width': 16})  # a weights file and its model
    load_model('runs/rc4/seed0/model.int8.safetensors')            # a quantized file names its model
    load_model(None, 'rc4_cifar')                                  # untrained

Weights load strictly through timm (`timm.models.load_checkpoint`), so weights that do not fit are an
error naming the first mismatch, never a silently re-initialised classifier.
"""
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from . import quantize
from .create import create_model
from .errors import UserError
from .runs import Run

__all__ = ['load_model', 'load_weights', 'load_spec', 'load_source', 'source_identity']


def load_weights(model: nn.Module, weights: Union[str, Path], what: str) -> None:
    """ timm's own checkpoint loading: strict, and it drops DDP / torch.compile key prefixes. `what`
    names the model in the message for weights that do not fit. """
    from timm.models import load_checkpoint
    try:
        load_checkpoint(model, str(weights), strict=True)
    except RuntimeError as e:
        text = str(e)
        if 'Error(s) in loading state_dict' not in text:
            raise UserError(f'cannot read weights {weights}: {text.splitlines()[0]}') from None
        problems = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        first = problems[0] if problems else text
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        raise UserError(f'weights {weights} do not fit {what}: {first[:300]}{more}; pass the --model and '
                        f'--model_kwargs the weights were trained with') from None
    except Exception as e:  # safetensors, pickle and OS errors for a file that is no checkpoint
        raise UserError(f'cannot read weights {weights}: {type(e).__name__}: {str(e)[:300]}') from None


def _describe(name: str, kwargs: Dict[str, Any]) -> str:
    return f'{name} with model_kwargs {json.dumps(kwargs)}' if kwargs else name


def load_model(
        source: Optional[Union[str, Path]] = None,
        model: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """ The model `source` holds, on the CPU in eval mode, with its `pretrained_cfg` (mean/std).

    * `source` a folder written by the trainer or timm's `save_for_hf` (config.json + model.safetensors):
      built from its config.json (`local-dir:`), `model_kwargs` on top; a run folder without config.json
      is built from its run_config.json. `model` builds that timm model instead, with the folder's weights.
    * `source` a weights file (model.safetensors, or a checkpoint's): needs `model` (and the
      `model_kwargs` it was trained with), unless the file lies in a run folder, whose model is then used.
    * `source` a weight-quantized file (`python -m timm_rc compress quantize`): its dequantized weights in
      the model its metadata names (kwargs given on top), or in `model`.
    * no `source`: the timm model `model` as created (untrained, or timm's pretrained tag).

    Problems are `UserError`s that name them.
    """
    kwargs = dict(model_kwargs or {})
    if source is None:
        if model is None:
            raise UserError('nothing to evaluate: give a run folder or a weights file, or --model NAME for an '
                            'untrained model')
        return create_model(model, kwargs).eval()
    path = Path(source)
    if not path.exists():
        raise UserError(f'{source} does not exist; give a run folder (holding {Run.WEIGHTS}) or a weights file')
    weights = path / Run.WEIGHTS if path.is_dir() else path
    if path.is_dir() and not weights.is_file():
        hint = ''
        ckpts = sorted((path / Run.CHECKPOINTS).glob(f'epoch_*/{Run.WEIGHTS}'))
        if ckpts:
            hint = f'; the run is not finished: evaluate its newest checkpoint with {ckpts[-1]}'
        raise UserError(f'{source} holds no {Run.WEIGHTS}; give a run folder written by the trainer (or timm\'s '
                        f'save_for_hf) or a weights file{hint}')
    if quantize.is_quantized(weights):  # python -m timm_rc compress quantize wrote it
        if model is None:  # the file's model, with the kwargs given on top: must still fit
            name, file_kwargs = quantize.quantized_metadata(weights)
            if not name:
                raise UserError(f'{weights} does not name its model; pass --model (and --model_kwargs)')
            model, kwargs = name, {**file_kwargs, **kwargs}
        return quantize.load_quantized(weights, create_model(model, kwargs))
    run = Run.find(path)
    if model is None and run is not None:
        kwargs = {**run.legacy_kwargs(), **kwargs}
    if model is None and path.is_dir() and (path / Run.MODEL_CONFIG).is_file():
        net = create_model(f'local-dir:{path}', kwargs)
        what = f'the model of {path / Run.MODEL_CONFIG}' + (f' with model_kwargs {json.dumps(kwargs)}' if kwargs else '')
    else:
        if model is None:
            if run is None or not run.model:
                raise UserError(f'{source} is a weights file outside a run folder: name its model with --model '
                                f'(and --model_kwargs), e.g. --model rc4_cifar --model_kwargs \'{{"width": 16}}\'')
            model, kwargs = run.model, {**run.model_kwargs(), **kwargs}
        net = create_model(model, kwargs)
        what = _describe(model, kwargs)
    load_weights(net, weights, what)
    return net.eval()


def source_identity(source: Optional[Union[str, Path]], model: Optional[str],
                    model_kwargs: Optional[Dict[str, Any]]) -> Tuple[Optional[str], Dict[str, Any]]:
    """ (timm name, model_kwargs) of what `load_model(source, model, model_kwargs)` builds, as a report
    names it: the given model, else the quantized file's or the run's, the given kwargs on top. """
    kwargs = dict(model_kwargs or {})
    if model is not None:
        return model, kwargs
    if source is None:
        return None, kwargs
    path = Path(source)
    if path.is_file() and quantize.is_quantized(path):
        name, file_kwargs = quantize.quantized_metadata(path)
        return name, {**file_kwargs, **kwargs}
    run = Run.find(path) if path.exists() else None
    if run is None:
        return None, kwargs
    return run.model, {**run.config().get('model_kwargs', {}), **kwargs}


def load_spec(spec: str, model_kwargs: Optional[Dict[str, Any]] = None
              ) -> Tuple[nn.Module, Optional[Run], str, Dict[str, Any]]:
    """ (model in eval mode, its run or None, timm name, model_kwargs) for a run folder or a registered
    name (built untrained with `model_kwargs`). A run's kwargs are the architecture's (`Run.model_kwargs`). """
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise UserError(f'{spec} is a file; give the run folder that holds it')
        net = load_model(path)
        run = Run.find(path)
        name = (run.model if run is not None else None) or net.pretrained_cfg.get('architecture')
        return net, run, name, run.model_kwargs() if run is not None else {}
    if '/' in spec or spec.startswith('.'):
        raise UserError(f'{spec} does not exist; give a run folder or a registered model name (e.g. rc4_cifar)')
    return create_model(spec, dict(model_kwargs or {})).eval(), None, spec, dict(model_kwargs or {})


def load_source(source: Union[str, Path], model: Optional[str] = None,
                model_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """ The model a command's SOURCE names: a run folder, a weights file (with `model` where it lies outside
    a run), a quantized file, or a timm name (built with `model_kwargs`, timm's pretrained weights where
    `model_kwargs` asks for them). A path that does not exist is an error, not a model name. """
    path = Path(source)
    if path.exists():
        return load_model(path, model, model_kwargs)
    if '/' in str(source) or str(source).startswith('.') or path.suffix in ('.safetensors', '.pth', '.pt', '.bin'):
        raise UserError(f'{source} does not exist; give a run folder, a weights file or a timm name (e.g. rc4_cifar)')
    if model is not None and model != str(source):
        raise UserError(f'{source} is a timm name and --model names another ({model}); --model is for a weights file')
    return load_model(None, str(source), model_kwargs)
