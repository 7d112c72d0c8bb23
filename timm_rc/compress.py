""" `python -m timm_rc.compress`: how small an RC network is, and quantization on top of it.

The paper's thesis is that RC compresses a network (one block's weights serve k unrolled steps) and that
an RC network can then be compressed further by existing methods such as weight quantization. Three
commands, each a thin layer over the functions below:

    # unique params, weights file bytes, FLOPs, training activation memory, CPU latency, test error;
    # each RC model beside the plain network of the same graph (share_weights=False)
    python -m timm_rc.compress report rc4_cifar rc2_cifar --model_kwargs '{"width": 8}'
    python -m timm_rc.compress report runs/rc4/seed0 runs/resnet18/seed0 --bits 8,4 [--markdown|--json]

    # weight-only quantization (int8 per output channel, int4 in groups), shared weights stored once
    python -m timm_rc.compress quantize runs/rc4/seed0 --bits 8   # writes runs/rc4/seed0/model.int8.safetensors

    # real int8 inference on the CPU: PT2E static quantization (torch.export, torchao's X86InductorQuantizer)
    python -m timm_rc.compress int8 runs/rc4/seed0

Library: `model_size`, `activation_bytes`, `cpu_latency_ms`, `compression_report`; `quantize_tensor` /
`dequantize_tensor`, `quantize_state_dict`, `save_quantized`, `load_quantized`; `static_int8`,
`untie_shared_weights`.

Weight-only quantization is symmetric and round-to-nearest: int8 with one scale per output channel
(fp32), int4 with one scale per `group_size` consecutive weights of an output channel (fp16 scales,
two weights a byte). Only convolution and linear weights are quantized; biases and the per-step BN
layers stay fp32 (they are tiny), and a weight that several steps share is one tensor in the file,
stored once. torchao's weight-only configs quantize linear layers only (`Int8WeightOnlyConfig` on a
Conv2d fails in torchao 0.18) and its tensor subclasses do not serialise to safetensors, hence this
small format: plain int8/uint8 tensors + scales in a safetensors file whose metadata names the model.

`static_int8` is different: activations and weights int8, BN folded into the convolutions, lowered by
`torch.compile` to oneDNN int8 kernels. PT2E's BN folding writes the folded weight back into the
convolution's weight, so with one weight-shared convolution followed by k per-step BN layers (the RC
graph) every step gets the weight folded with every BN (pytorch/ao pull request 2795). `static_int8`
detects convolutions that share a weight and gives each call its own copy before folding: the int8
model is right, and stores a folded copy per step (k times the shared model's convolution weights, at
one byte each).
"""
import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .train.config import INIT_KWARGS, UserError

__all__ = [
    'BITS', 'model_size', 'weights_bytes', 'activation_bytes', 'cpu_latency_ms', 'compression_report',
    'quantize_tensor', 'dequantize_tensor', 'quantize_state_dict', 'save_quantized', 'load_quantized',
    'quantized_metadata', 'dequantize_state_dict',
    'quantized_name', 'untie_shared_weights', 'static_int8', 'Int8Model', 'main',
]

BITS = (8, 4)
FORMAT = 'timm_rc.quantized/1'
DEFAULT_GROUP_SIZE = 32
SCALE_SUFFIX = '.__scale__'
_WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ---- size, memory, speed ---------------------------------------------------------------------


def _unique_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """ The state_dict with each storage once (an RC network's state_dict already lists a shared weight
    once; a model with tied tensors elsewhere keeps the first name). """
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def model_size(model: nn.Module) -> int:
    """ Unique parameters: a weight shared by several steps counts once. """
    return sum(p.numel() for p in model.parameters())  # parameters() yields each Parameter object once


def weights_bytes(model: nn.Module) -> int:
    """ Bytes of the model's weights as a safetensors file (what `model.safetensors` takes on disk). """
    from safetensors.torch import save
    return len(save({k: v.detach().contiguous() for k, v in _unique_tensors(model).items()}))


