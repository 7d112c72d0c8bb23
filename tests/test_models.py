""" The registered RC networks: exact paper parameter counts and timm's model contract. """
import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.resnet import BasicBlock
from torch import nn

import timm_rc
from timm_rc import PreActBasicBlock

MODELS = timm.list_models(module='rc_cifar')
WIDTH = 4  # tests use narrow models; full width only where the paper's numbers are checked

# the paper's table (paper-notes.md): exact counts with 10 classes, +23,130 with 100
PAPER_PARAMS = {
    'rc1_cifar': 1_259_082,
    'rc2_cifar': 1_260_362,
    'rc4_cifar': 1_262_922,
    'rc2_unshared_cifar': 2_513_738,  # the paper's ResNet-10
    'rc4_unshared_cifar': 5_023_050,  # the paper's ResNet-18
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_paper_models():
    assert sorted(MODELS) == sorted(PAPER_PARAMS)
    assert timm.list_models('rc4_cifar', include_tags=True) == ['rc4_cifar.cifar10', 'rc4_cifar.cifar100']


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('num_classes', [10, 100])
def test_exact_paper_param_counts(name, num_classes):
    model = timm.create_model(name, num_classes=num_classes, device='meta')
    assert n_params(model) == PAPER_PARAMS[name] + (23_130 if num_classes == 100 else 0)


@pytest.mark.parametrize('bn_sharing,expected', [
    ('independent', 1_262_922),
    ('shared', 1_259_082),  # RC-1's count
    ('none', 1_255_104 + 2_570 + 128),  # the stem keeps its BN
])
def test_rc4_bn_variants(bn_sharing, expected):
    assert n_params(timm.create_model('rc4_cifar', bn_sharing=bn_sharing, device='meta')) == expected


@pytest.mark.parametrize('steps,pool_index', [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (8, 4)])
def test_avgpool_sits_before_step_floor_k_over_2_plus_1(steps, pool_index):
    model = timm.create_model('rc4_cifar', steps=steps, width=WIDTH)
    for cell in (model.cell1, model.cell2):
        assert cell.num_steps == steps
        kinds = [type(m) for m in cell.before_step]
        assert kinds == [nn.AvgPool2d if i == pool_index else nn.Identity for i in range(steps)]
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 4 * WIDTH, 4, 4)


def test_block_styles():
    post = timm.create_model('rc2_cifar', width=WIDTH)  # the default, chosen by experiment (README)
    pre = timm.create_model('rc2_cifar', width=WIDTH, block='preact')
    assert isinstance(pre.cell1.steps[0], PreActBasicBlock)
    assert isinstance(post.cell1.steps[0], BasicBlock)
    assert n_params(pre) == n_params(post)


@pytest.mark.parametrize('kwargs,match', [
    (dict(block='bottleneck'), "unknown block 'bottleneck'; valid values: 'preact', 'postact'"),
    (dict(bn_sharing='global'), "unknown bn_sharing 'global'; valid values: 'independent', 'shared', 'none'"),
    (dict(steps=0), 'steps must be an int >= 1, got 0'),
    (dict(width=0), 'width must be an int >= 1, got 0'),
])
def test_bad_model_kwargs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('rc4_cifar', **kwargs)


def test_unknown_model_kwarg_is_a_type_error():
    with pytest.raises(TypeError):
        timm.create_model('rc4_cifar', not_a_model_arg=1)


@pytest.mark.parametrize('name,kwargs,mean', [
    ('rc4_cifar', {'widht': 8}, 'width'),
    ('rc4_cifar.cifar100', {'bn_shraing': 'none'}, 'bn_sharing'),
    ('rc_resnet18', {'stpes': 2}, 'steps'),       # an RC option of the wrapper, not of timm's ResNet
    ('resnet18', {'nmu_classes': 3}, 'num_classes'),
])
def test_a_misspelled_model_kwarg_names_the_valid_keys(name, kwargs, mean):
    """ The message named the bad key only; it now gives the closest valid key and all of them (the model
    class's and the entrypoint's: timm_rc's RC options for an rc_* wrapper of a timm family). """
    from timm_rc.errors import UserError
    from timm_rc.models.create import create_model, model_kwarg_names
    (bad,) = kwargs
    with pytest.raises(UserError) as e:
        create_model(name, kwargs)
    text = str(e.value)
    assert f"got an unexpected keyword argument '{bad}'; did you mean '{mean}'? valid keys: " in text
    valid = text.split('valid keys: ')[1].split(', ')
    assert mean in valid and bad not in valid and valid == sorted(valid)
    if name.startswith('rc_'):
        assert {'bn_sharing', 'steps', 'rank', 'init', 'layers'} <= set(model_kwarg_names(name, 'ResNet'))


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = timm.create_model(name, width=WIDTH, num_classes=7, drop_rate=0.1).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


