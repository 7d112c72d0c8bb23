""" `python -m timm_rc.results` and `timm_rc.plots` on tiny fake run folders (the trainer's file formats). """
import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from timm_rc.reports import figures as plots
from timm_rc.reports import tables as results
from timm_rc.cli.results import main as results_main

# run_config.json as the trainer writes it (timm_rc/train/loop.py: the config plus resolved values)
BASE_CONFIG = dict(
    model='rc4_cifar', model_kwargs={}, dataset='cifar10', data_dir='../shared/data/cifar10',
    max_train_samples=None, max_eval_samples=None, loader='dataloader', epochs=160, batch_size=128, lr=0.1,
    momentum=0.9, weight_decay=0.0001, lr_milestones=[60, 90], lr_gamma=0.1, warmup_epochs=0,
    clip_grad_value=0.1, label_smoothing=0.0, max_steps=None, seed=0, mixed_precision='no', compile=False,
    compile_mode=None, channels_last=False, sync_bn=False, eval_batch_size=1024, output_dir='runs/x',
    log_with='none', project='timm_rc', run_name=None, log_interval=50, keep_checkpoints=2, resume=None,
    params=1_262_922, num_processes=1)


def make_run(folder, err=10.0, mtime=None, summary=None, **config):
    """ A finished run: summary.json and run_config.json; `config` overrides run_config.json keys
    (and the summary's, where the trainer writes them to both). """
    cfg = dict(BASE_CONFIG, **config)
    summary = dict(dict(
        model=cfg['model'], model_kwargs=cfg['model_kwargs'], dataset=cfg['dataset'], data_dir=cfg['data_dir'],
        params=cfg['params'], epochs=cfg['epochs'], epochs_completed=cfg['epochs'], global_step=1,
        test_top1_error=err, best_test_top1_error=err, train_loss=0.5,
        eval_examples=cfg['max_eval_samples'] or 10_000, train_examples=cfg['max_train_samples'] or 50_000,
        images_per_sec=100.0, wall_time_s=1.0, seed=cfg['seed'], num_processes=1,
        global_batch_size=cfg['batch_size'], loader=cfg['loader'], mixed_precision=cfg['mixed_precision'],
        device='cpu', device_name='cpu', versions={}), **(summary or {}))
    folder.mkdir(parents=True)
    (folder / 'run_config.json').write_text(json.dumps(cfg, indent=2))
    (folder / 'summary.json').write_text(json.dumps(summary, indent=2))
    if mtime is not None:
        os.utime(folder / 'summary.json', (mtime, mtime))
    return folder


def rows(text):
    """ Markdown table -> list of {column: cell}. """
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    return [dict(zip(header, [c.strip() for c in line.strip('|').split('|')])) for line in lines[2:]]


def test_runs_that_differ_in_the_seed_alone_pool(tmp_path):
    for seed, err in enumerate([10.0, 12.0, 14.0]):
        make_run(tmp_path / f'rc4/seed{seed}', err=err, seed=seed, output_dir=f'runs/rc4/seed{seed}')
    (row,) = rows(results.table(results.collect([tmp_path]), markdown=True))
    assert row == {'model': 'RC-4', 'kwargs': '', 'dataset': 'cifar10', 'setting': '', 'runs': '3', 'seeds': '0,1,2',
                   'epochs': '160/160', 'params': '1,262,922', 'test err % (ours)': '12.00 ± 2.00', 'paper': '7.65'}