def activation_bytes(model: nn.Module, batch_size: int, input_size: Optional[Sequence[int]] = None) -> int:
    """ Bytes the autograd graph keeps for the backward pass of one training step at `batch_size` (every
    tensor saved for backward, each storage once, parameters and buffers excluded): the activation memory of training.
    Weight sharing does not reduce it: RC-4 keeps what the ResNet-18 graph keeps. Runs a copy of the model. """
    input_size = input_size or model.pretrained_cfg['input_size']
    net = copy.deepcopy(model).train()
    params = {t.untyped_storage().data_ptr() for t in (*net.parameters(), *net.buffers())}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ref = next(net.parameters())
    x = torch.randn(batch_size, *input_size, device=ref.device, dtype=ref.dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return sum(saved.values())


def cpu_latency_ms(model, batch_size: int, input_size: Sequence[int], min_time_s: float = 1.0,
                   min_runs: int = 5) -> float:
    """ Median wall time of one forward pass at `batch_size` on the CPU, in milliseconds (after two
    warm-up passes; at least `min_runs` passes and `min_time_s` seconds). """
    x = torch.randn(batch_size, *input_size)
    times = []
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        start = time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - start < min_time_s:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
            if len(times) >= 1000:
                break
    return 1000 * statistics.median(times)


# ---- weight-only quantization ----------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise UserError(f'--bits must be 8 or 4, got {bits}')


def quantize_tensor(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Symmetric round-to-nearest quantization of a weight (out_channels, ...) -> (data, scale).

    bits=8: data int8 (out, K), K = the weight's other dims flattened, one fp32 scale per output channel,
    values in [-127, 127]. bits=4: values in [-8, 7], one fp16 scale per `group_size` consecutive weights
    of an output channel (out, ceil(K / group_size)), two values a byte in a flat uint8 tensor (low
    nibble first). Every weight w comes back as q * scale with |w - q * scale| <= scale / 2. """
    _check_bits(bits)
    w = weight.detach().float().reshape(weight.shape[0], -1)
    out, k = w.shape
    if bits == 8:
        scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return q, scale
    if group_size < 1:
        raise UserError(f'group_size must be >= 1, got {group_size}')
    groups = math.ceil(k / group_size)
    padded = torch.nn.functional.pad(w, (0, groups * group_size - k)).view(out, groups, group_size)
    # fp16 scales; the smallest normal fp16 as a floor so that no scale is zero or subnormal
    scale = (padded.abs().amax(2) / 7).clamp_min(2 ** -14)
    scale = scale.half() if scale.max() <= torch.finfo(torch.float16).max else scale  # fp32 where fp16 overflows
    q = torch.round(padded / scale.float()[..., None]).clamp(-8, 7).view(out, -1)[:, :k]
    nibbles = (q.flatten() + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return packed, scale


def dequantize_tensor(data: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], bits: int,
                      group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """ The fp32 weight of shape `shape` that `quantize_tensor` encoded. """
    _check_bits(bits)
    out = shape[0]
    k = math.prod(shape[1:])
    if bits == 8:
        return (data.float() * scale.float()[:, None]).reshape(shape)
    nibbles = torch.stack([data & 0xF, data >> 4], 1).flatten()[:out * k]
    q = nibbles.float().sub(8).view(out, k)
    groups = scale.shape[1]
    q = torch.nn.functional.pad(q, (0, groups * group_size - k)).view(out, groups, group_size)
    return (q * scale.float()[..., None]).view(out, -1)[:, :k].reshape(shape)


def _quantizable(model: nn.Module, keys: Iterable[str]) -> List[str]:
    """ state_dict keys of convolution and linear weights (a shared module is listed under the name
    its state_dict uses, which `named_modules` yields first). """
    keys = set(keys)
    names = []
    for name, module in model.named_modules():
        key = f'{name}.weight' if name else 'weight'
        if isinstance(module, _WEIGHT_MODULES) and key in keys:
            names.append(key)
    return names


def quantize_state_dict(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[int]]]:
    """ The model's state_dict with every convolution and linear weight quantized: (tensors, shapes).
    A quantized weight `k` is `tensors[k]` (int8 or packed uint8) and `tensors[k + '.__scale__']`;
    `shapes[k]` is its fp32 shape. Everything else stays as it is. Each shared tensor is one entry. """
    _check_bits(bits)
    tensors = {k: v.detach().contiguous() for k, v in _unique_tensors(model).items()}
    shapes = {}
    for key in _quantizable(model, tensors):
        w = tensors.pop(key)
        data, scale = quantize_tensor(w, bits, group_size)
        tensors[key], tensors[key + SCALE_SUFFIX] = data, scale
        shapes[key] = list(w.shape)
    return tensors, shapes


def dequantize_state_dict(tensors: Dict[str, torch.Tensor], shapes: Dict[str, List[int]], bits: int,
                          group_size: int = DEFAULT_GROUP_SIZE) -> Dict[str, torch.Tensor]:
    """ The fp32 state_dict of `quantize_state_dict`'s (tensors, shapes). """
    state = {k: v for k, v in tensors.items() if not k.endswith(SCALE_SUFFIX) and k not in shapes}
    for key, shape in shapes.items():
        state[key] = dequantize_tensor(tensors[key], tensors[key + SCALE_SUFFIX], shape, bits, group_size)
    return state


def quantized_name(bits: int) -> str:
    return f'model.int{bits}.safetensors'


def _model_identity(model: nn.Module) -> Tuple[Optional[str], Dict[str, Any]]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('architecture')
    if name and cfg.get('tag'):
        name = f'{name}.{cfg["tag"]}'
    # timm's create_model records its kwargs in `_model_args` (timm 1.0.31 does; where it does not, pass
    # model_kwargs to save_quantized); where the starting weights came from is left out
    return name, {k: v for k, v in (getattr(model, '_model_args', None) or {}).items() if k not in INIT_KWARGS}


def _quantized_bytes(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    from safetensors.torch import save
    return save(tensors, metadata=metadata)


def _quantize_to_bytes(model: nn.Module, bits: int, group_size: int, model_name: Optional[str],
                       model_kwargs: Optional[Dict[str, Any]]):
    """ (the quantized file's bytes, its tensors, the quantized weights' shapes). """
    tensors, shapes = quantize_state_dict(model, bits, group_size)
    name, kwargs = _model_identity(model)
    metadata = {'format': FORMAT, 'bits': str(bits), 'group_size': str(group_size),
                'model': model_name or name or '', 'model_kwargs': json.dumps(model_kwargs if model_kwargs is not None
                                                                          else kwargs),
                'quantized': json.dumps(shapes)}
    return _quantized_bytes(tensors, metadata), tensors, shapes


def save_quantized(model: nn.Module, path: Union[str, Path], bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                   model_name: Optional[str] = None, model_kwargs: Optional[Dict[str, Any]] = None) -> int:
    """ Write the weight-quantized model to `path` (safetensors; its metadata names the timm model and
    model_kwargs that `load_quantized` rebuilds: `model_name` / `model_kwargs`, by default the model's
    `pretrained_cfg` architecture and the kwargs timm's create_model recorded). Written to a temporary file and renamed, so an existing
    file is replaced whole or not at all. Returns the file's size in bytes. """
    data = _quantize_to_bytes(model, bits, group_size, model_name, model_kwargs)[0]
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
                        f'with python -m timm_rc.compress quantize RUN --bits 8')
    return tensors, metadata


def quantized_metadata(path: Union[str, Path]) -> Tuple[str, Dict[str, Any]]:
    """ (timm name, model_kwargs) that a quantized file names. """
    _, metadata = _read_quantized(Path(path))
    return metadata.get('model', ''), json.loads(metadata.get('model_kwargs') or '{}')


def load_quantized(path: Union[str, Path], model: Optional[nn.Module] = None) -> nn.Module:
    """ A timm model with the dequantized (fp32) weights of a file `save_quantized` wrote. Without
    `model`, it is built from the file's metadata (the timm name and model_kwargs). Weights that do not
    fit the model are a `UserError` naming the first mismatch. Returns the model in eval mode. """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path} does not exist; write it with python -m timm_rc.compress quantize RUN --bits 8')
    tensors, metadata = _read_quantized(path)
    bits, group_size = int(metadata['bits']), int(metadata['group_size'])
    shapes = json.loads(metadata['quantized'])
    if model is None:
        from .eval import _create
        if not metadata.get('model'):
            raise UserError(f'{path} does not name its model; pass the model to load_quantized')
        model = _create(metadata['model'], json.loads(metadata.get('model_kwargs') or '{}'))
    state = dequantize_state_dict(tensors, shapes, bits, group_size)
    problems = _mismatch(model, state)
    if problems:
        named = f'{metadata["model"]} {metadata.get("model_kwargs") or ""}'.strip()
        raise UserError(f'{path} does not fit the model given: {problems}; it was written for {named}: load it '
                        f'without a model (its metadata builds that one)')
    model.load_state_dict(state, strict=True)
    return model.eval()


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


# ---- static int8 (PT2E) ----------------------------------------------------------------------


_CONV_LINEAR_OPS = None


def _conv_linear_ops():
    global _CONV_LINEAR_OPS
    if _CONV_LINEAR_OPS is None:
        aten = torch.ops.aten
        _CONV_LINEAR_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default,
                            aten.convolution.default}
    return _CONV_LINEAR_OPS


