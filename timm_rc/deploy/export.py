""" Export a network to the file that ships: ONNX, or torch.export's `.pt2`, keeping RC's weight sharing.

    report = export_model(model, 'rc4.onnx')          # ONNX (torch.onnx.export(dynamo=True)), dynamic batch
    report = export_model(model, 'rc4.pt2')           # torch.export.save
    report = export_model(model, 'rc4.int8.onnx', quantized='runs/rc4/seed0/model.int8.safetensors')

Every export is checked, not trusted: the file is loaded back and run on a batch of random images against
the model (`max_abs_diff`), for ONNX in onnxruntime at each graph optimization level (disabled, basic,
extended, all: the levels at which onnxruntime rewrites the graph, folding BN into convolutions among
others); and the file is checked to keep the sharing: the weights it stores (`stored_weights`) are
counted against the model's unique parameters and buffers (`model_weights`). An exporter or optimizer that
folded a step's BN into the shared convolution would have to copy that weight per step: the count would
grow k-fold, and the check fails rather than ship a file that lost the compression.

int8 (ONNX only): the conv and linear weights of a weight-only int8 file (`python -m timm_rc compress quantize
RUN --bits 8`) are stored as int8 with one scale per output channel and a DequantizeLinear node in front
(the standard weight-only QDQ form), so the file is about a quarter of the fp32 one; the outputs are
compared with the dequantized model's. A weight the exporter rewrote stays fp32 (the stem convolution, into
which it folds the stem's BN: an unshared layer, so nothing is copied); the report counts both.

onnx, onnxscript and onnxruntime are the `export` extra: `pip install "timm_rc[export]"`.
"""
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import UserError

__all__ = ['export_model', 'ExportReport', 'FORMATS', 'ORT_LEVELS', 'onnx_weights', 'check_onnx', 'require_onnx',
           'distinct_bn']

FORMATS = ('onnx', 'pt2')
ORT_LEVELS = ('disabled', 'basic', 'extended', 'all')
TOLERANCE = 1e-4  # max abs difference of an fp32 export's logits from the model's


@dataclass
class ExportReport:
    path: str
    format: str  # 'onnx' or 'pt2'
    bytes: int
    opset: Optional[int]  # ONNX: the opset the exporter chose
    int8: bool  # weights stored as int8 (QDQ)
    int8_weights: int  # how many weight tensors are stored as int8 (of `quantized_weights`)
    quantized_weights: int  # weight tensors the int8 file quantized (a weight the exporter rewrote stays fp32)
    model_weights: int  # the model's unique parameters and buffers (what an export that keeps the sharing stores)
    stored_weights: int  # the numbers the file stores as weights
    max_abs_diff: Dict[str, float] = field(default_factory=dict)  # per onnxruntime level, or {'torch': ...} for .pt2
    tolerance: float = TOLERANCE

    @property
    def keeps_sharing(self) -> bool:
        return self.stored_weights <= self.model_weights

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), keeps_sharing=self.keeps_sharing)


def require_onnx() -> None:
    """ A one-line error naming the extra when onnx, onnxscript or onnxruntime is missing. """
    import importlib.util
    missing = [m for m in ('onnx', 'onnxscript', 'onnxruntime') if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f'ONNX export needs {", ".join(missing)}: pip install "timm_rc[export]" (or pip install onnx '
                        f'onnxscript onnxruntime)')


def distinct_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """ Fill every BN layer's affine parameters and running statistics with distinct values, as a trained network's
    are (in place; returns `model`). An untrained network's BN layers all hold ones and zeros, which the ONNX
    exporter stores once as shared initializers: an export check (file size, stored weights, sharing kept) made
    on one would be flattered. Deterministic in `seed`. """
    g = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.empty(t.shape).uniform_(low, high, generator=g))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    fill(m.weight, 0.5, 1.5), fill(m.bias, -0.1, 0.1)
                if m.track_running_stats:
                    fill(m.running_mean, -0.1, 0.1), fill(m.running_var, 0.5, 1.5)
    return model


def _format(path: Path, format: Optional[str]) -> str:
    fmt = format or path.suffix.lstrip('.').lower()
    if fmt not in FORMATS:
        raise UserError(f'cannot tell the export format from {path.name!r}: name the file *.onnx or *.pt2, or pass '
                        f'format ({", ".join(FORMATS)})')
    return fmt


def _model_weights(model: nn.Module) -> int:
    """ Unique parameters and buffers (shared tensors counted once; BN's num_batches_tracked left out). """
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith('num_batches_tracked')]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def onnx_weights(path: Union[str, Path]) -> int:
    """ The numbers an ONNX file stores as weights: its float and int8 initializers and constant tensors of
    more than one element (not the int64 shapes of reshapes, nor an int8 weight's scale and zero point). """
    import onnx
    from onnx import numpy_helper
    types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
             onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    m = onnx.load(str(path))
    sizes = [int(np.prod(i.dims)) for i in m.graph.initializer
             if i.data_type in types and not i.name.endswith(('_scale', '_zero_point'))]
    for node in m.graph.node:
        if node.op_type == 'Constant':
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in types:
                    sizes.append(numpy_helper.to_array(a.t).size)
    return sum(s for s in sizes if s > 1)


