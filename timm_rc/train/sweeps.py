""" Run a W&B grid sweep file without a W&B server.

    python -m timm_rc sweep train_configs/sweeps/table2_cifar10.yaml [--dry-run] [--parallel N] [--gpus 0,1]

W&B sweeps need W&B's server (wandb has no offline sweeps). This reads the same files as `wandb sweep`
and runs every combination of a `grid` sweep with the command a W&B agent would run: the file's
`command` (W&B's default `${env} ${interpreter} ${program} ${args}` where it has none) with the macros
expanded as `wandb agent` expands them, in W&B's grid order, from the current folder (a relative
`program` or config path means what it means to `wandb agent` started here). A file means the same to
both.

When the program is timm_rc's trainer (`train.py`, `timm-rc-train`), each combination's output folder
is the one the trainer will use (its `load_config` resolves it), and re-running the same command
finishes the grid and redoes nothing: a complete run (`summary.json` with every epoch, and
`model.safetensors`) is skipped, an interrupted one (checkpoints or a summary) gets `--resume`. Each
run's output goes to `sweep.log` in its output folder. For any other program every run is started
each time, with its log in `runs/sweep_logs/<sweep>/`.

`--parallel N` runs N at once (subprocesses); `--gpus 0,1` gives the run in slot i the GPU
`gpus[i % len(gpus)]` through CUDA_VISIBLE_DEVICES, so `--parallel 4 --gpus 0,1` puts two runs on each.
A failing run does not stop the others. Exit code: 0 when every run succeeded, 1 when one failed,
2 for a problem with the sweep file (one line), 130 when interrupted (re-run the command to go on).
`random` and `bayes` sweeps need W&B's server: `wandb sweep FILE` then `wandb agent SWEEP_ID`.
"""
import ast
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

import yaml

from .. import runs as run_folders
from ..runs.config import load_config
from ..errors import UserError, yaml_problem

__all__ = ['DEFAULT_COMMAND', 'SweepError', 'Run', 'Overview', 'load_sweep', 'grid', 'command_args', 'expand_command',
           'trainer_argv', 'run_state', 'plan', 'run_sweep', 'is_trainer_script', 'TRAINER_MODULES',
           'cpu_threads_per_run', 'launch']

# wandb 0.31: wandb/sdk/launch/sweeps/utils.py DEFAULT_SWEEP_COMMAND (= wandb/wandb_agent.py
# Agent.DEFAULT_SWEEP_COMMAND), used when the file has no (or an empty) `command`
DEFAULT_COMMAND = ['${env}', '${interpreter}', '${program}', '${args}']
ENVVAR_MACRO = re.compile(r'\$\{envvar\:([A-Z0-9_]*)\}')  # utils.SWEEP_COMMAND_ENV_VAR_REGEX
AGENT_HINT = 'run it with W&B\'s server instead: `wandb sweep FILE`, then `wandb agent ENTITY/PROJECT/SWEEP_ID`'
LOG_NAME = 'sweep.log'
LOG_HEADER = '==== timm_rc.sweep'


class SweepError(UserError):
    """ A problem with the sweep file: reported as one line, exit code 2. """


# ---- the sweep file and its grid ----------------------------------------------------------------


