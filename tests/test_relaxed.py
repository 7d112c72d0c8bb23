""" Relaxed sharing: per-step low-rank corrections (unroll's rank), from scratch and from a trained network. """
import copy

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.resnet import BasicBlock

import timm_rc
from timm_rc import merge_corrections
from timm_rc.layers import LowRankCorrected

RC4_W8 = 20_786  # rc4_cifar at width 8


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def _random_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize('rank', [1, 2, 4, 8, 32])
def test_rc4_parameter_count_is_the_formula(rank):
    # a 3x3 conv C -> C gets r (9 C + C) per step, r capped at C (its full rank min(C, 9 C));
    # 2 convs x 4 steps in cell 1 (C = 8) and in cell 2 (C = 32)
    model = timm.create_model('rc4_cifar', width=8, rank=rank)
    extra = sum(2 * 4 * min(rank, c) * (9 * c + c) for c in (8, 32))
    assert n_params(model) == RC4_W8 + extra
    assert {1: 23_986, 2: 27_186, 4: 33_586}.get(rank, n_params(model)) == n_params(model)


def test_converted_timm_resnet_parameter_count():
    base = n_params(timm.create_model('rc_resnet18'))
    # layer1 of resnet18: 2 identical BasicBlocks of 64 channels -> 1 cell of 2 steps, 2 convs per step
    for rank in (1, 3):
        assert n_params(timm.create_model('rc_resnet18', rank=rank)) == base + 2 * 2 * rank * (9 * 64 + 64)


def test_rank_zero_is_bit_identical_to_strict_sharing():
    torch.manual_seed(0)
    ref = timm.create_model('rc4_cifar', width=4).eval()
    for rank in (0, None):
        torch.manual_seed(0)
        model = timm.create_model('rc4_cifar', width=4, **({} if rank is None else {'rank': rank})).eval()
        a, b = ref.state_dict(), model.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(ref(x), model(x))


def test_from_scratch_the_corrections_start_at_zero():
    torch.manual_seed(0)
    relaxed = _random_bn(timm.create_model('rc4_cifar', width=4, rank=2)).eval()
    assert all(not m.lora_b.weight.any() for m in relaxed.modules() if isinstance(m, LowRankCorrected))
    # the strictly shared network with the same shared weights computes the same
    strict = timm.create_model('rc4_cifar', width=4).eval()
    strict.load_state_dict({k.replace('.base.', '.'): v for k, v in relaxed.state_dict().items() if 'lora_' not in k})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(relaxed(x), strict(x), rtol=0, atol=0)


def test_the_base_weight_is_one_tensor_in_the_state_dict_and_the_file(tmp_path):
    model = timm.create_model('rc4_cifar', width=4, rank=2)
    sd = model.state_dict()
    base = [k for k in sd if k.endswith('.base.weight')]
    # one shared weight per conv of each cell's block (2 convs x 2 cells), each under steps.0
    assert len(base) == 4 and all('.steps.0.' in k for k in base)
    # every step has its own correction
    assert sum(k.endswith('lora_a.weight') for k in sd) == 2 * 2 * 4
    save_file(sd, str(tmp_path / 'm.safetensors'))
    assert sorted(load_file(str(tmp_path / 'm.safetensors'))) == sorted(sd)
    again = timm.create_model('rc4_cifar', width=4, rank=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'm.safetensors')))
    shared = [m.base for m in again.cell1.modules() if isinstance(m, LowRankCorrected)]
    assert len({id(m) for m in shared}) == 2  # conv1 and conv2, each the same module in the 4 steps


def test_full_rank_conversion_gives_the_original_network_back_and_error_falls_with_rank():
    torch.manual_seed(0)
    src = _random_bn(timm.create_model('rc4_unshared_cifar', width=4)).eval()
    original = src.state_dict()
    convs = [k for k in original if '.conv' in k and k.endswith('weight')]
    x = torch.randn(4, 3, 32, 32)
    ref = src(x)
    for init in ('first', 'average'):
        errors = []
        for rank in (1, 2, 4, 8, 16):  # 16: the full rank of cell 2's convs (cell 1's is 4)
            model = copy.deepcopy(src)
            report = timm_rc.convert_to_rc(model, init=init, rank=rank, return_report=True)
            assert report.rank == rank and model.rank == rank and model.share_weights
            model.eval()
            if rank == 16:
                torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
            # the per-step weights the corrections give, against each block's own
            merged = merge_corrections(copy.deepcopy(model)).state_dict()
            errors.append(sum((merged[k] - original[k]).norm() ** 2 for k in convs).sqrt().item())
        assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)
        assert errors[-1] < 1e-5 * errors[0]


