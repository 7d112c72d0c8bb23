""" The paper's tables beside this project's runs (what `python -m timm_rc results runs/` prints).

`collect` reads every `summary.json` (and the `run_config.json` beside it) below the given folders and pools
only runs whose configurations differ in the seed alone: model, model kwargs, dataset, epochs
(planned and completed), training and test examples, batch size and every optimisation and precision
setting of `run_config.json` (lr, milestones, clipping, warm-up, label smoothing, max_steps, mixed
precision, loader, compile, ...). What differs from the paper's protocol, or between rows that are
otherwise equal, is listed in the `setting` column (e.g. `epochs 15, lr_milestones 8,12, clip none`). A run
started from an experiment's file (`--config FILE`, recorded in run_config.json) is compared with that file
instead: the column names the file and what the run changed on top of it (and of the defaults for keys the
file leaves alone), e.g. `config rc4_cifar10.yaml, max_train_samples 1024`.
Each row gives the mean and standard deviation of the final test top-1 error over distinct seeds
next to the paper's number (mean of 3 runs on the lossless CIFAR; ours on whatever data the runs
used). A seed run more than once in one row counts once, with its newest run (by the time
`summary.json` was last written); the row shows it as `0,0!` and a warning on stderr names the runs.
A summary without a seed shows as `?` and counts as a run of its own.

Not compared: seed, output_dir, run_name, resume, log_with, log_model, log_interval,
keep_checkpoints, project, eval_batch_size, num_threads, and how data_dir is spelled (only its last
component, the dataset's name, counts). A run_config.json key that some runs lack (written by an
older trainer) is not compared.
"""
import json
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..runs.config import INIT_KWARGS, file_settings
from ..errors import UserError
from .formatting import format_table
from ..runs import Run, walk_runs

__all__ = ['PAPER', 'PROTOCOL', 'collect', 'paper_name', 'paper_row', 'table', 'result_rows']

# (model, bn_sharing) -> {dataset: test error %}; paper-notes.md, Tables 1 and 2
PAPER: Dict[Tuple[str, str], Dict[str, float]] = {
    ('rc4_cifar', 'none'): {'cifar10': 10.37, 'cifar100': 38.56},
    ('rc4_cifar', 'shared'): {'cifar10': 21.00, 'cifar100': 54.52},
    ('rc4_cifar', 'independent'): {'cifar10': 7.65, 'cifar100': 30.44},
    ('rc1_cifar', 'independent'): {'cifar10': 14.77, 'cifar100': 40.28},
    ('rc2_cifar', 'independent'): {'cifar10': 8.44, 'cifar100': 32.51},
    ('rc2_unshared_cifar', 'independent'): {'cifar10': 7.87, 'cifar100': 30.74},
    ('rc4_unshared_cifar', 'independent'): {'cifar10': 6.92, 'cifar100': 28.10},
}
PAPER_NAMES = {
    ('rc4_cifar', 'none'): 'RC-4, no BN', ('rc4_cifar', 'shared'): 'RC-4, shared BN',
    ('rc4_cifar', 'independent'): 'RC-4', ('rc1_cifar', 'independent'): 'RC-1',
    ('rc2_cifar', 'independent'): 'RC-2', ('rc2_unshared_cifar', 'independent'): 'ResNet-10',
    ('rc4_unshared_cifar', 'independent'): 'ResNet-18',
}
# the paper's protocol (Appendix B); epochs depend on the depth, see PAPER_EPOCHS
PROTOCOL: Dict[str, Any] = dict(
    global_batch_size=128, lr=0.1, lr_milestones=[60, 90], lr_gamma=0.1, momentum=0.9, weight_decay=1e-4,
    warmup_epochs=0, clip_grad_value=0.1, label_smoothing=0.0, max_steps=None)
PAPER_EPOCHS = {'rc1_cifar': 120, 'rc2_cifar': 120, 'rc2_unshared_cifar': 120, 'rc4_cifar': 160,
                'rc4_unshared_cifar': 160}