def load_sweep(path) -> Dict[str, Any]:
    """ Read a W&B sweep file and check what this runner needs (a `grid` over values it can list). """
    p = Path(path)
    if p.is_dir():  # the sweep files in it or a folder below (a sweep file has a top-level `method:`)
        files = [f for f in sorted(p.glob('*.yaml')) + sorted(p.glob('*/*.yaml'))
                 if re.search(r'^method:', f.read_text(errors='replace'), re.M)]
        shown = [str(f.relative_to(p)) for f in files[:6]]
        raise SweepError(f'{path} is a folder; give a sweep file' + (
            f', e.g. {files[0]} (sweep files there: {", ".join(shown)}{", ..." if len(files) > 6 else ""})'
            if files else ' (none there: a sweep file has a top-level method: grid)'))
    if not p.is_file():
        raise SweepError(f'sweep file {path} does not exist')
    try:
        sweep = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f'sweep file {path} is not valid YAML{yaml_problem(e)}') from None
    if not isinstance(sweep, dict):
        raise SweepError(f'sweep file {path} must hold a mapping (program, method, parameters, ...)')
    method = sweep.get('method')
    if method != 'grid':
        what = f'method {method!r}' if method is not None else 'no method'
        raise SweepError(f'{path} has {what}: python -m timm_rc sweep runs only `method: grid` sweeps without a server; '
                         f'{AGENT_HINT}')
    if not isinstance(sweep.get('parameters'), dict) or not sweep['parameters']:
        raise SweepError(f'{path} has no parameters: a grid sweep needs a `parameters` mapping')
    command = sweep.get('command')
    if command is not None and not isinstance(command, list):
        raise SweepError(f'{path}: `command` must be a list of strings, got {command!r}')
    if sweep.get('program') is not None and not isinstance(sweep['program'], str):
        raise SweepError(f'{path}: `program` must be a string, got {sweep["program"]!r}')
    grid(sweep['parameters'])  # every parameter expands, or a clear error now
    return sweep


def _grid_values(name: str, spec: Any) -> Tuple[bool, List[Any]]:
    """ (searched, values) for one parameter, following W&B's parameter schemas (sweeps/config/schema.json):
    `value` (constant), `values` (categorical), integer `min`/`max` (int_uniform: every integer). """
    if not isinstance(spec, dict):
        raise SweepError(f'parameter {name!r} must be a mapping such as {{values: [...]}} or {{value: ...}}, '
                         f'got {spec!r}')
    keys, dist = set(spec) - {'distribution'}, spec.get('distribution')
    if 'parameters' in spec:
        raise SweepError(f'parameter {name!r} has nested parameters, which python -m timm_rc sweep does not expand; '
                         f'{AGENT_HINT}')
    if keys == {'value'} and dist in (None, 'constant'):
        return False, [spec['value']]
    if keys == {'values'} and dist in (None, 'categorical'):
        if not isinstance(spec['values'], list) or not spec['values']:
            raise SweepError(f'parameter {name!r}: `values` must be a non-empty list, got {spec["values"]!r}')
        return True, list(spec['values'])
    if keys == {'min', 'max'} and dist in (None, 'int_uniform') and all(
            isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in keys):
        if spec['min'] > spec['max']:
            raise SweepError(f'parameter {name!r}: min {spec["min"]} is larger than max {spec["max"]}')
        return True, list(range(spec['min'], spec['max'] + 1))  # W&B's grid takes every integer in [min, max]
    raise SweepError(f'parameter {name!r} ({json.dumps(spec, default=str)}) cannot be expanded into a grid: '
                     f'python -m timm_rc sweep takes `values: [...]`, `value: x` or integer `min`/`max`; {AGENT_HINT}')


def _yaml_key(value: Any) -> str:
    # sweeps/grid_search.py tells values apart by their YAML dump (yaml_hash)
    return yaml.dump(value, default_flow_style=True, sort_keys=True)


