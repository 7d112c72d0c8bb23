""" Training: config, data, the loop, checkpoints and resume, multi-process, logging. CPU only. """
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from timm_rc.train import TrainConfig, UserError, load_config, reset_accelerate_state, train
from timm_rc.data import GpuBatches, ImageSplit, augment, epoch_generator, load_image_splits, normalize
from timm_rc.cli.train import main
from timm_rc.train.loop import StepSchedule

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / 'shared' / 'data' / 'cifar10'
TINY = ['--model_kwargs', '{"width": 4}', '--batch_size', '16', '--log_interval', '2']
RC4_W4_PARAMS = 5_502  # rc4_cifar at width 4, 10 classes


def make_parquet(folder: Path, n_train=96, n_test=40, num_classes=10, label='label', splits=('train', 'test'),
                 seed=0):
    """ A tiny dataset in the hub's CIFAR parquet schema (Image + ClassLabel columns). """
    import datasets
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({'img': datasets.Image(),
                                  label: datasets.ClassLabel(names=[f'c{i}' for i in range(num_classes)])})
    for split, n in (('train', n_train), ('test', n_test)):
        if split not in splits:
            continue
        labels = rng.integers(0, num_classes, n)
        # class-dependent colour so that a few steps can learn something
        imgs = [Image.fromarray(np.clip(rng.normal(25 * (y % 10), 40, (32, 32, 3)), 0, 255).astype(np.uint8))
                for y in labels]
        datasets.Dataset.from_dict({'img': imgs, label: labels.tolist()}, features=features).to_parquet(
            str(folder / f'{split}.parquet'))
    return folder


def run(argv):
    try:
        return train(load_config(argv))
    finally:
        reset_accelerate_state()


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        try:
            main(argv)
        finally:
            reset_accelerate_state()
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return make_parquet(tmp_path_factory.mktemp('tiny'))


@pytest.fixture(scope='module')
def tiny_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    summary = run(['--data_dir', str(tiny_data), '--epochs', '2', '--output_dir', str(out), *TINY])
    return out, summary


# ---- the run and what it leaves behind -------------------------------------------------------


