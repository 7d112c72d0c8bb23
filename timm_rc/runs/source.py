""" A model from whatever names it: a timm name, a run folder, a weights file or a quantized file.

`ModelSource.parse(source, model, model_kwargs)` says which of these a command's SOURCE is, checked once for
every command (eval, compress, convert, export, the trainer's teacher); `.load()` builds it, `.identity()` names
it. `load_model` and `load_source` are the one-call forms:

    load_model('runs/rc4/seed0')                                   # a run folder (its config.json)
    load_model('runs/rc4/seed0/checkpoints/epoch_0010/model.safetensors')  # a checkpoint of a run
    load_model('weights.safetensors', 'rc4_cifar', {'width': 16})  # a weights file and its model
    load_model('runs/rc4/seed0/model.int8.safetensors')            # a quantized file names its model
    load_model('rc4_cifar', model_kwargs={'width': 16})            # a timm name: untrained
    load_model(None, 'rc4_cifar')                                  # the same

Weights load strictly through timm (`timm.models.load_checkpoint`), so weights that do not fit are an
error naming the first mismatch, never a silently re-initialised classifier.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from .. import quantize
from ..models.create import create_model, is_registered, similar_models
from ..errors import UserError
from .folder import Run

__all__ = ['ModelSource', 'load_model', 'load_weights', 'load_spec', 'load_source', 'source_identity']


def load_weights(model: nn.Module, weights: Union[str, Path], what: str) -> None:
    """ timm's own checkpoint loading: strict, and it drops DDP / torch.compile key prefixes. `what`
    names the model in the message for weights that do not fit. """
    from timm.models import load_checkpoint
    try:
        load_checkpoint(model, str(weights), strict=True)
    except RuntimeError as e:
        text = str(e)
        if 'Error(s) in loading state_dict' not in text:
            raise UserError(_unreadable(weights, e)) from None
        problems = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        first = problems[0] if problems else text
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        raise UserError(f'weights {weights} do not fit {what}: {first[:300]}{more}; pass the --model and '
                        f'--model_kwargs the weights were trained with') from None
    except Exception as e:  # safetensors, pickle and OS errors for a file that is no checkpoint
        raise UserError(_unreadable(weights, e)) from None


def _unreadable(weights: Union[str, Path], e: Exception) -> str:
    """ Why a weights file could not be read, in the user's terms (not torch's advice to unpickle unsafely). """
    import zipfile
    first = (str(e).splitlines() or [''])[0][:200]
    if isinstance(e, OSError):
        reason = e.strerror or first or ('no such file' if isinstance(e, FileNotFoundError) else type(e).__name__)
        return f'cannot read weights {weights}: {reason}'
    if str(weights).endswith('.safetensors'):
        return f'cannot read weights {weights}: not a valid safetensors file ({type(e).__name__}: {first})'
    if not zipfile.is_zipfile(weights):
        return (f'cannot read weights {weights}: it is neither a safetensors file nor a torch checkpoint '
                f'(torch.save\'s zip format)')
    if 'weights_only' in str(e):
        return (f'cannot read weights {weights}: the checkpoint holds pickled Python objects besides tensors, which '
                f'are not loaded (unpickling runs code); save its state_dict with safetensors or torch.save')
    return f'cannot read weights {weights}: {type(e).__name__}: {first}'


WEIGHTS_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin')


def _describe(name: str, kwargs: Dict[str, Any]) -> str:
    return f'{name} with model_kwargs {json.dumps(kwargs)}' if kwargs else name


@dataclass(frozen=True)
class ModelSource:
    """ What names a model, parsed and checked once (`parse`) for every command.

    kind:
      'timm'       a registered timm name (`model`), built with `model_kwargs` (untrained, or timm's pretrained
                   weights where `model_kwargs` asks for them);
      'folder'     a folder written by the trainer or timm's `save_for_hf` (config.json + model.safetensors):
                   its model, `model_kwargs` on top; `model` builds that timm model instead, with its weights;
      'weights'    a weights file (model.safetensors, a checkpoint's): the model of the run folder it lies in,
                   else `model` (with the `model_kwargs` it was trained with);
      'quantized'  a weight-quantized file (`python -m timm_rc compress quantize`): the model its metadata names
                   (`model_kwargs` on top), or `model`.
    """
    kind: str
    path: Optional[Path] = None
    model: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, source: Optional[Union[str, Path]], model: Optional[str] = None,
              model_kwargs: Optional[Dict[str, Any]] = None) -> 'ModelSource':
        """ The source a command was given: a path (that must exist), or a timm name; no `source` means the
        timm model `model`. Problems are `UserError`s that name them and the valid forms. """
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise UserError(f'model_kwargs must be a dict such as {{"width": 16}}, got {type(model_kwargs).__name__} '
                            f'{model_kwargs!r}')
        kwargs = dict(model_kwargs or {})
        if source is None:
            if model is None:
                raise UserError('no model given: give a run folder, a weights file or a timm name (e.g. rc4_cifar)')
            return cls('timm', None, model, kwargs)
        path = Path(source)
        if not path.exists():
            looks_like_path = '/' in str(source) or str(source).startswith('.') or path.suffix in WEIGHTS_SUFFIXES
            if looks_like_path:
                raise UserError(f'{source} does not exist; give a run folder (holding {Run.WEIGHTS}), a weights file '
                                f'or a timm name (e.g. rc4_cifar)')
            if not is_registered(str(source)):
                raise UserError(f'{source} is neither a file or folder here nor a registered timm name; similar names: '
                                f'{similar_models(str(source))}')
            if model is not None and model != str(source):
                raise UserError(f'{source} is a timm name and --model names another ({model}); --model is for a '
                                f'weights file')
            return cls('timm', None, str(source), kwargs)
        if path.is_dir():
            if not (path / Run.WEIGHTS).is_file():
                hint = ''
                ckpts = sorted((path / Run.CHECKPOINTS).glob(f'epoch_*/{Run.WEIGHTS}'))
                if ckpts:
                    hint = f'; the run is not finished: its newest checkpoint is {ckpts[-1]}'
                if not hint and str(source) == path.name and is_registered(path.name):
                    hint = (f'; {source} is also a timm name, which this folder hides: run from another folder, or '
                            f'give --model {source}')
                raise UserError(f'{source} holds no {Run.WEIGHTS}; give a run folder written by the trainer (or '
                                f'timm\'s save_for_hf) or a weights file{hint}')
            return cls('folder', path, model, kwargs)
        if path.suffix.lower() not in WEIGHTS_SUFFIXES:
            raise UserError(f'{source} is not a weights file: give a run folder, a weights file '
                            f'({", ".join(WEIGHTS_SUFFIXES)}) or a timm name (e.g. rc4_cifar)')
        if quantize.is_quantized(path):
            if model is None and not quantize.quantized_metadata(path)[0]:
                raise UserError(f'{path} does not name its model; pass --model (and --model_kwargs)')
            return cls('quantized', path, model, kwargs)
        if model is None and (Run.find(path) is None or not Run.find(path).model):
            raise UserError(f'{source} is a weights file outside a run folder: name its model with --model '
                            f'(and --model_kwargs), e.g. --model rc4_cifar --model_kwargs \'{{"width": 16}}\'')
        return cls('weights', path, model, kwargs)

    @property
    def run(self) -> Optional[Run]:
        """ The run folder the source is or lies in (None for a timm name or a file outside a run). """
        return Run.find(self.path) if self.path is not None else None

    def identity(self) -> Tuple[Optional[str], Dict[str, Any]]:
        """ (timm name, model_kwargs) of what `load` builds, as a report names it: the given model, else the
        quantized file's or the run's, the given kwargs on top. """
        if self.model is not None:
            return self.model, dict(self.model_kwargs)
        if self.kind == 'quantized':
            name, file_kwargs = quantize.quantized_metadata(self.path)
            return name, {**file_kwargs, **self.model_kwargs}
        run = self.run
        if run is None:
            return None, dict(self.model_kwargs)
        return run.model, {**run.config().get('model_kwargs', {}), **self.model_kwargs}

    def load(self) -> nn.Module:
        """ The model, on the CPU in eval mode, with its `pretrained_cfg` (mean/std). Weights load strictly. """
        kwargs = dict(self.model_kwargs)
        if self.kind == 'timm':
            return create_model(self.model, kwargs).eval()
        weights = self.path / Run.WEIGHTS if self.kind == 'folder' else self.path
        if self.kind == 'quantized':
            model = self.model
            if model is None:  # the file's model, with the kwargs given on top: must still fit
                model, kwargs = self.identity()
            return quantize.load_quantized(weights, create_model(model, kwargs))
        run, model = self.run, self.model
        if model is None and run is not None:
            kwargs = {**run.legacy_kwargs(), **kwargs}
        if model is None and self.kind == 'folder' and (self.path / Run.MODEL_CONFIG).is_file():
            net = create_model(f'local-dir:{self.path}', kwargs)
            what = f'the model of {self.path / Run.MODEL_CONFIG}' + (
                f' with model_kwargs {json.dumps(kwargs)}' if kwargs else '')
        else:
            if model is None:
                model, kwargs = run.model, {**run.model_kwargs(), **kwargs}
            net = create_model(model, kwargs)
            what = _describe(model, kwargs)
        load_weights(net, weights, what)
        return net.eval()

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else _describe(self.model, self.model_kwargs)


def load_model(
        source: Optional[Union[str, Path]] = None,
        model: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """ The model `source` names (a run folder, a weights file, a quantized file or a registered timm name),
    or the timm model `model` where `source` is None: `ModelSource.parse(...).load()`, on the CPU in eval mode.
    A `source` that is neither an existing path nor a registered name is a `UserError`. """
    return ModelSource.parse(source, model, model_kwargs).load()


def source_identity(source: Optional[Union[str, Path]], model: Optional[str],
                    model_kwargs: Optional[Dict[str, Any]]) -> Tuple[Optional[str], Dict[str, Any]]:
    """ (timm name, model_kwargs) of what `load_model(source, model, model_kwargs)` builds
    (`ModelSource.identity`). """
    return ModelSource.parse(source, model, model_kwargs).identity()


def load_spec(spec: str, model_kwargs: Optional[Dict[str, Any]] = None
              ) -> Tuple[nn.Module, Optional[Run], str, Dict[str, Any]]:
    """ (model in eval mode, its run or None, timm name, model_kwargs) for a run folder or a registered
    name (built untrained with `model_kwargs`). A run's kwargs are the architecture's (`Run.model_kwargs`). """
    if Path(spec).is_file():  # before parsing, whose message would offer a weights file
        raise UserError(f'{spec} is a file; give the run folder that holds it, or a timm name (e.g. rc4_cifar)')
    src = ModelSource.parse(spec, None, None if Path(spec).exists() else model_kwargs)
    net = src.load()
    if src.kind == 'timm':
        return net, None, src.model, dict(src.model_kwargs)
    run = src.run
    name = (run.model if run is not None else None) or net.pretrained_cfg.get('architecture')
    return net, run, name, run.model_kwargs() if run is not None else {}


load_source = load_model  # kept for callers of 0.3.0.dev: load_model now takes every source form