def grid(parameters: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """ Every combination, in the order and form W&B's grid search gives them (sweeps 0.2,
    sweeps/grid_search.py and params.py): parameters sorted by name, the last one varying fastest,
    a combination whose values equal an earlier one's (a value listed twice) left out. """
    names = sorted(parameters)
    specs = {n: _grid_values(n, parameters[n]) for n in names}
    searched = [n for n in names if specs[n][0]]
    combos, seen = [], set()
    for values in itertools.product(*(specs[n][1] for n in searched)):
        key = tuple(_yaml_key(v) for v in values)
        if key in seen:
            continue
        seen.add(key)
        chosen = dict(zip(searched, values))
        combos.append({n: chosen[n] if specs[n][0] else specs[n][1][0] for n in names})
    return combos


# ---- the command, as `wandb agent` builds it ----------------------------------------------------


def command_args(params: Mapping[str, Any]) -> Dict[str, List[str]]:
    """ The argument macros, as wandb 0.31's `create_sweep_command_args` (wandb/sdk/launch/sweeps/utils.py)
    writes them: each value through Python's `str` (`True`, `None`, `[1, 2]`, `{'a': 1}`). """
    out: Dict[str, List[str]] = {k: [] for k in (
        'args', 'args_no_equals', 'args_no_hyphens', 'args_no_boolean_flags', 'args_append_hydra',
        'args_override_hydra')}
    for name, value in params.items():
        flag = f'{name}={value}'
        out['args'].append('--' + flag)
        out['args_no_hyphens'].append(flag)
        out['args_no_equals'] += [f'--{name}', str(value)]
        out['args_append_hydra'].append('+' + flag)
        out['args_override_hydra'].append('++' + flag)
        if not isinstance(value, bool):
            out['args_no_boolean_flags'].append('--' + flag)
        elif value:  # a false boolean is left out, a true one is a bare flag
            out['args_no_boolean_flags'].append('--' + name)
    out['args_json'] = [json.dumps(dict(params))]
    return out


def expand_command(command: Optional[Sequence[Any]], program: Optional[str], params: Mapping[str, Any],
                   environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """ The command line W&B's agent runs for one combination.

    Follows wandb 0.31's `Agent._command_run` (wandb/wandb_agent.py) with `create_sweep_command` and
    `create_sweep_command_args` (wandb/sdk/launch/sweeps/utils.py): no command means the default;
    `${envvar:NAME}` anywhere in an item becomes that variable (or NAME where it is unset); an item that
    is a whole macro becomes its values: `${env}` is `/usr/bin/env` (nothing on Windows),
    `${interpreter}` is the Python running the sweep (`sys.executable`; W&B writes `python`, which may be
    another Python, or none, where a venv is not activated), `${program}` the file's `program`, `${args}` one
    `--name=value` per parameter. Where W&B silently drops a macro it does not know, this is an error.
    """
    environ = os.environ if environ is None else environ
    macros: Dict[str, List[str]] = dict(command_args(params), interpreter=[sys.executable],
                                        env=[] if platform.system() == 'Windows' else ['/usr/bin/env'])
    if program is not None:
        macros['program'] = [program]
    tokens: List[str] = []
    for item in (list(command) if command else DEFAULT_COMMAND):
        item = ENVVAR_MACRO.sub(lambda m: environ.get(m.group(1), m.group(1)), str(item))
        if not (item.startswith('${') and item.endswith('}')):
            tokens.append(item)
            continue
        name = item[2:-1]
        if name in macros:
            tokens += macros[name]
        elif name == 'program':
            raise SweepError('the command uses ${program} but the sweep file has no `program`')
        elif name in ('args_json_file', 'args_dict'):
            raise SweepError(f'the command\'s {item} is not supported by python -m timm_rc sweep; {AGENT_HINT}')
        else:
            raise SweepError(f'the command has an unknown macro {item} (wandb agent would drop it); known: '
                             f'{", ".join("${" + m + "}" for m in sorted(macros))}, ${{envvar:NAME}}')
    return tokens


# the modules whose `main` is timm_rc's trainer (a script that imports it from one of them is the trainer)
TRAINER_MODULES = ('timm_rc.cli.train', 'timm_rc.train', 'timm_rc.train.cli', 'timm_rc.train.loop')


def is_trainer_script(path: str) -> bool:
    """ Whether `path` is a Python script that runs timm_rc's trainer: it imports `main` from one of
    `TRAINER_MODULES` (as the repository's train.py does). Read with `ast`, nothing is run. """
    p = Path(path)
    try:
        tree = ast.parse(p.read_text(errors='replace')) if p.suffix == '.py' and p.is_file() else None
    except (OSError, SyntaxError, ValueError):
        return False
    if tree is None:
        return False
    return any(isinstance(node, ast.ImportFrom) and node.module in TRAINER_MODULES
               and any(alias.name == 'main' for alias in node.names) for node in ast.walk(tree))


def trainer_argv(tokens: Sequence[str], program: Optional[str]) -> Optional[List[str]]:
    """ The arguments timm_rc's trainer gets from this command line, or None if it does not run the trainer
    (the program is a script that runs it (`is_trainer_script`), `timm-rc-train`, or `-m timm_rc.cli.train`). """
    for i, tok in enumerate(tokens):
        if (tok == program and is_trainer_script(tok)) or Path(tok).name == 'timm-rc-train':
            return list(tokens[i + 1:])
        if tok == '-m' and i + 1 < len(tokens) and tokens[i + 1] in ('timm_rc.train.cli', 'timm_rc.cli.train'):
            return list(tokens[i + 2:])
    return None


def run_state(cfg, out: Path) -> str:
    """ 'complete', 'interrupted' or 'new' for a trainer run with config `cfg` in folder `out`
    (`timm_rc.runs.Run.state`). """
    return run_folders.Run(out).state(cfg.epochs, cfg.max_steps)


# ---- the plan ----------------------------------------------------------------------------------


@dataclass
class Run:
    index: int  # 1-based, in W&B's grid order
    params: Dict[str, Any]
    command: List[str]  # what is run (with --resume added for an interrupted trainer run)
    log_file: Path
    output_dir: Optional[Path] = None  # None: the program is not timm_rc's trainer
    epochs: Optional[int] = None
    num_threads: Optional[int] = None  # the trainer's num_threads as its config and arguments set it
    state: str = 'new'  # 'complete', 'interrupted', 'new'; then 'running', 'done', 'failed'
    label: str = ''
    returncode: Optional[int] = None
    last_epoch: Optional[int] = None
    last_err: Optional[float] = None
    ran: bool = False  # started by this invocation
    _metrics_size: int = field(default=-1, repr=False)

    def refresh_metrics(self) -> bool:
        """ Read the newest epoch and test error from metrics.jsonl; True if they changed. """
        if self.output_dir is None:
            return False
        folder = run_folders.Run(self.output_dir)
        try:
            size = (self.output_dir / folder.METRICS).stat().st_size
        except OSError:
            return False
        if size == self._metrics_size:
            return False
        self._metrics_size = size
        if self.epochs is None:  # the paper's rule (epochs: null): the trainer writes what it chose
            try:
                self.epochs = folder.config().get('epochs')
            except UserError:
                pass
        for row in reversed(folder.metrics()):
            epoch, err = row.get('epoch'), row.get('test/top1_err')
            if epoch is None or err is None:
                continue
            changed = (epoch, err) != (self.last_epoch, self.last_err)
            self.last_epoch, self.last_err = epoch, err
            return changed
        return False

    def progress(self) -> str:
        if self.last_err is None:
            return ''
        total = f'/{self.epochs}' if self.epochs else ''
        return f'epoch {self.last_epoch}{total}, test err {self.last_err:.2f}%'


def _label(params: Mapping[str, Any], searched: Sequence[str]) -> str:
    def short(v):
        return Path(v).name if isinstance(v, str) and '/' in v else v
    return ' '.join(f'{k}={short(params[k])}' for k in searched) or 'the one combination'


def plan(sweep: Mapping[str, Any], name: str, environ: Optional[Mapping[str, str]] = None) -> List[Run]:
    """ One Run per combination: its command, output folder and state. A problem is a SweepError before
    anything starts (a combination the trainer rejects, two combinations writing to one folder). """
    program = sweep.get('program')
    combos = grid(sweep['parameters'])
    searched = [n for n in sorted(sweep['parameters']) if len({_yaml_key(c[n]) for c in combos}) > 1]
    runs: List[Run] = []
    owners: Dict[Path, Run] = {}
    for i, params in enumerate(combos, 1):
        tokens = expand_command(sweep.get('command'), program, params, environ)
        run = Run(index=i, params=params, command=tokens, label=_label(params, searched),
                  log_file=Path('runs', 'sweep_logs', name, f'{i:03d}.log'))
        argv = trainer_argv(tokens, program)
        if argv is not None:
            try:
                cfg = load_config(argv)
                out = cfg.resolved_output_dir()
            except UserError as e:
                raise SweepError(f'run {i} ({run.label}): the trainer rejects its arguments: {e}') from None
            key = out.resolve()
            if key in owners:
                raise SweepError(f'runs {owners[key].index} ({owners[key].label}) and {i} ({run.label}) both write '
                                 f'to {out}: put what differs into output_dir (it takes {{seed}}, {{model}}, '
                                 f'{{dataset}}) or sweep output_dir itself')
            owners[key] = run
            run.output_dir, run.epochs, run.log_file = out, cfg.epochs, out / LOG_NAME
            run.num_threads = cfg.num_threads
            run.state = run_state(cfg, out)
            if run.state == 'interrupted' and cfg.resume is None:
                run.command = tokens + ['--resume']  # the trainer's flag: a bare --resume is 'auto'
            if run.state == 'complete':
                run.refresh_metrics()
        runs.append(run)
    if program and not Path(program).exists() and shutil.which(program) is None and \
            any(program in r.command for r in runs):
        raise SweepError(f'the sweep\'s program {program} does not exist from here ({Path.cwd()}); run the sweep from the '
                         f'folder its paths are relative to (the repository root for train_configs/sweeps/*.yaml), as '
                         f'wandb agent would be')
    return runs


# ---- running it --------------------------------------------------------------------------------


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f'killed by {signal.Signals(-code).name}'
        except ValueError:
            return f'killed by signal {-code}'
    return f'exit code {code}'


def _last_line(path: Path) -> str:
    try:
        with open(path, 'rb') as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors='replace')
    except OSError:
        return ''
    lines = [x.strip() for x in re.split(r'[\r\n]', text) if x.strip() and not x.startswith(LOG_HEADER)]
    return lines[-1] if lines else ''


class Overview:
    """ The live status: on a terminal a block of lines rewritten in place, otherwise one line per event. """

    def __init__(self, runs: List[Run], stream: TextIO, name: str):
        self.runs, self.stream, self.name = runs, stream, name
        self.tty = hasattr(stream, 'isatty') and stream.isatty()
        self.drawn = 0

    def counts(self) -> str:
        n = {s: sum(r.state == s for r in self.runs) for s in ('done', 'running', 'failed')}
        n['done'] += sum(r.state == 'complete' for r in self.runs)
        pending = len(self.runs) - sum(n.values())
        return (f'{self.name}: {n["done"]} done, {n["running"]} running, {n["failed"]} failed, '
                f'{pending} pending ({len(self.runs)} runs)')

    def _row(self, r: Run) -> str:
        state = ('done (before)' if r.state == 'complete' else
                 f'FAILED ({_describe_exit(r.returncode)})' if r.state == 'failed' else r.state)
        where = r.output_dir if r.output_dir is not None else ''
        return f'  #{r.index:<3} {state:<14} {r.label}  {r.progress()}  {where}'.rstrip()

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f'\x1b[{self.drawn}F\x1b[J')
            self.drawn = 0

    def draw(self) -> None:
        if not self.tty:
            return
        self._clear()
        rows = [self._row(r) for r in self.runs if r.state not in ('new', 'interrupted')]
        size = shutil.get_terminal_size()
        room = max(size.lines - 2, 3)
        if len(rows) > room:
            rows = [f'  ... {len(rows) - room + 1} more'] + rows[-(room - 1):]
        lines = [line[:max(size.columns - 1, 20)] for line in [self.counts()] + rows]  # a wrapped line breaks \x1b[nF
        self.stream.write(''.join(line + '\n' for line in lines))
        self.stream.flush()
        self.drawn = len(lines)

    def event(self, text: str) -> None:
        self._clear()
        self.stream.write(text + '\n')
        self.stream.flush()
        self.draw()


