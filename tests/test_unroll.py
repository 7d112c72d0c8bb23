""" The generic unroll / bn_sharing wrapper on timm's, torchvision's and a user's own blocks. """
import copy
import io
import pickle

import pytest
import torch

import timm_rc
from safetensors.torch import load_file, save_file
from timm.models.resnet import BasicBlock as TimmBasic, Bottleneck as TimmBottleneck
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import BasicBlock as TvBasic, Bottleneck as TvBottleneck

from timm_rc import BN_SHARING, InvertibleDownsample, PreActBasicBlock, unroll

C = 8  # channels: narrow blocks keep the suite fast


class MLPBlock(nn.Module):
    """ A user's own 1-D residual block with BatchNorm1d and an in-place add. """

    def __init__(self, dim=C):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.norm = nn.BatchNorm1d(2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), 0.5))  # held by the container itself

    def forward(self, x):
        y = self.fc2(torch.relu(self.norm(self.fc1(x))))
        return y.mul_(self.scale).add_(x)


BLOCKS = {
    'timm_basic': (lambda: TimmBasic(C, C), (4, C, 6, 6)),
    'timm_bottleneck': (lambda: TimmBottleneck(4 * C, C), (4, 4 * C, 6, 6)),
    'tv_basic': (lambda: TvBasic(C, C), (4, C, 6, 6)),
    'tv_bottleneck': (lambda: TvBottleneck(4 * C, C), (4, 4 * C, 6, 6)),
    'preact': (lambda: PreActBasicBlock(C), (4, C, 6, 6)),
    'mlp_bn1d': (lambda: MLPBlock(), (16, C)),
}