@pytest.mark.parametrize('change,setting,base_setting', [
    (dict(epochs=15), 'epochs 15', 'epochs 160'),
    (dict(max_train_samples=1000), 'train_examples 1000', 'train_examples 50000'),
    (dict(max_eval_samples=500), 'eval_examples 500', 'eval_examples 10000'),
    (dict(batch_size=512), 'batch 512', 'batch 128'),
    (dict(lr=0.2), 'lr 0.2', 'lr 0.1'),
    (dict(lr_milestones=[8, 12]), 'lr_milestones 8,12', 'lr_milestones 60,90'),
    (dict(clip_grad_value=None), 'clip none', 'clip 0.1'),
    (dict(warmup_epochs=5), 'warmup_epochs 5', 'warmup_epochs 0'),
    (dict(label_smoothing=0.1), 'label_smoothing 0.1', 'label_smoothing 0'),
    (dict(max_steps=100), 'max_steps 100', 'max_steps none'),
    (dict(mixed_precision='bf16'), 'mixed_precision bf16', 'mixed_precision no'),
    (dict(compile=True), 'compile true', 'compile false'),
    (dict(loader='gpu'), 'loader gpu', 'loader dataloader'),
])
def test_runs_that_differ_in_a_setting_are_separate_rows(tmp_path, change, setting, base_setting):
    """ Each row names what sets it apart: from the paper's protocol, and from the other row. """
    make_run(tmp_path / 'a', err=10.0)
    make_run(tmp_path / 'b', err=20.0, **change)
    table = rows(results.table(results.collect([tmp_path]), markdown=True))
    assert len(table) == 2 and all(r['runs'] == '1' for r in table)
    by_err = {r['test err % (ours)']: r['setting'] for r in table}
    assert by_err == {'20.00': setting, '10.00': base_setting}


def test_paper_protocol_alone_has_an_empty_setting_and_a_deviation_is_listed(tmp_path):
    make_run(tmp_path / 'rc4', err=10.0)
    make_run(tmp_path / 'rc2', err=11.0, model='rc2_cifar', epochs=120, clip_grad_value=0.5, params=1_260_362)
    table = rows(results.table(results.collect([tmp_path]), markdown=True))
    assert [(r['model'], r['setting'], r['paper']) for r in table] == [
        ('RC-2', 'clip 0.5', '8.44'), ('RC-4', '', '7.65')]


def test_reduced_protocol_is_described_and_in_progress_runs_are_apart(tmp_path):
    reduced = dict(epochs=15, lr_milestones=[8, 12], clip_grad_value=None,
                   model_kwargs={'width': 16, 'block': 'postact'})
    make_run(tmp_path / 'done/seed0', err=30.0, **reduced)
    make_run(tmp_path / 'done/seed1', err=32.0, seed=1, **reduced)
    make_run(tmp_path / 'running/seed2', err=50.0, seed=2, summary=dict(epochs_completed=6), **reduced)
    table = rows(results.table(results.collect([tmp_path]), markdown=True))
    assert [(r['kwargs'], r['setting'], r['runs'], r['seeds'], r['epochs'], r['test err % (ours)'], r['paper'])
            for r in table] == [
        ('{"block": "postact", "width": 16}', 'epochs 15, lr_milestones 8,12, clip none', '2', '0,1', '15/15',
         '31.00 ± 1.41', '7.65'),
        ('{"block": "postact", "width": 16}', 'epochs 15, lr_milestones 8,12, clip none', '1', '2', '6/15', '50.00',
         '7.65'),
    ]


def test_settings_that_do_not_change_the_run_are_not_compared(tmp_path):
    make_run(tmp_path / 'a', err=10.0, seed=0, output_dir='a', run_name='x', log_with='wandb', log_interval=10,
             keep_checkpoints=5, project='p', eval_batch_size=256, resume='auto', data_dir='../shared/data/cifar10')
    make_run(tmp_path / 'b', err=12.0, seed=1, output_dir='b', data_dir='/work/shared/data/cifar10/')
    make_run(tmp_path / 'c', err=14.0, seed=2, output_dir='c', data_dir=None)  # the dataset's name
    (row,) = rows(results.table(results.collect([tmp_path]), markdown=True))
    assert (row['runs'], row['seeds'], row['setting'], row['test err % (ours)']) == ('3', '0,1,2', '', '12.00 ± 2.00')