def untie_shared_weights(gm: torch.fx.GraphModule) -> int:
    """ Give every convolution or linear call of an exported graph its own copy of a weight (and bias)
    that several calls share, so that folding a BN into a convolution changes that call's weight only.
    Returns the number of calls that got a copy (0: nothing was shared). """
    users: Dict[torch.fx.Node, List[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == 'call_function' and node.target in _conv_linear_ops():
            for arg in node.args[1:3]:  # weight, bias
                if isinstance(arg, torch.fx.Node) and arg.op == 'get_attr':
                    users.setdefault(arg, []).append(node)
    copies = 0
    for attr, calls in users.items():
        if len(calls) < 2:
            continue
        original = gm.get_parameter(attr.target) if _is_param(gm, attr.target) else _get_attr(gm, attr.target)
        for i, call in enumerate(calls[1:], 1):
            name = f'{attr.target.replace(".", "_")}_call{i}'
            value = original.detach().clone()
            if isinstance(original, nn.Parameter):
                gm.register_parameter(name, nn.Parameter(value, requires_grad=False))
            else:
                gm.register_buffer(name, value)
            with gm.graph.inserting_before(call):
                node = gm.graph.get_attr(name)
            call.replace_input_with(attr, node)
            copies += 1
    if copies:
        gm.graph.lint()
        gm.recompile()
    return copies


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split('.'):
        obj = getattr(obj, part)
    return obj


def _is_param(gm: nn.Module, target: str) -> bool:
    return isinstance(_get_attr(gm, target), nn.Parameter)


class Int8Model(nn.Module):
    """ The int8 model `static_int8` returns: call it on normalised float images. It runs in inference
    form only (train() and eval() change nothing), keeps the source model's `pretrained_cfg`, and says
    what was done: `untied` (calls that got their own weight copy), `shared_weight_elements` and
    `int8_weight_elements` (convolution and linear weights before and after untying), `compiled`. """

    def __init__(self, graph: nn.Module, pretrained_cfg: Dict[str, Any], untied: int, shared_weight_elements: int,
                 int8_weight_elements: int, compiled: bool):
        super().__init__()
        self.graph = graph
        self._run = torch.compile(graph) if compiled else graph
        self.pretrained_cfg = pretrained_cfg
        self.untied = untied
        self.shared_weight_elements = shared_weight_elements
        self.int8_weight_elements = int8_weight_elements
        self.compiled = compiled

    def train(self, mode: bool = True) -> 'Int8Model':
        self.training = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            import torch._inductor.config as inductor_config
            with inductor_config.patch(freezing=True), torch.no_grad():  # freezing: int8 weights prepacked for oneDNN
                return self._run(x)
        return self._run(x)


def _weight_elements(gm: torch.fx.GraphModule) -> int:
    total = 0
    for node in gm.graph.nodes:
        if node.op == 'call_function' and node.target in _conv_linear_ops():
            w = node.args[1]
            if isinstance(w, torch.fx.Node) and w.op == 'get_attr':
                total += _get_attr(gm, w.target).numel()
    return total


def _unique_weight_elements(gm: torch.fx.GraphModule) -> int:
    seen, total = set(), 0
    for node in gm.graph.nodes:
        if node.op == 'call_function' and node.target in _conv_linear_ops():
            w = node.args[1]
            if isinstance(w, torch.fx.Node) and w.op == 'get_attr' and w.target not in seen:
                seen.add(w.target)
                total += _get_attr(gm, w.target).numel()
    return total


def static_int8(model: nn.Module, calibration_batches: Sequence[torch.Tensor], compile: bool = True) -> Int8Model:
    """ Post-training static int8 quantization through PT2E: `torch.export` (batch dimension dynamic),
    `untie_shared_weights` (the RC fix, see the module docstring), torchao's `X86InductorQuantizer`
    (its default config: int8 activations per tensor, int8 weights per output channel, BN folded),
    calibration on `calibration_batches` (normalised float images, e.g. training images), `convert_pt2e`,
    and with `compile` `torch.compile` with inductor freezing, which runs oneDNN int8 kernels on an x86 CPU.
    The model is not changed (a copy in eval mode is exported). Needs torchao (pip install torchao). """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        raise UserError('static int8 quantization needs torchao: pip install torchao (or pip install -e ".[compress]")') \
            from None
    if not calibration_batches:
        raise UserError('static_int8 needs at least one calibration batch')
    net = copy.deepcopy(model).eval().cpu()
    example = calibration_batches[0]
    batch = torch.export.Dim('batch', min=1, max=1 << 16)
    with torch.no_grad():
        gm = torch.export.export(net, (example,), dynamic_shapes=({0: batch},)).module()
    shared_elements = _unique_weight_elements(gm)
    untied = untie_shared_weights(gm)
    int8_elements = _weight_elements(gm)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        prepared = prepare_pt2e(gm, quantizer)
        with torch.no_grad():
            for x in calibration_batches:
                prepared(x)
        converted = convert_pt2e(prepared)
    return Int8Model(converted, dict(getattr(model, 'pretrained_cfg', {}) or {}), untied, shared_elements,
                     int8_elements, compile)


# ---- reports -----------------------------------------------------------------------------------


def _plain_network(model: nn.Module, name: str, kwargs: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """ (timm name, kwargs) of the plain network of `model`'s graph, or None: an RCNet's with
    share_weights=False, a registered rc_* family's base model. """
    if bool(getattr(model, 'share_weights', False)) and getattr(model, 'steps', 1) != 1:
        return name, {**kwargs, 'share_weights': False}
    conversion = getattr(model, 'rc_conversion', None)
    if conversion is not None and conversion.runs and name.startswith('rc_'):
        return name.removeprefix('rc_'), {k: v for k, v in kwargs.items() if k not in ('bn_sharing', 'steps', 'bn_policy')}
    return None


def compression_report(
        model: nn.Module,
        *,
        name: str,
        batch_size: int = 128,
        latency_batches: Sequence[int] = (1, 64),
        evaluate_fn=None,
        bits: Sequence[int] = (),
        group_size: int = DEFAULT_GROUP_SIZE,
) -> Dict[str, Any]:
    """ One row of the compression report for `model`: params (unique), weights_bytes (its safetensors
    file), flops_per_image, activation_bytes (training, at `batch_size`), latency_ms_b{N} (CPU, fp32
    eager), and with `evaluate_fn` (model -> top-1 error %) the test error; for each of `bits` the bytes
    of the weight-quantized file (int{b}_bytes) and, with `evaluate_fn`, its error (int{b}_top1_error). """
    from .eval import flops_per_image
    input_size = model.pretrained_cfg['input_size']
    row: Dict[str, Any] = dict(
        name=name, params=model_size(model), weights_bytes=weights_bytes(model),
        flops_per_image=flops_per_image(model, input_size),
        activation_bytes=activation_bytes(model, batch_size, input_size), activation_batch=batch_size)
    for b in latency_batches:
        row[f'latency_ms_b{b}'] = cpu_latency_ms(model.eval(), b, input_size)
    if evaluate_fn is not None:
        row['top1_error'] = evaluate_fn(model)
    for b in bits:
        data, tensors, shapes = _quantize_to_bytes(model, b, group_size, None, None)
        row[f'int{b}_bytes'] = len(data)
        if evaluate_fn is not None:
            quantized = copy.deepcopy(model)
            quantized.load_state_dict(dequantize_state_dict(tensors, shapes, b, group_size), strict=True)
            row[f'int{b}_top1_error'] = evaluate_fn(quantized.eval())
    return row


# ---- the command -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as every other bad input
        command = self.prog.split()[-1]
        command = '' if command == 'timm_rc.compress' else f' {command}'
        raise UserError(f'{message} (see python -m timm_rc.compress{command} --help)')


def _parse_bits(text: str) -> List[int]:
    try:
        bits = [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        bits = []
    if not bits or any(b not in BITS for b in bits):
        raise UserError(f'--bits takes 8 or 4 (a comma list for report, e.g. 8,4); got {text!r}')
    return bits


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog='python -m timm_rc.compress', description=__doc__.split('\n\n')[0].split(': ', 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 2)[2].split('\n\nLibrary')[0])
    sub = p.add_subparsers(dest='command', metavar='{report,quantize,int8}', parser_class=_Parser)

    def data_options(q):
        q.add_argument('--dataset', help='cifar10, cifar100 or a hub id; default: the run\'s')
        q.add_argument('--data_dir', help='local folder in the hub\'s parquet schema; default: the run\'s')
        q.add_argument('--max_samples', type=int, help='evaluate on the first N test examples (default: all)')
        q.add_argument('--json', action='store_true', help='print JSON instead of a table')

    r = sub.add_parser('report', help='params, bytes, FLOPs, activation memory, latency, test error per model')
    r.add_argument('models', nargs='+', metavar='MODEL_OR_RUN', help='run folders, or registered names (e.g. rc4_cifar)')
    r.add_argument('--model_kwargs', help='JSON object for the registered names, e.g. \'{"width": 8}\'')
    r.add_argument('--bits', help='also quantize each model in memory: 8, 4 or 8,4 (file bytes; error of trained ones)')
    r.add_argument('--group_size', type=int, default=DEFAULT_GROUP_SIZE, help='int4 group size (default 32)')
    r.add_argument('--batch_size', type=int, default=128, help='batch of the activation-memory measure (default 128)')
    r.add_argument('--no_plain', action='store_true', help='no plain-graph (share_weights=False) row beside RC models')
    r.add_argument('--markdown', action='store_true', help='print a Markdown table')
    data_options(r)

    q = sub.add_parser('quantize', help='write RUN/model.int{8,4}.safetensors; fp32 and quantized error and size')
    q.add_argument('run', metavar='RUN', help='a run folder holding model.safetensors')
    q.add_argument('--bits', type=int, required=True, help='8 (per output channel) or 4 (grouped)')
    q.add_argument('--group_size', type=int, default=DEFAULT_GROUP_SIZE, help='int4 group size (default 32)')
    data_options(q)

    s = sub.add_parser('int8', help='static int8 (PT2E, X86InductorQuantizer) against fp32: error and CPU latency')
    s.add_argument('run', metavar='RUN', help='a run folder holding model.safetensors')
    s.add_argument('--calibration_batches', type=int, default=8, help='training batches to calibrate on (default 8)')
    s.add_argument('--batch_size', type=int, default=64, help='calibration batch size (default 64)')
    s.add_argument('--no_compile', action='store_true', help='skip torch.compile (int8 simulated in fp32; no speed-up)')
    data_options(s)
    return p


def _positive(args, *names) -> None:
    for key in names:
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise UserError(f'--{key} must be >= 1, got {value}')


def _load(spec: str, kwargs: Optional[Dict[str, Any]]):
    """ (model, run folder or None, timm name, model_kwargs) for a run folder or a registered name. """
    from .eval import _create, _legacy_block, find_run, load_model, read_run
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise UserError(f'{spec} is a file; give the run folder that holds it')
        net = load_model(path)
        run_dir = find_run(path)
        run = read_run(run_dir) if run_dir is not None else {}
        name = run.get('model') or net.pretrained_cfg.get('architecture')
        kwargs = {k: v for k, v in run.get('model_kwargs', {}).items() if k not in INIT_KWARGS}
        return net, run_dir, name, {**kwargs, **_legacy_block(path)}
    if '/' in spec or spec.startswith('.'):
        raise UserError(f'{spec} does not exist; give a run folder or a registered model name (e.g. rc4_cifar)')
    return _create(spec, dict(kwargs or {})).eval(), None, spec, dict(kwargs or {})


def _evaluator(run_dir: Optional[Path], args, model: nn.Module):
    """ model -> top-1 error % on the run's test split (or --data_dir), or None where there is no data. """
    from .eval import evaluate, load_split, model_mean_std, run_dataset, split_loader
    if run_dir is None and args.data_dir is None and args.dataset is None:
        return None
    from .eval import read_run
    run = read_run(run_dir) if run_dir is not None else {}
    try:
        dataset, data_dir = run_dataset(run_dir, args.dataset, args.data_dir)
        # the run's own test examples (its max_eval_samples), as python -m timm_rc.eval and the trainer use
        limit = args.max_samples or run.get('max_eval_samples')
        split, num_classes, _ = load_split(dataset, data_dir, 'test', limit, model, run.get('loader'))
    except UserError as e:
        raise UserError(f'{e}; pass --data_dir DIR (the test data the error is measured on)') from None
    if model.num_classes != num_classes:
        raise UserError(f'the model has a {model.num_classes}-class head but {data_dir or dataset} has {num_classes} '
                        f'classes; give the dataset it was trained on (--dataset / --data_dir)')
    mean, std = model_mean_std(model)
    loader = split_loader(split, 256)
    args.eval_examples = len(split)
    return lambda net: evaluate(net, loader, mean=mean, std=std, device='cpu', num_classes=num_classes).top1_error


def report_models(args) -> List[Dict[str, Any]]:
    from .eval import _create, _parse_kwargs
    kwargs = _parse_kwargs(args.model_kwargs)
    bits = _parse_bits(args.bits) if args.bits else []
    rows = []
    for spec in args.models:
        net, run_dir, name, model_kwargs = _load(spec, kwargs)
        evaluate_fn = _evaluator(run_dir, args, net) if run_dir is not None else None
        row = compression_report(net, name=spec, batch_size=args.batch_size, evaluate_fn=evaluate_fn, bits=bits,
                                 group_size=args.group_size)
        row.update(model=name, model_kwargs=model_kwargs, trained=run_dir is not None)
        if evaluate_fn is not None:
            row['eval_examples'] = args.eval_examples
        rows.append(row)
        plain_of = _plain_network(net, name, model_kwargs)
        if plain_of is not None and not args.no_plain:
            plain_name, plain_kwargs = plain_of
            plain = _create(plain_name, plain_kwargs).eval()
            plain_row = compression_report(plain, name=f'plain graph of {spec}', batch_size=args.batch_size, bits=bits,
                                           group_size=args.group_size)
            plain_row.update(model=plain_name, model_kwargs=plain_kwargs, trained=False)
            row['plain_params'] = plain_row['params']
            row['compression'] = plain_row['params'] / row['params']
            rows.append(plain_row)
    return rows


def _mb(n: Optional[int]) -> str:
    return '' if n is None else f'{n / 1e6:.3f}' if n < 1e7 else f'{n / 1e6:.1f}'


def _err(e: Optional[float]) -> str:
    return '' if e is None else f'{e:.2f}'


def report_table(rows: List[Dict[str, Any]], markdown: bool = False) -> str:
    bits = [b for b in BITS if any(f'int{b}_bytes' in r for r in rows)]
    batch = rows[0]['activation_batch'] if rows else 128
    head = ['model', 'params', 'x smaller', 'fp32 MB'] + [f'int{b} MB' for b in bits] + [
        'MFLOPs/image', f'train act. MB (batch {batch})', 'CPU ms (b1)', 'CPU ms (b64)', 'top-1 err %'] + [
        f'int{b} err %' for b in bits]
    body = []
    for r in rows:
        body.append([r['name'], f'{r["params"]:,}', f'{r["compression"]:.2f}x' if 'compression' in r else '',
                     _mb(r['weights_bytes'])] + [_mb(r.get(f'int{b}_bytes')) for b in bits] + [
            f'{r["flops_per_image"] / 1e6:,.2f}', _mb(r['activation_bytes']), f'{r["latency_ms_b1"]:.2f}',
            f'{r["latency_ms_b64"]:.1f}', _err(r.get('top1_error'))] + [_err(r.get(f'int{b}_top1_error')) for b in bits])
    if markdown:
        lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] + ['---:'] * (len(head) - 1)) + '|']
        return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in body])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda row: '  '.join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
    return '\n'.join([fmt(head)] + [fmt(row) for row in body])


