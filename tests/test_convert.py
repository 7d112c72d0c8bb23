""" `timm_rc.convert_to_rc` on timm's, torchvision's and timm_rc's networks, and the registered rc_* families. """
import copy
import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import timm_rc
import timm_rc.runs.source
from timm_rc import Unrolled, convert_to_rc, find_runs

# (params before, after) by the rule: total minus the non-BN parameters of every block of a run after its first
COUNTS = {
    'resnet18': (11_689_512, 11_615_784),
    'resnet34': (21_797_672, 11_623_208),
    'resnet50': (25_557_032, 16_017_448),
    'resnet101': (44_549_160, 16_069_672),
    'efficientnet_b0': (5_288_548, 3_816_148),
    'mobilenetv2_100': (3_504_872, 2_954_024),
}


SMALL = (3, 64, 64)  # the probe's image size: the same runs as at 224, a tenth of the time


def params(m):
    return sum(p.numel() for p in m.parameters())


def non_bn_params(block):
    bn = {id(p) for m in block.modules() if isinstance(m, _BatchNorm) for p in m.parameters()}
    return sum(p.numel() for p in block.parameters() if id(p) not in bn)


def randomize_bn(model, seed=0):
    """ Non-trivial BN layers: timm zero-inits the last BN of a residual branch, which hides mistakes. """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize('name', list(COUNTS))
def test_exact_param_counts_by_the_rule(name):
    model = timm.create_model(name)
    original = copy.deepcopy(model)
    runs = find_runs(original, SMALL)
    expected = params(original) - sum(non_bn_params(seq._modules[c]) for _, seq, names in runs for c in names[1:])
    report = convert_to_rc(model, input_size=SMALL, return_report=True)
    assert (report.params_before, report.params_after) == COUNTS[name] == (params(original), params(model))
    assert report.params_after == expected
    assert [(r.container, r.blocks) for r in report.runs] == [(c, names) for c, _, names in runs]
    assert all(isinstance(model.get_submodule(r.container)._modules[r.blocks[0]], Unrolled) for r in report.runs)
    assert find_runs(model, SMALL) == []  # nothing left to share


def test_torchvision_resnet50_the_same_rule():
    model = torchvision.models.resnet50()
    report = convert_to_rc(model, input_size=(3, 224, 224), return_report=True)
    assert (report.params_before, report.params_after) == (25_557_032, 16_017_448)
    assert [(r.container, r.blocks) for r in report.runs] == [
        ('layer1', ['1', '2']), ('layer2', ['1', '2', '3']), ('layer3', ['1', '2', '3', '4', '5']), ('layer4', ['1', '2'])]
    assert 'layer3  blocks 1..5  5 x Bottleneck  -> 1 cell, 5 steps' in str(report)


def make_runs_identical(model, runs):
    """ Give every block of each run the non-BN weights of the run's first block (BN layers stay their own). """
    with torch.no_grad():
        for _, seq, names in runs:
            first = seq._modules[names[0]]
            for c in names[1:]:
                block = seq._modules[c]
                for (n, p), (_, q) in zip(first.named_parameters(), block.named_parameters()):
                    if not any(isinstance(m, _BatchNorm) and p is m.weight or p is getattr(m, 'bias', None)
                               for m in first.modules() if isinstance(m, _BatchNorm)):
                        q.copy_(p)


@pytest.mark.parametrize('name,size', [('resnet50', 64), ('efficientnet_b0', 64), ('mobilenetv2_100', 64)])
def test_outputs_equal_the_original_when_the_runs_blocks_are_identical(name, size):
    model = randomize_bn(timm.create_model(name)).eval()
    runs = find_runs(model, (3, size, size))
    make_runs_identical(model, runs)
    block_bns = {(c, n): [m.state_dict() for m in seq._modules[n].modules() if isinstance(m, _BatchNorm)]
                 for c, seq, names in runs for n in names}
    original = copy.deepcopy(model)
    report = convert_to_rc(model, input_size=(3, size, size), return_report=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)
    # step i keeps block i's BN layers
    for run in report.runs:
        cell = model.get_submodule(run.container)._modules[run.blocks[0]]
        for i, n in enumerate(run.blocks):
            bns = [m.state_dict() for m in cell.steps[i].modules() if isinstance(m, _BatchNorm)]
            for got, want in zip(bns, block_bns[(run.container, n)], strict=True):
                assert all(torch.equal(got[k], want[k]) for k in want)