def test_a_key_older_runs_lack_is_not_compared(tmp_path):
    make_run(tmp_path / 'new', err=10.0, seed=0, num_threads=2, some_new_setting=1)
    old = make_run(tmp_path / 'old', err=12.0, seed=1)
    assert 'some_new_setting' not in json.loads((old / 'run_config.json').read_text())
    (row,) = rows(results.table(results.collect([tmp_path]), markdown=True))
    assert (row['runs'], row['seeds']) == ('2', '0,1')


def test_a_seed_run_twice_counts_once_with_its_newest_run(tmp_path, capsys):
    make_run(tmp_path / 'first/seed0', err=80.0, mtime=1_000_000)
    make_run(tmp_path / 'again/seed0', err=75.0, mtime=2_000_000)
    make_run(tmp_path / 'first/seed1', err=77.0, seed=1)
    warnings = []
    (row,) = rows(results.table(results.collect([tmp_path]), markdown=True, on_warning=warnings.append))
    assert (row['runs'], row['seeds'], row['test err % (ours)']) == ('2', '0,0!,1', '76.00 ± 1.41')
    assert '\n'.join(warnings) + '\n' == (
        f'warning: RC-4 on cifar10: seed 0 was run 2 times ({tmp_path}/first/seed0, {tmp_path}/again/seed0); '
        f'counting only the newest, {tmp_path}/again/seed0\n')


def test_plain_timm_model_is_named_by_its_name(tmp_path):
    make_run(tmp_path / 'r18', err=9.0, model='resnet18', model_kwargs={'drop_rate': 0.1}, params=11_181_642)
    make_run(tmp_path / 'rc2', err=11.0, model='rc2_cifar', model_kwargs={'bn_sharing': 'shared', 'width': 16},
             epochs=120)
    table = rows(results.table(results.collect([tmp_path]), markdown=True))
    assert [(r['model'], r['kwargs'], r['paper']) for r in table] == [
        ('rc2_cifar (shared BN)', '{"width": 16}', ''),
        ('resnet18', '{"drop_rate": 0.1}', ''),
    ]


def test_public_api_keeps_its_signatures(tmp_path, capsys):
    make_run(tmp_path / 'a', err=10.0)
    runs = results.collect([tmp_path])
    assert runs[0]['path'] == str(tmp_path / 'a') and runs[0]['run_config']['lr'] == 0.1
    # a caller that builds the run dicts itself (without run_config) still gets run_config.json compared
    bare = [{k: v for k, v in r.items() if k != 'run_config'} for r in runs]
    assert results.table(bare) == results.table(runs)
    text = results.table(runs, markdown=False).splitlines()
    assert text[0].split() == ['model', 'kwargs', 'dataset', 'setting', 'runs', 'seeds', 'epochs', 'params', 'test',
                               'err', '%', '(ours)', 'paper']
    results_main([str(tmp_path), '--markdown'])
    assert capsys.readouterr().out.splitlines()[2] == \
        '| RC-4 |  | cifar10 |  | 1 | 0 | 160/160 | 1,262,922 | 10.00 | 7.65 |'


# ---- plots ----------------------------------------------------------------------------------


def write_metrics(folder, epochs=3):
    with open(folder / 'metrics.jsonl', 'w') as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({'train/loss': 2.0 / e, 'train/acc': 0.3, 'test/top1_err': 60.0 - e,
                                'test/top1_acc': 0.4, 'lr': 0.1, 'epoch': e}) + '\n')


