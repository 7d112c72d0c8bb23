""" What makes a trained network smaller and ships it, each measured: `compression` (size, FLOPs, latency and
error reports; weight-only and PT2E int8 of a run), `convert` (a run converted to RC weights, BN re-estimated,
before/after error), `export` (ONNX and torch.export files that keep the sharing, checked in onnxruntime). """