def _need_run_folder(run: str, command: str) -> None:
    if Path(run).is_file():
        raise UserError(f'{command} takes a run folder (holding model.safetensors); {run} is a file; give the run folder '
                        f'that holds it')
    if not Path(run).exists():
        raise UserError(f'{command} takes a run folder (holding model.safetensors); {run} does not exist (registered '
                        f'model names go to python -m timm_rc.compress report)')


def quantize_run(args) -> Dict[str, Any]:
    from .eval import WEIGHTS
    _check_bits(args.bits)
    _positive(args, 'group_size')
    _need_run_folder(args.run, 'quantize')
    net, run_dir, name, model_kwargs = _load(args.run, None)
    run = Path(args.run)
    evaluate_fn = _evaluator(run_dir, args, net) if run_dir is not None or args.data_dir or args.dataset else None
    out = run / quantized_name(args.bits)
    size = save_quantized(net, out, args.bits, args.group_size, model_name=name, model_kwargs=model_kwargs)
    result = dict(run=str(run), path=str(out), model=name, model_kwargs=model_kwargs, bits=args.bits,
                  group_size=args.group_size if args.bits == 4 else None, params=model_size(net),
                  fp32_bytes=(run / WEIGHTS).stat().st_size, quantized_bytes=size)
    if evaluate_fn is not None:
        result['fp32_top1_error'] = evaluate_fn(net)
        result['quantized_top1_error'] = evaluate_fn(load_quantized(out))
        result['eval_examples'] = args.eval_examples
    return result