def test_curves_figure_titles_labels_and_integer_epochs(tmp_path):
    a = make_run(tmp_path / 'rc4/seed0', model_kwargs={'width': 8})
    b = make_run(tmp_path / 'r18/seed0', model='resnet18')
    write_metrics(a), write_metrics(b)
    fig = plots.curves_figure([a, b])
    ax_loss, ax_err = fig.axes[:2]
    assert (ax_loss.get_xlabel(), ax_loss.get_ylabel(), ax_loss.get_title()) == ('epoch', 'training loss',
                                                                                  'training loss')
    assert (ax_err.get_xlabel(), ax_err.get_ylabel(), ax_err.get_title()) == ('epoch', 'test error (%)', 'test error')
    # short labels: the model (the paper's name where it has one), the kwargs not every run shares, the folder
    # below the common one; the title holds what they share, so neither outgrows the figure
    assert [line.get_label() for line in ax_err.get_lines()] == ['RC-4, width 8 (rc4/seed0)',
                                                                 'resnet18 (r18/seed0)']
    assert fig._suptitle.get_text() == f'runs in {tmp_path}'
    c = make_run(tmp_path / 'more/rc2/seed1', model='rc2_cifar', model_kwargs={'width': 8, 'rank': 2})
    d = make_run(tmp_path / 'more/rc2/seed2', model='rc2_cifar', model_kwargs={'width': 8})
    assert plots.curve_labels([c, d]) == (['RC-2, rank 2 (seed1)', 'RC-2 (seed2)'],
                                          f'width 8; runs in {tmp_path / "more/rc2"}')
    assert plots.curve_labels([c]) == (['RC-2 (seed1)'], f'rank 2, width 8; runs in {tmp_path / "more/rc2"}')
    e = make_run(tmp_path / 'bn/shared', model='rc4_cifar', model_kwargs={'width': 8, 'bn_sharing': 'shared'})
    f = make_run(tmp_path / 'bn/none', model='rc4_cifar', model_kwargs={'width': 8, 'bn_sharing': 'none'})
    g = make_run(tmp_path / 'bn/r18', model='rc4_unshared_cifar', model_kwargs={'width': 8})
    assert plots.curve_labels([e, f, g])[0] == ['RC-4, shared BN (shared)', 'RC-4, no BN (none)',
                                                'ResNet-18 graph (r18)']
    fig.canvas.draw()
    for ax in (ax_loss, ax_err):
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks == [1, 2, 3]


def test_tradeoff_figure_labels_rows_with_their_spread(tmp_path):
    for seed, err in ((0, 20.0), (1, 22.0)):
        make_run(tmp_path / f'rc4/seed{seed}', err=err, seed=seed, params=20_786, model_kwargs={'width': 8})
    make_run(tmp_path / 'r18/seed0', err=17.0, model='rc4_unshared_cifar', params=79_538, model_kwargs={'width': 8})
    fig = plots.tradeoff_figure(results.result_rows(results.collect([tmp_path])))
    ax = fig.axes[0]
    assert sorted(ax.get_legend_handles_labels()[1]) == ['RC-4: 21.00 ± 1.41 % (2 runs)', 'ResNet-18: 17.00 %']
    assert (ax.get_xlabel(), ax.get_ylabel()) == ('unique parameters', 'test top-1 error (%)')
    assert ax.get_xscale() == 'linear'  # 20,786 to 79,538: under 5x


def test_rows_of_one_network_go_by_width_as_numbers(tmp_path):
    for width in (16, 4, 8):
        make_run(tmp_path / f'w{width}/seed0', params=width, model_kwargs={'width': width})
    rows = results.result_rows(results.collect([tmp_path]))
    assert [r['kwargs'] for r in rows] == ['{"width": 4}', '{"width": 8}', '{"width": 16}']  # not 16, 4, 8


