""" Compression that keeps the accuracy: distillation in the trainer, conversion init, per-step BN re-estimation. """
import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import timm_rc
from timm_rc import recalibrate_bn
from timm_rc.train.distillation import check_teacher, distillation_task, load_teacher, weights_digest
from timm_rc.errors import UserError
from timm_rc.evaluation.recalibration import recalibration_batches

from cli_helpers import exits_2
from test_train import TINY, make_parquet, run, run_main


@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
    """ (data folder, a finished 1-epoch run of the ResNet-18 graph at width 4: the teacher). """
    root = tmp_path_factory.mktemp('kd')
    data = make_parquet(root / 'data')
    run(['--data_dir', str(data), '--epochs', '1', '--model', 'rc4_unshared_cifar', '--output_dir', str(root / 't'),
         *TINY])
    return data, root / 't'


# ---- conversion that keeps the trained network ----------------------------------------------


def test_average_init_is_the_mean_of_the_blocks_tensors():
    torch.manual_seed(0)
    src = timm.create_model('rc4_unshared_cifar', width=4)
    blocks = [copy.deepcopy(s) for s in src.cell2.steps]
    model = copy.deepcopy(src)
    report = timm_rc.convert_to_rc(model, init='average', return_report=True)
    assert report.init == 'average' and 'init=\'average\'' in str(report)
    step0 = model.cell2.steps[0]
    for name in ('conv1.weight', 'conv2.weight'):
        expected = torch.stack([b.get_parameter(name) for b in blocks]).mean(0)
        assert torch.equal(step0.get_parameter(name), expected)
    # each step keeps its own block's BN layers
    for i, b in enumerate(blocks):
        assert torch.equal(model.cell2.steps[i].bn1.running_var, b.bn1.running_var)
        assert torch.equal(model.cell2.steps[i].bn2.weight, b.bn2.weight)
    first = copy.deepcopy(src)
    timm_rc.convert_to_rc(first, init='first', return_report=True)
    assert torch.equal(first.cell2.steps[0].conv1.weight, blocks[0].conv1.weight)
    with pytest.raises(ValueError, match="unknown init 'mean'; valid values: 'first', 'average'"):
        timm_rc.convert_to_rc(copy.deepcopy(src), init='mean', return_report=True)


# ---- BN re-estimation ------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(self.conv(x))


def test_recalibration_equals_the_mean_and_variance_computed_by_hand():
    torch.manual_seed(0)
    cell = timm_rc.unroll(_Block(), 2)
    for step in cell.steps:
        step.bn.weight.data.uniform_(0.5, 1.5)
        step.bn.bias.data.normal_()
    batches = [torch.randn(5, 3, 6, 6) for _ in range(3)]
    params = {k: v.clone() for k, v in cell.named_parameters()}
    buffers = {k: v.clone() for k, v in cell.state_dict().items()}
    cell.eval()
    assert recalibrate_bn(cell, batches) == 2
    assert not cell.training and all(m.momentum == 0.1 for m in cell.modules() if isinstance(m, nn.BatchNorm2d))
    # by hand: each step's BN input per batch, normalised with the batch's own statistics on the way
    conv = cell.steps[0].conv
    expected = {0: [], 1: []}
    for x in batches:
        for i, step in enumerate(cell.steps):
            z = conv(x)
            expected[i].append((z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=True)))
            x = x + F.batch_norm(z, None, None, step.bn.weight, step.bn.bias, training=True)
    for i, step in enumerate(cell.steps):
        torch.testing.assert_close(step.bn.running_mean, torch.stack([m for m, _ in expected[i]]).mean(0))
        torch.testing.assert_close(step.bn.running_var, torch.stack([v for _, v in expected[i]]).mean(0))
        assert step.bn.num_batches_tracked.item() == 3
    # only BN buffers changed
    assert all(torch.equal(v, params[k]) for k, v in cell.named_parameters())
    changed = {k for k, v in cell.state_dict().items() if not torch.equal(v, buffers[k])}
    assert changed == {f'steps.{i}.bn.{b}' for i in (0, 1) for b in ('running_mean', 'running_var',
                                                                     'num_batches_tracked')}


def test_recalibration_leaves_the_steps_that_do_not_run_alone():
    torch.manual_seed(0)
    model = timm.create_model('rc4_cifar', width=4)
    model.set_steps(2)  # 'spread': trained steps 0 and 3 run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_bn(model, [torch.randn(4, 3, 32, 32)])
    after = model.state_dict()
    assert torch.equal(after['cell1.steps.1.bn1.running_mean'], before['cell1.steps.1.bn1.running_mean'])
    assert not torch.equal(after['cell1.steps.3.bn1.running_mean'], before['cell1.steps.3.bn1.running_mean'])