def _quantize_text(r: Dict[str, Any]) -> str:
    group = f', groups of {r["group_size"]}' if r['group_size'] else ', per output channel'
    examples = f', test error on {r["eval_examples"]:,} examples' if 'eval_examples' in r else ''
    lines = [f'{r["path"]}: int{r["bits"]}{group}, {r["params"]:,} params{examples}',
             f'  {"":<10}{"bytes":>12}{"top-1 error":>14}',
             f'  {"fp32":<10}{r["fp32_bytes"]:>12,}{_err(r.get("fp32_top1_error")) + "%" if "fp32_top1_error" in r else "n/a":>14}',
             f'  {"int" + str(r["bits"]):<10}{r["quantized_bytes"]:>12,}'
             f'{_err(r.get("quantized_top1_error")) + "%" if "quantized_top1_error" in r else "n/a":>14}',
             f'  {r["fp32_bytes"] / r["quantized_bytes"]:.2f}x smaller']
    if 'fp32_top1_error' not in r:
        lines.append('  (no test data: pass --data_dir to measure the error)')
    return '\n'.join(lines)


def int8_run(args) -> Dict[str, Any]:
    from .eval import load_split, model_mean_std, run_dataset
    from .train.data import normalize
    _positive(args, 'calibration_batches', 'batch_size', 'max_samples')
    _need_run_folder(args.run, 'int8')
    net, run_dir, name, model_kwargs = _load(args.run, None)
    from .eval import read_run, split_loader
    dataset, data_dir = run_dataset(run_dir, args.dataset, args.data_dir)
    loader = read_run(run_dir).get('loader') if run_dir is not None else None
    train, _, _ = load_split(dataset, data_dir, 'train', args.calibration_batches * args.batch_size, net, loader)
    mean, std = model_mean_std(net)
    # calibration on training images, as the model sees them at test time (no augmentation)
    batches = [x if x.is_floating_point() else normalize(x, mean, std) for x, _ in split_loader(train, args.batch_size)]
    images = torch.cat(batches)
    int8 = static_int8(net, batches, compile=not args.no_compile)
    evaluate_fn = _evaluator(run_dir, args, net)
    input_size = net.pretrained_cfg['input_size']
    result = dict(run=str(args.run), model=name, model_kwargs=model_kwargs, compiled=int8.compiled,
                  calibration_images=len(images), untied_calls=int8.untied,
                  fp32_weight_elements=int8.shared_weight_elements, int8_weight_elements=int8.int8_weight_elements,
                  threads=torch.get_num_threads())
    result['fp32_top1_error'] = evaluate_fn(net)
    result['int8_top1_error'] = evaluate_fn(int8)
    result['eval_examples'] = args.eval_examples
    for b in (1, 64):
        result[f'fp32_latency_ms_b{b}'] = cpu_latency_ms(net, b, input_size)
        result[f'int8_latency_ms_b{b}'] = cpu_latency_ms(int8, b, input_size)
    if int8.compiled:  # the fair baseline: fp32 through the same compiler
        compiled = torch.compile(net)
        for b in (1, 64):
            result[f'fp32_compiled_latency_ms_b{b}'] = cpu_latency_ms(compiled, b, input_size)
    return result