def make_block(kind, seed=0):
    torch.manual_seed(seed)
    factory, shape = BLOCKS[kind]
    block = factory()
    # non-trivial BN state, so that copies and sharing are visible in the numbers
    for m in block.modules():
        if isinstance(m, _BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return block, torch.randn(shape, generator=torch.Generator().manual_seed(1))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def n_bn_params(module):
    return sum(p.numel() for m in module.modules() if isinstance(m, _BatchNorm) for p in m.parameters())


def bns(module):
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize('kind', BLOCKS)
@pytest.mark.parametrize('steps', [1, 3])
def test_param_count(kind, steps):
    expected = {}
    for mode in BN_SHARING:
        block, _ = make_block(kind)
        base, base_bn = n_params(block), n_bn_params(block)
        expected[mode] = {
            'independent': base + (steps - 1) * base_bn,
            'shared': base,
            'none': base - base_bn,
        }[mode]
        assert n_params(unroll(block, steps, bn_sharing=mode)) == expected[mode]


@pytest.mark.parametrize('kind', BLOCKS)
def test_one_step_is_the_block(kind):
    block, x = make_block(kind)
    ref = copy.deepcopy(block)
    rc = unroll(block, 1)
    for train in (True, False):
        rc.train(train), ref.train(train)
        torch.testing.assert_close(rc(x.clone()), ref(x.clone()), rtol=0, atol=0)


@pytest.mark.parametrize('kind', BLOCKS)
def test_independent_equals_fresh_bn_copies_per_step(kind):
    """ Step i of the wrapper computes what a fresh copy of the block computes on h_i, and keeps
    exactly that copy's running statistics. """
    steps = 3
    block, x = make_block(kind)
    refs = [copy.deepcopy(block) for _ in range(steps)]
    rc = unroll(block, steps).train()
    out = rc(x.clone())
    h = x.clone()
    for ref in refs:
        h = ref.train()(h)
    torch.testing.assert_close(out, h)
    for i, ref in enumerate(refs):
        for bn_rc, bn_ref in zip(bns(rc.steps[i]), bns(ref)):
            torch.testing.assert_close(bn_rc.running_mean, bn_ref.running_mean)
            torch.testing.assert_close(bn_rc.running_var, bn_ref.running_var)
            assert bn_rc.num_batches_tracked.item() == 1
    # the steps saw different inputs, so their statistics differ
    assert not torch.allclose(bns(rc.steps[0])[0].running_mean, bns(rc.steps[1])[0].running_mean)
    # and in eval mode each step normalises with its own statistics
    rc.eval()
    h = x.clone()
    for ref in refs:
        h = ref.eval()(h)
    torch.testing.assert_close(rc(x.clone()), h)


@pytest.mark.parametrize('kind', BLOCKS)
def test_shared_bn_is_the_block_applied_k_times(kind):
    steps = 3
    block, x = make_block(kind)
    ref = copy.deepcopy(block).train()
    rc = unroll(block, steps, bn_sharing='shared').train()
    h = x.clone()
    for _ in range(steps):
        h = ref(h)
    torch.testing.assert_close(rc(x.clone()), h)
    assert len(bns(rc)) == len(bns(ref))
    for bn_rc, bn_ref in zip(bns(rc), bns(ref)):
        torch.testing.assert_close(bn_rc.running_mean, bn_ref.running_mean)
        assert bn_rc.num_batches_tracked.item() == steps


@pytest.mark.parametrize('kind', BLOCKS)
def test_no_bn(kind):
    """ Without BN the block is its convolutions and activations, applied k times; the reference
    runs every activation out of place, so an in-place op that clobbers a shortcut shows up. """
    block, x = make_block(kind)
    ref = copy.deepcopy(block)
    for name, m in list(ref.named_modules()):
        if hasattr(m, 'inplace'):
            m.inplace = False
        for cname, child in list(m.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(m, cname, nn.Identity())
    rc = unroll(block, 2, bn_sharing='none')
    assert not bns(rc)
    x = x.requires_grad_()
    out = rc(x * 1)
    torch.testing.assert_close(out, ref(ref(x * 1)))
    out.sum().backward()  # no in-place op broke autograd
    assert x.grad is not None


@pytest.mark.parametrize('kind', BLOCKS)
def test_gradients_reach_shared_weights_and_every_step_bn(kind):
    """ The shared weights' gradient is the sum of what each step contributes. """
    steps = 3
    block, x = make_block(kind)
    refs = [copy.deepcopy(block).train() for _ in range(steps)]
    rc = unroll(block, steps).train()
    rc(x.clone()).square().sum().backward()
    h = x.clone()
    for ref in refs:
        h = ref(h)
    h.square().sum().backward()
    for name, p in rc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in rc.steps[0].named_parameters():
        if not any(name.startswith(n + '.') for n, m in rc.steps[0].named_modules() if isinstance(m, _BatchNorm)):
            expected = sum(dict(ref.named_parameters())[name].grad for ref in refs)
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5)
    for i in range(steps):
        for bn_rc, bn_ref in zip(bns(rc.steps[i]), bns(refs[i])):
            torch.testing.assert_close(bn_rc.weight.grad, bn_ref.weight.grad, rtol=1e-4, atol=1e-5)


def _storage_ptrs(state_dict):
    return [t.untyped_storage().data_ptr() for t in state_dict.values() if t.numel()]


@pytest.mark.parametrize('mode', BN_SHARING)
def test_state_dict_lists_each_tensor_once_and_round_trips(mode, tmp_path):
    steps = 4
    block, x = make_block('timm_basic')
    n_bn_state = sum(t.numel() for m in bns(block) for t in m.state_dict().values())
    n_state = sum(t.numel() for t in block.state_dict().values())
    rc = unroll(block, steps, bn_sharing=mode).train()
    rc(x)  # move the running statistics away from their initial values
    sd = rc.state_dict()
    ptrs = _storage_ptrs(sd)
    assert len(ptrs) == len(set(ptrs)), 'aliased tensors in state_dict'
    expected = {'independent': n_state + (steps - 1) * n_bn_state, 'shared': n_state,
                'none': n_state - n_bn_state}[mode]
    assert sum(t.numel() for t in sd.values()) == expected
    assert all(k.startswith('steps.0.') for k in sd if 'conv' in k)

    path = tmp_path / 'rc.safetensors'
    save_file(sd, str(path))
    fresh = unroll(make_block('timm_basic', seed=5)[0], steps, bn_sharing=mode)
    result = fresh.load_state_dict(load_file(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    rc.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), rc(x), rtol=0, atol=0)
    assert fresh.steps[-1].conv1.weight is fresh.steps[0].conv1.weight


def test_safetensors_file_size_reflects_sharing(tmp_path):
    """ RC-4 of a block costs the block plus 3 extra sets of BN state, not 4 blocks. """
    block, _ = make_block('timm_basic')
    bn_bytes = sum(t.numel() * t.element_size() for m in bns(block) for t in m.state_dict().values())
    save_file(block.state_dict(), str(tmp_path / 'block.safetensors'))
    save_file(unroll(block, 4).state_dict(), str(tmp_path / 'rc.safetensors'))
    block_size = (tmp_path / 'block.safetensors').stat().st_size
    rc_size = (tmp_path / 'rc.safetensors').stat().st_size
    header_slack = 4096  # the JSON header grows with the number of keys
    assert block_size + 3 * bn_bytes <= rc_size <= block_size + 3 * bn_bytes + header_slack


@pytest.mark.parametrize('mode', BN_SHARING)
def test_deepcopy_pickle_and_to_keep_the_sharing(mode):
    block, x = make_block('tv_basic')
    rc = unroll(block, 3, bn_sharing=mode).eval()
    expected = rc(x)
    for other in (copy.deepcopy(rc), pickle.loads(pickle.dumps(rc))):
        assert other.steps[2].conv1.weight is other.steps[0].conv1.weight
        assert other.steps[2].conv1.weight is not rc.steps[0].conv1.weight
        assert n_params(other) == n_params(rc)
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        buf = io.BytesIO()
        torch.save(other.state_dict(), buf)
    rc.to(torch.float64)
    assert rc.steps[2].conv1.weight is rc.steps[0].conv1.weight
    assert rc.steps[2].conv1.weight.dtype == torch.float64
    torch.testing.assert_close(rc(x.double()).float(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', ['independent', 'shared'])
def test_sync_batchnorm_conversion(mode):
    block, _ = make_block('timm_bottleneck')
    rc = unroll(block, 3, bn_sharing=mode)
    count = n_params(rc)
    n_bn = len(bns(rc))
    rc = nn.SyncBatchNorm.convert_sync_batchnorm(rc)
    assert all(isinstance(m, nn.SyncBatchNorm) for m in bns(rc)) and len(bns(rc)) == n_bn
    assert n_params(rc) == count
    assert rc.steps[2].conv1 is rc.steps[0].conv1
    assert (rc.steps[2].bn1 is rc.steps[0].bn1) == (mode == 'shared')


def test_unshared_weights_are_independent_and_freshly_initialised():
    block, _ = make_block('timm_basic')
    n = n_params(block)
    rc = unroll(block, 3, share_weights=False)
    assert n_params(rc) == 3 * n
    w = [s.conv1.weight for s in rc.steps]
    assert w[1] is not w[0] and not torch.equal(w[1], w[0]) and not torch.equal(w[2], w[1])


def test_before_step_runs_between_steps():
    block = PreActBasicBlock(C)
    rc = unroll(block, 4, before_step={2: nn.AvgPool2d(2)})
    out = rc(torch.randn(2, C, 8, 8))
    assert out.shape == (2, C, 4, 4)
    assert isinstance(rc.before_step[2], nn.AvgPool2d)
    assert all(isinstance(rc.before_step[i], nn.Identity) for i in (0, 1, 3))


@pytest.mark.parametrize('mode', BN_SHARING)
def test_torch_compile_fullgraph(mode):
    block, x = make_block('timm_basic')
    rc = unroll(block, 3, bn_sharing=mode).train()
    ref = copy.deepcopy(rc)
    compiled = torch.compile(rc, fullgraph=True, backend='aot_eager')
    out = compiled(x.clone())
    out.sum().backward()
    out_ref = ref(x.clone())
    out_ref.sum().backward()
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(rc.steps[0].conv1.weight.grad, ref.steps[0].conv1.weight.grad)


def test_torchscript():
    block, x = make_block('preact')
    rc = unroll(block, 3, before_step={1: nn.AvgPool2d(2)}).eval()
    torch.testing.assert_close(torch.jit.script(rc)(x), rc(x))


# ---- errors ---------------------------------------------------------------------------------


def test_block_with_downsample_is_rejected():
    down = nn.Sequential(nn.Conv2d(C, 2 * C, 1, stride=2, bias=False), nn.BatchNorm2d(2 * C))
    with pytest.raises(ValueError) as e:
        unroll(TimmBasic(C, 2 * C, stride=2, downsample=down), 2)
    assert str(e.value) == (
        'unroll() needs a shape-preserving block with an identity shortcut, but this BasicBlock has a '
        'downsample shortcut (Sequential(Conv2d, BatchNorm2d)): it was built with a stride or a change of '
        'channels. Unroll a block built with stride 1 and as many output as input channels (its downsample '
        'then is None or nn.Identity).')


def test_real_downsampling_regnet_block_is_rejected():
    from timm.models.regnet import Bottleneck as RegNetBottleneck
    with pytest.raises(ValueError, match=r'this Bottleneck has a downsample shortcut \(ConvNormAct\(Conv2d, '):
        unroll(RegNetBottleneck(C, 2 * C, stride=2), 2)
    with pytest.raises(ValueError, match=r'downsample shortcut \(True\)'):
        unroll(_FlagBlock(True), 2)


class _FlagBlock(nn.Module):
    """ A block whose `downsample` is a flag (as timm's CSATv2 TransformerBlock's). """

    def __init__(self, downsample):
        super().__init__()
        self.downsample = downsample
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return x + self.bn(self.conv(x))


def _regnet_block():
    from timm.models.regnet import Bottleneck as RegNetBottleneck
    return RegNetBottleneck(2 * C, 2 * C, bottle_ratio=1.0, group_size=C, se_ratio=0.25)


def _dla_tree():
    from timm.models.dla import DlaBasic, DlaTree
    return DlaTree(1, DlaBasic, 2 * C, 2 * C, stride=1)


def _csat_block():
    from timm.models.csatv2 import TransformerBlock
    return TransformerBlock(2 * C, 2 * C, num_heads=2, attn_head_dim=C, downsample=False)


@pytest.mark.parametrize('factory', [
    _regnet_block,  # timm's RegNet: nn.Identity shortcut when in == out and stride 1
    _dla_tree,  # timm's DLA tree: downsample and project are nn.Identity
    _csat_block,  # timm's CSATv2: downsample=False, a flag
    lambda: _FlagBlock(nn.Sequential()),
    lambda: _FlagBlock(nn.Sequential(nn.Identity())),
], ids=['regnet_identity', 'dla_tree_identity', 'csatv2_false', 'empty_sequential', 'sequential_of_identity'])
def test_identity_downsample_is_not_a_downsample(factory):
    """ A block whose `downsample` leaves the shortcut as it is unrolls, and computes what
    fresh copies of it compute step by step. """
    torch.manual_seed(0)
    block = factory()
    x = torch.randn(2, C if isinstance(block, _FlagBlock) else 2 * C, 8, 8)
    refs = [copy.deepcopy(block) for _ in range(3)]
    rc = unroll(block, 3).train()
    h = x.clone()
    for ref in refs:
        h = ref.train()(h)
    torch.testing.assert_close(rc(x.clone()), h)
    assert rc(x).shape == x.shape


# ---- drop path per step ---------------------------------------------------------------------


@pytest.mark.parametrize('mode', BN_SHARING)
@pytest.mark.parametrize('kind', ['timm_basic', 'preact'])
def test_drop_path_per_step(mode, kind):
    """ Step i holds its own DropPath(rate_i) (None at rate 0) and computes what a fresh copy of
    the block built with that DropPath computes; the weights stay shared, the parameters, the
    state_dict and the aliases are those without drop path. """
    from timm.layers import DropPath
    rates = [0.0, 0.3, 0.6]
    block, x = make_block(kind)
    x = x.repeat(16, 1, 1, 1)  # 64 samples: a mask of every step is visible
    refs = [copy.deepcopy(block) for _ in rates]
    plain = unroll(copy.deepcopy(block), 3, bn_sharing=mode)
    rc = unroll(block, 3, bn_sharing=mode, drop_path=rates).train()
    assert [s.drop_path.drop_prob if s.drop_path is not None else 0.0 for s in rc.steps] == rates
    assert rc.steps[2].conv1.weight is rc.steps[0].conv1.weight
    assert n_params(rc) == n_params(plain)
    assert rc.state_dict().keys() == plain.state_dict().keys()
    assert rc.aliases() == plain.aliases()
    if mode == 'none':
        for ref in refs:
            for name, m in list(ref.named_modules()):
                for cname, child in list(m.named_children()):
                    if isinstance(child, _BatchNorm):
                        setattr(m, cname, nn.Identity())
    masks = []
    hooks = [s.drop_path.register_forward_hook(lambda m, i, o: masks.append((o == 0).flatten(1).all(1)))
             for s in rc.steps if s.drop_path is not None]
    torch.manual_seed(0)
    out = rc(x.clone())
    for h in hooks:
        h.remove()
    torch.manual_seed(0)
    h = x.clone()
    for ref, rate in zip(refs, rates):
        ref.drop_path = DropPath(rate) if rate else None
        if mode == 'shared':  # one set of BN layers serves every step
            for bn_ref, bn_0 in zip(bns(ref), bns(refs[0])):
                ref._modules.update({n: bn_0 for n, m in ref.named_children() if m is bn_ref})
        h = ref.train()(h)
    torch.testing.assert_close(out, h, rtol=0, atol=0)
    assert len(masks) == 2 and masks[0].any() and masks[1].any() and not torch.equal(masks[0], masks[1])


def test_drop_path_keeps_identity_convention_and_validates():
    from timm.layers import DropPath
    from timm.models.convnext import ConvNeXtBlock
    rc = unroll(ConvNeXtBlock(C, drop_path=0.1), 2, drop_path=[0.0, 0.2])  # calls drop_path unconditionally
    assert isinstance(rc.steps[0].drop_path, nn.Identity) and isinstance(rc.steps[1].drop_path, DropPath)
    assert rc(torch.randn(2, C, 8, 8)).shape == (2, C, 8, 8)
    assert all(isinstance(s.drop_path, DropPath) for s in unroll(PreActBasicBlock(C), 3, drop_path=0.1).steps)
    with pytest.raises(ValueError, match=r'drop_path must be a rate in \[0, 1\) or 3 of them \(one per step\), '
                                         r'got \[0.1, 0.2\]'):
        unroll(PreActBasicBlock(C), 3, drop_path=[0.1, 0.2])
    with pytest.raises(ValueError, match="but this MLPBlock has no `drop_path` attribute"):
        unroll(MLPBlock(), 2, drop_path=0.1)


def test_block_that_changes_shape_fails_at_forward_with_a_clear_message():
    strided = nn.Sequential(nn.Conv2d(C, C, 3, stride=2, padding=1), nn.BatchNorm2d(C))
    rc = unroll(strided, 2)
    with pytest.raises(ValueError, match=r'step 0 turned an input of shape \(2, 8, 8, 8\) into \(2, 8, 4, 4\)'):
        rc(torch.randn(2, C, 8, 8))


@pytest.mark.parametrize('steps', [0, -1, 1.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match='steps >= 1'):
        unroll(PreActBasicBlock(C), steps)


def test_bad_bn_sharing_lists_the_valid_values():
    valid = "'independent', 'shared', 'none'"
    with pytest.raises(ValueError, match=f"unknown bn_sharing 'per_step'; valid values: {valid}"):
        unroll(PreActBasicBlock(C), 2, bn_sharing='per_step')


def test_bad_before_step_index():
    with pytest.raises(ValueError, match=r'before_step keys must be step indices in \[0, 1\]'):
        unroll(PreActBasicBlock(C), 2, before_step={2: nn.AvgPool2d(2)})


def test_invertible_downsample_is_exactly_invertible():
    x = torch.randn(2, 3, 8, 6)
    down = InvertibleDownsample(2)
    y = down(x)
    assert y.shape == (2, 12, 4, 3)
    assert torch.equal(down.inverse(y), x)
    # channel 4c + 2i + j of the output holds pixel (2h + i, 2w + j) of input channel c
    assert torch.equal(y[:, 4 * 1 + 2 * 1 + 0], x[:, 1, 1::2, 0::2])


# ---- every norm layer follows bn_sharing (issue 17, item 3) ------------------------------------


class GroupNormBlock(nn.Module):
    """ A GroupNorm residual block (NFNet / GroupNorm-ResNet style). """

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.n1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c)
        self.conv2, self.n2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c)

    def forward(self, x):
        return torch.relu(x + self.n2(self.conv2(torch.relu(self.n1(self.conv1(x))))))


def _params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize('make,norm', [
    (lambda: GroupNormBlock(8), 32),  # two GroupNorm(2, 8): weight + bias each
    (lambda: __import__('timm').models.convnext.ConvNeXtBlock(8), 16),  # one LayerNorm(8)
    (lambda: __import__('timm').models.convnext.ConvNeXtBlock(8, conv_mlp=True), 16),  # one timm LayerNorm2d(8)
], ids=['groupnorm', 'convnext_layernorm', 'convnext_layernorm2d'])
def test_groupnorm_and_layernorm_follow_bn_sharing(make, norm):
    from timm_rc.layers import is_norm
    block = make()
    assert sum(p.numel() for m in block.modules() if is_norm(m) for p in m.parameters(recurse=False)) == norm
    counts = {s: _params(unroll(make(), 4, bn_sharing=s)) for s in BN_SHARING}
    assert counts['shared'] == _params(block)
    assert counts['independent'] == _params(block) + 3 * norm
    assert counts['none'] == _params(block) - norm
    cell = unroll(make(), 4, bn_sharing='independent')
    norms = [[m for m in step.modules() if is_norm(m)] for step in cell.steps]
    assert len({id(m) for ms in norms for m in ms}) == 4 * len(norms[0])  # each step its own norms
    assert cell.steps[0].state_dict().keys() == cell.steps[3].state_dict().keys()
    x = torch.randn(2, 8, 6, 6)
    assert cell(x).shape == x.shape
    none = unroll(make(), 4, bn_sharing='none')
    assert not any(is_norm(m) for m in none.modules())


def test_a_norm_layer_unroll_does_not_know_is_refused():
    class MyNorm(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(c))

        def forward(self, x):
            return x / x.std() * self.scale[:, None, None]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), MyNorm(4)

        def forward(self, x):
            return x + self.norm(self.conv(x))

    with pytest.raises(ValueError, match=r"unroll\(\) does not know the norm layer\(s\) norm \(MyNorm\): bn_sharing "
                                         r"gives each step its own copy"):
        unroll(Block(), 2)
    from timm_rc.layers import NORM_LAYERS, register_norm_layer
    register_norm_layer(MyNorm)
    try:
        assert _params(unroll(Block(), 3)) == _params(Block()) + 2 * 4
    finally:
        NORM_LAYERS.remove(MyNorm)


def test_none_keeps_the_activation_of_a_norm_act_layer():
    from timm.layers import BatchNormAct2d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), BatchNormAct2d(4, act_layer=nn.ReLU)

        def forward(self, x):
            return x + self.bn(self.conv(x))

    cell = unroll(Block(), 2, bn_sharing='none')
    assert isinstance(cell.steps[0].bn, nn.ReLU)
    block = Block().eval()
    x = torch.randn(1, 4, 5, 5)
    ref = x + torch.relu(block.conv(x))
    cell = unroll(block, 1, bn_sharing='none')
    assert torch.equal(cell(x), ref)