def test_state_dict_holds_each_shared_tensor_once_and_round_trips(tmp_path):
    model = randomize_bn(timm.create_model('resnet50')).eval()
    convert_to_rc(model, input_size=SMALL, return_report=True)
    sd = model.state_dict()
    assert 'layer3.1.steps.0.conv1.weight' in sd and 'layer3.1.steps.4.conv1.weight' not in sd
    assert 'layer3.1.steps.4.bn1.running_mean' in sd  # every step's BN
    assert sum(v.numel() for k, v in sd.items() if k.endswith('.weight') and 'bn' not in k and 'downsample.1' not in k) \
        == sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in [m.weight])
    save_file(sd, str(tmp_path / 'rc.safetensors'))  # safetensors refuses shared tensors: none are left
    fresh = timm.create_model('resnet50')
    timm_rc.convert_to_rc(fresh, input_size=SMALL, return_report=True)
    fresh.load_state_dict(load_file(str(tmp_path / 'rc.safetensors')), strict=True)
    fresh.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert fresh.layer3[1].steps[4].conv1.weight is fresh.layer3[1].steps[0].conv1.weight


def test_unshared_rcnet_becomes_the_rc_network():
    """ The paper's ResNet-18 graph converts to RC-4: the same params and the same state_dict keys. """
    plain = randomize_bn(timm.create_model('rc4_unshared_cifar', width=8)).eval()
    report = convert_to_rc(plain, return_report=True)
    assert report.params_before == 79_538 and report.params_after == 20_786
    assert plain.share_weights and [r.container for r in report.runs] == ['cell1', 'cell2']
    rc4 = timm.create_model('rc4_cifar', width=8)
    rc4.load_state_dict(plain.state_dict(), strict=True)
    rc4.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rc4(x), plain(x), rtol=0, atol=0)
        plain.set_steps(6)  # shared weights now: more steps than trained
        assert plain(x).shape == (2, 10)


def test_steps_unrolls_more_or_fewer_times():
    model = timm.create_model('resnet50')
    before = params(model)
    later = sum(params(seq._modules[c]) for _, seq, names in find_runs(model, SMALL) for c in names[1:])
    report = convert_to_rc(model, steps=1, input_size=SMALL, return_report=True)
    # one step per run: every block after the first of a run is gone, BN included
    assert report.params_after == before - later
    model = timm.create_model('resnet50')
    report = convert_to_rc(model, steps=[2, 6, 5, 4], input_size=SMALL, return_report=True)
    assert [r.steps for r in report.runs] == [2, 6, 5, 4]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match=r'steps has 2 values but the network has 4 runs'):
        convert_to_rc(timm.create_model('resnet50'), steps=[2, 3], input_size=SMALL, return_report=True)
    with pytest.raises(ValueError, match=r'steps must be ints >= 1'):
        convert_to_rc(timm.create_model('resnet50'), steps=0, input_size=SMALL, return_report=True)
    with pytest.raises(ValueError, match=r"unknown bn_sharing 'double'; valid values: 'independent', 'shared', 'none'"):
        convert_to_rc(timm.create_model('resnet18'), bn_sharing='double', return_report=True)
    with pytest.raises(ValueError, match=r'needs input_size \(C, H, W\) .* does not start with a 2-D convolution'):
        convert_to_rc(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), return_report=True)
    with pytest.raises(ValueError, match=r'convert it at 4 steps'):
        convert_to_rc(timm.create_model('rc4_unshared_cifar', width=4), steps=2, return_report=True)


def test_a_torchvision_network_without_a_cfg_is_probed_at_224():
    """ torchvision models have no pretrained_cfg: a network that starts with a 2-D convolution is probed with a
    224 x 224 image of its channels (issue 17, item 8); the runs found equal those at the size given. """
    import torchvision
    model = torchvision.models.resnet34()
    given = convert_to_rc(torchvision.models.resnet34(), input_size=(3, 64, 64), return_report=True)
    report = convert_to_rc(model, return_report=True)
    assert [(r.container, r.blocks) for r in report.runs] == [(r.container, r.blocks) for r in given.runs]
    assert [(r.container, len(r.blocks)) for r in report.runs] == [('layer1', 3), ('layer2', 3), ('layer3', 5),
                                                                   ('layer4', 2)]
    assert report.params_after == given.params_after < report.params_before
    with pytest.raises(ValueError, match=r'could not run Sequential on a zero image of size \(3, 224, 224\)'):
        convert_to_rc(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(10, 2)), return_report=True)


def test_nothing_to_share_is_a_warning_and_the_model_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match='nothing|no run of two or more identical'):
        report = convert_to_rc(model, input_size=(3, 16, 16), return_report=True)
    assert report.runs == [] and report.params_after == report.params_before
    assert model.state_dict().keys() == before.keys()


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


def test_a_users_own_network_with_torch_compile():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residual(8), Residual(8), Residual(8), nn.AvgPool2d(2),
                          Residual(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    randomize_bn(model).eval()
    report = convert_to_rc(model, input_size=(3, 16, 16), return_report=True)
    assert [(r.container, r.blocks) for r in report.runs] == [('', ['1', '2', '3'])]
    assert isinstance(model[1], Unrolled) and model[1].num_steps == 3 and len(model) == 6
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.compile(model)(x), eager, rtol=1e-4, atol=1e-5)