def test_summary(tiny_run):
    out, summary = tiny_run
    on_disk = json.loads((out / 'summary.json').read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk['model'] == 'rc4_cifar' and on_disk['model_kwargs'] == {'width': 4}
    assert on_disk['params'] == RC4_W4_PARAMS
    assert on_disk['epochs_completed'] == 2 and on_disk['global_step'] == 2 * (96 // 16)
    assert on_disk['eval_examples'] == 40 and on_disk['num_processes'] == 1
    assert 0 <= on_disk['test_top1_error'] <= 100
    assert on_disk['best_test_top1_error'] <= on_disk['test_top1_error']
    assert on_disk['images_per_sec'] > 0 and on_disk['wall_time_s'] > 0 and on_disk['seed'] == 0
    assert set(on_disk['versions']) >= {'torch', 'timm', 'accelerate', 'datasets', 'timm_rc'}
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2]
    assert rows[-1]['test/top1_err'] == on_disk['test_top1_error']


def test_checkpoints_rotate_and_are_complete(tiny_run):
    out, _ = tiny_run
    ckpts = sorted(p.name for p in (out / 'checkpoints').iterdir())
    assert ckpts == ['epoch_0001', 'epoch_0002']  # keep_checkpoints=2
    state = json.loads((out / 'checkpoints' / 'epoch_0002' / 'trainer_state.json').read_text())
    assert state['epoch'] == 2 and state['global_step'] == 12


def test_per_step_bn_stats_are_saved(tiny_run):
    out, _ = tiny_run
    stats = load_file(str(out / 'bn_stats' / 'epoch_0002.safetensors'))
    assert len(stats) == 2 * 4 * 2 * 4  # cells x steps x BN layers x (mean, var, gamma, beta)
    assert stats['cell1.step3.bn1.running_var'].shape == (4,)
    assert stats['cell2.step0.bn2.weight'].shape == (16,)
    # independent BN: the steps' running means differ
    assert not torch.equal(stats['cell1.step0.bn1.running_mean'], stats['cell1.step1.bn1.running_mean'])


def test_final_model_loads_in_timm_and_reproduces_the_test_error(tiny_run, tiny_data):
    assert json.loads((tiny_run[0] / 'config.json').read_text())['model_args']['block'] == 'postact'  # recorded
    out, summary = tiny_run
    model = timm.create_model('rc4_cifar', width=4, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors'))).eval()
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'rc4_cifar' and config['model_args']['width'] == 4
    local = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    _, test, _, _ = load_image_splits('cifar10', str(tiny_data))
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg['mean']).view(1, -1, 1, 1) * 255
    std = torch.tensor(cfg['std']).view(1, -1, 1, 1) * 255
    with torch.no_grad():
        x = normalize(test.images, mean, std)
        preds = model(x).argmax(-1)
        torch.testing.assert_close(local(x), model(x), rtol=0, atol=0)
    err = 100 * (1 - (preds == test.labels).float().mean().item())
    assert err == pytest.approx(summary['test_top1_error'], abs=1e-6)


def test_plots_and_results_table(tiny_run, tmp_path):
    from timm_rc.reports.figures import plot_bn, plot_curves
    from timm_rc.reports.tables import collect, table
    out, summary = tiny_run
    pngs = plot_bn(out, out=tmp_path)
    assert sorted(p.name for p in pngs) == ['bn_cell1_bn1.png', 'bn_cell1_bn2.png', 'bn_cell2_bn1.png',
                                            'bn_cell2_bn2.png']
    assert plot_curves([out], tmp_path / 'curves.png').stat().st_size > 1000
    text = table(collect([out]))  # this run only (the session's tmp tree holds every other test's runs)
    assert f'{summary["test_top1_error"]:.2f}' in text and 'RC-4' in text


def test_results_table_puts_the_paper_beside_the_mean_over_seeds(tmp_path):
    from timm_rc.reports.tables import collect, table
    for seed, err in enumerate([8.0, 9.0, 10.0]):
        d = tmp_path / f'seed{seed}'
        d.mkdir()
        (d / 'summary.json').write_text(json.dumps(dict(
            model='rc4_cifar', model_kwargs={'bn_sharing': 'shared'}, dataset='cifar10', data_dir=None, seed=seed,
            test_top1_error=err, epochs_completed=160, epochs=160, params=1_259_082)))
    text = table(collect([tmp_path]), markdown=True)
    assert '| RC-4, shared BN |  | cifar10 |  | 3 | 0,1,2 | 160/160 | 1,259,082 | 9.00 ± 1.00 | 21.00 |' in text


def test_shared_cifar10_slice_with_the_gpu_resident_loader(tmp_path):
    if not SHARED_CIFAR10.is_dir():
        pytest.skip(f'{SHARED_CIFAR10} not here')
    out = tmp_path / 'run'
    summary = run(['--data_dir', str(SHARED_CIFAR10), '--max_train_samples', '64', '--max_eval_samples', '50',
                   '--epochs', '1', '--loader', 'gpu', '--output_dir', str(out), *TINY])
    assert summary['loader'] == 'gpu' and summary['eval_examples'] == 50 and summary['train_examples'] == 64
    assert summary['global_step'] == 4


def test_cuda_style_settings_on_the_cpu(tiny_data, tmp_path):
    """ The CUDA defaults (device-resident data, bf16 autocast, channels_last weights) run on the CPU
    too: checkpoints save (safetensors needs contiguous tensors), resume and export. """
    out = tmp_path / 'run'
    argv = ['--data_dir', str(tiny_data), '--output_dir', str(out), '--loader', 'gpu', '--mixed_precision', 'bf16',
            '--channels_last', 'true', *TINY]
    run(argv + ['--epochs', '1'])
    summary = run(argv + ['--epochs', '2', '--resume'])
    assert summary['epochs_completed'] == 2 and summary['mixed_precision'] == 'bf16'
    assert summary['loader'] == 'gpu'
    timm.create_model(f'local-dir:{out}', pretrained=True)


def test_cifar100_schema_with_fine_label(tmp_path, capsys):
    data = make_parquet(tmp_path / 'c100', num_classes=100, label='fine_label', n_train=32, n_test=8)
    summary = run(['--data_dir', str(data), '--model', 'rc1_cifar.cifar100', '--epochs', '1',
                   '--output_dir', str(tmp_path / 'ok'), *TINY])
    reference = timm.create_model('rc1_cifar', width=4, num_classes=100)
    assert summary['params'] == sum(p.numel() for p in reference.parameters())
    assert summary['eval_examples'] == 8
    code, err = run_main(['--data_dir', str(data), '--model', 'rc1_cifar', '--output_dir',
                          str(tmp_path / 'bad'), *TINY], capsys)
    assert code == 2
    assert 'rc1_cifar has a 10-class head but' in err and 'has 100 classes' in err
    assert "use the model's tag for such data, rc1_cifar.cifar100, or --model_kwargs '{\"num_classes\": 100}'" in err


def test_the_class_count_remedy_fits_the_numbers():
    """ A tag is suggested only where one has the data's class count (issue 17, item 10). """
    from timm_rc.train.loop import class_count_remedy
    assert class_count_remedy('rc4_cifar.cifar100', 10) == \
        "use the model's tag for such data, rc4_cifar.cifar10, or --model_kwargs '{\"num_classes\": 10}'"
    for model in ('rc4_cifar', 'rc4_cifar.cifar100', 'resnet18'):
        assert class_count_remedy(model, 2) == \
            "set its head to the data's classes with --model_kwargs '{\"num_classes\": 2}'"


# ---- resume, kill, multi-process (real subprocesses) -----------------------------------------


def _train_cmd(data, out, *extra):
    return [sys.executable, str(REPO / 'train.py'), '--data_dir', str(data), '--epochs', '3', '--output_dir',
            str(out), *TINY, *extra]


def _subprocess_env(**extra):
    env = dict(os.environ, **extra)
    env.pop('TIMM_RC_FAULT', None) if 'TIMM_RC_FAULT' not in extra else None
    return env


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tiny_data, tmp_path):
    ref, killed = tmp_path / 'ref', tmp_path / 'killed'
    subprocess.run(_train_cmd(tiny_data, ref), check=True, env=_subprocess_env(), capture_output=True)
    # 6 steps per epoch: step 9 is the middle of epoch 2
    p = subprocess.run(_train_cmd(tiny_data, killed), env=_subprocess_env(TIMM_RC_FAULT='step9'),
                       capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert sorted(x.name for x in (killed / 'checkpoints').iterdir()) == ['epoch_0001']
    # restarting without --resume refuses to touch the run
    p = subprocess.run(_train_cmd(tiny_data, killed), env=_subprocess_env(), capture_output=True, text=True)
    assert p.returncode == 2 and 'already holds a run' in p.stderr and '--resume' in p.stderr
    p = subprocess.run(_train_cmd(tiny_data, killed, '--resume'), env=_subprocess_env(), capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'resumed from' in p.stdout
    a, b = load_file(str(ref / 'model.safetensors')), load_file(str(killed / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)['epoch'] for x in (killed / 'metrics.jsonl').read_text().splitlines()] == [1, 2, 3]


def test_sigkill_while_writing_a_checkpoint_leaves_no_partial_checkpoint(tiny_data, tmp_path):
    out = tmp_path / 'run'
    p = subprocess.run(_train_cmd(tiny_data, out), env=_subprocess_env(TIMM_RC_FAULT='save'),
                       capture_output=True, text=True)
    assert p.returncode == -9
    assert [x.name for x in (out / 'checkpoints').iterdir()] == ['.tmp-epoch_0001']
    p = subprocess.run(_train_cmd(tiny_data, out, '--resume', '--epochs', '1'), env=_subprocess_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'no complete checkpoint' in p.stdout
    assert sorted(x.name for x in (out / 'checkpoints').iterdir()) == ['epoch_0001']


def test_a_finished_run_is_never_overwritten_without_resume(tiny_data, tmp_path, capsys):
    out = tmp_path / 'run'
    argv = ['--data_dir', str(tiny_data), '--epochs', '2', '--max_steps', '3', '--output_dir', str(out), *TINY]
    summary = run(argv)  # stops inside epoch 1: a summary and a model, no checkpoint
    assert summary['global_step'] == 3 and summary['epochs_completed'] == 0
    assert not list((out / 'checkpoints').glob('epoch_*'))
    model_bytes = (out / 'model.safetensors').read_bytes()
    code, err = run_main(argv, capsys)
    assert code == 2 and 'already holds a run (checkpoints or summary.json)' in err
    assert (out / 'model.safetensors').read_bytes() == model_bytes
    summary = run(argv + ['--resume'])  # nothing to resume: starts again, stale metrics dropped
    assert [json.loads(x)['epoch'] for x in (out / 'metrics.jsonl').read_text().splitlines()] == [1]


def test_two_processes_on_cpu_count_the_test_set_once(tmp_path):
    data = make_parquet(tmp_path / 'data', n_train=64, n_test=37)  # 37: uneven over 2 processes
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(REPO / 'train.py'), '--data_dir', str(data), '--epochs', '1', '--output_dir', str(out), *TINY]
    p = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['num_processes'] == 2
    assert summary['eval_examples'] == 37
    assert summary['global_step'] == 64 // 16
    assert 'over 2 processes' in p.stdout


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_data, tmp_path, capsys):
    out = tmp_path / 'run'
    # epoch 1 at lr 1e-30 is fine; from epoch 2 the lr is 1e10 and the weights blow up
    code, err = run_main(['--data_dir', str(tiny_data), '--output_dir', str(out), '--epochs', '3', '--lr', '1e-30',
                          '--lr_gamma', '1e40', '--lr_milestones', '1', '--clip_grad_value', 'null', *TINY], capsys)
    assert code == 3
    assert 'training diverged: the training loss became nan in epoch 2' in err
    assert sorted(x.name for x in (out / 'checkpoints').iterdir()) == ['epoch_0001']


def test_compiled_run_exports_plain_weights(tiny_data, tmp_path):
    """ torch.compile (inductor on the CPU, ~30 s): the exported weights and BN statistics carry the
    model's own names, not the compiled wrapper's '_orig_mod.' ones. """
    out = tmp_path / 'run'
    run(['--data_dir', str(tiny_data), '--epochs', '1', '--max_train_samples', '32', '--output_dir', str(out),
         '--compile', *TINY])
    keys = list(load_file(str(out / 'model.safetensors')))
    assert 'cell1.steps.0.conv1.weight' in keys and not any('_orig_mod' in k for k in keys)
    assert 'cell1.step0.bn1.running_mean' in load_file(str(out / 'bn_stats' / 'epoch_0001.safetensors'))
    timm.create_model(f'local-dir:{out}', pretrained=True)


def test_benchmark_script_prints_its_table(tiny_data):
    p = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_train.py'), '--data_dir', str(tiny_data),
                        '--width', '4', '--batch_sizes', '16', '32', '--epochs', '2'],
                       env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line.split() for line in p.stdout.splitlines()
            if line.startswith('rc4_cifar ') and line.split()[1].isdigit()]  # the table, not the trainer's lines
    assert [r[1] for r in rows] == ['16', '32'] and all(float(r[-1].replace(',', '')) > 0 for r in rows)
    assert 'decode: 136 images' in p.stdout