def test_tradeoff_figure_joins_a_network_across_widths_and_keeps_an_outlier_on_the_edge(tmp_path):
    """ The paper's networks at two widths: one series per network (a line through its widths, one legend
    entry), a log parameter axis, and RC-4 with one shared BN (near chance) drawn at the top edge instead of
    stretching the axis fourfold. """
    for seed, err in ((0, 20.0), (1, 22.0)):
        make_run(tmp_path / f'w8/rc4/seed{seed}', err=err, seed=seed, params=20_786, model_kwargs={'width': 8})
    make_run(tmp_path / 'w16/rc4/seed0', err=15.5, params=80_730, model_kwargs={'width': 16})
    make_run(tmp_path / 'w8/r18/seed0', err=17.0, model='rc4_unshared_cifar', params=79_538, model_kwargs={'width': 8})
    make_run(tmp_path / 'w16/r18/seed0', err=13.4, model='rc4_unshared_cifar', params=315_738,
             model_kwargs={'width': 16})
    make_run(tmp_path / 'w8/shared/seed0', err=89.2, params=20_306, model_kwargs={'width': 8, 'bn_sharing': 'shared'})
    fig = plots.tradeoff_figure(results.result_rows(results.collect([tmp_path])))
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    assert sorted(labels) == ['RC-4, shared BN: width 8 89.20 %',
                              'RC-4: width 8 21.00 ± 1.41 % (2 runs); width 16 15.50 %',
                              'ResNet-18: width 8 17.00 %; width 16 13.40 %']
    lines = {label: h for h, label in zip(handles, labels)}
    rc4 = lines['RC-4: width 8 21.00 ± 1.41 % (2 runs); width 16 15.50 %']
    assert list(rc4.get_xdata()) == [20_786, 80_730] and list(rc4.get_ydata()) == [21.0, 15.5]
    assert ax.get_xscale() == 'log'
    bottom, top = ax.get_ylim()
    shared = lines['RC-4, shared BN: width 8 89.20 %']
    assert top < 30 and shared.get_ydata()[0] < top  # on the edge, not at 89.2
    assert '(89.2 %, off scale)' in ' '.join(t.get_text() for t in ax.texts)


def test_tradeoff_labels_of_points_at_one_place_do_not_overlap(tmp_path):
    """ RC-2 at width 16 and the ResNet-18 graph at width 8 have about the same parameters and error: their
    width labels went on top of each other. """
    make_run(tmp_path / 'w8/rc2/seed0', err=21.5, model='rc2_cifar', params=20_466, model_kwargs={'width': 8})
    make_run(tmp_path / 'w16/rc2/seed0', err=16.56, model='rc2_cifar', params=80_090, model_kwargs={'width': 16})
    make_run(tmp_path / 'w8/r18/seed0', err=16.77, model='rc4_unshared_cifar', params=79_538,
             model_kwargs={'width': 8})
    make_run(tmp_path / 'w16/r18/seed0', err=13.4, model='rc4_unshared_cifar', params=315_738,
             model_kwargs={'width': 16})
    fig = plots.tradeoff_figure(results.result_rows(results.collect([tmp_path])))
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert sorted(t.get_text() for t in ax.texts) == ['w16', 'w16', 'w8', 'w8']
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)


def test_plot_curves_writes_a_png(tmp_path):
    a = make_run(tmp_path / 'run')
    write_metrics(a)
    out = plots.plot_curves([a], tmp_path / 'out' / 'curves.png')
    assert out.read_bytes()[:4] == b'\x89PNG'


def write_bn_stats(folder, steps=2, channels=6, epoch=3):
    stats = {}
    for cell in ('cell1', 'cell2'):
        for i in range(steps):
            for bn in ('bn1', 'bn2'):
                for stat in ('running_mean', 'running_var', 'weight', 'bias'):
                    stats[f'{cell}.step{i}.{bn}.{stat}'] = torch.full((channels,), float(i))
    (folder / 'bn_stats').mkdir()
    save_file(stats, str(folder / 'bn_stats' / f'epoch_{epoch:04d}.safetensors'))