# ---- registered families ----------------------------------------------------------------------


def test_registered_families_and_their_configs():
    assert set(timm.list_models('rc_*')) >= {f'rc_{b}' for b in COUNTS}
    for base, (_, after) in COUNTS.items():
        if base in ('resnet34', 'resnet101'):
            continue  # the resnet18 and resnet50 configs stand for them (the counts are checked above)
        model = timm.create_model(f'rc_{base}')
        base_cfg = timm.create_model(base).pretrained_cfg
        assert params(model) == after
        cfg = model.pretrained_cfg
        assert cfg['architecture'] == f'rc_{base}'
        assert (cfg['mean'], cfg['std'], cfg['input_size']) == (base_cfg['mean'], base_cfg['std'], base_cfg['input_size'])
    assert timm.list_pretrained('rc_resnet50.*')[:1] and 'rc_resnet50.tv_in1k' in timm.list_pretrained('rc_resnet50.*')
    tagged = timm.create_model('rc_resnet50.tv_in1k', num_classes=10)
    assert tagged.pretrained_cfg['hf_hub_id'] == 'timm/resnet50.tv_in1k' and tagged.num_classes == 10


def test_pretrained_loads_the_base_weights_then_converts(tmp_path):
    src = randomize_bn(timm.create_model('resnet18')).eval()
    path = tmp_path / 'resnet18.safetensors'
    save_file(src.state_dict(), str(path))
    dst = timm.create_model('rc_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    cell = dst.layer1[0]
    assert isinstance(cell, Unrolled) and cell.num_steps == 2
    assert torch.equal(cell.steps[0].conv1.weight, src.layer1[0].conv1.weight)
    assert cell.steps[1].conv1.weight is cell.steps[0].conv1.weight  # shared: block 0's
    assert torch.equal(cell.steps[1].bn2.running_var, src.layer1[1].bn2.running_var)  # block 1's own statistics
    assert torch.equal(dst.layer2[1].conv2.weight, src.layer2[1].conv2.weight)  # nothing shared there
    assert '1 run of identical blocks' in str(dst.rc_conversion) and 'layer1  blocks 0..1' in str(dst.rc_conversion)


@pytest.mark.parametrize('name', ['rc_resnet18'])
def test_timm_contract_of_the_families(name):
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model(x).shape == (2, 7)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    features = timm.create_model(name, features_only=True)
    outs = features(x)
    assert [o.shape[1] for o in outs] == features.feature_info.channels()
    assert params(features) < params(timm.create_model(name.removeprefix('rc_'), features_only=True))


# ---- python -m timm_rc convert -----------------------------------------------------------------


def convert_cli(argv, capsys):
    from timm_rc.cli.convert import main
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_a_trained_resnet18_graph_and_fine_tune_it(tmp_path, capsys, monkeypatch):
    """ The user's path: train the ResNet-18 graph, convert it to RC-4, fine-tune from the converted file. """
    from test_train import make_parquet, run
    monkeypatch.chdir(tmp_path)
    make_parquet(tmp_path / 'data')
    common = ['--data_dir', 'data', '--epochs', '1', '--batch_size', '16', '--log_with', 'none']
    run(['--model', 'rc4_unshared_cifar', '--model_kwargs', '{"width": 4}', '--output_dir', 'runs/r18', *common])
    code, out, err = convert_cli(['runs/r18', '--output', 'converted/rc4.safetensors'], capsys)
    assert code == 0, err
    assert 'cell1  blocks steps.0..steps.3  4 x BasicBlock' in out and 'wrote converted/rc4.safetensors' in out
    assert "--model rc4_cifar --model_kwargs '{\"width\": 4, \"pretrained\": true" in out
    rc4 = timm.create_model('rc4_cifar', width=4, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / 'converted/rc4.safetensors')))
    plain = timm_rc.runs.source.load_model(tmp_path / 'runs/r18').eval()
    assert torch.equal(rc4.cell2.steps[3].conv1.weight, plain.cell2.steps[0].conv1.weight)
    assert torch.equal(rc4.cell2.steps[3].bn1.running_mean, plain.cell2.steps[3].bn1.running_mean)
    kwargs = json.dumps({'width': 4, 'pretrained': True, 'pretrained_cfg_overlay': {'file': 'converted/rc4.safetensors'}})
    summary = run(['--model', 'rc4_cifar', '--model_kwargs', kwargs, '--output_dir', 'runs/ft', *common])
    assert summary['params'] == 5_502
    # the finished run loads without the file it started from
    (tmp_path / 'converted/rc4.safetensors').unlink()
    assert 'pretrained' not in json.loads((tmp_path / 'runs/ft/config.json').read_text())['model_args']
    from timm_rc.cli.eval import main as eval_main
    assert eval_main(['runs/ft'])['top1_error'] == summary['test_top1_error']
    # nothing left to share: one line, exit 2, nothing written
    code, out, err = convert_cli(['runs/ft', '--output', 'again.safetensors'], capsys)
    assert code == 2 and 'nothing to share (5,502 params)' in err and not (tmp_path / 'again.safetensors').exists()
    code, out, err = convert_cli(['runs/r18', '--output', 'runs/r18/model.safetensors'], capsys)
    assert code == 2 and "is the source's own weights" in err
    code, out, err = convert_cli(['runs/r18', '--output', 'x.safetensors', '--bn_sharing', 'double'], capsys)
    assert code == 2 and '--bn_sharing must be one of independent, shared, none' in err


