""" `timm_rc.compress`: the compression report, weight-only int8/int4 quantization that keeps the sharing,
static int8 through PT2E with weight-shared convolutions, and the command's bad inputs. """
import hashlib
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import timm_rc  # noqa: F401
from timm_rc.cli.compress import main
from timm_rc.deploy.compression import activation_bytes, model_size, weights_bytes
from timm_rc.quantize import (SCALE_SUFFIX, dequantize_tensor, load_quantized, quantize_state_dict, quantize_tensor,
                              save_quantized, static_int8, untie_shared_weights)
from cli_helpers import exits_2 as _exits_2, json_result
from timm_rc.runs.source import load_model

W8 = dict(width=8, block='postact')
RC4_W8_PARAMS, PLAIN4_W8_PARAMS = 20_786, 79_538  # rc4_cifar and rc4_unshared_cifar at width 8


def digests(folder: Path):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def call(argv, capsys):
    return json_result(main, argv, capsys)


def exits_2(argv, capsys):
    return _exits_2(main, argv, capsys)


def distinct_bn_stats(model: nn.Module, batches=5) -> nn.Module:
    """ Per-step BN statistics made different, as training makes them. """
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(16, 3, 32, 32, generator=g))
    return model.eval()


# ---- quantize / dequantize ---------------------------------------------------------------------


@pytest.mark.parametrize('bits,shape,group', [(8, (16, 8, 3, 3), 32), (4, (16, 8, 3, 3), 32), (4, (10, 33), 32),
                                              (4, (7, 5, 3, 3), 8), (8, (10, 64), 32)])
def test_quantize_error_is_at_most_half_a_step_per_weight(bits, shape, group):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1
    w[0] = 0  # an all-zero output channel quantizes exactly
    data, scale = quantize_tensor(w, bits, group)
    back = dequantize_tensor(data, scale, shape, bits, group)
    assert back.shape == w.shape and back.dtype == torch.float32
    out, k = shape[0], math.prod(shape[1:])
    if bits == 8:
        assert data.dtype == torch.int8 and data.shape == (out, k) and scale.shape == (out,)
        assert data.abs().max() == 127  # the largest weight of each channel maps to +-127
        step = scale[:, None].expand(out, k)
    else:
        groups = math.ceil(k / group)
        assert data.dtype == torch.uint8 and data.numel() == math.ceil(out * k / 2)
        assert scale.dtype == torch.float16 and scale.shape == (out, groups)
        step = scale.float().repeat_interleave(group, 1)[:, :k]
    err = (w.reshape(out, k) - back.reshape(out, k)).abs()
    assert (err <= step / 2 + 1e-7).all(), (err - step / 2).max()
    assert (back[0] == 0).all()
    # quantizing the dequantized weight changes nothing: the grid is exact
    data2, scale2 = quantize_tensor(back, bits, group)
    torch.testing.assert_close(dequantize_tensor(data2, scale2, shape, bits, group), back, rtol=0, atol=1e-7)


def test_quantized_file_stores_each_shared_weight_once(tmp_path):
    rc4 = timm.create_model('rc4_cifar', **W8)
    plain = timm.create_model('rc4_unshared_cifar', **W8)
    conv_linear = lambda m: {id(x.weight): x.weight.numel() for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))}
    for model in (rc4, plain):
        tensors, shapes = quantize_state_dict(model, 8)
        # one int8 tensor per unique convolution / linear weight, never per step
        assert sum(tensors[k].numel() for k in shapes) == sum(conv_linear(model).values())
        assert all(tensors[k].dtype == torch.int8 and tensors[k + SCALE_SUFFIX].dtype == torch.float32 for k in shapes)
    assert sum(conv_linear(rc4).values()) == 20_120 and sum(conv_linear(plain).values()) == 78_872
    size = save_quantized(rc4, tmp_path / 'rc4.int8.safetensors', 8, model_name='rc4_cifar', model_kwargs=W8)
    size_plain = save_quantized(plain, tmp_path / 'plain.int8.safetensors', 8, model_name='rc4_unshared_cifar',
                                model_kwargs=W8)
    assert size == (tmp_path / 'rc4.int8.safetensors').stat().st_size
    # the shared model's file holds its 20,120 conv/linear weights at a byte each, the plain one 78,872
    assert size_plain - size > 78_872 - 20_120
    assert size < weights_bytes(rc4) / 2
    int4 = save_quantized(rc4, tmp_path / 'rc4.int4.safetensors', 4, model_name='rc4_cifar', model_kwargs=W8)
    assert int4 < size