def test_bn_figures_titles_labels_and_integer_channels(tmp_path):
    run = make_run(tmp_path / 'rc4/seed0', model_kwargs={'width': 8, 'block': 'postact'})
    write_bn_stats(run)
    figs = plots.bn_figures(run)
    assert sorted(figs) == [('cell1', 'bn1'), ('cell1', 'bn2'), ('cell2', 'bn1'), ('cell2', 'bn2')]
    fig = figs[('cell1', 'bn1')]
    assert fig._suptitle.get_text() == \
        f'rc4_cifar {{"block": "postact", "width": 8}} ({run}): cell1.bn1 per unrolling step, epoch 3'
    assert [ax.get_title() for ax in fig.axes] == ['running mean', 'running variance', 'gamma', 'beta']
    assert [ax.get_ylabel() for ax in fig.axes] == ['running mean', 'running variance', 'gamma', 'beta']
    assert {ax.get_xlabel() for ax in fig.axes} == {'channel'}
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ['step 1', 'step 2']
    fig.canvas.draw()
    assert all(float(t).is_integer() for ax in fig.axes for t in ax.get_xticks())
    written = plots.plot_bn(run, out=tmp_path / 'plots')
    assert sorted(p.name for p in written) == ['bn_cell1_bn1.png', 'bn_cell1_bn2.png', 'bn_cell2_bn1.png',
                                               'bn_cell2_bn2.png']


def test_summaries_without_seed_or_run_config_count_each_run(tmp_path):
    """ Older or hand-made summaries: no seed (re-runs cannot be told apart, so each counts), no
    run_config.json, no example counts (not compared, not listed as a deviation). """
    for i, err in enumerate([8.0, 9.0, 10.0]):
        (tmp_path / f'r{i}').mkdir()
        (tmp_path / f'r{i}' / 'summary.json').write_text(json.dumps(dict(
            model='rc4_cifar', model_kwargs={'bn_sharing': 'shared'}, dataset='cifar10', data_dir=None,
            test_top1_error=err, epochs_completed=160, epochs=160, params=1_259_082)))
    assert results.table(results.collect([tmp_path]), markdown=True).splitlines()[2] == \
        '| RC-4, shared BN |  | cifar10 |  | 3 | ?,?,? | 160/160 | 1,259,082 | 9.00 ± 1.00 | 21.00 |'


def test_a_key_older_runs_lack_has_its_default_and_sampled_or_converted_runs_say_so(tmp_path):
    old = make_run(tmp_path / 'old', err=12.0, seed=0)
    cfg = json.loads((old / 'run_config.json').read_text())
    cfg.pop('sample_steps', None)  # written before sample_steps existed: it trained fixed steps
    (old / 'run_config.json').write_text(json.dumps(cfg))
    make_run(tmp_path / 'sampled', err=20.0, seed=0, sample_steps=[1, 7])
    overlay = {'pretrained': True, 'pretrained_cfg_overlay': {'file': 'runs/converted/rc4_from_resnet18.safetensors'}}
    make_run(tmp_path / 'converted', err=30.0, seed=0, model_kwargs=overlay, lr=0.01)
    table = rows(results.table(results.collect([tmp_path]), markdown=True))
    by_err = {r['test err % (ours)']: r for r in table}
    # the lr differs between the rows, so every row names it
    assert len(table) == 3 and by_err['12.00']['setting'] == 'lr 0.1'
    assert by_err['20.00']['setting'] == 'lr 0.1, sample_steps 1,7'
    assert by_err['30.00']['kwargs'] == '' and by_err['30.00']['setting'] == 'lr 0.01, init from rc4_from_resnet18.safetensors'


def test_collect_does_not_follow_symlinked_folders(tmp_path):
    make_run(tmp_path / 'runs' / 'rc4' / 'seed0', err=10.0, seed=0)
    (tmp_path / 'runs' / 'rc4' / 'seed0' / 'loop').symlink_to(tmp_path / 'runs')  # a link back up the tree
    (tmp_path / 'runs' / 'elsewhere').symlink_to(tmp_path / 'runs' / 'rc4')
    runs = results.collect([tmp_path / 'runs'])
    assert [Path(r['path']).relative_to(tmp_path).as_posix() for r in runs] == ['runs/rc4/seed0']


