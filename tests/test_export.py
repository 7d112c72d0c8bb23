""" python -m timm_rc export: ONNX and .pt2 files that give the model's outputs and keep RC's sharing. """
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch

import timm_rc  # noqa: F401
from cli_helpers import exits_2, json_result

onnxruntime = pytest.importorskip('onnxruntime')


def trained_like(name, **kwargs):
    """ An eval-mode model whose BN layers hold distinct values, as a trained one's do. """
    from timm_rc.deploy.export import distinct_bn
    return distinct_bn(timm.create_model(name, **kwargs).eval())


def test_distinct_bn_fills_every_bn_deterministically_and_leaves_the_rest():
    from timm_rc.deploy.export import distinct_bn
    a, b = timm.create_model('rc2_cifar', width=4), timm.create_model('rc2_cifar', width=4)
    b.load_state_dict(a.state_dict())
    conv = a.conv1.weight.clone()
    distinct_bn(a), distinct_bn(b)
    assert torch.equal(a.conv1.weight, conv)
    bns = [m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.running_var.unique().numel() == m.num_features for m in bns)
    assert all(0.5 <= m.weight.min() and m.weight.max() <= 1.5 and m.bias.abs().max() <= 0.1 for m in bns)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = distinct_bn(timm.create_model('rc2_cifar', width=4), seed=1)
    assert not torch.equal(c.bn1.weight, a.bn1.weight)


def test_onnx_gives_the_outputs_at_every_optimization_level_and_keeps_the_sharing(tmp_path):
    from timm_rc.deploy.export import ORT_LEVELS, export_model, onnx_weights
    rc4 = export_model(trained_like('rc4_cifar', width=16), tmp_path / 'rc4.onnx')
    plain = export_model(trained_like('rc4_unshared_cifar', width=16), tmp_path / 'r18.onnx')
    for r in (rc4, plain):
        assert set(r.max_abs_diff) == set(ORT_LEVELS) and max(r.max_abs_diff.values()) < 1e-4
        # every weight once, nothing copied (the exporter drops a few constant values: a zero bias, ...)
        assert 0.99 * r.model_weights <= r.stored_weights == onnx_weights(r.path) <= r.model_weights
        assert r.keeps_sharing and r.opset >= 18
    model = trained_like('rc4_cifar', width=16)
    unique = sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers()
                                                              if not n.endswith('num_batches_tracked'))
    assert rc4.model_weights == unique
    assert rc4.stored_weights / plain.stored_weights < 0.3


def test_the_dynamic_batch_axis_takes_other_batch_sizes(tmp_path):
    from timm_rc.deploy.export import export_model
    model = trained_like('rc2_cifar', width=4)
    export_model(model, tmp_path / 'm.onnx')
    session = onnxruntime.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
    x = torch.randn(5, 3, 32, 32)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert (torch.from_numpy(got) - model(x)).abs().max() < 1e-4


def test_pt2_keeps_the_sharing(tmp_path):
    from timm_rc.deploy.export import export_model
    rc4 = export_model(trained_like('rc4_cifar', width=4), tmp_path / 'rc4.pt2')
    plain = export_model(trained_like('rc4_unshared_cifar', width=4), tmp_path / 'r18.pt2')
    assert rc4.max_abs_diff == {'torch': 0.0} and rc4.stored_weights == rc4.model_weights
    assert plain.stored_weights == plain.model_weights and rc4.stored_weights < plain.stored_weights / 3


def test_a_copied_shared_weight_is_refused(tmp_path, monkeypatch):
    """ What Conv+BN folding into a shared weight would do: store it once per step. The check must fail. """
    from timm_rc.deploy import export
    from timm_rc.errors import UserError
    monkeypatch.setattr(export, 'onnx_weights', lambda path: 10 ** 9)
    with pytest.raises(UserError, match='the export copied shared weights and lost the compression'):
        export.export_model(trained_like('rc4_cifar', width=4), tmp_path / 'rc4.onnx')


