""" python -m timm_rc sweep: W&B grid sweep files run without a W&B server. CPU only. """
import copy
import io
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from test_train import make_parquet
from timm_rc.cli.sweep import main
from timm_rc.train.sweeps import LOG_HEADER, Overview, Run, expand_command, grid

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / 'train_configs' / 'sweeps').glob('*.yaml'))
START = f'{LOG_HEADER} start '
PARAMS = {'bool_f': False, 'bool_t': True, 'lr': 0.1, 'lr_milestones': [60, 90], 'model_kwargs': {'width': 4},
          'none': None, 'seed': 0, 'text': 'a b'}


@pytest.fixture(autouse=True)
def python_on_path(monkeypatch):
    """ A `python` on PATH that is this interpreter, for the tests' own commands that name `python`. """
    bindir = Path(sys.executable).parent
    if (bindir / 'python').exists():
        monkeypatch.setenv('PATH', f'{bindir}{os.pathsep}{os.environ.get("PATH", "")}')
    monkeypatch.delenv('TIMM_RC_FAULT', raising=False)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)


def write_sweep(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(dict(method='grid', **spec), sort_keys=False))
    return path


def starts(log: Path) -> int:
    return sum(line.startswith(START) for line in log.read_text().splitlines())


# ---- the command, against W&B's own code --------------------------------------------------------


def wandb_agent_command(command, program, params, monkeypatch, tmp_path):
    """ The command line wandb's own agent builds for one run (Agent._command_run), captured, not run. """
    from wandb import wandb_agent
    started = []

    class Capture:
        def __init__(self, command=None, **kwargs):
            started.append(command)

    monkeypatch.setattr(wandb_agent, 'AgentProcess', Capture)
    for var in ('WANDB_RUN_ID', 'WANDB_SWEEP_PARAM_PATH'):
        monkeypatch.setenv(var, 'x')  # the agent sets them: restored afterwards
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id='sweep')
    agent._sweep_command = copy.deepcopy(command) or []  # what `wandb agent` reads from the sweep's config
    agent._command_run({'run_id': 'run', 'program': program, 'args': {k: {'value': v} for k, v in params.items()}})
    return started[0]


ALL_ARGS = ['--bool_f=False', '--bool_t=True', '--lr=0.1', '--lr_milestones=[60, 90]', "--model_kwargs={'width': 4}",
            '--none=None', '--seed=0', '--text=a b']
COMMANDS = [
    (None, ['/usr/bin/env', sys.executable, 'train.py', *ALL_ARGS]),  # W&B's default command
    (['${env}', '${interpreter}', '${program}', '${args}'], ['/usr/bin/env', sys.executable, 'train.py', *ALL_ARGS]),
    (['accelerate', 'launch', '${program}', '${args}'], ['accelerate', 'launch', 'train.py', *ALL_ARGS]),
    (['${env}', 'python3', '${program}', '${args_no_hyphens}'],
     ['/usr/bin/env', 'python3', 'train.py', *(a[2:] for a in ALL_ARGS)]),
    (['${interpreter}', '-u', '${program}', 7, '${args_no_boolean_flags}', '--tag=${envvar:TIMM_RC_SWEEP_VAR}',
      '${envvar:TIMM_RC_UNSET_VAR}'],
     [sys.executable, '-u', 'train.py', '7', '--bool_t', *ALL_ARGS[2:], '--tag=abc', 'TIMM_RC_UNSET_VAR']),
    (['${program}', '${args_no_equals}', '${args_json}'],
     ['train.py', '--bool_f', 'False', '--bool_t', 'True', '--lr', '0.1', '--lr_milestones', '[60, 90]',
      '--model_kwargs', "{'width': 4}", '--none', 'None', '--seed', '0', '--text', 'a b',
      '{"bool_f": false, "bool_t": true, "lr": 0.1, "lr_milestones": [60, 90], "model_kwargs": {"width": 4}, '
      '"none": null, "seed": 0, "text": "a b"}']),
    (['${program}', '${args_append_hydra}', '${args_override_hydra}'],
     ['train.py', *('+' + a[2:] for a in ALL_ARGS), *('++' + a[2:] for a in ALL_ARGS)]),
]