def test_collect_skips_a_summary_that_is_no_regular_file(tmp_path, capsys):
    """ A summary.json linked to /dev/zero (left by a disk-full test) once made collect read forever. """
    make_run(tmp_path / 'runs' / 'good', err=10.0, seed=0)
    bad = tmp_path / 'runs' / 'bad'
    bad.mkdir(parents=True)
    (bad / 'summary.json').symlink_to('/dev/zero')
    (bad / 'run_config.json').symlink_to('/dev/zero')
    skipped = []
    runs = results.collect([tmp_path / 'runs'], on_skip=skipped.append)
    assert [Path(r['path']).name for r in runs] == ['good']
    err = '\n'.join(skipped)
    assert 'skipping' in err and 'bad/summary.json: not a regular file' in err


def test_collect_skips_files_that_are_no_run_summary(tmp_path, capsys):
    make_run(tmp_path / 'runs' / 'good', err=10.0, seed=0)
    other = tmp_path / 'runs' / 'other'
    other.mkdir()
    (other / 'summary.json').write_text(json.dumps({'accuracy': 0.9}))  # some other tool's summary
    skipped = []
    assert [Path(r['path']).name for r in results.collect([tmp_path / 'runs'], on_skip=skipped.append)] == ['good']
    assert 'other/summary.json: not a timm_rc run summary' in '\n'.join(skipped)
    # the command says it on stderr
    results_main([str(tmp_path / 'runs')])
    assert 'other/summary.json: not a timm_rc run summary' in capsys.readouterr().err


def test_a_command_piped_into_head_ends_quietly():
    """ Every python -m timm_rc.<command> runs its main() through timm_rc.cli.common.run: output larger than a pipe
    holds, read by a reader that stops early, ends without a BrokenPipeError traceback. """
    import subprocess
    import sys
    code = "from timm_rc.cli.common import run; run(lambda: print('row\\n' * 100_000))"
    p = subprocess.run(f'{sys.executable} -c "{code}" | head -c 10', shell=True, capture_output=True, text=True,
                       timeout=60)
    assert 'Traceback' not in p.stderr and 'BrokenPipeError' not in p.stderr, p.stderr[-500:]
    assert p.stdout == 'row\nrow\nro'
    package = Path(__file__).resolve().parents[1] / 'timm_rc'
    # python -m timm_rc <verb> hands every verb's main to the same runner
    assert 'run_command(main)' in (package / '__main__.py').read_text()
    for command in ('compress', 'convert', 'eval', 'export', 'plots', 'results', 'sweep'):
        cli = (package / 'cli' / f'{command}.py').read_text()
        assert cli.rstrip().endswith("if __name__ == '__main__':\n    run(main)"), command


def test_a_run_from_an_experiments_file_is_compared_with_that_file(tmp_path):
    # the CPU demo's file sets 8 epochs and its own milestones; a sweep adds max_train_samples on top
    demo = dict(model='rc1_cifar', epochs=8, lr_milestones=[5, 7], model_kwargs={'width': 8}, params=20_306)
    file = dict(demo, data_dir='../shared/data/cifar10', weight_decay='1e-4')  # YAML reads 1e-4 as text
    make_run(tmp_path / 'plain', err=40.0, config_file='train_configs/cpu_demo.yaml', config_values=file, **demo)
    make_run(tmp_path / 'small', err=50.0, config_file='train_configs/cpu_demo.yaml', config_values=file,
             max_train_samples=1024, summary=dict(train_examples=1024), **demo)
    make_run(tmp_path / 'nofile', err=45.0, **demo)
    table = rows(results.table(results.collect([tmp_path]), markdown=True))
    settings = sorted(r['setting'] for r in table)
    assert settings == ['config cpu_demo.yaml', 'config cpu_demo.yaml, max_train_samples 1024',
                        'epochs 8, train_examples 50000, lr_milestones 5,7']  # without a file: the protocol's way
