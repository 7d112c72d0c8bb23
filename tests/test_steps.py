""" Cost-adjustable RC (the extended version): running k' steps (`set_steps`), sampled-step training,
double independent BN, and `python -m timm_rc.eval --steps`. CPU only, width 4. """
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import timm_rc
from test_train import REPO, TINY, _subprocess_env, make_parquet, run, run_main
from timm_rc import PreActBasicBlock, flops_per_image, step_map, unroll
from timm_rc.cli.eval import main as eval_main
from timm_rc.train.bnstats import per_step_bn
from timm_rc.train.loop import draw_steps

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def rc(steps=4, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model('rc4_cifar', width=4, steps=steps, **kwargs).eval()
    for m in model.modules():  # non-trivial BN state, so that the choice of step shows in the outputs
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
    return model


# ---- set_steps ---------------------------------------------------------------------------------


def test_step_maps():
    assert step_map(2, 4, 'first') == [0, 1] and step_map(6, 4, 'first') == [0, 1, 2, 3, 3, 3]
    assert step_map(1, 4, 'spread') == [0] and step_map(2, 4, 'spread') == [0, 3]
    assert step_map(3, 4, 'spread') == [0, 2, 3] and step_map(8, 4, 'spread') == [0, 0, 1, 1, 2, 2, 3, 3]
    assert step_map(4, 4, 'spread') == step_map(4, 4, 'first') == [0, 1, 2, 3]
    assert step_map(2, 4, [3, 3]) == [3, 3]


@pytest.mark.parametrize('k', [1, 3, 6])
def test_set_steps_costs_exactly_the_k_step_graph(k):
    model = rc(4).set_steps(k)
    assert model.active_steps == (k, k) and model.cell1.active_steps == k
    assert flops_per_image(model) == flops_per_image(timm.create_model('rc4_cifar', width=4, steps=k))
    assert model(X).shape == (2, 10)
    # the AvgPool sits before step floor(k/2)+1 of each cell
    assert [bool(pres) for pres, _ in model.cell1.executed()] == [j == k // 2 for j in range(k)]
    assert len(model.feature_info) == 2 * k + 1


@pytest.mark.parametrize('policy', ['spread', 'first'])
def test_fewer_steps_is_the_k_step_network_with_the_mapped_steps(policy):
    """ RC-4 run 2 steps computes exactly what RC-2 computes with the weights of the mapped steps. """
    model = rc(4, bn_policy=policy).set_steps(2)
    small = timm.create_model('rc4_cifar', width=4, steps=2).eval()
    mapping = step_map(2, 4, policy)
    state = model.state_dict()
    for key, t in small.state_dict().items():
        cell, sub, *rest = key.split('.')
        source = key
        if cell in ('cell1', 'cell2') and sub == 'steps':
            j, rest = int(rest[0]), '.'.join(rest[1:])
            source = f'{cell}.steps.{mapping[j]}.{rest}'
            source = source if source in state else f'{cell}.steps.0.{rest}'  # shared convs: stored once
        t.copy_(state[source])
    assert torch.equal(small(X), model(X))


def test_set_steps_back_gives_the_very_same_outputs():
    model = rc(4)
    y = model(X)
    for k in (1, 3, 8, (2, 6)):
        assert not torch.equal(model.set_steps(k)(X), y)
    assert torch.equal(model.set_steps(4)(X), y)
    assert model.active_steps == (4, 4)
    # the state_dict never changes with the steps run
    assert model.state_dict().keys() == rc(4).set_steps(7).state_dict().keys()


def test_features_and_torchscript_after_set_steps():
    model = rc(4).set_steps(2)
    _, feats = model.forward_intermediates(X)
    assert [f.shape[-1] for f in feats] == [32, 32, 16, 8, 4]
    model.set_steps(4)
    scripted = torch.jit.script(model)  # a scripted network runs its trained steps
    assert torch.equal(scripted(X), model(X))
    with pytest.raises(ValueError, match=r'set_steps\(4\) first'):
        rc(4).set_steps(2).prune_intermediate_layers(2)


def test_unrolled_set_steps_on_any_block():
    cell = unroll(PreActBasicBlock(4), 4, before_step={2: nn.AvgPool2d(2)}).eval()
    x = torch.randn(2, 4, 8, 8)
    y = cell(x)
    assert cell.set_steps(2).step_map() == [0, 3] and cell(x).shape == (2, 4, 4, 4)
    assert cell.set_steps(8, 'first').step_map() == [0, 1, 2, 3, 3, 3, 3, 3]
    assert torch.equal(cell.set_steps(4)(x), y)


def test_set_steps_errors():
    unshared = timm.create_model('rc4_unshared_cifar', width=4)
    assert unshared.set_steps(2)(X).shape == (2, 10)  # fewer steps: a subset of its layers
    with pytest.raises(ValueError, match='unshared weights for 4 steps per cell and cannot run 5.*at most 4'):
        unshared.set_steps(5)
    cell = unroll(PreActBasicBlock(4), 2, share_weights=False)
    with pytest.raises(ValueError, match='unshared weights for 2 steps and cannot run 3.*at most 2'):
        cell.set_steps(3)
    with pytest.raises(ValueError, match="unknown bn_policy 'last'; valid values: 'first', 'spread'"):
        cell.set_steps(2, 'last')
    with pytest.raises(ValueError, match=r'needs 2 trained step indices in \[0, 1\]'):
        cell.set_steps(2, [0, 5])
    with pytest.raises(ValueError, match='steps >= 1'):
        cell.set_steps(0)
    with pytest.raises(ValueError, match=r'an int >= 1 \(both cells\) or a pair'):
        rc(4).set_steps((1, 2, 3))
    with pytest.raises(ValueError, match="unknown bn_policy 'x'; valid values: 'first', 'spread'"):
        timm.create_model('rc4_cifar', width=4, bn_policy='x')
    with pytest.raises(ValueError, match="bn_groups > 1 .* needs bn_sharing='independent'"):
        unroll(PreActBasicBlock(4), 2, bn_sharing='shared', bn_groups=2)


# ---- double independent BN ---------------------------------------------------------------------


def test_double_bn_groups_cell2_by_the_steps_of_cell1():
    model = rc(4, bn_sharing='double')
    single = rc(4)
    bn_params_per_step = 2 * 2 * 16  # cell 2: 2 BN layers x (gamma, beta) x 16 channels
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in single.parameters()) + 3 * 4 * bn_params_per_step
    keys = model.state_dict().keys()
    assert 'cell2.steps.15.bn1.weight' in keys and 'cell2.steps.15.conv1.weight' not in keys  # convs once
    assert 'cell1.steps.4.bn1.weight' not in keys
    # cell 1 run k1 steps -> cell 2 uses group k1 - 1, with the first k2 steps of it
    model.set_steps((2, 3))
    assert [s for _, s in model.cell2.plan] == [4, 5, 6] and model.cell2.bn_group == 1
    model.set_steps((6, 1))  # more steps than trained: the largest group
    assert [s for _, s in model.cell2.plan] == [12]
    assert torch.equal(model.set_steps(4)(X), rc(4, bn_sharing='double')(X))
    stats = per_step_bn(model)
    assert 'cell2.group3.step3.bn2.running_var' in stats and 'cell1.step3.bn1.weight' in stats
    assert len(stats) == (4 + 16) * 2 * 4


# ---- training with sampled step counts ---------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return make_parquet(tmp_path_factory.mktemp('tiny'))


@pytest.fixture(scope='module')
def sampled_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('sampled')
    summary = run(['--data_dir', str(tiny_data), '--epochs', '2', '--output_dir', str(out), '--sample_steps', '1,3',
                   '--sample_steps_cells', 'independent', '--model_kwargs.bn_sharing', 'double', *TINY])
    return out, summary


def test_sampled_run_draws_per_batch_and_saves_everything(sampled_run, tmp_path):
    out, summary = sampled_run
    assert summary['model_kwargs'] == {'width': 4, 'bn_sharing': 'double', 'steps': 3, 'bn_policy': 'first'}
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    drawn = [d for r in rows for d in r['train/steps_drawn'][0]]  # one list per process
    assert drawn == [draw_steps(0, s, 1, 3, cells=2) for s in range(12)]
    assert len({tuple(d) for d in drawn}) > 3  # several (k1, k2) pairs
    stats = load_file(str(out / 'bn_stats' / 'epoch_0002.safetensors'))
    assert 'cell2.group2.step2.bn1.running_mean' in stats and 'cell1.step2.bn2.weight' in stats
    from timm_rc.reports.figures import plot_bn
    names = sorted(p.name for p in plot_bn(out, out=tmp_path))
    assert 'bn_cell2.group0_bn1.png' in names and 'bn_cell1_bn1.png' in names and len(names) == 2 + 3 * 2
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.steps == 3 and model.bn_policy == 'first' and model.bn_sharing == 'double'


def test_sampled_run_killed_mid_epoch_resumes_bit_identically(tiny_data, tmp_path):
    ref, killed = tmp_path / 'ref', tmp_path / 'killed'
    argv = ['--data_dir', str(tiny_data), '--epochs', '2', '--max_train_samples', '64', '--sample_steps', '1,4', *TINY]
    run(argv + ['--output_dir', str(ref)])
    cmd = [sys.executable, str(REPO / 'train.py'), *argv, '--output_dir', str(killed)]
    p = subprocess.run(cmd, env=_subprocess_env(TIMM_RC_FAULT='step6'), capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]  # 4 steps per epoch: killed in the middle of epoch 2
    assert sorted(x.name for x in (killed / 'checkpoints').iterdir()) == ['epoch_0001']
    run(argv + ['--output_dir', str(killed), '--resume'])
    a, b = load_file(str(ref / 'model.safetensors')), load_file(str(killed / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drawn = [json.loads(line)['train/steps_drawn'] for line in (killed / 'metrics.jsonl').read_text().splitlines()]
    assert drawn == [json.loads(line)['train/steps_drawn'] for line in (ref / 'metrics.jsonl').read_text().splitlines()]


def test_two_processes_draw_the_same_steps(tmp_path):
    data = make_parquet(tmp_path / 'data', n_train=64, n_test=20)
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(REPO / 'train.py'), '--data_dir', str(data), '--epochs', '1', '--output_dir', str(out),
           '--sample_steps', '1,4', *TINY]
    p = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads((out / 'metrics.jsonl').read_text().splitlines()[0])
    rank0, rank1 = row['train/steps_drawn']
    assert rank0 == rank1 == [draw_steps(0, s, 1, 4)[0] for s in range(4)]
    assert json.loads((out / 'summary.json').read_text())['num_processes'] == 2


@pytest.mark.parametrize('argv, message', [
    (['--model_kwargs.bn_sharing', 'double'], "bn_sharing 'double' keeps cell 2's BN layers per step count of cell 1"),
    (['--sample_steps', '1,4', '--model_kwargs.steps', '2'], 'builds the model with BN layers for its largest count, '
                                                            'steps=4, but model_kwargs sets steps=2'),
    (['--sample_steps', '1,4', '--model', 'resnet10t', '--model_kwargs', '{"num_classes": 10}'],
     'sample_steps needs an RC network'),
    (['--sample_steps', '4,1'], "'sample_steps' takes [min, max] with 1 <= min <= max"),
])
def test_bad_sampling_settings_exit_2(argv, message, tiny_data, tmp_path, capsys):
    code, err = run_main(['--data_dir', str(tiny_data), '--output_dir', str(tmp_path / 'x'), *TINY, *argv], capsys)
    assert code == 2 and message in err, err


# ---- python -m timm_rc.eval --steps ------------------------------------------------------------


def test_eval_over_steps_rows_flops_and_plot(sampled_run, tiny_data, tmp_path, capsys):
    out, summary = sampled_run
    plain = tmp_path / 'plain'
    run(['--data_dir', str(tiny_data), '--epochs', '1', '--max_train_samples', '32', '--output_dir', str(plain), *TINY])
    png = tmp_path / 'steps.png'
    capsys.readouterr()
    reports = eval_main([str(out), str(plain), '--steps', '1,2,3,4', '--plot', str(png), '--json'])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(reports))
    double, rc4 = reports
    assert [r['steps'] for r in double['steps']] == [1, 2, 3, 4] and double['trained_steps'] == 3
    assert double['bn_policy'] == 'first' and rc4['bn_policy'] == 'spread'
    for r in double['steps']:
        assert r['flops_per_image'] == flops_per_image(timm.create_model('rc4_cifar', width=4, steps=r['steps']))
        assert r['examples'] == 40 and 0 <= r['top1_error'] <= 100
    # at its trained steps, exactly the error the trainer measured
    assert double['steps'][2]['top1_error'] == summary['test_top1_error']
    assert png.stat().st_size > 1000
    text_reports = eval_main([str(plain), '--steps', '2,4', '--bn_policy', 'first'])
    table = capsys.readouterr().out
    assert 'bn_policy first' in table and '(trained)' in table and 'MFLOPs/image' in table
    assert text_reports[0]['steps'][1]['top1_error'] == json.loads((plain / 'summary.json').read_text())['test_top1_error']
    # an untrained model (a timm name) was trained with no steps: it is "built with" them, and no row is "(trained)"
    eval_main(['rc4_cifar', '--model_kwargs', '{"width": 4}', '--data_dir', str(tiny_data), '--steps', '2,4'])
    table = capsys.readouterr().out
    assert 'untrained: rc4_cifar {"width": 4}' in table and 'built with 4 steps per cell' in table
    assert '(trained)' not in table and table.count('(built)') == 1


@pytest.mark.parametrize('argv, message', [
    (['--steps', '1,x'], '--steps needs a comma list of step counts >= 1'),
    (['--steps', '0,2'], '--steps needs a comma list of step counts >= 1'),
    (['--plot', 'a.png'], '--plot applies to an evaluation over steps: add --steps'),
    (['--steps', '2', '--bn_policy', 'last'], '--bn_policy must be one of first, spread'),
    (['--model', 'rc4_unshared_cifar', '--steps', '2,6'], 'unshared weights for 4 steps per cell and cannot run 6'),
    (['--model', 'resnet10t', '--model_kwargs', '{"num_classes": 10}', '--steps', '2'],
     'cannot change its number of steps: --steps needs an RC network'),
])
def test_eval_over_steps_errors(argv, message, tiny_data, capsys):
    model = [] if '--model' in argv else ['--model', 'rc4_cifar', '--model_kwargs', '{"width": 4}']
    with pytest.raises(SystemExit) as e:
        eval_main([*model, '--data_dir', str(tiny_data), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count('\n') == 1, err


def test_several_runs_need_steps(sampled_run, capsys):
    out, _ = sampled_run
    with pytest.raises(SystemExit):
        eval_main([str(out), str(out)])
    assert 'evaluate one at a time, or several over steps with --steps' in capsys.readouterr().err