# ---- logging ---------------------------------------------------------------------------------


def test_tensorboard_logging(tiny_data, tmp_path):
    out = tmp_path / 'run'
    run(['--data_dir', str(tiny_data), '--epochs', '1', '--output_dir', str(out), '--log_with', 'tensorboard',
         *TINY])
    events = list(out.rglob('events.out.tfevents.*'))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()['scalars']
    assert {'train/loss', 'test/top1_err', 'lr', 'images_per_sec', 'bn/cell1/step3/bn2/running_var'} <= set(tags)


def test_wandb_goes_offline_without_an_api_key(tiny_data, tmp_path):
    out = tmp_path / 'run'
    env = _subprocess_env(WANDB_SILENT='true', HOME=str(tmp_path))  # no ~/.netrc login
    env.pop('WANDB_MODE', None)
    env.pop('WANDB_API_KEY', None)
    p = subprocess.run([sys.executable, str(REPO / 'train.py'), '--data_dir', str(tiny_data), '--epochs', '1',
                        '--output_dir', str(out), '--log_with', 'wandb', *TINY], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((out / 'wandb').glob('offline-run-*'))
    assert len(runs) == 1 and list(runs[0].glob('*.wandb'))


# ---- user errors: exit code 2, one clear line, no traceback ----------------------------------


@pytest.mark.parametrize('argv,message', [
    (['--epochz', '3'], "unknown config key 'epochz' in the command line; did you mean 'epochs'? valid keys: batch_size,"),
    (['--zzz', '3'], "unknown config key 'zzz' in the command line; valid keys: batch_size,"),
    (['--epochs', 'three'], "config key 'epochs' needs a value of type int, got 'three'"),
    (['--lr', 'fast'], "config key 'lr' needs a value of type float, got 'fast'"),
    (['--loader', 'fastest'], "config key 'loader' must be one of auto, gpu, dataloader, timm; got 'fastest'"),
    (['--log_with', 'mlflow'], "config key 'log_with' takes wandb, tensorboard, none"),
    (['--model_kwargs', '[1, 2]'], "config key 'model_kwargs' needs a value of type"),
    (['--batch_size', '0'], "config key 'batch_size' must be >= 1, got 0"),
    # every numeric key is checked before anything is written (issue 17, item 9)
    (['--momentum', '-1'], "config key 'momentum' must be in [0, 1), got -1.0"),
    (['--weight_decay', '-1'], "config key 'weight_decay' must be >= 0, got -1.0"),
    (['--lr', 'nan'], "config key 'lr' must be > 0 and finite, got nan"),
    (['--lr', 'inf'], "config key 'lr' must be > 0 and finite, got inf"),
    (['--lr_gamma', '0'], "config key 'lr_gamma' must be > 0, got 0.0"),
    (['--label_smoothing', '1'], "config key 'label_smoothing' must be in [0, 1), got 1.0"),
    (['--lr_milestones', '5,-1'], "config key 'lr_milestones' must be a list of epochs >= 0, got [5, -1]"),
    (['--seed', '-3'], "config key 'seed' must be in [0, 2**32), got -3"),
    (['--clip_grad_value', '0'], "config key 'clip_grad_value' must be > 0, or null to turn clipping off, got 0.0"),
    (['--config', 'nope.yaml'], 'config file nope.yaml does not exist'),
    (['--data_dir', '/nonexistent/cifar'], 'data_dir /nonexistent/cifar does not exist'),
    (['--model', 'rc5_cifar'], "unknown model 'rc5_cifar'; similar names:"),
    (['--model_kwargs', '{"bn_sharing": "half"}'],
     "cannot build rc4_cifar with model_kwargs {'bn_sharing': 'half'}: unknown bn_sharing 'half'; valid values:"),
    (['--model_kwargs', '{"widht": 8}'], "cannot build rc4_cifar with model_kwargs {'widht': 8}"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, tiny_data, tmp_path, capsys):
    base = ['--data_dir', str(tiny_data), '--output_dir', str(tmp_path / 'run'), '--epochs', '1']
    code, err = run_main(base + argv, capsys)  # a repeated key: the last one wins
    assert code == 2
    assert message in err
    assert 'Traceback' not in err


def test_bad_yaml_key_names_the_file(tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model: rc4_cifar\nlearning_rate: 0.1\n')
    code, err = run_main(['--config', str(cfg)], capsys)
    assert code == 2 and f"unknown config key 'learning_rate' in config file {cfg}" in err


@pytest.mark.parametrize('make,message', [
    (lambda d: d.mkdir(), 'holds no parquet files'),
    (lambda d: make_parquet(d, splits=('train',)), 'has no test (or validation) split; it has: train'),
    (lambda d: make_parquet(d, label='target_str_not_classlabel'), None),
])
def test_bad_data_folders(make, message, tmp_path, capsys):
    d = tmp_path / 'data'
    make(d)
    if message is None:  # a ClassLabel under another name is found from the features
        summary = run(['--data_dir', str(d), '--epochs', '1', '--output_dir', str(tmp_path / 'run'), *TINY])
        assert summary['eval_examples'] == 40
        return
    code, err = run_main(['--data_dir', str(d), '--output_dir', str(tmp_path / 'run')], capsys)
    assert code == 2 and message in err


def test_wrong_columns(tmp_path, capsys):
    import datasets
    d = tmp_path / 'data'
    d.mkdir()
    for split in ('train', 'test'):
        datasets.Dataset.from_dict({'pixels': [[0, 1]], 'y': [1]}).to_parquet(str(d / f'{split}.parquet'))
    code, err = run_main(['--data_dir', str(d), '--output_dir', str(tmp_path / 'run')], capsys)
    assert code == 2
    assert 'needs an Image column and a ClassLabel column' in err and 'pixels (List)' in err


# ---- config ----------------------------------------------------------------------------------


def test_config_precedence_and_parsing(tmp_path):
    cfg_file = tmp_path / 'c.yaml'
    cfg_file.write_text('model: rc2_cifar\nlr: 1e-4\nepochs: 5\nlr_milestones: [2, 4]\n'
                        'model_kwargs: {width: 8}\noutput_dir: runs/x/seed{seed}\n')
    cfg = load_config(['--config', str(cfg_file), '--epochs', '7', '--seed=3', '--compile',
                       '--lr_milestones', '3,6', '--resume'])
    assert cfg.model == 'rc2_cifar' and cfg.lr == 1e-4 and cfg.epochs == 7 and cfg.seed == 3
    assert cfg.compile is True and cfg.lr_milestones == [3, 6] and cfg.resume == 'auto'
    assert cfg.model_kwargs == {'width': 8}
    assert cfg.resolved_output_dir() == Path('runs/x/seed3')
    assert load_config([]) == TrainConfig()
    assert TrainConfig().resolved_output_dir() == Path('runs/rc4_cifar-cifar10/seed0')
    assert load_config(['--epochs', '1', '--epochs', '2']).epochs == 2  # the last one wins
    with pytest.raises(UserError, match=r"output_dir 'runs/\{run\}' may only use \{seed\}"):
        TrainConfig(output_dir='runs/{run}').resolved_output_dir()


def test_every_shipped_config_loads_and_sweeps_point_at_real_configs():
    import yaml
    configs = sorted((REPO / 'train_configs').glob('*.yaml'))
    ours = ('fast_rc4_cifar10.yaml', 'cpu_demo.yaml', 'ours_rc4_cifar10.yaml',  # labelled as ours in the file
            'rc4_rank1_cifar10.yaml', 'rc4_rank2_cifar10.yaml', 'rc4_rank4_cifar10.yaml', 'rc4_distilled_cifar10.yaml',
            'rc4_rank2_distilled_cifar10.yaml')
    assert len(configs) == 14 + len(ours)
    for path in configs:
        cfg = load_config(['--config', str(path)])
        assert timm.is_model(cfg.model.split('.')[0]), path
        assert '{seed}' in cfg.output_dir
        assert (path.read_text().startswith('# Ours') or 'ours' in path.read_text().splitlines()[0]) == (
            path.name in ours), path
    paper = {p.name: load_config(['--config', str(p)]) for p in configs if p.name not in ours}
    for name, cfg in paper.items():
        depth_gt_10 = cfg.model.split('.')[0] in ('rc4_cifar', 'rc4_unshared_cifar')
        assert cfg.epochs == (160 if depth_gt_10 else 120), name
        assert (cfg.batch_size, cfg.lr, cfg.lr_milestones, cfg.clip_grad_value) == (128, 0.1, [60, 90], 0.1)
        assert cfg.dataset in name and (cfg.model.endswith('.cifar100') == ('cifar100' in name))
    for sweep in (REPO / 'train_configs' / 'sweeps').glob('*.yaml'):
        spec = yaml.safe_load(sweep.read_text())
        values = spec['parameters']['config'].get('values') or [spec['parameters']['config']['value']]
        for v in values:
            assert (REPO / v).is_file(), f'{sweep.name} names missing {v}'


# ---- data pieces -----------------------------------------------------------------------------


def test_augment_is_a_padded_crop_and_flip():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(7), pad=2)
    # replay the same draws
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 5, (64, 1, 1), generator=g).flatten()
    dx = torch.randint(0, 5, (64, 1, 1), generator=g).flatten()
    flip = (torch.rand(64, 1, 1, generator=g) < 0.5).flatten()
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(64):
        crop = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    assert 0 < flip.sum() < 64 and out.dtype == torch.uint8


def test_gpu_batches_shard_one_global_permutation():
    split = ImageSplit(torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1), torch.arange(50))
    whole = [y for _, y in GpuBatches(split, 8, seed=1)]
    parts = [[y for _, y in GpuBatches(split, 8, seed=1, rank=r, world=2)] for r in (0, 1)]
    assert len(whole) == 6  # 50 // 8, the partial batch dropped
    for w, a, b in zip(whole, *parts):
        assert torch.equal(torch.cat([a, b]), w)
    again = GpuBatches(split, 8, seed=1)
    again.set_epoch(1)
    assert not torch.equal(torch.cat(whole), torch.cat([y for _, y in again]))
    assert torch.equal(epoch_generator(1, 0, 'cpu').get_state(), epoch_generator(1, 0, 'cpu').get_state())


def test_step_schedule():
    s = StepSchedule(warmup_steps=4, milestones=[10, 20], gamma=0.1)
    assert [s(i) for i in (0, 3, 9, 10, 19, 20)] == pytest.approx([0.25, 1, 1, 0.1, 0.1, 0.01])


# ---- what a new user hit (issue 10) ------------------------------------------------------------


def test_command_line_mappings_merge_into_the_files(tmp_path):
    nobn = str(REPO / 'train_configs' / 'rc4_nobn_cifar10.yaml')
    cfg = load_config(['--config', nobn, '--model_kwargs', '{"width": 8}'])
    assert cfg.model_kwargs == {'bn_sharing': 'none', 'width': 8}  # the file's bn_sharing survives
    cfg = load_config(['--config', nobn, '--model_kwargs.width', '8', '--model_kwargs.block=postact',
                       '--model_kwargs', '{"bn_sharing": "shared"}'])
    assert cfg.model_kwargs == {'bn_sharing': 'shared', 'width': 8, 'block': 'postact'}  # the command line wins
    with pytest.raises(UserError, match=r"config key 'epochs.x' in the command line: only mappings \(model_kwargs, teacher_model_kwargs\)"):
        load_config(['--epochs.x', '3'])


def test_help_lists_every_key_with_type_default_and_comment(capsys):
    assert main(['--help']) is None and main(['-h']) is None
    out = capsys.readouterr().out
    for name, f in TrainConfig.__dataclass_fields__.items():
        # every key a user sets; config_file / config_values are recorded by --config, not given
        assert (f'  --{name} ' in out) == (not f.metadata.get('recorded')), name
    with pytest.raises(UserError, match="unknown config key 'config_values' in the command line"):
        load_config(['--config_values', '{}'])
    assert '  --epochs int or null (default null)\n      None: 160 for depth > 10, 120 otherwise' in out
    assert '  --lr_milestones list of int (default [60, 90])' in out
    assert out.index('\nmodel:') < out.index('\ndata:') < out.index('\nspeed:')


@pytest.mark.parametrize('argv0,door,usage', [
    ('train.py', None, 'usage: python train.py [--config'),
    ('/venv/bin/timm-rc-train', None, 'usage: timm-rc-train [--config'),
    ('/x/timm_rc/__main__.py', 'front', 'usage: python -m timm_rc train [--config'),
    ('/venv/bin/timm-rc', 'front', 'usage: timm-rc train [--config'),
])
def test_help_names_the_command_the_user_ran(argv0, door, usage, capsys, monkeypatch):
    import timm_rc.__main__ as front
    monkeypatch.setattr(sys, 'argv', [argv0, '--help'])
    assert (front.main(['train', '--help']) if door else main(['--help'])) in (None, 0)
    assert capsys.readouterr().out.startswith(usage)


def test_the_run_prints_its_resolved_model_kwargs(tiny_data, tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model_kwargs: {bn_sharing: none}\n')
    run(['--config', str(cfg), '--data_dir', str(tiny_data), '--output_dir', str(tmp_path / 'run'), '--max_steps', '1',
         *TINY])
    assert 'rc4_cifar {"bn_sharing": "none", "width": 4}: 5,' in capsys.readouterr().out


@pytest.mark.parametrize('argv,message', [
    (['--mixed_precision', 'fp16'], 'mixed_precision fp16 needs a CUDA device'),
    (['--compile_mode', 'max-autotune'], "compile_mode 'max-autotune' only applies with compile: true"),
    (['--compile', '--compile_mode', 'reduce-overhead'], "compile_mode 'reduce-overhead' means CUDA graphs"),
    (['--log_model'], "log_model logs the model to W&B and needs log_with to include 'wandb'"),
])
def test_settings_that_cannot_take_effect_on_the_cpu_are_errors(argv, message, tiny_data, tmp_path, capsys):
    out = tmp_path / 'run'
    code, err = run_main(['--data_dir', str(tiny_data), '--output_dir', str(out), *TINY, *argv], capsys)
    assert code == 2 and message in err and 'Traceback' not in err
    assert not out.exists()


def test_sync_bn_with_cpu_processes_is_an_error():
    from timm_rc.train.loop import _check_device_settings
    with pytest.raises(UserError, match='sync_bn needs CUDA processes .*these 2 processes run on the CPU'):
        _check_device_settings(TrainConfig(sync_bn=True), cuda=False, world=2, mixed_precision='no')
    with pytest.raises(UserError, match='sync_bn needs CUDA processes .*this process runs on the CPU'):
        _check_device_settings(TrainConfig(sync_bn=True), cuda=False, world=1, mixed_precision='no')
    _check_device_settings(TrainConfig(sync_bn=True), cuda=True, world=2, mixed_precision='bf16')


def test_bf16_on_the_cpu_is_applied(tiny_data, tmp_path):
    base = ['--data_dir', str(tiny_data), '--max_steps', '2', *TINY]
    fp32 = run(base + ['--output_dir', str(tmp_path / 'fp32'), '--mixed_precision', 'no'])
    bf16 = run(base + ['--output_dir', str(tmp_path / 'bf16'), '--mixed_precision', 'bf16'])
    assert fp32['mixed_precision'] == 'no' and bf16['mixed_precision'] == 'bf16'
    assert fp32['train_loss'] != bf16['train_loss']


def test_resume_with_other_settings_lists_the_differences(tiny_data, tmp_path, capsys):
    out = tmp_path / 'run'
    base = ['--data_dir', str(tiny_data), '--output_dir', str(out), *TINY]
    run(base + ['--epochs', '1'])
    weights = (out / 'checkpoints' / 'epoch_0001' / 'model.safetensors').read_bytes()
    code, err = run_main(base + ['--epochs', '2', '--resume', '--model_kwargs.width', '8', '--lr', '0.2'], capsys)
    assert code == 2 and 'Traceback' not in err
    assert f'cannot resume {out}: its settings differ (' in err
    assert "model_kwargs: {'width': 4} in the run, {'width': 8} now" in err and 'lr: 0.1 in the run, 0.2 now' in err
    assert (out / 'checkpoints' / 'epoch_0001' / 'model.safetensors').read_bytes() == weights
    summary = run(base + ['--epochs', '2', '--resume', '--log_interval', '1'])  # more epochs: allowed
    assert summary['epochs_completed'] == 2


def test_resume_refuses_other_data_of_the_same_shape_but_takes_a_moved_copy(tiny_data, tmp_path, capsys):
    """ What identifies the data (class names, examples, a hash of the first examples) is compared on resume,
    not the path (issue 17, item 1). """
    import shutil
    out = tmp_path / 'run'
    run(['--data_dir', str(tiny_data), '--output_dir', str(out), '--epochs', '1', *TINY])
    saved = json.loads((out / 'run_config.json').read_text())['data']
    assert saved['train']['examples'] == 96 and saved['test']['examples'] == 40 and len(saved['train']['sha256']) == 16
    other = make_parquet(tmp_path / 'other', seed=1)  # the same shape, other images
    code, err = run_main(['--data_dir', str(other), '--output_dir', str(out), '--epochs', '2', '--resume', *TINY], capsys)
    assert code == 2 and f'cannot resume {out}: its settings differ (the data ({other}) is not the data the run ' \
        f'trained on: its test split and train split differ)' in err
    assert json.loads((out / 'run_config.json').read_text())['data_dir'] == str(tiny_data)  # untouched
    moved = tmp_path / 'moved'
    shutil.copytree(tiny_data, moved)
    summary = run(['--data_dir', str(moved), '--output_dir', str(out), '--epochs', '2', '--resume', *TINY])
    assert summary['epochs_completed'] == 2


def test_the_progress_bar_shows_the_loss_in_short_epochs(tiny_data, tmp_path, capsys):
    """ 6 steps an epoch, log_interval 50: the bar still shows the epoch's loss (issue 17, item 13). """
    capsys.readouterr()
    summary = run(['--data_dir', str(tiny_data), '--output_dir', str(tmp_path / 'run'), '--epochs', '1',
                   '--model_kwargs', '{"width": 4}', '--batch_size', '16', '--log_interval', '50'])
    err = capsys.readouterr().err
    assert f'loss={summary["train_loss"]:.4f}' in err, err[-1000:]


def test_resume_takes_the_runs_own_settings(tiny_data, tmp_path, capsys):
    """ `--output_dir RUN --resume` continues the run as it was trained: its data_dir, model and kwargs come
    from its run_config.json, the command line on top (issue 17, item 6). """
    out = tmp_path / 'run'
    run(['--data_dir', str(tiny_data), '--output_dir', str(out), '--epochs', '1', '--lr', '0.05', *TINY])
    try:
        main(['--output_dir', str(out), '--resume', '--epochs', '2'])  # no --data_dir, no TINY kwargs
    finally:
        reset_accelerate_state()
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['epochs_completed'] == 2 and summary['model_kwargs'] == {'width': 4}
    assert json.loads((out / 'run_config.json').read_text())['lr'] == 0.05
    # a setting that changes the run is still refused
    code, err = run_main(['--output_dir', str(out), '--resume', '--epochs', '3', '--lr', '0.2'], capsys)
    assert code == 2 and 'lr: 0.05 in the run, 0.2 now' in err


@pytest.mark.parametrize('door', ['train.py', 'python -m timm_rc train'])
def test_ctrl_c_says_where_the_newest_checkpoint_is(door, tiny_data, tmp_path, capsys, monkeypatch):
    """ The resume hint names the command the user ran (issue 23: the front door said `python train.py`). """
    import timm_rc.train.loop as loop
    import timm_rc.__main__ as front

    def interrupt(point):
        if point == 'step9':  # in epoch 2 (6 steps per epoch)
            raise KeyboardInterrupt
    monkeypatch.setattr(loop, 'fault', interrupt)
    out = tmp_path / 'run'
    argv = ['--data_dir', str(tiny_data), '--output_dir', str(out), '--epochs', '3', *TINY]
    if door == 'train.py':
        monkeypatch.setattr(sys, 'argv', ['train.py'])
        code, err = run_main(argv, capsys)
    else:
        monkeypatch.setattr(sys, 'argv', ['/x/timm_rc/__main__.py'])
        with pytest.raises(SystemExit) as e:
            try:
                front.main(['train', *argv])
            finally:
                reset_accelerate_state()
        code, err = e.value.code, capsys.readouterr().err
        assert sys.argv == ['/x/timm_rc/__main__.py']  # given back
    assert code == 130 and 'Traceback' not in err
    prog = 'python train.py' if door == 'train.py' else door
    assert f'interrupted. The newest complete checkpoint is {out}/checkpoints/epoch_0001; continue with: ' \
           f'{prog} --data_dir {tiny_data} --output_dir {out} --epochs 3' in err
    assert err.rstrip().endswith('--resume (or the same through accelerate launch)')


def test_sigterm_stops_like_ctrl_c(tiny_data, tmp_path):
    import signal
    import time
    out = tmp_path / 'run'
    # stderr to a file: a pipe nobody reads fills with progress bars and blocks the run
    log = open(tmp_path / 'stderr.log', 'w')
    p = subprocess.Popen([sys.executable, str(REPO / 'train.py'), '--data_dir', str(tiny_data), '--output_dir', str(out),
                          '--epochs', '500', *TINY], env=_subprocess_env(), stderr=log, text=True)
    deadline = time.time() + 600
    # any checkpoint: with tiny epochs the first is rotated away (keep_checkpoints 2) within a second
    checkpoints = lambda: list((out / 'checkpoints').glob('epoch_*'))
    while not checkpoints() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None and checkpoints()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=300)
    log.close()
    err = (tmp_path / 'stderr.log').read_text()
    assert p.returncode == 130, err[-2000:]
    assert 'interrupted. The newest complete checkpoint is' in err and 'Traceback' not in err


def test_user_errors_print_on_the_main_process_only(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    code, err = run_main(['--epochz', '1'], capsys)
    assert code == 2 and err == ''


def test_num_processes_without_multi_gpu_is_refused(tiny_data, tmp_path):
    """ `accelerate launch --num_processes 2` without --multi_gpu starts one process on a CPU machine; the
    trainer says so and gives the working command instead of training alone (issue 17, item 2). """
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '-q', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', str(REPO / 'train.py'), '--data_dir', str(tiny_data),
           '--output_dir', str(out), '--epochs', '1', *TINY]
    p = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert ('error: accelerate launch was asked for 2 processes but started one (without --multi_gpu the launcher '
            'runs a single process); run accelerate launch --multi_gpu --num_processes 2 train.py') in p.stderr, \
        p.stderr[-2000:]
    assert not out.exists()


def test_a_bad_config_under_the_launcher_prints_one_line(tmp_path):
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '-q', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(REPO / 'train.py'), '--epochz', '1']
    p = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert p.stderr.count("error: unknown config key 'epochz'") == 1, p.stderr[-3000:]


