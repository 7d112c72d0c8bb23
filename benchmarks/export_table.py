""" File size and batch-1 CPU latency of exported networks, in onnxruntime and in PyTorch (issue 23).

    python benchmarks/export_table.py [--json benchmarks/results/export_cpu.json]

Exports, with `timm_rc.deploy.export.export_model` (every file checked against the model), RC-4 and the ResNet-18
graph at full width, RC-4 with int8 weights, and timm's ResNet-18 converted to RC (`rc_resnet18`), each with
BN layers holding distinct values as a trained network's do (the exporter stores equal initializers once, which
would flatter an untrained network). Latency: median of `torch.utils.benchmark.Timer` / of timed
`InferenceSession.run` calls on one image, with the process's threads (torch's default: every core). Time
nothing else while it runs.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

import timm_rc  # noqa: F401
from timm_rc.deploy.export import distinct_bn, export_model
from timm_rc.quantize import int8_weights, load_quantized, save_quantized

MODELS = [('RC-4 (rc4_cifar)', 'rc4_cifar', False), ('ResNet-18 graph (rc4_unshared_cifar)', 'rc4_unshared_cifar', False),
          ('RC-4, int8 weights', 'rc4_cifar', True), ('rc_resnet18 (timm ResNet-18 converted)', 'rc_resnet18', False)]


def trained_like(name):
    return distinct_bn(timm.create_model(name).eval())


def ort_latency(path, x, repeats=50) -> float:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torch_latency(model, x) -> float:
    from torch.utils.benchmark import Timer
    with torch.no_grad():
        return Timer('model(x)', globals=dict(model=model, x=x)).blocked_autorange(min_run_time=2).median * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--json')
    args = p.parse_args()
    rows = []
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1')
    print(f'{"network":<40} {"params":>10} {"ONNX bytes":>12} {"stored":>10} {"ORT ms":>8} {"torch ms":>9} {"max diff":>9}')
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, int8 in MODELS:
            model = trained_like(name)
            quantized = None
            if int8:
                save_quantized(model, Path(tmp) / 'q.safetensors', 8)
                quantized = int8_weights(Path(tmp) / 'q.safetensors')
                model = load_quantized(Path(tmp) / 'q.safetensors')
            path = Path(tmp) / f'{name}{"_int8" if int8 else ""}.onnx'
            report = export_model(model, path, quantized=quantized)
            x = torch.randn(1, *model.pretrained_cfg['input_size'])
            row = dict(network=label, params=sum(q.numel() for q in model.parameters()), onnx_bytes=report.bytes,
                       stored_weights=report.stored_weights, ort_ms=round(ort_latency(path, x), 3),
                       torch_ms=round(torch_latency(model, x), 3), max_abs_diff=max(report.max_abs_diff.values()),
                       input_size=list(model.pretrained_cfg['input_size']))
            rows.append(row)
            print(f'{label:<40} {row["params"]:>10,} {row["onnx_bytes"]:>12,} {row["stored_weights"]:>10,} '
                  f'{row["ort_ms"]:>8.2f} {row["torch_ms"]:>9.2f} {row["max_abs_diff"]:>9.1e}', flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