@pytest.mark.parametrize('command,expected', COMMANDS)
def test_macros_expand_exactly_as_wandbs_agent_does(command, expected, monkeypatch, tmp_path):
    monkeypatch.setenv('TIMM_RC_SWEEP_VAR', 'abc')
    monkeypatch.delenv('TIMM_RC_UNSET_VAR', raising=False)
    ours = expand_command(command, 'train.py', PARAMS)
    assert ours == expected
    # the one difference: W&B's `${interpreter}` is `python`, ours the Python that runs the sweep
    theirs = wandb_agent_command(command, 'train.py', PARAMS, monkeypatch, tmp_path)
    assert ours == [sys.executable if t == 'python' else t for t in theirs]


def test_the_grid_is_wandbs_grid():
    """ The same combinations in the same order as W&B's grid search (the `sweeps` package). """
    pytest.importorskip('sweeps', reason='W&B\'s sweep engine: pip install "wandb[sweeps]"')
    from sweeps.grid_search import grid_search_next_runs
    synthetic = {'method': 'grid', 'parameters': {
        'b': {'values': [2, 1, 2]},  # a value twice: W&B runs it once
        'a': {'min': 1, 'max': 3},  # int_uniform: every integer
        'c': {'value': 'x'},
        'd': {'values': [True, 1, 'x', None, [1, 2], {'k': 1}]},
        'e': {'values': [0.5], 'distribution': 'categorical'},
    }}
    configs = [yaml.safe_load(p.read_text()) for p in SHIPPED] + [synthetic]
    for config in configs:
        theirs = [{k: v['value'] for k, v in r.config.items()}
                  for r in grid_search_next_runs([], config, n=10_000) if r is not None]
        ours = grid(config['parameters'])
        assert [list(c.items()) for c in ours] == [list(c.items()) for c in theirs]
    assert len(grid(synthetic['parameters'])) == 3 * 2 * 6


def test_shipped_sweep_files_pass_wandbs_schema():
    sweeps = pytest.importorskip('sweeps', reason='W&B\'s sweep schema: pip install "wandb[sweeps]"')
    assert len(SHIPPED) == 6  # table1/2 x cifar10/100, fast_rc_vs_plain, cpu_demo
    for path in SHIPPED:
        assert sweeps.schema_violations_from_proposed_config(yaml.safe_load(path.read_text())) == [], path.name
    assert sweeps.schema_violations_from_proposed_config(tiny_sweep(Path('/data'), [0, 1])) == []