def test_recalibration_batches_are_fixed_and_normalised():
    from timm_rc.data import ImageSplit
    split = ImageSplit(torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8), torch.arange(10))
    mean, std = torch.full((1, 3, 1, 1), 127.5), torch.full((1, 3, 1, 1), 50.0)
    a = list(recalibration_batches(split, 2, 4, mean, std, seed=1))
    b = list(recalibration_batches(split, 2, 4, mean, std, seed=1))
    assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1))[:4]
    torch.testing.assert_close(a[0], (split.images[order].float() - 127.5) / 50)


# ---- distillation ----------------------------------------------------------------------------


def test_the_distillation_loss_is_the_formula():
    torch.manual_seed(0)
    student = timm.create_model('rc1_cifar', width=4)
    teacher = timm.create_model('rc2_unshared_cifar', width=4).eval()
    alpha, t = 0.7, 3.0
    task = distillation_task(student, teacher, nn.CrossEntropyLoss(), alpha, t, torch.device('cpu'))
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = task(x, y)
    s_logits = student(x)
    with torch.no_grad():
        t_logits = teacher(x)
    p_t = F.softmax(t_logits / t, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s_logits / t, -1))).sum(-1).mean() * t * t
    expected = (1 - alpha) * F.cross_entropy(s_logits, y) + alpha * kl
    torch.testing.assert_close(out['loss'], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['kd_loss'], kl, rtol=1e-5, atol=1e-6)
    out['loss'].backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_a_distilled_run_records_its_teacher_which_never_changes(teacher_run, tmp_path, monkeypatch):
    data, teacher = teacher_run
    kept = []

    def keep(*args, **kwargs):
        t = load_teacher(*args, **kwargs)
        kept.append(t)
        return t
    monkeypatch.setattr('timm_rc.train.loop.load_teacher', keep)
    out = tmp_path / 's'
    summary = run(['--data_dir', str(data), '--epochs', '1', '--teacher', str(teacher), '--output_dir', str(out), *TINY])
    file = load_file(str(teacher / 'model.safetensors'))
    state = kept[0].model.state_dict()
    assert all(torch.equal(state[k], file[k]) for k in file)  # bit-identical after training
    t = summary['teacher']
    assert t['model'] == 'rc4_unshared_cifar' and t['model_kwargs'] == {'width': 4} and t['params'] == 20_190
    assert (t['alpha'], t['temperature']) == (0.9, 4.0) and t['weights_sha256'] == weights_digest(kept[0].model)
    cfg = json.loads((out / 'run_config.json').read_text())
    assert cfg['teacher'] == str(teacher) and cfg['teacher_identity']['weights_sha256'] == t['weights_sha256']
    assert 'train/kd_loss' in json.loads((out / 'metrics.jsonl').read_text().splitlines()[0])
    # the results table shows the distilled run in its own row
    from timm_rc.reports.tables import collect, table
    text = table(collect([out, teacher.parent]))
    assert 'distilled from rc4_unshared_cifar ' + t['weights_sha256'][:8] in text