def _stop(procs: List[subprocess.Popen], grace: float, hurry) -> None:
    """ SIGINT to each run's process group (as Ctrl-C in a terminal would); SIGKILL after `grace` seconds,
    or at once when `hurry()` turns true (a second Ctrl-C). """
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline and not hurry():
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def run_sweep(runs: List[Run], name: str, parallel: int = 1, gpus: Optional[Sequence[str]] = None,
              stream: Optional[TextIO] = None, environ: Optional[Mapping[str, str]] = None,
              again: str = 'the same command', poll: float = 0.2, grace: float = 30.0) -> int:
    """ Run every run not complete yet, `parallel` at once. Returns 0 if all succeeded, 1 if any failed,
    130 if interrupted (Ctrl-C or SIGTERM: the running ones are stopped, and `again` continues). """
    stream = sys.stdout if stream is None else stream
    environ = os.environ if environ is None else environ
    view = Overview(runs, stream, name)
    threads = cpu_threads_per_run(parallel, gpus, environ)
    pending = deque(r for r in runs if r.state != 'complete')
    slots: List[Optional[Tuple[Run, subprocess.Popen, Any, float]]] = [None] * parallel
    if not pending:
        view.event(f'{name}: all {len(runs)} runs are complete; nothing to run')
        return 0
    # Ctrl-C, and the SIGTERM of a lost machine or a cluster's scheduler, only raise a flag that the loop
    # reads, so a run is never started without being recorded (and then not stopped)
    signals: List[int] = []
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, lambda signum, frame: signals.append(signum))
    last_draw = 0.0
    try:
        view.draw()
        while (pending or any(slots)) and not signals:
            for s in range(parallel):
                while slots[s] is None and pending and not signals:
                    slots[s] = _start(pending.popleft(), s, gpus, environ, view, threads)
            for s, slot in enumerate(slots):
                if slot is None:
                    continue
                run, proc, log, t0 = slot
                if run.refresh_metrics() and not view.tty:
                    view.event(f'#{run.index} {run.label}: {run.progress()}')
                code = proc.poll()
                if code is None:
                    continue
                slots[s] = None
                run.refresh_metrics()
                log.write(f'{LOG_HEADER} end: {_describe_exit(code)} after {time.time() - t0:.0f} s\n')
                log.close()
                run.returncode, run.state = code, 'done' if code == 0 else 'failed'
                if code == 0:
                    view.event(f'done    #{run.index} {run.label}' + (f': {run.progress()}' if run.progress() else ''))
                else:
                    view.event(f'FAILED  #{run.index} {run.label}: {_describe_exit(code)}; log {run.log_file}: '
                               f'{_last_line(run.log_file)}')
            if view.tty and time.monotonic() - last_draw > 1.0:
                view.draw()
                last_draw = time.monotonic()
            if (pending or any(slots)) and not signals:
                time.sleep(poll)
    except KeyboardInterrupt:  # not the main thread: no handler of ours
        signals.append(signal.SIGINT)
    try:
        if signals:
            running = [slot for slot in slots if slot is not None]
            view.event(f'interrupted: stopping {len(running)} running run(s)...')
            _stop([p for _, p, _, _ in running], grace, hurry=lambda: len(signals) > 1)
            for run, proc, log, _ in running:
                log.write(f'{LOG_HEADER} end: stopped by the sweep runner ({_describe_exit(proc.returncode)})\n')
                log.close()
                run.state = 'interrupted'
            view.event(f'interrupted. Runs finished so far are kept and interrupted ones resume from their newest '
                       f'checkpoint: to continue, run {again}')
            return 130
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    view.draw()
    failed = [r for r in runs if r.state == 'failed']
    ran = sum(r.ran for r in runs)
    skipped = sum(r.state == 'complete' for r in runs)
    stream.write(f'{name}: {ran - len(failed)} of {ran} runs succeeded'
                 + (f', {skipped} already complete (skipped)' if skipped else '') + '\n')
    for r in failed:
        stream.write(f'  failed: #{r.index} {r.label}: {_describe_exit(r.returncode)}, log {r.log_file}\n')
    if failed:
        stream.write(f'  fix the cause and run {again}: it reruns only the failed runs\n')
    stream.flush()
    return 1 if failed else 0