@pytest.mark.parametrize('block', ['preact', 'postact'])
@pytest.mark.parametrize('bn_sharing', ['shared', 'none'])
def test_bn_variants_train(block, bn_sharing):
    model = timm.create_model('rc4_cifar', width=WIDTH, block=block, bn_sharing=bn_sharing).train()
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('name', MODELS)
def test_timm_contract(name):
    model = timm.create_model(name, width=WIDTH).eval()
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32) and cfg['num_classes'] == 10 == model.num_classes
    assert cfg['mean'] == (0.4914, 0.4822, 0.4465) and cfg['std'] == (0.2470, 0.2435, 0.2616)
    sd = model.state_dict()
    assert cfg['first_conv'] + '.weight' in sd and cfg['classifier'] + '.weight' in sd
    assert model.get_classifier() is model.fc
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, *cfg['pool_size'])
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(model.fc(pre), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and not model.fc.training
    model.reset_classifier(0, '')
    assert model(x).shape == feats.shape

    c100 = timm.create_model(name + '.cifar100', width=WIDTH)
    assert c100.num_classes == 100 and c100.pretrained_cfg['mean'] == (0.5071, 0.4865, 0.4409)


@pytest.mark.parametrize('name', ['rc1_cifar', 'rc4_cifar'])
def test_features_only(name):
    model = timm.create_model(name, width=WIDTH, features_only=True)
    feats = model(torch.randn(2, 3, 32, 32))
    assert [f.shape[1:] for f in feats] == [(WIDTH, 32, 32), (WIDTH, 16, 16), (4 * WIDTH, 4, 4)]
    assert model.feature_info.reduction() == [1, 2, 8]


@pytest.mark.parametrize('name', ['rc4_cifar', 'rc2_unshared_cifar'])
def test_pretrained_from_a_local_safetensors_file(name, tmp_path):
    src = timm.create_model(name, width=WIDTH, num_classes=100).train()
    src(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    src.eval()
    path = tmp_path / 'model.safetensors'
    save_file(src.state_dict(), str(path))
    # the '.cifar100' tag says the file has a 100-class head (timm drops a head whose size differs)
    dst = timm.create_model(
        name + '.cifar100', width=WIDTH, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_torchscript_matches_eager():
    model = timm.create_model('rc2_cifar', width=WIDTH).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_compile_fullgraph():
    model = timm.create_model('rc2_cifar', width=WIDTH).train()
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend='aot_eager')(x), ref)


def test_public_api():
    assert callable(timm_rc.unroll) and timm_rc.BN_SHARING == ('independent', 'shared', 'none')
    assert timm.is_model('rc4_cifar')


# ---- what timm users pass to every model ----------------------------------------------------


@pytest.mark.parametrize('block', ['preact', 'postact'])
@pytest.mark.parametrize('bn_sharing', ['independent', 'shared', 'none'])
def test_drop_path_rate_is_per_step_stochastic_depth(block, bn_sharing):
    kwargs = dict(width=WIDTH, block=block, bn_sharing=bn_sharing)
    torch.manual_seed(0)
    plain = timm.create_model('rc4_cifar', **kwargs)
    torch.manual_seed(0)
    model = timm.create_model('rc4_cifar', drop_path_rate=0.1, **kwargs)
    # timm's rule: linear from 0 at the first step of cell 1 to the rate at the last step of cell 2
    rates = [s.drop_path.drop_prob if s.drop_path is not None else 0.0
             for cell in (model.cell1, model.cell2) for s in cell.steps]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)], abs=1e-12)
    assert model.cell1.steps[0].drop_path is None
    # DropPath has no tensors: the same parameters, shared weights and file contents
    assert n_params(model) == n_params(plain)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert model.cell1.aliases() == plain.cell1.aliases() and model.cell2.aliases() == plain.cell2.aliases()
    assert model.cell1.steps[3].conv1.weight is model.cell1.steps[0].conv1.weight
    bn_first, bn_last = model.cell1.steps[0].bn1, model.cell1.steps[3].bn1
    assert (bn_last is bn_first) == (bn_sharing != 'independent')  # 'none': one shared nn.Identity
    assert isinstance(bn_last, nn.Identity) == (bn_sharing == 'none')
    x = torch.randn(4, 3, 32, 32)
    plain.eval(), model.eval()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # DropPath is the identity in eval
    plain.train(), model.train()
    torch.manual_seed(1)
    assert not torch.equal(model(x), plain(x))  # branches were dropped


