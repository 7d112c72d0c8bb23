""" Weight-quantized state dicts and their safetensors files, for every registered scheme.

A quantized file is a safetensors file whose metadata says `format: timm_rc.quantized/1`, the scheme
(`scheme: int8`, with the scheme's own keys such as `group_size`), the timm model and model_kwargs it
rebuilds, and the fp32 shape of each quantized weight. A quantized weight `k` is stored as
`k` (the scheme's data) and `k.__scale__`; everything else of the state_dict is stored as it is, and a
tensor that several steps share is one entry: the file keeps the RC sharing. Files written before the
`scheme` key existed say `bits: 8` or `bits: 4`, which name the same schemes.

`SCHEMES` maps a scheme's name to its config class (`Int8WeightOnlyConfig`, `Int4WeightOnlyConfig`);
`register_scheme` adds one: a frozen dataclass with `name`, `bits`, `encode(weight) -> (data, scale)`,
`decode(data, scale, shape)`, `metadata()` and `from_metadata(metadata)`.
"""
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..models.create import INIT_KWARGS
from ..models.create import create_model
from ..errors import UserError
from .weight_only import DEFAULT_GROUP_SIZE, Int4WeightOnlyConfig, Int8WeightOnlyConfig

__all__ = ['FORMAT', 'SCALE_SUFFIX', 'BITS', 'SCHEMES', 'register_scheme', 'config_for_bits', 'scheme_from_metadata',
           'unique_tensors', 'quantize_tensor', 'dequantize_tensor', 'quantize_state_dict', 'dequantize_state_dict',
           'quantize_', 'quantized_file_bytes', 'save_quantized', 'load_quantized', 'quantized_metadata',
           'is_quantized', 'quantized_name']

FORMAT = 'timm_rc.quantized/1'
SCALE_SUFFIX = '.__scale__'
BITS = (8, 4)
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SCHEMES: Dict[str, type] = {}


def register_scheme(cls: type) -> type:
    """ Make a weight-only scheme (its config class) known to the files: `SCHEMES[cls.name] = cls`. """
    SCHEMES[cls.name] = cls
    return cls


register_scheme(Int8WeightOnlyConfig)
register_scheme(Int4WeightOnlyConfig)


def config_for_bits(bits: int, group_size: int = DEFAULT_GROUP_SIZE):
    """ The weight-only config of `bits` (8 or 4), as the commands' --bits name them. """
    if bits == 8:
        return Int8WeightOnlyConfig()
    if bits == 4:
        return Int4WeightOnlyConfig(group_size)
    raise UserError(f'--bits must be 8 or 4, got {bits}')


def _as_config(config, group_size: int = DEFAULT_GROUP_SIZE):
    if isinstance(config, int) and not isinstance(config, bool):
        return config_for_bits(config, group_size)
    if not all(callable(getattr(config, f, None)) for f in ('encode', 'decode', 'metadata')):
        raise UserError(f'{config!r} is not a quantization config; use one of '
                        f'{", ".join(f"{c.__name__}()" for c in SCHEMES.values())} (or 8 / 4)')
    return config


def scheme_from_metadata(metadata: Dict[str, str]):
    """ The config a quantized file was written with, from its metadata. """
    name = metadata.get('scheme') or {'8': 'int8', '4': 'int4'}.get(metadata.get('bits', ''))
    if name not in SCHEMES:
        raise UserError(f'unknown quantization scheme {name!r} in the file; known: {", ".join(SCHEMES)}')
    return SCHEMES[name].from_metadata(metadata)