def test_resume_of_a_distilled_run_is_bit_identical_and_refuses_another_teacher(teacher_run, tmp_path, capsys):
    data, teacher = teacher_run
    common = ['--data_dir', str(data), '--teacher', str(teacher), *TINY]
    run([*common, '--epochs', '2', '--output_dir', str(tmp_path / 'ref')])
    run([*common, '--epochs', '1', '--output_dir', str(tmp_path / 'split')])
    run([*common, '--epochs', '2', '--output_dir', str(tmp_path / 'split'), '--resume'])
    a, b = load_file(str(tmp_path / 'ref' / 'model.safetensors')), load_file(str(tmp_path / 'split' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another teacher (here: none) for the same run is refused
    code, err = run_main(['--data_dir', str(data), *TINY, '--epochs', '3', '--output_dir', str(tmp_path / 'split'),
                          '--resume', '--teacher', 'null'], capsys)
    assert code == 2 and 'cannot resume' in err and 'teacher' in err


def test_bad_teachers_are_one_line(teacher_run, tmp_path, capsys):
    data, teacher = teacher_run
    base = ['--data_dir', str(data), *TINY, '--epochs', '1']
    code, err = run_main([*base, '--output_dir', str(tmp_path / 'a'), '--teacher', str(tmp_path / 'nothing')], capsys)
    assert code == 2 and err.count('\n') == 1, err
    assert f'{tmp_path / "nothing"} does not exist; give a run folder (holding model.safetensors), a weights file' in err
    assert 'teacher' in err
    code, err = run_main([*base, '--output_dir', str(tmp_path / 'b'), '--teacher_model', 'rc4_cifar'], capsys)
    assert code == 2 and 'give the teacher itself with --teacher' in err
    code, err = run_main([*base, '--output_dir', str(tmp_path / 'c'), '--teacher', str(teacher), '--distill_alpha', '2'],
                         capsys)
    assert code == 2 and "'distill_alpha' must be in [0, 1]" in err
    import shutil
    shutil.copy(teacher / 'model.safetensors', tmp_path / 'loose.safetensors')  # a weights file outside a run
    code, err = run_main([*base, '--output_dir', str(tmp_path / 'e'), '--teacher', str(tmp_path / 'loose.safetensors')],
                         capsys)
    assert code == 2 and 'name its model with --teacher_model (and --teacher_model_kwargs)' in err
    five = make_parquet(tmp_path / 'five', num_classes=5)
    code, err = run_main(['--data_dir', str(five), *TINY, '--model_kwargs.num_classes', '5', '--epochs', '1',
                          '--output_dir', str(tmp_path / 'd'), '--teacher', str(teacher)], capsys)
    assert code == 2 and 'the teacher has a 10-class head but the data has 5 classes' in err
    assert not (tmp_path / 'd' / 'checkpoints').exists()


def test_a_teacher_that_cannot_take_the_images_is_refused():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    with pytest.raises(UserError, match=r"the teacher cannot take the student's \(3, 32, 32\) images"):
        check_teacher(flat, 10, (3, 32, 32))


# ---- the commands ----------------------------------------------------------------------------


def test_convert_with_init_rank_and_recalibration_reports_the_errors(teacher_run, tmp_path, capsys):
    from timm_rc.cli.convert import main
    _, teacher = teacher_run
    capsys.readouterr()
    main([str(teacher), '--output', str(tmp_path / 'c.safetensors'), '--init', 'average', '--rank', '2',
          '--recalibrate', '2', '--json'])
    out = json.loads(capsys.readouterr().out)
    assert out['init'] == 'average' and out['rank'] == 2 and out['test_examples'] == 40
    assert set(out['test_errors']) == {'original', 'converted', 'recalibrated'}
    summary = json.loads((teacher / 'summary.json').read_text())
    assert out['test_errors']['original'] == summary['test_top1_error']
    assert out['recalibration'] == {'batches': 2, 'batch_size': 16, 'augmented': False}
    m = timm.create_model('rc4_cifar', width=4, rank=2, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'c.safetensors')))
    assert m.rank == 2
    err = exits_2(main, [str(teacher), '--output', str(tmp_path / 'd.safetensors'), '--init', 'mean'], capsys)
    assert '--init must be one of first, average' in err


def test_eval_with_recalibration_over_steps(teacher_run, tmp_path, capsys):
    from cli_helpers import json_result
    from timm_rc.cli.eval import main
    data, teacher = teacher_run
    rc = tmp_path / 'rc'
    run(['--data_dir', str(data), '--epochs', '1', '--output_dir', str(rc), *TINY])
    reports = json_result(main, [str(rc), '--steps', '2,4', '--recalibrate', '2'], capsys)
    rows = reports[0]['steps']
    assert [r['steps'] for r in rows] == [2, 4] and all('top1_error_before' in r for r in rows)
    plain = json_result(main, [str(rc)], capsys)
    assert rows[1]['top1_error_before'] == plain['top1_error']  # every k' starts from the trained statistics
    one = json_result(main, [str(rc), '--recalibrate', '2'], capsys)
    assert one['top1_error_before'] == plain['top1_error'] and one['recalibration']['batches'] == 2
    err = exits_2(main, [str(rc), '--recalibrate_data', 'augmented'], capsys)
    assert '--recalibrate_data applies to BN re-estimation: add --recalibrate N' in err


def test_quantize_with_recalibration_writes_the_new_statistics_and_keeps_the_fp32_error(teacher_run, tmp_path):
    from timm_rc.deploy.compression import quantize_run
    from timm_rc.quantize import load_quantized
    _, teacher = teacher_run
    plain = quantize_run(str(teacher), 8)
    with pytest.raises(UserError, match='model.int8.safetensors exists .written by an earlier quantize, perhaps with '
                                        'other options.; pass --overwrite to replace it, or move it away first'):
        quantize_run(str(teacher), 8, recalibrate=2)
    recal = quantize_run(str(teacher), 8, recalibrate=2, overwrite=True)
    assert recal['fp32_top1_error'] == plain['fp32_top1_error']  # the run's own model, untouched
    assert recal['quantized_top1_error_before'] == plain['quantized_top1_error']
    assert recal['recalibration'] == {'batches': 2, 'batch_size': 16, 'augmented': True}  # measured the better
    written = load_quantized(teacher / 'model.int8.safetensors').state_dict()
    fp32 = load_file(str(teacher / 'model.safetensors'))
    assert not torch.equal(written['cell1.steps.0.bn1.running_mean'], fp32['cell1.steps.0.bn1.running_mean'])
    with pytest.raises(UserError, match='--recalibrate takes a number of training batches >= 1'):
        quantize_run(str(teacher), 8, recalibrate=0)