def test_int8_onnx_stores_int8_weights_once(tmp_path, capsys):
    from timm_rc.cli.export import main
    from timm_rc.quantize import load_quantized, save_quantized
    model = trained_like('rc4_cifar', width=32)
    save_quantized(model, tmp_path / 'model.int8.safetensors', 8)
    r = json_result(main, [str(tmp_path / 'model.int8.safetensors'), '--int8', '--output', str(tmp_path / 'q.onnx')],
                    capsys)
    f = json_result(main, ['rc4_cifar', '--model_kwargs', '{"width": 32}', '--output', str(tmp_path / 'f.onnx')], capsys)
    # an int8 file exported without --int8 keeps its int8 weights (not a 4x larger dequantized file), and says so
    capsys.readouterr()
    q2 = main([str(tmp_path / 'model.int8.safetensors'), '--output', str(tmp_path / 'q2.onnx'), '--json'])
    out, err = capsys.readouterr()
    assert json.loads(out) == q2 and q2['bytes'] == r['bytes'] and q2['int8_weights'] == r['int8_weights']
    assert err == f"note: {tmp_path / 'model.int8.safetensors'} holds int8 weights; exporting them as int8 (as --int8)\n"
    save_quantized(model, tmp_path / 'model.int4.safetensors', 4)  # int4: exported dequantized, and said so
    f4 = main([str(tmp_path / 'model.int4.safetensors'), '--output', str(tmp_path / 'q4.onnx'), '--json'])
    out, err = capsys.readouterr()
    assert not f4['int8'] and err == (f"note: {tmp_path / 'model.int4.safetensors'} holds quantized weights; this "
                                      "export stores them dequantized (float): only an int8 file exported to *.onnx "
                                      "keeps them quantized\n")
    assert r['int8'] and max(r['max_abs_diff'].values()) < 1e-3 and r['keeps_sharing']
    assert r['bytes'] < 0.4 * f['bytes']
    import onnx
    graph = onnx.load(str(tmp_path / 'q.onnx')).graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    # the two shared convs of each cell and the head; the stem conv, into which the exporter folds the stem's
    # BN, stays fp32
    assert len(int8) == r['int8_weights'] == 2 + 2 + 1 and r['quantized_weights'] == 6
    dequantized = load_quantized(tmp_path / 'model.int8.safetensors')
    session = onnxruntime.InferenceSession(str(tmp_path / 'q.onnx'), providers=['CPUExecutionProvider'])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert abs(session.run(None, {'images': x.numpy()})[0] - dequantized(x).numpy()).max() < 1e-3


def test_bad_export_input_is_one_line(tmp_path, capsys, monkeypatch):
    from timm_rc.cli.export import main
    assert exits_2(main, ['rc4_cifar', '--output', str(tmp_path / 'x.bin')], capsys) == \
        f'error: --output {tmp_path / "x.bin"}: name the file *.onnx (ONNX) or *.pt2 (torch.export)\n'
    assert 'has no model.int8.safetensors: write it with python -m timm_rc compress quantize' in \
        exits_2(main, [str(tmp_path), '--int8', '--output', str(tmp_path / 'q.onnx')], capsys)
    assert exits_2(main, ['rc4_cifar', '--int8', '--output', str(tmp_path / 'q.pt2')], capsys) == \
        'error: --int8 writes ONNX (int8 weights behind DequantizeLinear nodes); name the file *.onnx, not q.pt2\n'
    assert exits_2(main, [str(tmp_path / 'runs' / 'nope'), '--output', str(tmp_path / 'x.onnx')], capsys) == \
        f'error: {tmp_path / "runs" / "nope"} does not exist; give a run folder (holding model.safetensors), a weights file or a timm name (e.g. ' \
        f'rc4_cifar)\n'
    (tmp_path / 'afile').write_text('')
    assert exits_2(main, ['rc4_cifar', '--output', str(tmp_path / 'afile' / 'sub' / 'x.onnx')], capsys) == \
        f'error: --output {tmp_path / "afile" / "sub" / "x.onnx"}: {tmp_path / "afile"} is a file, not a folder; ' \
        'name a file in a folder\n'
    assert 'rc9_cifar is neither a file or folder here nor a registered timm name; similar names: rc4_cifar, ' in exits_2(main, ['rc9_cifar', '--output', str(tmp_path / 'x.onnx')], capsys)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnxscript' else real(name, *a))
    assert exits_2(main, ['rc4_cifar', '--output', str(tmp_path / 'x.onnx')], capsys) == \
        'error: ONNX export needs onnxscript: pip install "timm_rc[export]" (or pip install onnx onnxscript onnxruntime)\n'
    assert not Path(tmp_path / 'x.onnx').exists()