def test_accelerate_launch_uses_the_cores_not_one_thread(tiny_data, tmp_path):
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--num_processes', '1', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', str(REPO / 'train.py'), '--data_dir', str(tiny_data),
           '--max_steps', '1', '--output_dir', str(out), *TINY]
    env = _subprocess_env()
    env.pop('OMP_NUM_THREADS', None)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))
    assert json.loads((out / 'summary.json').read_text())['num_threads'] == cores
    if cores > 1:
        assert f'{cores} CPU thread(s) per process (accelerate launch set OMP_NUM_THREADS=1' in p.stdout
    # a count the user chose is kept
    p = subprocess.run(cmd[:-len(TINY) - 2] + ['--output_dir', str(tmp_path / 'run2'), *TINY],
                       env=dict(env, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / 'run2' / 'summary.json').read_text())['num_threads'] == 1


def test_wandb_asks_wandb_whether_a_key_is_configured(tmp_path, monkeypatch):
    from timm_rc.train.loop import _trackers
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.delenv('WANDB_MODE', raising=False)
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    monkeypatch.setenv('WANDB_BASE_URL', 'https://wandb.example.org')  # a self-hosted server
    (tmp_path / '.netrc').write_text(f'machine wandb.example.org\n  login user\n  password {"k" * 40}\n')
    (tmp_path / '.netrc').chmod(0o600)
    try:
        assert _trackers(TrainConfig(log_with='wandb'), tmp_path) == (['wandb'], None, None)
    finally:
        from wandb.sdk.lib import wbauth
        wbauth.unauthenticate_session(update_settings=False)  # forget the key loaded above
    # without a key: offline, said in one line (test_wandb_offline_run_summary_and_model_artifact)