def cpu_threads_per_run(parallel: int, gpus: Optional[Sequence[str]], environ: Mapping[str, str]) -> Optional[int]:
    """ The CPU threads each run gets when `parallel` runs share a machine without GPUs: its share of the
    cores (torch's default, every core for every process, makes their threads spin against each other:
    two width-16 runs at once took 94 s against 34 s one after the other). None: the runs' own choice
    (one run at a time, GPUs, or OMP_NUM_THREADS set by the user). The share beats a trainer run's own
    num_threads (its config file's or the sweep's), which would oversubscribe the cores (`_start`). """
    if parallel < 2 or gpus or 'OMP_NUM_THREADS' in environ:
        return None
    import torch
    if torch.cuda.is_available():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(cores // parallel, 1)


def _without_option(command: List[str], option: str) -> List[str]:
    """ `command` without `option VALUE` / `option=VALUE`. """
    out, skip = [], False
    for tok in command:
        if skip:
            skip = False
        elif tok == option:
            skip = True
        elif not tok.startswith(option + '='):
            out.append(tok)
    return out


def launch(run: Run, slot: int, gpus: Optional[Sequence[str]], threads: Optional[int] = None
           ) -> Tuple[List[str], Dict[str, str], str]:
    """ How `run` starts in run slot `slot`: (its command, the environment variables set for it, a note such as
    ' with 1 CPU thread (its share of the cores)' or ' on GPU 1'). `threads`: `cpu_threads_per_run`'s share, which
    a trainer run also gets as --num_threads (beating its config file's). The runner and --dry-run both use it. """
    command, env, where = list(run.command), {}, ''
    if threads is not None:
        where = f' with {threads} CPU thread{"s" * (threads != 1)} (its share of the cores'
        if run.output_dir is not None:  # the trainer: --num_threads on its command line beats its config file's
            if run.num_threads not in (None, threads):
                where += f'; the run\'s num_threads {run.num_threads} would oversubscribe them'
            command = _without_option(command, '--num_threads') + ['--num_threads', str(threads)]
        env['OMP_NUM_THREADS'] = str(threads)
        where += ')'
    if gpus:
        env['CUDA_VISIBLE_DEVICES'] = gpus[slot % len(gpus)]
        where = f' on GPU {env["CUDA_VISIBLE_DEVICES"]}'
    return command, env, where


def _start(run: Run, slot: int, gpus: Optional[Sequence[str]], environ: Mapping[str, str], view: Overview,
           threads: Optional[int] = None):
    run.command, extra, where = launch(run, slot, gpus, threads)
    env = {**environ, **extra}
    run.log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(run.log_file, 'a')
    gpu_note = ''.join(f'{k}={v} ' for k, v in sorted(extra.items()))
    log.write(f'{LOG_HEADER} start {time.strftime("%Y-%m-%d %H:%M:%S")} ({run.state} run): '
              f'{gpu_note}{shlex.join(run.command)}\n')
    log.flush()
    verb = 'resume ' if run.state == 'interrupted' else 'start  '
    run.state, run.ran, t0 = 'running', True, time.time()
    try:
        proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)  # its own process group, stopped as one
    except OSError as e:  # the command does not exist, or is not executable
        log.write(f'cannot start {run.command[0]}: {e}\n{LOG_HEADER} end: exit code 127\n')
        log.close()
        run.returncode, run.state = 127, 'failed'
        view.event(f'FAILED  #{run.index} {run.label}: cannot start {run.command[0]}: {e}')
        return None
    view.event(f'{verb} #{run.index} {run.label}{where}, log {run.log_file}')
    return run, proc, log, t0