def check_onnx(path: Union[str, Path], inputs: torch.Tensor, expected: torch.Tensor,
               levels: Sequence[str] = ORT_LEVELS) -> Dict[str, float]:
    """ Max abs difference of the file's outputs in onnxruntime from `expected`, at each optimization level. """
    import onnxruntime as ort
    names = dict(disabled=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, basic=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                 extended=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, all=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    out = {}
    for level in levels:
        options = ort.SessionOptions()
        options.graph_optimization_level = names[level]
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
        out[level] = float(np.abs(got - expected.numpy()).max())
    return out


def _quantize_onnx_weights(onnx_model, quantized: Dict[str, torch.Tensor], scales: Dict[str, torch.Tensor]) -> int:
    """ Store the named float initializers as int8 + per-output-channel scale behind a DequantizeLinear node
    (in place). Returns how many were replaced. """
    from onnx import helper, numpy_helper
    graph = onnx_model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for name, q in quantized.items():
        if name not in inits or inits[name].data_type != 1:  # absent, or already replaced (an alias)
            continue
        shape = list(inits[name].dims)
        values = (q.float() * scales[name].float()[:, None]).reshape(shape).numpy()
        if not np.allclose(numpy_helper.to_array(inits[name]), values, rtol=1e-6, atol=1e-7):
            continue  # the exporter rewrote it (a BN folded into an unshared conv): it stays fp32
        graph.initializer.remove(inits.pop(name))
        graph.initializer.extend([
            numpy_helper.from_array(q.reshape(shape).numpy(), name + '_int8'),
            numpy_helper.from_array(scales[name].float().numpy(), name + '_scale'),
            numpy_helper.from_array(np.zeros(shape[0], dtype=np.int8), name + '_zero_point')])
        nodes.append(helper.make_node('DequantizeLinear', [name + '_int8', name + '_scale', name + '_zero_point'],
                                      [name], name=name + '_dequantize', axis=0))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return len(nodes)


def export_model(model: nn.Module, path: Union[str, Path], format: Optional[str] = None, batch_size: int = 2,
                 quantized: Optional[Dict[str, Any]] = None, seed: int = 0, check: bool = True) -> ExportReport:
    """ Export `model` (eval mode, on the CPU) to `path` with a dynamic batch axis, then load the file back
    and check it (see the module docstring). `quantized`: {state-dict key: (int8 data, scale)} of the weights
    to store as int8 (ONNX only; `timm_rc.quantize.int8_weights` reads them from a weight-only int8 file). Raises
    a `UserError` for a file that does not give the model's outputs or does not keep the sharing. """
    path = Path(path)
    fmt = _format(path, format)
    if quantized is not None and fmt != 'onnx':
        raise UserError('int8 export writes ONNX (DequantizeLinear in front of the int8 weights); name the file *.onnx')
    if fmt == 'onnx':
        require_onnx()
    model = model.eval().to(memory_format=torch.contiguous_format)
    input_size = tuple(getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 32, 32)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_size, generator=g)
    with torch.no_grad():
        expected = model(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim('batch', min=1)
    if fmt == 'pt2':
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path))
        with torch.no_grad():
            diffs = {'torch': float((loaded.module()(x) - expected).abs().max())}
        # what the file holds: each storage once (torch.export.save writes a shared tensor once)
        tensors = [t for k, t in loaded.state_dict.items() if not k.endswith('num_batches_tracked')] + \
            [t for t in loaded.constants.values() if isinstance(t, torch.Tensor)]
        stored = sum(t.numel() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())
        report = ExportReport(str(path), fmt, path.stat().st_size, None, False, 0, 0, _model_weights(model), stored, diffs)
    else:
        import onnx
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=['images'], output_names=['logits'],
                                    dynamic_shapes=({0: batch},), verbose=False)
        onnx_model = program.model_proto
        if quantized is not None:
            # the exporter names a shared weight by one of its names (the file's key is another): every alias
            params = dict(model.named_parameters(remove_duplicate=False))
            aliases: Dict[int, list] = {}
            for name, p in params.items():
                aliases.setdefault(id(p), []).append(name)
            unknown = [k for k in quantized if k not in params]
            if unknown:
                raise UserError(f'the int8 weights name {unknown[0]}, which the model does not have')
            by_name = {alias: v for k, v in quantized.items() for alias in aliases[id(params[k])]}
            int8_count = _quantize_onnx_weights(onnx_model, {k: v[0] for k, v in by_name.items()},
                                                {k: v[1] for k, v in by_name.items()})
        tmp = path.with_name(path.name + '.tmp')
        onnx.save_model(onnx_model, str(tmp))
        tmp.replace(path)
        opset = next((o.version for o in onnx_model.opset_import if o.domain in ('', 'ai.onnx')), None)
        diffs = check_onnx(path, x, expected) if check else {}
        report = ExportReport(str(path), fmt, path.stat().st_size, opset, quantized is not None,
                              int8_count if quantized is not None else 0, len(quantized or {}), _model_weights(model),
                              onnx_weights(path), diffs, TOLERANCE if quantized is None else 1e-3)
    if check:
        worst = max(report.max_abs_diff.values())
        limit = report.tolerance
        if not worst <= limit:
            raise UserError(f'the exported {path.name} does not give the model\'s outputs: max abs difference '
                            f'{worst:.3g} (limit {limit:g}) at {report.max_abs_diff}')
        if not report.keeps_sharing:
            raise UserError(f'the exported {path.name} stores {report.stored_weights:,} weights for a model of '
                            f'{report.model_weights:,}: the export copied shared weights and lost the compression')
    return report
