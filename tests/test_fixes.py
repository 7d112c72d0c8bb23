""" What a new user met (issue 24) and the CPU defaults (issue 21): each test fails on the code before its fix. """
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import exits_2
from test_train import TINY, make_parquet, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    make_parquet(root)
    return root


def test_the_logged_lr_is_the_one_the_epoch_trained_with(data, tmp_path):
    """ lr / 10 from epoch 2 on (milestone 1): epoch 1 trained at 0.1 and is logged so; before the fix it was
    logged with the next epoch's 0.01. """
    run(['--data_dir', str(data), '--epochs', '3', '--lr_milestones', '[1, 2]', '--output_dir', str(tmp_path / 'r'),
         *TINY])
    rows = [json.loads(line) for line in (tmp_path / 'r' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['lr'] for r in rows] == [0.1, 0.01, 0.001]  # exactly: 12 significant digits, no 0.010000000000000002
    assert [r['lr_mean'] for r in rows] == [0.1, 0.01, 0.001]
    assert all(r['eval_time_s'] > 0 for r in rows)


def test_a_warm_up_epoch_logs_its_last_and_its_mean_lr(data, tmp_path):
    """ One warm-up epoch of n steps ramps the lr (i + 1) / n * 0.1: 'lr' is its last step's (0.1) and 'lr_mean'
    the mean, 0.1 * (n + 1) / (2 n). """
    run(['--data_dir', str(data), '--epochs', '2', '--warmup_epochs', '1', '--output_dir', str(tmp_path / 'r'), *TINY])
    rows = [json.loads(line) for line in (tmp_path / 'r' / 'metrics.jsonl').read_text().splitlines()]
    n = json.loads((tmp_path / 'r' / 'summary.json').read_text())['global_step'] // 2
    assert n > 1 and [r['lr'] for r in rows] == [0.1, 0.1]
    assert rows[0]['lr_mean'] == pytest.approx(0.1 * (n + 1) / (2 * n), rel=1e-9) and rows[1]['lr_mean'] == 0.1


def test_cpu_defaults_are_channels_last_bf16_where_the_cpu_has_it_and_fused_sgd(data, tmp_path):
    from timm_rc.evaluation import auto_channels_last, auto_precision
    has_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert auto_precision('cpu') == ('bf16' if has_bf16 else 'no') and auto_precision('cuda') == 'bf16'
    assert auto_channels_last('cpu') is True and auto_channels_last('cuda') is True
    summary = run(['--data_dir', str(data), '--epochs', '1', '--output_dir', str(tmp_path / 'r'), *TINY])
    config = json.loads((tmp_path / 'r' / 'run_config.json').read_text())
    assert config['channels_last'] is True and config['mixed_precision'] == summary['mixed_precision'] == \
        ('bf16' if has_bf16 else 'no')


def test_weights_and_checkpoints_are_readable_by_others(data, tmp_path):
    """ safetensors 0.8 writes 0600; every run file gets 0666 less the umask (0644 under umask 022). """
    old = os.umask(0o022)
    try:
        run(['--data_dir', str(data), '--epochs', '1', '--output_dir', str(tmp_path / 'r'), *TINY])
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / 'r').rglob('*') if f.is_file() and not f.name.endswith('.lock')]
    assert any(f.name == 'model.safetensors' for f in files) and any('checkpoints' in f.parts for f in files)
    modes = {str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert set(modes.values()) == {'0o644'}, modes


def test_an_output_dir_that_is_a_file_is_named(data, tmp_path, capsys):
    from timm_rc.cli.train import main
    (tmp_path / 'taken').write_text('x')
    err = exits_2(main, ['--data_dir', str(data), '--output_dir', str(tmp_path / 'taken'), *TINY], capsys)
    assert err == f'error: output_dir {tmp_path / "taken"} is a file, not a folder: choose another output_dir\n'
    err = exits_2(main, ['--data_dir', str(data), '--output_dir', str(tmp_path / 'taken' / 'seed0'), *TINY], capsys)
    assert err == (f'error: {tmp_path / "taken"} is a file, so output_dir {tmp_path / "taken" / "seed0"} cannot be '
                   f'created below it: choose another output_dir\n')


@pytest.mark.parametrize('text, where', [('{"width": 8', 'Expecting \',\' delimiter: column 12'),
                                         ('{"width: 8}', 'Unterminated string starting at: column 2')])
def test_invalid_json_in_model_kwargs_says_where(text, where):
    from timm_rc.runs.config import load_config
    from timm_rc.errors import UserError
    with pytest.raises(UserError) as e:
        load_config(['--model_kwargs', text])
    assert str(e.value) == f"config key 'model_kwargs': {text!r} is not valid JSON: {where} (e.g. '{{\"width\": 8}}')"


def test_yaml_style_model_kwargs_still_work():
    from timm_rc.runs.config import load_config
    assert load_config(['--model_kwargs', '{width: 8}']).model_kwargs == {'width': 8}


def test_results_and_plots_name_a_missing_folder(tmp_path, capsys):
    from timm_rc.cli.plots import main as plots
    from timm_rc.cli.results import main as results
    missing = tmp_path / 'nope'
    assert exits_2(results, [str(missing)], capsys) == f'error: {missing} does not exist\n'
    assert exits_2(plots, ['curves', str(missing)], capsys) == f'error: {missing} does not exist\n'
    assert exits_2(plots, ['tradeoff', str(missing), '--out', str(tmp_path / 'f.png')], capsys) == \
        f'error: {missing} does not exist\n'
    # a file where a run folder belongs is named as such (it was "no run summary below" and, for plots, a
    # complaint about the output folder)
    file = tmp_path / 'summary.json'
    file.write_text('{}')
    as_run = f'error: {file} is a file, not a run folder; give the folder the trainer wrote (it holds metrics.jsonl ' \
             f'and bn_stats/)\n'
    assert exits_2(plots, ['bn', str(file)], capsys) == as_run
    assert exits_2(plots, ['curves', str(tmp_path), str(file)], capsys) == as_run
    as_root = f'error: {file} is a file, not a folder; give run folders (holding summary.json) or folders below ' \
              f'which they lie\n'
    assert exits_2(results, [str(file)], capsys) == as_root
    assert exits_2(plots, ['tradeoff', str(file), '--out', str(tmp_path / 'f.png')], capsys) == as_root
    assert sorted(p.name for p in tmp_path.iterdir()) == ['summary.json']  # nothing written


def test_results_after_skipping_a_broken_summary_says_so(tmp_path, capsys):
    from timm_rc.cli.results import main as results
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'summary.json').write_text('{not json')
    with pytest.raises(SystemExit) as e:
        results([str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 2
    assert err[0].startswith(f'skipping the run: {tmp_path / "run" / "summary.json"} is not valid JSON')
    assert err[1] == f'error: no run summary below {tmp_path} that could be read (1 skipped, said above)'


def test_loading_data_prints_no_progress_bars_of_datasets(data, capfd):
    from timm_rc.data import load_splits
    capfd.readouterr()
    load_splits(data_dir=str(data))
    out, err = capfd.readouterr()
    assert 'Generating' not in out + err and out + err == ''


def test_output_dir_takes_the_config_files_name(tmp_path):
    from timm_rc.runs.config import load_config
    cfg_file = tmp_path / 'rc4_sharedbn_cifar10.yaml'
    cfg_file.write_text('model: rc4_cifar\n')
    cfg = load_config(['--config', str(cfg_file), '--output_dir', 'runs/w8/{config}/seed{seed}', '--seed', '2'])
    assert cfg.resolved_output_dir() == Path('runs/w8/rc4_sharedbn_cifar10/seed2')
    assert load_config(['--output_dir', 'runs/{config}']).resolved_output_dir() == Path('runs/no-config')


def test_sweep_parallel_gives_each_run_its_share_whatever_the_config_says(tmp_path, monkeypatch):
    """ A config with num_threads 2 (cpu_demo.yaml had it): under --parallel 2 on 2 cores each run oversubscribed them (13-16x
    slower); the runner now puts its share on the trainer's command line, which beats the config file. """
    import io
    from timm_rc.train import sweeps as sweep_runner
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'train.py').write_text((REPO / 'train.py').read_text())
    (tmp_path / 'two.yaml').write_text('model: rc4_cifar\nnum_threads: 2\nlog_with: none\n'
                                       'output_dir: runs/{model}/seed{seed}\n')
    (tmp_path / 'sweep.yaml').write_text('program: train.py\nmethod: grid\nparameters:\n  config: {value: two.yaml}\n'
                                         '  seed: {values: [0, 1]}\n')
    monkeypatch.setattr(sweep_runner, 'cpu_threads_per_run', lambda parallel, gpus, environ: 1)
    runs = sweep_runner.plan(sweep_runner.load_sweep('sweep.yaml'), 'two')
    assert [r.num_threads for r in runs] == [2, 2]
    started = []

    class Proc:
        pid, returncode = 0, 0

        def poll(self):
            return 0

    def popen(command, **kwargs):
        started.append((command, kwargs['env'].get('OMP_NUM_THREADS')))
        return Proc()

    monkeypatch.setattr(sweep_runner.subprocess, 'Popen', popen)
    for r in runs:
        r.log_file = tmp_path / f'{r.index}.log'
        r.output_dir = tmp_path / f'out{r.index}'
    stream = io.StringIO()
    assert sweep_runner.run_sweep(runs, 'two', parallel=2, stream=stream) == 0
    for command, omp in started:
        assert command[-2:] == ['--num_threads', '1'] and command.count('--num_threads') == 1 and omp == '1'
    assert "with 1 CPU thread (its share of the cores; the run's num_threads 2 would oversubscribe them)" in \
        stream.getvalue()


def test_without_option_drops_both_spellings():
    from timm_rc.train.sweeps import _without_option
    assert _without_option(['a', '--num_threads', '2', 'b', '--num_threads=4', 'c'], '--num_threads') == ['a', 'b', 'c']


def test_one_step_is_singular():
    import timm
    import timm_rc  # noqa: F401
    model = timm.create_model('rc1_cifar', width=4, share_weights=False)
    with pytest.raises(ValueError, match='unshared weights for 1 step per cell and cannot run'):
        model.set_steps(2)


def test_the_front_door_lists_every_command_and_dispatches(capsys):
    out = subprocess.run([sys.executable, '-m', 'timm_rc', '--help'], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    for verb in ('train', 'eval', 'sweep', 'results', 'plots', 'compress', 'convert', 'export'):
        assert f'\n  {verb} ' in out.stdout
    from timm_rc.__main__ import main  # the rest in-process: each interpreter start costs seconds on 2 cores
    assert main(['trian']) == 2
    bad = capsys.readouterr()
    assert bad.err.startswith("error: unknown command 'trian'; did you mean train? the commands are train, ")
    assert bad.err.count('\n') == 1 and bad.out == ''
    assert main([]) == 2
    bare = capsys.readouterr()
    assert bare.out == ''
    assert bare.err.endswith('error: no command given; name one of train, eval, sweep, results, plots, compress, '
                             'convert, export\n')
    with pytest.raises(SystemExit) as e:
        main(['results', '/nonexistent/folder'])
    assert e.value.code == 2


def test_the_trainers_package_runs_as_a_module(monkeypatch, capsys):
    """ `python -m timm_rc.train` (it had no __main__: "cannot be directly executed"). """
    import runpy
    monkeypatch.setattr(sys, 'argv', ['-m', '--help'])
    try:
        runpy.run_module('timm_rc.train', run_name='__main__')
    except SystemExit as e:  # the exit code the command returned, where it returned one
        assert e.code == 0
    assert capsys.readouterr().out.startswith('usage: python -m timm_rc train [--config FILE.yaml]')


def test_version_names_the_package_and_what_it_runs_on(capsys):
    from timm_rc.__main__ import main as door
    assert door(['--verison']) == 2 and capsys.readouterr().err.startswith(
        "error: unknown command '--verison'; did you mean --version? the commands are train, ")
    import accelerate
    import timm
    import timm_rc
    from timm_rc.__main__ import main
    assert main(['--version']) == 0
    out = capsys.readouterr().out
    torch_field = out.split('(torch ')[1].split(',')[0]  # the wheel's version: its build tag (+cu130) may differ
    assert out == (f'timm_rc {timm_rc.__version__} (torch {torch_field}, timm {timm.__version__}, '
                   f'accelerate {accelerate.__version__})\n')
    assert torch_field.split('+')[0] == torch.__version__.split('+')[0]


@pytest.mark.parametrize('argv,message', [
    (['export', 'rc4_cifar', '--ouput', 'x.onnx'],  # --output is required: argparse named that, not the typo
     'unknown option --ouput; did you mean --output? (see python -m timm_rc export --help)'),
    (['compress', 'quantize', 'x', '--bitz=8'],  # a sub-command's parser checks its own options
     'unknown option --bitz; did you mean --bits? (see python -m timm_rc compress quantize --help)'),
    (['results', 'x', '--zzz'], 'unknown option --zzz (see python -m timm_rc results --help)'),
])
def test_an_unknown_option_is_named_with_the_closest_one(argv, message, capsys, monkeypatch):
    from timm_rc.__main__ import main
    monkeypatch.setattr(sys, 'argv', ['/x/timm_rc/__main__.py'])
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == f'error: {message}\n'


def test_plots_name_a_bad_epoch_or_output_before_drawing(tmp_path, capsys):
    from safetensors.torch import save_file
    from timm_rc.cli.plots import main as plots
    run = tmp_path / 'run'
    (run / 'bn_stats').mkdir(parents=True)
    for epoch in (1, 2, 3, 5):
        save_file({'cell1.step0.bn1.running_mean': torch.zeros(2)}, str(run / 'bn_stats' / f'epoch_{epoch:04d}.safetensors'))
    (run / 'metrics.jsonl').write_text('{"epoch": 1, "train/loss": 1.0, "test/top1_err": 50.0}\n')
    for epoch in ('-1', '0', '4'):
        assert exits_2(plots, ['bn', str(run), '--epoch', epoch], capsys) == \
            f'error: no BN statistics for epoch {epoch} in {run / "bn_stats"}; epochs saved: 1-3, 5 (leave --epoch ' \
            'out for the last)\n'
    assert exits_2(plots, ['curves', str(run), '--out', str(tmp_path / 'c.txt')], capsys) == \
        f'error: {tmp_path / "c.txt"}: cannot write a .txt image; name it .png (or avif, eps, gif, jpeg, jpg, pdf, ' \
        'pgf, png, ps, raw, rgba, svg, svgz, tif, tiff, webp)\n'
    assert exits_2(plots, ['curves', str(run), '--out', str(tmp_path)], capsys) == \
        f'error: {tmp_path} is a folder; name the image file to write, e.g. {tmp_path / "figure.png"}\n'
    assert exits_2(plots, ['bn', str(run), '--out', str(run / 'metrics.jsonl' / 'plots')], capsys) == \
        f'error: {run / "metrics.jsonl"} is a file, not a folder; write the figures elsewhere\n'
    assert exits_2(plots, ['tradeoff', str(run), '--out', str(run / 'metrics.jsonl' / 'f.png')], capsys) == \
        f'error: {run / "metrics.jsonl"} is a file, not a folder; write the figures elsewhere\n'
    assert sorted(p.name for p in run.iterdir()) == ['bn_stats', 'metrics.jsonl']  # nothing written
    plots(['curves', str(run), '--out', str(tmp_path / 'curves')])  # no suffix: a PNG
    assert capsys.readouterr().out == f'{tmp_path / "curves.png"}\n'
    assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(capsys):
    """ Every verb runs through cli.common.run (python -m timm_rc <verb>, timm-rc, python -m timm_rc.cli.<verb>):
    Ctrl-C there was a KeyboardInterrupt traceback and death by SIGINT. """
    from timm_rc.cli.common import run as run_command

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_command(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err == '\ninterrupted.\n'


def test_a_folder_given_for_a_config_or_sweep_file_is_named_as_one(tmp_path, capsys):
    from timm_rc.cli.sweep import main as sweep
    from timm_rc.runs.config import load_config
    from timm_rc.errors import UserError
    (tmp_path / 'b.yaml').write_text('{}')
    (tmp_path / 'a.yaml').write_text('{}')
    with pytest.raises(UserError) as e:
        load_config(['--config', str(tmp_path)])
    assert str(e.value) == f'--config {tmp_path} is a folder; give a config file, e.g. {tmp_path / "a.yaml"} ' \
                           '(it holds a.yaml, b.yaml)'
    assert sweep([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f'error: {tmp_path} is a folder; give a sweep file (none there: a sweep file ' \
                                      f'has a top-level method: grid)\n'
    # the sweep files, not the train configs beside them (the hint pointed at a train config, which then failed)
    (tmp_path / 'sweeps').mkdir()
    (tmp_path / 'sweeps' / 'grid.yaml').write_text('program: train.py\nmethod: grid\nparameters: {}\n')
    assert sweep([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f'error: {tmp_path} is a folder; give a sweep file, e.g. ' \
                                      f'{tmp_path / "sweeps/grid.yaml"} (sweep files there: sweeps/grid.yaml)\n'


def test_compress_reports_table_says_its_error_is_fp32():
    """ `eval` of a bf16 run measures in bf16 (the run's own precision), the report in fp32: they may differ
    in the second decimal, so the report's column says which it is. """
    from timm_rc.cli.compress import report_table
    row = dict(name='rc4_cifar', params=20_786, weights_bytes=86_000, flops_per_image=12e6,
               activation_bytes=1e6, activation_batch=128, latency_ms_b1=1.0, latency_ms_b64=9.0, top1_error=21.06)
    head, body = report_table([row]).splitlines()
    assert head.endswith('  fp32 top-1 err %') and body.endswith(' 21.06')


def test_a_missing_data_dir_says_where_it_looked_and_how_to_give_another(tmp_path, monkeypatch):
    """ The CPU demo's sweep reads ../shared/data/cifar10: from a clone elsewhere, say what to change. """
    from timm_rc.data import load_splits
    from timm_rc.errors import UserError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_splits(data_dir='../shared/data/cifar10')
    assert str(e.value) == (f'data_dir ../shared/data/cifar10 does not exist or is not a folder (relative to '
                            f'{tmp_path}); give the folder that holds the data (train.parquet and test.parquet, or '
                            f'train/ and test/ image folders) as --data_dir, or as data_dir in the config file or the '
                            f"sweep's parameters")