def test_wandb_online_without_a_key_is_one_line_and_keeps_the_run(tiny_data, tmp_path):
    out = tmp_path / 'run'
    base = [sys.executable, str(REPO / 'train.py'), '--data_dir', str(tiny_data), '--output_dir', str(out), *TINY]
    env = _subprocess_env(HOME=str(tmp_path))
    env.pop('WANDB_API_KEY', None)
    env.pop('WANDB_MODE', None)
    assert subprocess.run(base + ['--epochs', '1'], env=env, capture_output=True, timeout=300).returncode == 0
    files = sorted(p.relative_to(out) for p in out.rglob('*'))
    p = subprocess.run(base + ['--epochs', '2', '--resume', '--log_with', 'wandb'], env=dict(env, WANDB_MODE='online'),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and 'Traceback' not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        'error: WANDB_MODE=online but no W&B API key is configured: run `wandb login` (or set WANDB_API_KEY), '
        'or unset WANDB_MODE to log offline')
    assert sorted(p.relative_to(out) for p in out.rglob('*')) == files


def test_a_tracker_that_cannot_start_leaves_the_run_folder_as_it_was(tiny_data, tmp_path, capsys, monkeypatch):
    """ W&B failing to start (no network) once left its wandb/ folder in a run folder said to be untouched
    (issue 17, item 11). """
    import accelerate
    out = tmp_path / 'run'
    base = ['--data_dir', str(tiny_data), '--output_dir', str(out), *TINY]
    run(base + ['--epochs', '1'])
    files = sorted(p.relative_to(out) for p in out.rglob('*'))

    def fail(self, project, config=None, init_kwargs=None):
        (Path(init_kwargs['wandb']['dir']) / 'wandb' / 'run-x').mkdir(parents=True)  # as wandb.init does first
        raise ConnectionError('network is unreachable')
    monkeypatch.setattr(accelerate.Accelerator, 'init_trackers', fail)
    monkeypatch.setenv('WANDB_MODE', 'offline')
    code, err = run_main(base + ['--epochs', '2', '--resume', '--log_with', 'wandb'], capsys)
    assert code == 2 and 'wandb could not start (ConnectionError: network is unreachable)' in err
    assert 'The run folder is untouched' in err
    assert sorted(p.relative_to(out) for p in out.rglob('*')) == files


