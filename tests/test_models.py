""" The registered RC networks: exact paper parameter counts and timm's model contract. """
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
    pre = timm.create_model('rc2_cifar', width=WIDTH)
    post = timm.create_model('rc2_cifar', width=WIDTH, block='postact')
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