CIFAR_EXAMPLES = dict(train_examples=50_000, eval_examples=10_000)
# run_config.json keys that do not change what is trained and measured (or are columns already)
IGNORED = {'seed', 'data', 'teacher_identity', 'teacher_model', 'teacher_model_kwargs', 'config_file', 'config_values',
           'output_dir', 'run_name', 'resume', 'log_with', 'log_model', 'log_interval', 'keep_checkpoints',
           'project', 'eval_batch_size', 'num_threads', 'data_dir', 'dataset', 'model', 'model_kwargs', 'params',
           # their effect is in the summary's train_examples / eval_examples / global_batch_size
           'max_train_samples', 'max_eval_samples', 'batch_size'}
SUMMARY_KEYS = ('epochs', 'epochs_completed', 'train_examples', 'eval_examples', 'global_batch_size')
# keys a run changes on top of its experiment's file that the setting column names (the others are columns,
# or do not change what is trained and measured)
FILE_COMPARED_IGNORED = (IGNORED - {'max_train_samples', 'max_eval_samples', 'batch_size', 'data_dir', 'dataset'}) | {
    'config_file', 'config_values', 'teacher_identity', 'params', 'num_processes', 'loader', 'channels_last',
    'model', 'model_kwargs'}
SHORT = {'clip_grad_value': 'clip', 'global_batch_size': 'batch', 'init': 'init from', 'teacher': 'distilled from'}
ORDER = ['epochs', 'train_examples', 'eval_examples', 'global_batch_size', 'lr', 'lr_milestones', 'lr_gamma',
         'momentum', 'weight_decay', 'warmup_epochs', 'clip_grad_value', 'label_smoothing', 'max_steps',
         'mixed_precision']


# model kwargs that leave the paper's network the same network (its width, its block style)
SAME_NETWORK_KWARGS = frozenset(('width', 'block', 'drop_rate', 'drop_path_rate'))


def paper_row(model: str, model_kwargs: dict) -> Tuple[str, str]:
    base = model.split('.')[0]
    bn = model_kwargs.get('bn_sharing', 'independent')
    if base == 'rc1_cifar':  # one step: BN sharing makes no difference
        bn = 'independent' if bn == 'shared' else bn
    return base, bn


def paper_name(model: str, model_kwargs: dict) -> Optional[str]:
    """ The paper's name of a model ('RC-4', 'RC-4, shared BN', 'ResNet-18' for its unshared graph), None for
    a model the paper has no row for. """
    return PAPER_NAMES.get(paper_row(model, model_kwargs))


def collect(roots: Sequence[Path], on_skip: Optional[Callable[[str], None]] = None) -> List[dict]:
    """ One dict per run below `roots`: its summary.json, `path` (the run folder) and `run_config` (its
    run_config.json with the defaults of keys its trainer did not write, None where there is none). What
    is not a run summary is skipped and said to `on_skip`; a root that does not exist is an error. """
    missing = [str(r) for r in roots if not Path(r).exists()]
    if missing:
        raise UserError(f'{", ".join(missing)} do{"es" * (len(missing) == 1)} not exist')
    files = [str(r) for r in roots if Path(r).is_file()]
    if files:
        raise UserError(f'{files[0]} is a file, not a folder; give run folders (holding summary.json) or folders '
                        f'below which they lie')
    runs = []
    for run, summary in walk_runs(roots, on_skip):
        entry = dict(summary, path=str(run.path))
        try:
            entry['run_config'] = run.config(defaults=True) if run.has_config() else None
        except UserError:
            entry['run_config'] = None
        runs.append(entry)
    return runs


def _run_config(run: dict) -> Optional[dict]:
    """ The run's run_config.json, a key an older trainer did not write at its default. """
    if 'run_config' in run:
        return run['run_config']
    folder = Run(run['path']) if run.get('path') else None
    try:
        return folder.config(defaults=True) if folder is not None and folder.has_config() else None
    except UserError:
        return None


def _rc_models() -> set:
    import timm
    from .. import models  # noqa: F401, registers the RC models
    return set(timm.list_models(module='rc_cifar'))


def _mtime(run: dict) -> float:
    try:
        return os.stat(Path(run['path']) / 'summary.json').st_mtime
    except (KeyError, TypeError, OSError):
        return float('-inf')