@pytest.mark.parametrize('name', MODELS)
def test_drop_path_rate_zero_changes_nothing(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, width=WIDTH)
    torch.manual_seed(0)
    model = timm.create_model(name, width=WIDTH, drop_path_rate=0.0)
    assert all(s.drop_path is None for c in (model.cell1, model.cell2) for s in c.steps)
    assert [id(s) for s in model.cell1.steps].count(id(model.cell1.steps[0])) == \
        [id(s) for s in ref.cell1.steps].count(id(ref.cell1.steps[0]))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.train()(x), ref.train()(x), rtol=0, atol=0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(drop_block_rate=0.1), r'RCNet has no DropBlock \(drop_block_rate=0.1\); use drop_path_rate'),
    (dict(drop_path_rate=1.0), r'drop_path_rate must be in \[0, 1\), got 1.0'),
    (dict(global_pool=''), r"global_pool='' \(no pooling\) leaves a feature map .* pass num_classes=0"),
])
def test_timm_kwargs_refused_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('rc4_cifar', width=WIDTH, **kwargs)


def test_timm_kwargs_that_work():
    x = torch.randn(2, 1, 32, 32)
    model = timm.create_model('rc2_cifar', width=WIDTH, in_chans=1, num_classes=5, drop_block_rate=0.0).eval()
    assert model(x).shape == (2, 5) and model.conv1.in_channels == 1
    assert timm.create_model('rc2_cifar', width=WIDTH, global_pool='', num_classes=0)(
        torch.randn(2, 3, 32, 32)).shape == (2, 4 * WIDTH, 4, 4)
    # a pool that concatenates doubles the head's input: head_hidden_size follows
    model = timm.create_model('rc2_cifar', width=WIDTH, global_pool='catavgmax')
    assert model.head_hidden_size == 8 * WIDTH
    pre = model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True)
    assert pre.shape == (2, 8 * WIDTH)
    # layers by timm name, as timm's models take them
    model = timm.create_model('rc2_cifar', width=WIDTH, act_layer='silu', norm_layer='batchnorm2d')
    assert isinstance(model.act1, nn.SiLU) and isinstance(model.cell1.steps[0].act2, nn.SiLU)


@pytest.mark.parametrize('name', ['rc4_cifar', 'rc4_cifar.cifar100'])
def test_pretrained_without_a_file_says_where_weights_come_from(name):
    expected = (
        f"{name} has no published weights (its pretrained cfg has no url or hf_hub_id). Load a weights "
        f"file with timm.create_model('{name}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='model.safetensors')), or a training run's output with "
        f"timm.create_model('local-dir:<run folder>', pretrained=True); or pass pretrained=False.")
    with pytest.raises(RuntimeError) as e:
        timm.create_model(name, pretrained=True, width=WIDTH)
    assert str(e.value) == expected