def unique_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """ The state_dict with each storage once (an RC network's state_dict already lists a shared weight
    once; a model with tied tensors elsewhere keeps the first name). """
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def quantize_tensor(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ (data, scale) of `weight` under the weight-only scheme of `bits` (see `weight_only`). """
    return config_for_bits(bits, group_size).encode(weight)


def dequantize_tensor(data: torch.Tensor, scale: torch.Tensor, shape, bits: int,
                      group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """ The fp32 weight of shape `shape` that `quantize_tensor` encoded. """
    return config_for_bits(bits, group_size).decode(data, scale, shape)


def _quantizable(model: nn.Module, keys: Iterable[str]) -> List[str]:
    """ state_dict keys of convolution and linear weights (a shared module is listed under the name
    its state_dict uses, which `named_modules` yields first). """
    keys = set(keys)
    return [f'{name}.weight' if name else 'weight' for name, module in model.named_modules()
            if isinstance(module, WEIGHT_MODULES) and (f'{name}.weight' if name else 'weight') in keys]


def quantize_state_dict(model: nn.Module, config, group_size: int = DEFAULT_GROUP_SIZE
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[int]]]:
    """ The model's state_dict with every convolution and linear weight quantized by `config` (a scheme's
    config, or 8 / 4 for the weight-only int8 / int4 schemes): (tensors, shapes). A quantized weight `k`
    is `tensors[k]` and `tensors[k + '.__scale__']`; `shapes[k]` is its fp32 shape. Everything else stays
    as it is. Each shared tensor is one entry. """
    config = _as_config(config, group_size)
    tensors = {k: v.detach().contiguous() for k, v in unique_tensors(model).items()}
    shapes = {}
    for key in _quantizable(model, tensors):
        w = tensors.pop(key)
        tensors[key], tensors[key + SCALE_SUFFIX] = config.encode(w)
        shapes[key] = list(w.shape)
    return tensors, shapes


def dequantize_state_dict(tensors: Dict[str, torch.Tensor], shapes: Dict[str, List[int]], config,
                          group_size: int = DEFAULT_GROUP_SIZE) -> Dict[str, torch.Tensor]:
    """ The fp32 state_dict of `quantize_state_dict`'s (tensors, shapes). """
    config = _as_config(config, group_size)
    state = {k: v for k, v in tensors.items() if not k.endswith(SCALE_SUFFIX) and k not in shapes}
    for key, shape in shapes.items():
        state[key] = config.decode(tensors[key], tensors[key + SCALE_SUFFIX], shape)
    return state


def quantize_(model: nn.Module, config) -> nn.Module:
    """ Round every convolution and linear weight of `model` to its quantized value under `config`, in
    place (the weights stay fp32 tensors holding the dequantized values: what the quantized file loads
    back to), and return the model. torchao's `quantize_(model, config)` shape, for these schemes. """
    tensors, shapes = quantize_state_dict(model, config)
    model.load_state_dict(dequantize_state_dict(tensors, shapes, config), strict=True)
    return model


def _model_identity(model: nn.Module) -> Tuple[Optional[str], Dict[str, Any]]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('architecture')
    if name and cfg.get('tag'):
        name = f'{name}.{cfg["tag"]}'
    # timm's create_model records its kwargs in `_model_args` (timm 1.0.31 does; where it does not, pass
    # model_kwargs to save_quantized); where the starting weights came from is left out
    return name, {k: v for k, v in (getattr(model, '_model_args', None) or {}).items() if k not in INIT_KWARGS}


def quantized_file_bytes(model: nn.Module, config, model_name: Optional[str] = None,
                         model_kwargs: Optional[Dict[str, Any]] = None):
    """ (the quantized file's bytes, its tensors, the quantized weights' shapes). """
    from safetensors.torch import save
    tensors, shapes = quantize_state_dict(model, config)
    name, kwargs = _model_identity(model)
    metadata = {'format': FORMAT, 'scheme': config.name, **config.metadata(), 'model': model_name or name or '',
                'model_kwargs': json.dumps(model_kwargs if model_kwargs is not None else kwargs),
                'quantized': json.dumps(shapes)}
    if 'group_size' not in metadata:  # readers of timm_rc 0.2.0 expect it
        metadata['group_size'] = str(DEFAULT_GROUP_SIZE)
    return save(tensors, metadata=metadata), tensors, shapes


def save_quantized(model: nn.Module, path: Union[str, Path], config, group_size: int = DEFAULT_GROUP_SIZE,
                   model_name: Optional[str] = None, model_kwargs: Optional[Dict[str, Any]] = None) -> int:
    """ Write the weight-quantized model to `path` (`config`: a scheme's config, or 8 / 4). Its metadata names
    the timm model and model_kwargs that `load_quantized` rebuilds: `model_name` / `model_kwargs`, by
    default the model's `pretrained_cfg` architecture and the kwargs timm's create_model recorded. Written
    to a temporary file and renamed, so an existing file is replaced whole or not at all. Returns the
    file's size in bytes. """
    data = quantized_file_bytes(model, _as_config(config, group_size), model_name, model_kwargs)[0]
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f'cannot write {path}: {e.strerror or e}') from None
    return len(data)