def test_convert_to_rc_gives_each_step_its_blocks_groupnorm():
    blocks = [GroupNormBlock(8) for _ in range(3)]
    for i, b in enumerate(blocks):
        nn.init.constant_(b.n1.weight, float(i + 1))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *blocks)
    before = _params(model)
    report = timm_rc.convert_to_rc(model, input_size=(3, 8, 8), return_report=True)
    cell = model[1]
    assert [float(step.n1.weight[0]) for step in cell.steps] == [1.0, 2.0, 3.0]
    conv = 2 * 8 * 8 * 9
    assert report.params_after == before - 2 * conv


def test_unshared_weights_do_not_load_into_a_shared_cell():
    """ The ResNet-18 graph's weights once loaded into RC-4 without an error, each step's copy overwriting the
    shared tensor (the last step's won); now it is an error naming the cure. A shared cell's own state_dict,
    and one that lists the aliases with the same values, still load. """
    import timm
    unshared = timm.create_model('rc4_unshared_cifar', width=4)
    shared = timm.create_model('rc4_cifar', width=4)
    with pytest.raises(RuntimeError, match=r'6 tensor\(s\) such as cell1.steps.1.conv1.weight hold other values than '
                                           r'the weights that cell1 shares across its steps .* convert them with '
                                           r'timm_rc.convert_to_rc'):
        shared.load_state_dict(unshared.state_dict())
    other = timm.create_model('rc4_cifar', width=4)
    other.load_state_dict(shared.state_dict())
    full = dict(shared.state_dict())
    full['cell1.steps.2.conv1.weight'] = full['cell1.steps.0.conv1.weight'].clone()
    other.load_state_dict(full)
    assert torch.equal(other.cell1.steps[2].conv1.weight, shared.cell1.steps[0].conv1.weight)