def _fmt(value) -> str:
    if value is None:
        return 'none'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f'{value:g}'
    if isinstance(value, (list, tuple)):
        return ','.join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _changes_to_file(cfg: dict) -> Optional[Dict[str, Any]]:
    """ {key: the run's value} for what a run started from an experiment's file (`config_file`) changed: the
    keys the file sets, against the file's values, and the others against their defaults. None without a file. """
    if not cfg.get('config_file'):
        return None
    expected = file_settings(cfg.get('config_values') or {})
    changed = {}
    for k, v in cfg.items():
        if k in FILE_COMPARED_IGNORED or k not in expected:
            continue
        if (k, expected[k]) in (('epochs', None), ('mixed_precision', 'auto')):  # resolved by the trainer
            continue
        if k == 'data_dir' and v is not None and expected[k] is not None and Path(v).name == Path(expected[k]).name:
            continue  # the same dataset, spelled from another folder
        if json.dumps(v, sort_keys=True, default=str) != json.dumps(expected[k], sort_keys=True, default=str):
            changed[k] = v
    return changed


def _order(key: str):
    return (ORDER.index(key), '') if key in ORDER else (len(ORDER), key)


def table(runs: List[dict], markdown: bool = False, on_warning: Optional[Callable[[str], None]] = None) -> str:
    """ One row per configuration (runs that differ in the seed alone), as text or Markdown. A seed run
    more than once in a row is said to `on_warning` (the row shows it as `0,0!`). """
    header = ['model', 'kwargs', 'dataset', 'setting', 'runs', 'seeds', 'epochs', 'params', 'test err % (ours)',
              'paper']
    rows = []
    for r in result_rows(runs, on_warning):
        spread = f' ± {r["std"]:.2f}' if r['std'] is not None else ''
        rows.append([r['name'], r['kwargs'], r['dataset'], r['setting'], str(r['runs']), r['seeds'], r['epochs'],
                     f'{r["params"]:,}', f'{r["mean"]:.2f}{spread}', '' if r['paper'] is None else f'{r["paper"]:.2f}'])
    return format_table(header, rows, markdown, numeric=[False] * len(header))