def _read_quantized(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f'cannot read {path}: {type(e).__name__}: {str(e)[:200]}') from None
    if metadata.get('format') != FORMAT:
        raise UserError(f'{path} is not a quantized timm_rc file (no {FORMAT!r} format in its metadata); write one '
                        f'with python -m timm_rc compress quantize RUN --bits 8')
    return tensors, metadata


def is_quantized(path: Union[str, Path]) -> bool:
    """ Whether `path` is a safetensors file written by `save_quantized`. """
    from safetensors import safe_open
    path = Path(path)
    if path.suffix != '.safetensors' or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework='pt') as f:
            return (f.metadata() or {}).get('format') == FORMAT
    except Exception:  # not a safetensors file: timm's loader says what it is
        return False


def quantized_metadata(path: Union[str, Path]) -> Tuple[str, Dict[str, Any]]:
    """ (timm name, model_kwargs) that a quantized file names. """
    _, metadata = _read_quantized(Path(path))
    return metadata.get('model', ''), json.loads(metadata.get('model_kwargs') or '{}')


def _mismatch(model: nn.Module, state: Dict[str, torch.Tensor]) -> str:
    """ What keeps `state` from loading into `model` strictly, in a line ('' when it fits). """
    own = model.state_dict()

    def some(keys):
        keys = sorted(keys)
        return ', '.join(keys[:3]) + (f' and {len(keys) - 3} more' if len(keys) > 3 else '')

    missing, unexpected = set(own) - set(state), set(state) - set(own)
    shapes = [f'{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model'
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    parts = ([f'{len(shapes)} shape mismatches ({shapes[0]}{" ..." if len(shapes) > 1 else ""})'] if shapes else []) + \
        ([f'{len(missing)} missing keys ({some(missing)})'] if missing else []) + \
        ([f'{len(unexpected)} unexpected keys ({some(unexpected)})'] if unexpected else [])
    return '; '.join(parts)


def load_quantized(path: Union[str, Path], model: Optional[nn.Module] = None) -> nn.Module:
    """ A timm model with the dequantized (fp32) weights of a file `save_quantized` wrote. Without
    `model`, it is built from the file's metadata (the timm name and model_kwargs). Weights that do not
    fit the model are a `UserError` naming the first mismatch. Returns the model in eval mode. """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path} does not exist; write it with python -m timm_rc compress quantize RUN --bits 8')
    tensors, metadata = _read_quantized(path)
    config = scheme_from_metadata(metadata)
    shapes = json.loads(metadata['quantized'])
    if model is None:
        if not metadata.get('model'):
            raise UserError(f'{path} does not name its model; pass the model to load_quantized')
        model = create_model(metadata['model'], json.loads(metadata.get('model_kwargs') or '{}'))
    state = dequantize_state_dict(tensors, shapes, config)
    problems = _mismatch(model, state)
    if problems:
        named = f'{metadata["model"]} {metadata.get("model_kwargs") or ""}'.strip()
        raise UserError(f'{path} does not fit the model given: {problems}; it was written for {named}: load it '
                        f'without a model (its metadata builds that one)')
    model.load_state_dict(state, strict=True)
    return model.eval()


def int8_weights(path: Union[str, Path]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """ {state-dict key: (int8 data (out, K), fp32 scale (out,))} of a weight-only int8 file's quantized
    weights, as the file stores them (what an int8 export stores; each shared weight once). """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path} does not exist; write it with python -m timm_rc compress quantize RUN --bits 8')
    tensors, metadata = _read_quantized(path)
    config = scheme_from_metadata(metadata)
    if config.name != 'int8':
        raise UserError(f'{path} holds {config.name} weights; an int8 export takes an int8 file (python -m timm_rc '
                        f'compress quantize RUN --bits 8)')
    return {k: (tensors[k], tensors[k + SCALE_SUFFIX]) for k in json.loads(metadata['quantized'])}


def quantized_name(config) -> str:
    """ The file a run's quantized weights go to: model.int8.safetensors, model.int4.safetensors. """
    return f'model.{_as_config(config).name}.safetensors'