def test_dry_run_of_a_shipped_sweep(monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # program and configs are relative to where the agent runs, as with W&B
    assert main(['train_configs/sweeps/table2_cifar10.yaml', '--dry-run']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('# train_configs/sweeps/table2_cifar10.yaml: grid of 15 runs: ')
    commands = [line.split('  # ')[0] for line in lines[1:]]
    assert commands == [f'accelerate launch train.py --config=train_configs/{m}_cifar10.yaml --seed={s}'
                        for m in ('rc1', 'rc2', 'rc4', 'resnet10', 'resnet18') for s in (0, 1, 2)]
    assert lines[1].endswith(': runs/rc1_cifar10/seed0') and lines[15].endswith(': runs/resnet18_cifar10/seed2')


def test_dry_run_shows_each_runs_thread_share_or_gpu(monkeypatch, capsys):
    """ --dry-run prints the commands as the runner starts them: with --parallel on a CPU machine, each run's
    share of the cores as OMP_NUM_THREADS and --num_threads (which beats the config file's). """
    import torch
    import timm_rc.train.sweeps as runner
    monkeypatch.chdir(REPO)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(runner.os, 'sched_getaffinity', lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert main(['train_configs/sweeps/table2_cifar10.yaml', '--dry-run', '--parallel', '4']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == '# 4 at once; each gets 2 CPU threads (its share of the cores)'
    assert lines[2].split('  # ')[0] == ('OMP_NUM_THREADS=2 accelerate launch train.py '
                                         '--config=train_configs/rc1_cifar10.yaml --seed=0 --num_threads 2')
    assert len(lines) == 17 and all(line.startswith('OMP_NUM_THREADS=2 ') for line in lines[2:])
    assert main(['train_configs/sweeps/table2_cifar10.yaml', '--dry-run', '--gpus', '0,1']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == '# 2 at once; run slot i gets GPU gpus[i % 2] as the slots free up'
    assert [line.split(' ')[0] for line in lines[2:5]] == ['CUDA_VISIBLE_DEVICES=0', 'CUDA_VISIBLE_DEVICES=1',
                                                           'CUDA_VISIBLE_DEVICES=0']
    # ids are what CUDA_VISIBLE_DEVICES takes: indices or UUIDs; anything else is named (a,b was taken)
    assert main(['train_configs/sweeps/table2_cifar10.yaml', '--dry-run', '--gpus', 'GPU-8f3a,1']) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith('CUDA_VISIBLE_DEVICES=GPU-8f3a ')
    for text, what in (('a,b', "'a' is not one"), ('0,,1', 'an empty entry is not one'), ('cuda:0', "'cuda:0' is not one"),
                       ('GPU-xxxx', "'GPU-xxxx' is not one")):  # a malformed UUID would hide every GPU
        assert main(['train_configs/sweeps/table2_cifar10.yaml', '--dry-run', '--gpus', text]) == 2
        assert capsys.readouterr().err == (
            f'error: argument --gpus: --gpus takes a comma list of GPU indices such as 0,1 (or GPU-/MIG- UUIDs as '
            f'nvidia-smi -L prints them); {what}, in {text!r} (see python -m timm_rc sweep --help)\n')


# ---- user errors: exit code 2, one line ---------------------------------------------------------


TRAINER = str(REPO / 'train.py')
ERRORS = [
    (dict(method='random', parameters={'a': {'values': [1]}}),
     "has method 'random': python -m timm_rc sweep runs only `method: grid` sweeps without a server; run it with W&B's "
     "server instead: `wandb sweep FILE`, then `wandb agent ENTITY/PROJECT/SWEEP_ID`"),
    (dict(method='bayes', parameters={'a': {'values': [1]}}), "has method 'bayes'"),
    (dict(method=None, parameters={'a': {'values': [1]}}), 'has no method'),
    (dict(parameters={'lr': {'distribution': 'uniform', 'min': 0.01, 'max': 0.1}}),
     'parameter \'lr\' ({"distribution": "uniform", "max": 0.1, "min": 0.01}) cannot be expanded into a grid: '
     'python -m timm_rc sweep takes `values: [...]`, `value: x` or integer `min`/`max`; run it with W&B\'s server'),
    (dict(parameters={'opt': {'parameters': {'lr': {'values': [1]}}}}), "parameter 'opt' has nested parameters"),
    (dict(parameters={'a': {'values': []}}), "parameter 'a': `values` must be a non-empty list"),
    (dict(parameters={'a': {'min': 3, 'max': 1}}), "parameter 'a': min 3 is larger than max 1"),
    (dict(program='x.py', parameters={'a': {'values': [1]}}, command=['${program}', '${argz}']),
     'the command has an unknown macro ${argz} (wandb agent would drop it)'),
    (dict(program='x.py', parameters={'a': {'values': [1]}}, command=['${program}', '${args_json_file}']),
     "the command's ${args_json_file} is not supported by python -m timm_rc sweep"),
    (dict(parameters={'a': {'values': [1]}}), 'the command uses ${program} but the sweep file has no `program`'),
    (dict(program=TRAINER, parameters={'lr': {'values': [0.1, 0.2]}, 'output_dir': {'value': 'runs/x'}}),
     'runs 1 (lr=0.1) and 2 (lr=0.2) both write to runs/x: put what differs into output_dir'),
    (dict(program=TRAINER, parameters={'bogus': {'values': [1, 2]}}),
     "run 1 (bogus=1): the trainer rejects its arguments: unknown config key 'bogus' in the command line"),
]


@pytest.mark.parametrize('spec,message', ERRORS)
def test_user_errors_exit_2_with_one_line(spec, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 's.yaml'
    path.write_text(yaml.safe_dump({'method': 'grid', **spec}))
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err.count('\n') == 1 and captured.err.startswith('error: ')
    assert message in captured.err
    assert not (tmp_path / 'runs').exists()  # nothing started


def test_unreadable_sweep_files(tmp_path, capsys):
    assert main([str(tmp_path / 'missing.yaml')]) == 2
    (tmp_path / 'list.yaml').write_text('- 1\n')
    assert main([str(tmp_path / 'list.yaml')]) == 2
    (tmp_path / 'bad.yaml').write_text('a: [1\n')
    assert main([str(tmp_path / 'bad.yaml')]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f'error: sweep file {tmp_path / "missing.yaml"} does not exist'
    assert err[1].endswith('must hold a mapping (program, method, parameters, ...)')
    assert err[2] == (f'error: sweep file {tmp_path / "bad.yaml"} is not valid YAML (line 2, column 1): expected \',\' '
                      f'or \']\', but got \'<stream end>\'') and len(err) == 3
    from timm_rc.errors import UserError
    from timm_rc.runs.config import load_config  # the trainer's config file: the same one line
    with pytest.raises(UserError, match=r'^config file .*bad.yaml is not valid YAML \(line 2, column 1\): expected'):
        load_config(['--config', str(tmp_path / 'bad.yaml')])


# ---- running: any program ------------------------------------------------------------------------


PROGRAM = '''
import os, sys, time
args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True)
open(f'started-{args["n"]}', 'w').write(str(os.getpid()))
for other in args.get('wait', '').split(':') if args.get('wait') else []:
    for _ in range(1200):  # waits for runs that must be running at the same time (at most 2 minutes)
        if os.path.exists(f'started-{other}'):
            break
        time.sleep(0.1)
    else:
        sys.exit(4)
if args.get('sleep'):
    time.sleep(float(args['sleep']))
code = int(args.get('code', 0))
print(f'boom {code}' if code else 'ok')
sys.exit(code)
'''


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'prog.py').write_text(PROGRAM)
    path = write_sweep(tmp_path / 'fail.yaml', program='prog.py', parameters={
        'code': {'values': [3, 0, 3]}, 'n': {'value': 1}})  # no command: W&B's default
    assert main([path.name]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("# fail.yaml: grid of 2 runs; its program 'prog.py' is not timm_rc's trainer, "
                      'so runs are not checked for completion: all are run')
    assert 'FAILED  #1 code=3: exit code 3; log runs/sweep_logs/fail/001.log: boom 3' in out
    assert 'done    #2 code=0' in out
    assert out[-3:] == ['fail: 1 of 2 runs succeeded',
                        '  failed: #1 code=3: exit code 3, log runs/sweep_logs/fail/001.log',
                        '  fix the cause and run python -m timm_rc sweep fail.yaml: it reruns only the failed runs']
    log = (tmp_path / 'runs' / 'sweep_logs' / 'fail' / '001.log').read_text().splitlines()
    assert log[0].startswith(START) and log[0].endswith(f'(new run): /usr/bin/env {sys.executable} prog.py --code=3 --n=1')
    assert log[1:3] == ['gpu None', 'boom 3'] and len(log) == 4
    assert log[3].startswith(f'{LOG_HEADER} end: exit code 3 after')


def test_parallel_runs_get_gpus_round_robin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'prog.py').write_text(PROGRAM)
    # runs 1-3 wait until all three have started: they finish only if 3 run at once
    path = write_sweep(tmp_path / 'par.yaml', program='prog.py', parameters={
        'n': {'values': [1, 2, 3, 4]}, 'wait': {'value': '1:2:3'}},
        command=['${env}', '${interpreter}', '${program}', '${args}'])
    assert main([str(path), '--parallel', '3', '--gpus', '0,1']) == 0
    out = capsys.readouterr().out
    assert 'par: 4 of 4 runs succeeded' in out
    gpus = [(tmp_path / 'runs' / 'sweep_logs' / 'par' / f'00{i}.log').read_text().splitlines()[1] for i in (1, 2, 3, 4)]
    assert gpus[:3] == ['gpu 0', 'gpu 1', 'gpu 0'] and gpus[3] in ('gpu 0', 'gpu 1')  # slot i: gpus[i % 2]


def test_parallel_cpu_runs_get_their_share_of_the_cores(tmp_path, monkeypatch, capsys):
    """ Without GPUs, N runs at once get cores // N threads each (OMP_NUM_THREADS), unless the user chose
    (OMP_NUM_THREADS set, or --num_threads in the command); one run at a time keeps the default (issue 17,
    item 5). """
    import timm_rc.train.sweeps as runner
    monkeypatch.setattr('torch.cuda.is_available', lambda: False)
    monkeypatch.setattr(runner.os, 'sched_getaffinity', lambda pid: set(range(8)), raising=False)
    assert runner.cpu_threads_per_run(2, None, {}) == 4 and runner.cpu_threads_per_run(3, None, {}) == 2
    assert runner.cpu_threads_per_run(16, None, {}) == 1
    assert runner.cpu_threads_per_run(1, None, {}) is None
    assert runner.cpu_threads_per_run(2, ['0', '1'], {}) is None
    assert runner.cpu_threads_per_run(2, None, {'OMP_NUM_THREADS': '3'}) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'threads.py').write_text('import os, sys\nprint("threads", os.environ.get("OMP_NUM_THREADS"))\n')
    path = write_sweep(tmp_path / 'cpu.yaml', program='threads.py', parameters={'n': {'values': [1, 2]}},
                       command=['${env}', '${interpreter}', '${program}', '${args}'])
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    monkeypatch.setattr(runner.os, 'environ', env)
    assert main([str(path), '--parallel', '2']) == 0
    out = capsys.readouterr().out
    assert 'with 4 CPU threads (its share of the cores)' in out
    logs = [(tmp_path / 'runs' / 'sweep_logs' / 'cpu' / f'00{i}.log').read_text().splitlines() for i in (1, 2)]
    assert all(log[1] == 'threads 4' and 'OMP_NUM_THREADS=4 ' in log[0] for log in logs)


def test_a_sweep_run_from_another_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """ The shipped sweeps' program and config paths are relative to the repository root: from elsewhere the
    runner says so instead of planning commands that cannot start (issue 17 review). """
    monkeypatch.chdir(tmp_path)
    sweep = Path(__file__).resolve().parents[1] / 'train_configs' / 'sweeps' / 'cpu_demo.yaml'
    assert main([str(sweep), '--dry-run']) == 2
    assert capsys.readouterr().err == (
        f"error: the sweep's program train.py does not exist from here ({tmp_path}); run the sweep from the folder "
        f"its paths are relative to (the repository root for train_configs/sweeps/*.yaml), as wandb agent would be\n")


def test_ctrl_c_stops_the_runs_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'prog.py').write_text(PROGRAM)
    write_sweep(tmp_path / 'slow.yaml', program='prog.py',
                parameters={'n': {'values': [1, 2]}, 'sleep': {'value': 120}})

    def press_ctrl_c_once_run_1_is_up():
        for _ in range(1200):
            if (tmp_path / 'started-1').exists():  # the runner's own SIGINT handler is installed by then
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    threading.Thread(target=press_ctrl_c_once_run_1_is_up, daemon=True).start()
    assert main(['slow.yaml']) == 130
    out = capsys.readouterr().out
    assert 'interrupted: stopping 1 running run(s)...' in out
    assert out.rstrip().endswith('to continue, run python -m timm_rc sweep slow.yaml')
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / 'started-1').read_text()), 0)  # stopped, and reaped
    log = (tmp_path / 'runs' / 'sweep_logs' / 'slow' / '001.log').read_text()
    assert f'{LOG_HEADER} end: stopped by the sweep runner' in log
    assert not (tmp_path / 'runs' / 'sweep_logs' / 'slow' / '002.log').exists()


def test_overview_on_a_terminal_rewrites_its_lines(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    runs = [Run(index=i, params={}, command=['x'], log_file=tmp_path / f'{i}.log', label=f'n={i}', state=s)
            for i, s in enumerate(['complete', 'running', 'failed', 'new'], 1)]
    runs[2].returncode = -9
    term = Terminal()
    view = Overview(runs, term, 'demo')
    view.draw()
    first = term.getvalue()
    assert first.splitlines() == ['demo: 1 done, 1 running, 1 failed, 1 pending (4 runs)',
                                  '  #1   done (before)  n=1', '  #2   running        n=2',
                                  '  #3   FAILED (killed by SIGKILL) n=3']
    view.event('start #4')
    assert term.getvalue()[len(first):].startswith('\x1b[4F\x1b[Jstart #4\ndemo: ')  # up 4 lines, clear, redraw


# ---- running timm_rc's trainer: skip, resume, results ----------------------------------------------


def tiny_sweep(data: Path, seeds):
    return dict(program=TRAINER, method='grid', metric={'name': 'test/top1_err', 'goal': 'minimize'}, parameters={
        'data_dir': {'value': str(data)}, 'model': {'value': 'rc1_cifar'}, 'model_kwargs': {'value': {'width': 4}},
        'batch_size': {'value': 16}, 'epochs': {'value': 2}, 'output_dir': {'value': 'runs/seed{seed}'},
        'seed': {'values': seeds}}, command=['${env}', '${interpreter}', '${program}', '${args}'])


def test_trainer_sweep_skips_complete_runs_and_resumes_killed_ones(tmp_path, monkeypatch, capsys):
    data = make_parquet(tmp_path / 'data', n_train=32, n_test=16)  # 2 steps per epoch
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'tiny.yaml'
    seed0, seed1 = tmp_path / 'runs' / 'seed0', tmp_path / 'runs' / 'seed1'

    path.write_text(yaml.safe_dump(tiny_sweep(data, [0])))
    assert main([str(path)]) == 0
    assert json.loads((seed0 / 'summary.json').read_text())['epochs_completed'] == 2
    first_summary = (seed0 / 'summary.json').stat().st_mtime_ns
    capsys.readouterr()

    # one more seed; it is killed in its second epoch (step 3), after epoch 1's checkpoint
    path.write_text(yaml.safe_dump(tiny_sweep(data, [0, 1])))
    monkeypatch.setenv('TIMM_RC_FAULT', 'step3')
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f'# {path}: grid of 2 runs: 1 complete (skipped), 0 interrupted (resumed), 1 new'
    assert 'FAILED  #2 seed=1: killed by SIGKILL; log runs/seed1/sweep.log' in out
    assert "results of this sweep's 2 runs:" in out  # the killed run's summary holds its first epoch
    monkeypatch.delenv('TIMM_RC_FAULT')

    assert main([str(path), '--dry-run']) == 0
    lines = capsys.readouterr().out.splitlines()
    command = ['/usr/bin/env', sys.executable, TRAINER, '--batch_size=16', f'--data_dir={data}', '--epochs=2',
               '--model=rc1_cifar', "--model_kwargs={'width': 4}", '--output_dir=runs/seed{seed}']
    assert lines[1] == shlex.join(command + ['--seed=0']) + '  # complete: runs/seed0'
    assert lines[2] == shlex.join(command + ['--seed=1', '--resume']) + '  # interrupted: runs/seed1'

    # the same command again finishes the grid: seed 1 resumes from its checkpoint, seed 0 is left alone
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert 'resume  #2 seed=1, log runs/seed1/sweep.log' in out and 'seed=0' not in out.split('results')[0]
    assert 'tiny: 1 of 1 runs succeeded, 1 already complete (skipped)' in out
    log1 = (seed1 / 'sweep.log').read_text()
    assert starts(seed1 / 'sweep.log') == 2 and 'resumed from runs/seed1/checkpoints/epoch_0001' in log1
    assert json.loads((seed1 / 'summary.json').read_text())['epochs_completed'] == 2
    assert [json.loads(x)['epoch'] for x in (seed1 / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
    assert starts(seed0 / 'sweep.log') == 1 and (seed0 / 'summary.json').stat().st_mtime_ns == first_summary
    assert "results of this sweep's 2 runs:" in out and 'test err % (ours)' in out and '2/2' in out

    assert main([str(path)]) == 0
    assert 'tiny: all 2 runs are complete; nothing to run' in capsys.readouterr().out
    assert starts(seed0 / 'sweep.log') == 1 and starts(seed1 / 'sweep.log') == 2