def result_rows(runs: List[dict], on_warning: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """ The rows of `table` as dicts: name, kwargs (JSON text, '' for none), dataset, setting, runs, seeds
    (text), epochs (text), params, mean and std (None for one run) of the test error %, paper (or None),
    errors (one per counted run). """
    rc_models = _rc_models()
    configs = [_run_config(r) for r in runs]
    # keys every run_config.json has (a key an older trainer did not write is not compared)
    common = set.intersection(*[set(c) for c in configs if c is not None]) if any(
        c is not None for c in configs) else set()
    common -= IGNORED

    groups: Dict[tuple, List[dict]] = defaultdict(list)
    settings: Dict[tuple, Dict[str, Any]] = {}
    for r, cfg in zip(runs, configs):
        kwargs = dict(r.get('model_kwargs') or {})
        init = kwargs.pop('pretrained_cfg_overlay', None) or {}
        for k in INIT_KWARGS:  # where the starting weights came from: the setting column says it
            kwargs.pop(k, None)
        base = r['model'].split('.')[0]
        if base in rc_models:
            key = paper_row(r['model'], kwargs)
            extra = {k: v for k, v in kwargs.items() if k != 'bn_sharing'}
        else:  # a plain timm model: its own name, all its kwargs
            key, extra = (r['model'], ''), dict(kwargs)
        dataset = Path(r.get('data_dir') or r.get('dataset') or '?').name
        setting = {k: r[k] for k in SUMMARY_KEYS if k in r}  # a key an older summary lacks is unknown
        if cfg is None:
            setting['run_config'] = 'missing'
        else:
            setting.update({k: cfg[k] for k in common})
        file_changes = _changes_to_file(cfg) if cfg is not None else None
        if file_changes is not None:
            setting['config'] = Path(cfg['config_file']).name
            setting['changed'] = file_changes
        if isinstance(init, dict) and init.get('file'):
            setting['init'] = Path(init['file']).name
        if cfg is not None and cfg.get('teacher') is not None:  # distilled: from which network (its weights' digest)
            ident = cfg.get('teacher_identity') or {}
            setting['teacher'] = (f'{ident["model"]} {ident["weights_sha256"][:8]}' if ident.get('weights_sha256')
                                  else str(cfg['teacher']))
        ident = (key, json.dumps(extra, sort_keys=True), dataset)
        sig = ident + (json.dumps(setting, sort_keys=True, default=str),)
        groups[sig].append(r)
        settings[sig] = setting

    # settings that differ between rows of the same model, kwargs and dataset
    varying: Dict[tuple, set] = defaultdict(set)
    by_ident: Dict[tuple, List[tuple]] = defaultdict(list)
    for sig in groups:
        by_ident[sig[:3]].append(sig)
    for ident, sigs in by_ident.items():
        for k in set().union(*[settings[s] for s in sigs]):
            if len({json.dumps(settings[s].get(k), default=str) for s in sigs}) > 1:
                varying[ident].add(k)

    rows = []
    # rows of one model, kwargs and dataset together, the most complete first
    def natural(text: str) -> list:  # {"width": 8} before {"width": 16}
        return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', text)]
    order = sorted(groups, key=lambda sig: (sig[0], natural(sig[1]), sig[2],
                                            -(settings[sig].get('epochs_completed') or 0), sig[3]))
    for sig in order:
        rs = groups[sig]
        key, extra, dataset, _ = sig
        setting = settings[sig]
        name = PAPER_NAMES.get(key) or (f'{key[0]} ({key[1]} BN)' if key[1] else key[0])
        # the paper's protocol, where it says something about this model and dataset
        protocol = dict(PROTOCOL)
        if key[0] in PAPER_EPOCHS and 'steps' not in json.loads(extra or '{}'):
            protocol['epochs'] = PAPER_EPOCHS[key[0]]
        if dataset in ('cifar10', 'cifar100'):
            protocol.update(CIFAR_EXAMPLES)
        if 'config' in setting:  # the experiment's file is the reference: what the run changed on top of it
            shown = {'config'} | set(setting['changed'])
        else:
            shown = {k for k, v in protocol.items() if k in setting and setting[k] != v}
            shown |= varying[sig[:3]] - {'epochs_completed', 'changed', 'config'}
        shown |= {k for k in ('init', 'sample_steps', 'teacher') if setting.get(k) is not None}
        shown -= {k for k in ('init', 'sample_steps', 'teacher') if setting.get(k) is None}  # from scratch, fixed steps
        if setting.get('teacher') is None:  # the distillation settings say nothing without a teacher
            shown -= {'distill_alpha', 'distill_temperature', 'teacher_model', 'teacher_model_kwargs'}
        described = ', '.join(f'{SHORT.get(k, k)} {_fmt(setting.get(k, (setting.get("changed") or {}).get(k)))}'
                              for k in sorted(shown, key=lambda k: (k != 'config', _order(k))))

        # one run per seed: the newest of a seed run more than once
        by_seed: Dict[Any, List[dict]] = defaultdict(list)
        for r in rs:
            by_seed[r.get('seed')].append(r)
        chosen = []
        seeds = []
        for seed in sorted(by_seed, key=lambda s: (s is None, s)):
            same = sorted(by_seed[seed], key=_mtime)
            if seed is None:  # a summary without its seed: no way to tell re-runs apart, all count
                chosen += same
                seeds += ['?'] * len(same)
                continue
            chosen.append(same[-1])
            if len(same) > 1:
                seeds.append(','.join([_fmt(seed)] * len(same)) + '!')
                if on_warning is not None:
                    on_warning(f'warning: {name}{" " + extra if extra and extra != "{}" else ""} on {dataset}: seed '
                               f'{_fmt(seed)} was run {len(same)} times ({", ".join(str(r.get("path")) for r in same)}); '
                               f'counting only the newest, {same[-1].get("path")}')
            else:
                seeds.append(_fmt(seed))
        r0 = rs[0]
        errs = [r['test_top1_error'] for r in chosen]
        # the paper's number beside runs of the same network, also at another width or block style
        # (the setting and kwargs columns say how the run differs); another step count is another network
        same_net = extra in ('{}', '') or set(json.loads(extra)) <= SAME_NETWORK_KWARGS
        paper: Optional[float] = PAPER.get(key, {}).get(dataset) if same_net else None
        rows.append(dict(name=name, kwargs='' if extra in ('{}', '') else extra, dataset=dataset, setting=described,
                         runs=len(chosen), seeds=','.join(seeds),
                         epochs=f"{r0.get('epochs_completed', '?')}/{r0.get('epochs', '?')}", params=r0['params'],
                         mean=statistics.mean(errs), std=statistics.stdev(errs) if len(errs) > 1 else None,
                         paper=paper, errors=errs))
    return rows