def test_svd_initialisation_is_the_truncated_svd():
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=False)
    layer = LowRankCorrected(conv, 2)
    delta = torch.randn(5, 6, 3, 3)
    layer.set_delta(delta)
    u, s, vh = torch.linalg.svd(delta.reshape(5, -1).double())
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(layer.delta_weight().double().reshape(5, -1), best, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 6, 7, 7)
    expected = torch.nn.functional.conv2d(x, conv.weight + layer.delta_weight(), padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_set_steps_uses_the_corrections_of_the_trained_steps_and_restores_the_trained_cell():
    torch.manual_seed(0)
    model = timm.create_model('rc4_cifar', width=4, rank=2).eval()
    for m in model.modules():
        if isinstance(m, LowRankCorrected):
            torch.nn.init.normal_(m.lora_b.weight)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model.set_steps(2)  # 'spread': trained steps 0 and 3 serve
    executed = [step for _, step in model.cell1.executed()]
    assert executed == [model.cell1.steps[0], model.cell1.steps[3]]
    assert executed[1].conv1.lora_a is model.cell1.steps[3].conv1.lora_a
    model(x)
    model.set_steps(4)
    assert torch.equal(model(x), ref)


def test_gradients_reach_the_base_weight_and_every_steps_correction():
    torch.manual_seed(0)
    model = timm.create_model('rc4_cifar', width=4, rank=2)
    for m in model.modules():  # off zero, so that A gets a gradient too
        if isinstance(m, LowRankCorrected):
            torch.nn.init.normal_(m.lora_b.weight, std=0.1)
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean().backward()
    layers = [m for m in model.modules() if isinstance(m, LowRankCorrected)]
    assert len(layers) == 2 * 2 * 4
    for m in layers:
        assert m.base.weight.grad is not None and m.base.weight.grad.abs().sum() > 0
        assert m.lora_a.weight.grad.abs().sum() > 0 and m.lora_b.weight.grad.abs().sum() > 0


def test_merge_folds_the_corrections_into_the_unshared_network():
    torch.manual_seed(0)
    model = _random_bn(timm.create_model('rc4_cifar', width=4, rank=2)).eval()
    for m in model.modules():
        if isinstance(m, LowRankCorrected):
            torch.nn.init.normal_(m.lora_b.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    merge_corrections(model)
    assert not any(isinstance(m, LowRankCorrected) for m in model.modules())
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    plain = timm.create_model('rc4_unshared_cifar', width=4).eval()
    plain.load_state_dict(model.state_dict())  # strict: the unshared network's keys
    torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-5)


def test_unroll_with_rank_on_a_timm_block_and_bn_groups():
    block = BasicBlock(8, 8)
    cell = timm_rc.unroll(block, 3, rank=2)
    assert n_params(cell) == 2 * 8 * 8 * 9 + 3 * 2 * 2 * 8 + 3 * 2 * 2 * (8 * 9 + 8)
    double = timm.create_model('rc4_cifar', width=4, rank=1, bn_sharing='double')
    # the BN groups of cell 2 share each step's correction
    steps = double.cell2.steps
    assert steps[0].conv1.lora_a is steps[4].conv1.lora_a and steps[0].conv1.lora_a is not steps[1].conv1.lora_a


@pytest.mark.parametrize('call,match', [
    (lambda: timm.create_model('rc4_unshared_cifar', width=4, rank=2), 'unshared weights'),
    (lambda: timm.create_model('rc4_cifar', width=4, rank=-1), 'rank must be an int >= 0'),
    (lambda: timm_rc.unroll(BasicBlock(4, 4), 2, rank=1.5), 'rank >= 0'),
    (lambda: timm_rc.unroll(BasicBlock(4, 4), 2, share_weights=False, rank=1), 'drop rank'),
])
def test_bad_ranks(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_timm_contract_with_corrections():
    model = timm.create_model('rc4_cifar', width=4, rank=2).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert len(inter) == 2 * 4 + 1  # the stem and every step
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))
    fo = timm.create_model('rc4_cifar', width=4, rank=2, features_only=True)
    assert [f.shape[1] for f in fo(x)] == [4, 4, 16]
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    sampled = timm.create_model('rc4_cifar', width=4, rank=1, drop_path_rate=0.2).train()
    sampled.set_steps(3)
    sampled(x).sum().backward()