def test_ctrl_c_while_the_trainer_imports_is_one_line(tmp_path):
    """ A sweep runner stopping its runs (SIGINT to the process group) may hit a run still importing torch: one
    line and exit code 130, no traceback in its log (issue 17, item 11). """
    p = subprocess.Popen([sys.executable, str(REPO / 'train.py'), '--help'], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_subprocess_env())
    time.sleep(0.5)  # python is up, torch is not imported yet
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert 'Traceback' not in err, err[-2000:]
    assert (p.returncode, err.strip()) in ((130, 'interrupted while starting; nothing was started.'), (-2, '')), (
        p.returncode, err[-500:])


def test_wandb_offline_run_summary_and_model_artifact(tiny_data, tmp_path):
    out = tmp_path / 'run'
    env = _subprocess_env(WANDB_SILENT='true', HOME=str(tmp_path))
    env.pop('WANDB_MODE', None)
    env.pop('WANDB_API_KEY', None)
    p = subprocess.run([sys.executable, str(REPO / 'train.py'), '--data_dir', str(tiny_data), '--epochs', '1',
                        '--output_dir', str(out), '--log_with', 'wandb', '--log_model', *TINY], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f'W&B: no API key configured (`wandb login`), logging offline; upload later with: wandb sync {out}' \
           in p.stdout
    log, = (out / 'wandb').glob('offline-run-*/*.wandb')  # W&B's own record log (protobuf records)
    records = log.read_bytes()
    assert b'bn/*' in records  # define_metric('bn/*', summary='none'): no BN keys in the run summary
    assert f'{out.name}-model'.encode() in records  # the model artifact was logged


def test_the_model_artifact_holds_the_weights_and_config(tiny_run):
    from timm_rc.train.loop import _log_model_artifact
    out, summary = tiny_run
    logged = []

    class Run:
        name = 'cpu_w8/rc4 cifar/seed0'

        def log_artifact(self, artifact, aliases):
            logged.append((artifact, aliases))
    _log_model_artifact(Run(), out, summary)
    (artifact, aliases), = logged
    assert (artifact.name, artifact.type, aliases) == ('cpu_w8-rc4-cifar-seed0-model', 'model', ['latest', 'epoch2'])
    assert sorted(artifact.manifest.entries) == ['config.json', 'model.safetensors']
    assert artifact.metadata['test_top1_error'] == summary['test_top1_error']


def test_cpu_demo_config_and_sweep(tiny_data, tmp_path, monkeypatch):
    from timm_rc.train.sweeps import load_sweep, plan
    # the sweep's paths are relative to the folder it runs from (the repository, as for `wandb agent`);
    # a copy of that layout keeps the repository's own runs/ out of the test
    for name in ('train_configs', 'train.py'):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    runs = plan(load_sweep(REPO / 'train_configs' / 'sweeps' / 'cpu_demo.yaml'), 'cpu_demo')
    assert [r.command[-2:] for r in runs] == [['--config=train_configs/cpu_demo.yaml', '--model=rc1_cifar'],
                                              ['--config=train_configs/cpu_demo.yaml', '--model=rc4_cifar']]
    assert [str(r.output_dir) for r in runs] == ['runs/cpu_demo/rc1_cifar/seed0', 'runs/cpu_demo/rc4_cifar/seed0']
    cfg = load_config(['--config', 'train_configs/cpu_demo.yaml'])
    assert (cfg.model_kwargs, cfg.epochs, cfg.lr_milestones, cfg.clip_grad_value) == ({'width': 8}, 8, [5, 7], 0.1)
    assert cfg.data_dir == '../shared/data/cifar10'
    # the demo's settings train (on the tiny data, two steps)
    summary = run(['--config', 'train_configs/cpu_demo.yaml', '--data_dir', str(tiny_data), '--max_steps', '2',
                   '--batch_size', '16', '--output_dir', str(tmp_path / 'demo')])
    width8 = timm.create_model('rc4_cifar', width=8)
    assert summary['global_step'] == 2 and summary['params'] == sum(p.numel() for p in width8.parameters())