@pytest.mark.parametrize('bits', [8, 4])
def test_round_trip_through_the_loader(tmp_path, bits):
    model = distinct_bn_stats(timm.create_model('rc4_cifar', **W8))
    path = tmp_path / f'm.int{bits}.safetensors'
    save_quantized(model, path, bits, model_name='rc4_cifar', model_kwargs=W8)
    loaded = load_quantized(path)  # built from the file's metadata
    assert type(loaded).__name__ == 'RCNet' and loaded.steps == 4 and loaded.width == 8 and not loaded.training
    ref = dict(model.state_dict())
    tensors, shapes = quantize_state_dict(model, bits)
    for k, v in loaded.state_dict().items():
        if k in shapes:
            expected = dequantize_tensor(tensors[k], tensors[k + SCALE_SUFFIX], shapes[k], bits)
            assert torch.equal(v, expected), k
        else:  # BN layers (per step), biases: exactly as trained
            assert torch.equal(v, ref[k]), k
    # the shared convolution is still one tensor in every step of the loaded model
    assert loaded.cell1.steps[3].conv1.weight is loaded.cell1.steps[0].conv1.weight
    # timm_rc.eval loads the same model from the file
    via_eval = load_model(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(via_eval(x), loaded(x), rtol=0, atol=0)
        rel = ((loaded(x) - model(x)).norm() / model(x).norm()).item()
    assert rel < (0.05 if bits == 8 else 0.5)


def test_a_quantized_file_that_does_not_fit_the_model_is_one_line(tmp_path):
    model = timm.create_model('rc4_cifar', **W8)
    path = tmp_path / 'm.int8.safetensors'
    save_quantized(model, path, 8, model_name='rc4_cifar', model_kwargs=W8)
    from timm_rc.train import UserError
    with pytest.raises(UserError, match=r'does not fit the model given: 40 unexpected keys \(cell1\.steps\.2\.bn1\.bias'):
        load_quantized(path, timm.create_model('rc2_cifar', **W8))
    with pytest.raises(UserError, match=r'shape mismatches .*it was written for rc4_cifar \{"width": 8'):
        load_quantized(path, timm.create_model('rc4_cifar', width=16))
    (tmp_path / 'plain.safetensors').write_bytes((tmp_path / 'm.int8.safetensors').read_bytes()[:100])
    with pytest.raises(UserError, match='cannot read'):
        load_quantized(tmp_path / 'plain.safetensors')


# ---- static int8 through PT2E --------------------------------------------------------------------


def test_static_int8_is_right_for_weight_shared_convolutions(monkeypatch):
    """ PT2E folds each BN into the convolution before it; with one shared convolution and k per-step BNs
    it folds them all into one weight (pytorch/ao#2795). static_int8 unties the calls first. """
    pytest.importorskip('torchao')
    model = distinct_bn_stats(timm.create_model('rc4_cifar', **W8))
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(32, 3, 32, 32, generator=g) for _ in range(4)]
    x = torch.randn(64, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = model(x)
    int8 = static_int8(model, calib, compile=False)
    # 2 cells x 2 convolutions x 3 further steps got their own copy: 4 x the cell convolutions in int8
    assert int8.untied == 12 and int8.shared_weight_elements == 20_120 and int8.int8_weight_elements == 78_872
    with torch.no_grad():
        out = int8(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel  # int8 quantization noise only
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.9
    assert int8.pretrained_cfg['mean'] == model.pretrained_cfg['mean']
    # the source model is untouched (a copy was exported)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    # without untying, the upstream folding is wrong: the check above can fail
    monkeypatch.setattr('timm_rc.quantize.pt2e.untie_shared_weights', lambda gm: 0)
    with torch.no_grad():
        broken = static_int8(model, calib, compile=False)(x)
    assert ((broken - ref).norm() / ref.norm()).item() > 0.5


def test_untie_leaves_an_unshared_graph_alone():
    model = timm.create_model('rc4_unshared_cifar', width=4).eval()
    gm = torch.export.export(model, (torch.randn(2, 3, 32, 32),)).module()
    assert untie_shared_weights(gm) == 0


# ---- the report --------------------------------------------------------------------------------


def test_report_rows_exact_counts_and_the_plain_graph(capsys):
    rows = call(['report', 'rc4_cifar', 'rc1_cifar', '--model_kwargs', json.dumps(W8), '--bits', '8,4'], capsys)
    assert [r['name'] for r in rows] == ['rc4_cifar', 'plain graph of rc4_cifar', 'rc1_cifar']
    rc4, plain, rc1 = rows
    assert rc4['params'] == RC4_W8_PARAMS and plain['params'] == PLAIN4_W8_PARAMS
    assert rc4['compression'] == PLAIN4_W8_PARAMS / RC4_W8_PARAMS and 'compression' not in rc1  # RC-1 is its own graph
    assert plain['model_kwargs'] == {**W8, 'share_weights': False}
    # the same graph: the same FLOPs and the same training activation memory; sharing saves weights only
    assert rc4['flops_per_image'] == plain['flops_per_image'] > rc1['flops_per_image']
    assert rc4['activation_bytes'] == plain['activation_bytes'] > rc1['activation_bytes']
    assert rc4['weights_bytes'] == weights_bytes(timm.create_model('rc4_cifar', **W8))
    assert rc4['int8_bytes'] < rc4['weights_bytes'] and rc4['int4_bytes'] < rc4['int8_bytes']
    assert all(r['latency_ms_b1'] > 0 and r['latency_ms_b64'] > 0 and 'top1_error' not in r for r in rows)  # untrained
    main(['report', 'rc1_cifar', '--model_kwargs', json.dumps(W8), '--markdown'])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith('| model | params | x smaller | fp32 MB |') and table[2].startswith('| rc1_cifar | 20,306 |')


def test_activation_bytes_counts_what_backward_keeps():
    """ A conv -> BN -> ReLU stack at batch 2 on 4x4 inputs keeps: the input (for the conv's weight grad),
    the conv output (for BN), the ReLU output; all fp32. """
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    net.pretrained_cfg = {'input_size': (3, 4, 4)}
    expected = 4 * (2 * 3 * 16 + 2 * 8 * 16 + 2 * 8 * 16)
    # BN also saves its per-channel mean and inverse std (2 x 8 floats)
    assert activation_bytes(net, 2) == expected + 4 * 2 * 8
    assert model_size(net) == 3 * 8 * 9 + 16


def test_report_of_a_trained_run_has_its_test_error(tiny, capsys):
    root, out, summary = tiny
    rows = call(['report', str(out), '--bits', '8', '--no_plain', '--data_dir', str(root / 'data')], capsys)
    assert len(rows) == 1 and rows[0]['top1_error'] == summary['test_top1_error'] and rows[0]['trained']
    assert 'int8_top1_error' in rows[0] and rows[0]['params'] == summary['params']


# ---- quantize a run ------------------------------------------------------------------------------


def test_quantize_a_run_writes_beside_its_weights_and_touches_nothing(tiny, capsys):
    root, out, summary = tiny
    before = digests(out)
    r = call(['quantize', str(out), '--bits', '8', '--data_dir', str(root / 'data')], capsys)
    written = out / 'model.int8.safetensors'
    try:
        assert r['path'] == str(written) and written.stat().st_size == r['quantized_bytes']
        assert r['fp32_bytes'] == (out / 'model.safetensors').stat().st_size > r['quantized_bytes']
        assert r['bits'] == 8 and r['fp32_top1_error'] == summary['test_top1_error']
        assert 0 <= r['quantized_top1_error'] <= 100
        after = digests(out)
        assert {k: v for k, v in after.items() if k != 'model.int8.safetensors'} == before  # nothing else changed
        # the written file evaluates through the evaluation command to the same error
        from timm_rc.cli.eval import main as eval_main
        capsys.readouterr()
        report = eval_main([str(written), '--data_dir', str(root / 'data'), '--json'])
        assert report['top1_error'] == r['quantized_top1_error'] and report['quantized'] is True
        # beside the run's fp32 summary, the table says that a difference is expected (issue 17, item 11)
        eval_main([str(written)])
        assert "of the fp32 model; this file's weights are quantized, so a difference is expected" in \
            capsys.readouterr().out
        # a second quantize keeps the first file (it may hold other options' weights) unless told to replace it
        kept = digests(out)
        assert exits_2(['quantize', str(out), '--bits', '8'], capsys) == \
            f'error: {written} exists (written by an earlier quantize, perhaps with other options); pass ' \
            f'--overwrite to replace it, or move it away first\n'
        assert digests(out) == kept
        first = load_file(str(written))
        again = call(['quantize', str(out), '--bits', '8', '--overwrite', '--data_dir', str(root / 'data')], capsys)
        assert again['quantized_top1_error'] == r['quantized_top1_error']
        second = load_file(str(written))  # the same tensors (safetensors orders its metadata anew each write)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    finally:
        written.unlink(missing_ok=True)


def test_bad_inputs_are_one_line_and_leave_the_run_alone(tiny, tmp_path, capsys):
    root, out, summary = tiny
    before = digests(out)
    for bits in ('5', '8,4'):
        assert exits_2(['quantize', str(out), '--bits', bits], capsys) == (
            f"error: argument --bits: --bits takes 8 or 4 (quantize writes one file a call; report takes a list such "
            f"as 8,4); got '{bits}' (see python -m timm_rc compress quantize --help)\n")
    assert "--bits takes 8 or 4" in exits_2(['report', 'rc1_cifar', '--bits', '16'], capsys)
    assert exits_2(['report', str(out), '--model_kwargs', '{"widht": 4}'], capsys) == (
        'error: --model_kwargs applies to registered names (e.g. rc4_cifar); a run folder builds the model it was '
        'trained with, so {"widht": 4} would be ignored: leave it out, or give a name\n')  # it was dropped silently
    assert 'rc5_cifar is neither a file or folder here nor a registered timm name; similar names: rc4_cifar, rc2_cifar, rc1_cifar\n' in exits_2(['report', 'rc5_cifar'], capsys)
    empty = tmp_path / 'run_without_weights'
    empty.mkdir()
    (empty / 'run_config.json').write_text(json.dumps({'model': 'rc4_cifar'}))
    assert 'holds no model.safetensors' in exits_2(['quantize', str(empty), '--bits', '8'], capsys)
    assert list(empty.iterdir()) == [empty / 'run_config.json']
    assert 'does not exist' in exits_2(['quantize', str(tmp_path / 'nope'), '--bits', '8'], capsys)
    assert 'is a file; give the run folder' in exits_2(['quantize', str(out / 'model.safetensors'), '--bits', '4'],
                                                       capsys)
    assert 'give a command: report, quantize or int8' in exits_2([], capsys)
    # a quantized file that does not fit the model named
    save_quantized(load_model(out), tmp_path / 'w4.int8.safetensors', 8, model_name='rc4_cifar',
                   model_kwargs={'width': 4})
    from timm_rc.cli.eval import main as eval_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_main([str(tmp_path / 'w4.int8.safetensors'), '--model', 'rc4_cifar', '--data_dir', str(root / 'data')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'does not fit the model given: ' in err and 'Traceback' not in err
    assert digests(out) == before


def test_quantize_and_int8_take_a_run_folder_and_count_the_runs_examples(tiny, capsys):
    root, out, summary = tiny
    assert 'quantize takes a run folder (holding model.safetensors); rc4_cifar does not exist' in \
        exits_2(['quantize', 'rc4_cifar', '--bits', '8'], capsys)
    assert 'int8 takes a run folder' in exits_2(['int8', 'rc4_cifar'], capsys)
    assert '--json and --markdown both given' in exits_2(['report', 'rc1_cifar', '--json', '--markdown'], capsys)
    assert '--bits takes 8 or 4' in exits_2(['report', 'rc1_cifar', '--bits', ''], capsys)


def test_the_plain_network_of_a_registered_family_is_its_base():
    from timm_rc.deploy.compression import plain_network as _plain_network
    rc = timm.create_model('rc_resnet18', num_classes=3)
    assert _plain_network(rc, 'rc_resnet18', {'num_classes': 3, 'bn_sharing': 'shared'}) == ('resnet18', {'num_classes': 3})
    assert _plain_network(timm.create_model('rc4_cifar', width=4), 'rc4_cifar', {'width': 4}) == \
        ('rc4_cifar', {'width': 4, 'share_weights': False})
    assert _plain_network(timm.create_model('rc1_cifar', width=4), 'rc1_cifar', {'width': 4}) is None


def test_quantize_in_place_equals_the_files_weights_and_bad_configs_are_named(tmp_path):
    """ quantize_(model, config) rounds in place to exactly what the quantized file loads back to. """
    from timm_rc.quantize import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    from timm_rc.train import UserError
    for config in (Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=16)):
        model = timm.create_model('rc4_cifar', width=4)
        path = tmp_path / f'{config.name}.safetensors'
        save_quantized(model, path, config)
        loaded = load_quantized(path)
        assert quantize_(model, config) is model
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(UserError, match=r"'int8' is not a quantization config; use one of Int8WeightOnlyConfig\(\), "
                                        r"Int4WeightOnlyConfig\(\) \(or 8 / 4\)"):
        quantize_(timm.create_model('rc4_cifar', width=4), 'int8')