def test_pretrained_from_a_run_folder(tmp_path):
    from timm.models import save_for_hf
    src = timm.create_model('rc2_cifar', width=WIDTH).eval()
    save_for_hf(src, str(tmp_path), model_args=dict(width=WIDTH), safe_serialization=True)
    dst = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ---- forward_intermediates / prune_intermediate_layers (timm's interface) --------------------


@pytest.mark.parametrize('name', MODELS)
def test_feature_info_has_the_stem_and_every_step(name):
    model = timm.create_model(name, width=WIDTH)
    k = model.steps
    info = model.feature_info
    assert len(info) == 1 + 2 * k
    pool = k // 2  # the AvgPool sits before this step
    assert [f['reduction'] for f in info] == [1] + [1 if i < pool else 2 for i in range(k)] + \
        [4 if i < pool else 8 for i in range(k)]
    assert [f['num_chs'] for f in info] == [WIDTH] * (1 + k) + [4 * WIDTH] * k
    assert [f['module'] for f in info] == ['act1'] + [f'cell1.steps.{i}' for i in range(k - 1)] + ['cell1'] + \
        [f'cell2.steps.{i}' for i in range(k - 1)] + ['cell2']


@pytest.mark.parametrize('name', MODELS)
def test_model_forward_intermediates(name):
    """ As timm's own test of the same name, plus the per-step values. """
    model = timm.create_model(name, width=WIDTH).eval()
    x = torch.randn(1, 3, 32, 32)
    output, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(intermediates) == len(info.channels()) >= 3
    for c, r, o in zip(info.channels(), info.reduction(), intermediates):
        assert o.shape == (1, c, 32 // r, 32 // r)
    torch.testing.assert_close(output, model.forward_features(x), rtol=0, atol=0)
    # every step's output, computed by hand
    h = model.act1(model.bn1(model.conv1(x)))
    expected = [h]
    for cell in (model.cell1, model.cell2):
        if cell is model.cell2:
            h = model.downsample(h)
        for pre, step in zip(cell.before_step, cell.steps):
            h = step(pre(h))
            expected.append(h)
    for o, e in zip(intermediates, expected):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    # indices: an int takes the last n, a list those given (negative from the end)
    last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [t.shape for t in last2] == [t.shape for t in intermediates[-2:]]
    picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    torch.testing.assert_close(picked[1], intermediates[-1], rtol=0, atol=0)
    final, taps = model.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close(final, intermediates[1], rtol=0, atol=0)


@pytest.mark.parametrize('name', MODELS)
def test_model_forward_intermediates_features(name):
    """ As timm's own test of the same name (features_only with the 'getter' extractor). """
    model = timm.create_model(name, width=WIDTH, features_only=True, feature_cls='getter').eval()
    outputs = model(torch.randn(1, 3, 32, 32))
    assert len(outputs) == len(model.feature_info.channels()) == 3
    for c, r, o in zip(model.feature_info.channels(), model.feature_info.reduction(), outputs):
        assert o.shape == (1, c, 32 // r, 32 // r)


@pytest.mark.parametrize('name', ['rc1_cifar', 'rc4_cifar', 'rc4_unshared_cifar'])
def test_prune_intermediate_layers(name):
    model = timm.create_model(name, width=WIDTH).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        last = len(taps) - 1
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([last], prune_head=False) == [last]
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=0)
    for i in range(last + 1):
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([i]) == [i]
        with torch.no_grad():
            torch.testing.assert_close(pruned.forward_features(x), taps[i], rtol=0, atol=0)
            torch.testing.assert_close(
                pruned.forward_intermediates(x, indices=[i], intermediates_only=True)[0], taps[i], rtol=0, atol=0)
        assert pruned.num_features == taps[i].shape[1] and pruned.num_classes == 0
        pruned.train().forward_features(x).sum().backward()
        assert all(p.grad is not None for p in pruned.parameters())  # what is left is used


def test_features_only_out_indices_take_steps():
    model = timm.create_model('rc4_cifar', width=WIDTH, features_only=True, out_indices=(1, 2, 3, 4))
    feats = model(torch.randn(2, 3, 32, 32))
    assert [f.shape[1:] for f in feats] == [(WIDTH, 32, 32), (WIDTH, 32, 32), (WIDTH, 16, 16), (WIDTH, 16, 16)]
    assert model.feature_info.reduction() == [1, 1, 2, 2]