def test_a_trained_rc_family_run_loads_back_through_timm(tmp_path):
    """ Weights of a converted network (a run's model.safetensors, a file python -m timm_rc.convert wrote)
    load after the conversion, through local-dir: and pretrained_cfg_overlay alike. """
    from timm.models import save_for_hf
    src = randomize_bn(timm.create_model('rc_resnet18', num_classes=3)).eval()
    save_for_hf(src, str(tmp_path / 'run'), model_args=dict(num_classes=3), safe_serialization=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
        via_dir = timm.create_model(f'local-dir:{tmp_path / "run"}', pretrained=True).eval()
        torch.testing.assert_close(via_dir(x), ref, rtol=0, atol=0)
        via_file = timm.create_model('rc_resnet18', num_classes=3, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(tmp_path / 'run' / 'model.safetensors'))).eval()
        torch.testing.assert_close(via_file(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"holds RC weights that do not fit rc_resnet18 with these kwargs \(bn_sharing='none'"):
        timm.create_model('rc_resnet18', num_classes=3, bn_sharing='none', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'run' / 'model.safetensors')))


def test_convert_refuses_to_write_into_the_run_and_names_a_missing_source(tmp_path, capsys, monkeypatch):
    from test_train import make_parquet, run
    monkeypatch.chdir(tmp_path)
    make_parquet(tmp_path / 'data')
    run(['--model', 'rc2_unshared_cifar', '--model_kwargs', '{"width": 4}', '--data_dir', 'data', '--epochs', '1',
         '--batch_size', '16', '--log_with', 'none', '--output_dir', 'runs/r10'])
    before = sorted(p.as_posix() for p in (tmp_path / 'runs/r10').rglob('*'))
    code, out, err = convert_cli(['runs/r10', '--output', 'runs/r10/checkpoints/epoch_0001/model.safetensors'], capsys)
    assert code == 2 and 'lies inside the run folder runs/r10' in err
    assert sorted(p.as_posix() for p in (tmp_path / 'runs/r10').rglob('*')) == before
    code, out, err = convert_cli(['runs/missing', '--output', 'f.safetensors'], capsys)
    assert code == 2 and ('runs/missing does not exist; give a run folder (holding model.safetensors), a weights file '
                          'or a timm name (e.g. rc4_cifar)') in err
    code, out, err = convert_cli(['runs/r10', '--output', 'shared.safetensors', '--bn_sharing', 'shared'], capsys)
    assert code == 0 and '"bn_sharing": "shared"' in out and '--model rc2_cifar' in out


def test_the_printed_load_line_of_a_converted_timm_model_works(tmp_path, capsys):
    out = tmp_path / 'rc18_shared.safetensors'
    code, printed, err = convert_cli(['resnet18', '--model_kwargs', '{"num_classes": 3}', '--bn_sharing', 'shared',
                                      '--output', str(out)], capsys)
    assert code == 0, err
    assert 'note: resnet18 was built with random weights' in printed
    line = next(x for x in printed.splitlines() if x.startswith('load it with '))
    assert "num_classes=3, bn_sharing='shared', pretrained=True" in line
    model = eval(line.removeprefix('load it with '), {'timm': timm})  # the very line a user would paste
    assert isinstance(model.layer1[0], Unrolled) and model.layer1[0].bn_sharing == 'shared' and model.num_classes == 3


def test_convert_to_rc_returns_the_model_when_asked_and_warns_about_the_change():
    model = timm.create_model('resnet18')
    converted = convert_to_rc(model, return_report=False)
    assert converted is model and isinstance(model.rc_conversion, timm_rc.RCConversion)
    assert model.rc_conversion.params_after == sum(p.numel() for p in model.parameters())
    assert converted(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.warns(FutureWarning, match=r'returns the converted model from timm_rc 0\.4.*return_report=False'):
        report = convert_to_rc(timm.create_model('resnet18'))
    assert isinstance(report, timm_rc.RCConversion) and report.runs