def _int8_text(r: Dict[str, Any]) -> str:
    how = 'torch.compile (oneDNN int8)' if r['compiled'] else 'not compiled (int8 simulated in fp32)'
    lines = [f'{r["run"]}: static int8 (PT2E, X86InductorQuantizer), {how}, calibrated on {r["calibration_images"]:,} '
             f'training images, test error on {r["eval_examples"]:,} examples, {r["threads"]} threads']
    if r['untied_calls']:
        lines.append(f'  weight-shared convolutions: {r["untied_calls"]} calls got their own folded copy; int8 weights '
                     f'{r["int8_weight_elements"]:,} elements against {r["fp32_weight_elements"]:,} shared in fp32')
    lines += [f'  {"":<15}{"top-1 error":>12}{"ms (b1)":>10}{"ms (b64)":>10}']
    for kind, label in (('fp32', 'fp32 eager'), ('fp32_compiled', 'fp32 compiled'), ('int8', 'int8')):
        if kind + '_latency_ms_b1' not in r:
            continue
        error = f'{r[kind + "_top1_error"]:.2f}%' if kind + '_top1_error' in r else '(same model)'
        lines.append(f'  {label:<15}{error:>12}{r[kind + "_latency_ms_b1"]:>10.2f}{r[kind + "_latency_ms_b64"]:>10.1f}')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None):
    """ `python -m timm_rc.compress {report,quantize,int8} ...`: prints a table, or JSON with --json. Bad
    input: one line on stderr and exit code 2, and the run's own files untouched. Returns the result. """
    try:
        import datasets
        datasets.disable_progress_bars()
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.command is None:
            raise UserError('give a command: report, quantize or int8 (see python -m timm_rc.compress --help)')
        _positive(args, 'max_samples', 'batch_size')
        if getattr(args, 'markdown', False) and args.json:
            raise UserError('--json and --markdown both given; choose one output')
        if getattr(args, 'bits', None) is not None and args.command == 'report':
            _parse_bits(args.bits)  # an empty or bad --bits is an error, not ignored
        if args.command == 'report':
            if (args.data_dir or args.dataset) and not any(Path(m).is_dir() for m in args.models):
                print('note: no run folder given; registered names are untrained, so no test error is measured',
                      file=sys.stderr)
            result = report_models(args)
            text = json.dumps(result) if args.json else report_table(result, args.markdown)
        elif args.command == 'quantize':
            result = quantize_run(args)
            text = json.dumps(result) if args.json else _quantize_text(result)
        else:
            result = int8_run(args)
            text = json.dumps(result) if args.json else _int8_text(result)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2)
    print(text)
    return result


if __name__ == '__main__':
    from timm_rc._cli import run as run_command
    run_command(main)
