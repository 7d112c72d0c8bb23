""" Static int8 quantization through PT2E: activations and weights int8, BN folded into the convolutions.

`static_int8(model, calibration_batches)`: `torch.export`, `untie_shared_weights`, torchao's
`X86InductorQuantizer`, calibration, `convert_pt2e`, and `torch.compile` with inductor freezing, which
lowers to oneDNN int8 kernels on an x86 CPU.

PT2E's BN folding writes the folded weight back into the convolution's weight, so with one weight-shared
convolution followed by k per-step BN layers (the RC graph) every step gets the weight folded with every
BN (pytorch/ao pull request 2795). `untie_shared_weights` gives each call of a shared weight its own copy
before folding: the int8 model is right, and stores a folded copy per step (k times the shared model's
convolution weights, at one byte each).
"""
import copy
import warnings
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from ..errors import UserError

__all__ = ['static_int8', 'untie_shared_weights', 'Int8Model']


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
