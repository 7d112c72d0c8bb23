""" Training configuration: defaults, then a YAML file, then command-line overrides.

Every field is typed; an unknown key or a value of the wrong type is a `UserError` that names the key
and lists the valid ones (the command line turns it into exit code 2, no traceback). Mappings
(`model_kwargs`) merge: the YAML file's entries, then the command line's, key by key
(`--model_kwargs '{"width": 8}'` or `--model_kwargs.width 8`). `--help` lists every key with its type,
default and the help text of its field (`_key`).
"""
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..errors import UserError, yaml_problem
from ..models.create import INIT_KWARGS

__all__ = ['TrainConfig', 'UserError', 'INIT_KWARGS', 'load_config', 'paper_epochs', 'config_help', 'wants_help',
           'config_defaults', 'file_settings']




MODEL, DATA, OPTIMISATION, DISTILL, SPEED, OUTPUT = (
    'model', 'data', "optimisation (defaults: the paper's protocol, Appendix B)", 'distillation (off without a teacher)',
    'speed', 'output, logging, checkpoints')


def _key(group: str, default: Any = None, help: str = '', factory=None):
    """ A config field; its group and help text are what `--help` prints (`config_help`). """
    metadata = {'group': group, 'help': help}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """ Every setting of a training run; `python train.py --help` lists them with these help texts. """
    model: str = _key(MODEL, 'rc4_cifar', "any timm name; '.cifar100' tag for CIFAR-100's head and statistics")
    model_kwargs: Dict[str, Any] = _key(MODEL, factory=dict, help='passed to timm.create_model')
    sample_steps: Optional[List[int]] = _key(
        MODEL, None, "[min, max]: unrolled steps k' per cell drawn per batch (RC models; built with steps=max)")
    sample_steps_cells: str = _key(
        MODEL, 'same', "with sample_steps: 'same' (one k' for both cells) or 'independent' (one per cell)")

    dataset: str = _key(DATA, 'cifar10', "'cifar10', 'cifar100' or a Hugging Face hub id ('owner/name:config' picks a "
                                         "config); evaluated on its test split, else validation")
    data_dir: Optional[str] = _key(DATA, None, "local folder in the hub's parquet schema (no network needed)")
    max_train_samples: Optional[int] = _key(DATA, None, 'use only the first N training examples')
    max_eval_samples: Optional[int] = _key(DATA, None, 'use only the first N test examples')
    loader: str = _key(DATA, 'auto', "'gpu' (whole split on the GPU), 'dataloader', 'timm' (timm's pipeline, any image "
                                     "size), 'auto' (CIFAR-sized: gpu on CUDA, else dataloader; other images: timm)")
    num_workers: Optional[int] = _key(
        DATA, None, 'DataLoader workers of the timm pipeline; None: the cores per process - 1, at most 8')

    epochs: Optional[int] = _key(OPTIMISATION, None, "None: 160 for depth > 10, 120 otherwise (the paper's rule)")
    batch_size: int = _key(OPTIMISATION, 128, 'global, split over all processes')
    lr: float = _key(OPTIMISATION, 0.1, 'SGD learning rate')
    momentum: float = _key(OPTIMISATION, 0.9, 'SGD momentum')
    weight_decay: float = _key(OPTIMISATION, 1e-4, 'SGD weight decay')
    lr_milestones: List[int] = _key(OPTIMISATION, factory=lambda: [60, 90], help='epochs where lr is multiplied by lr_gamma')
    lr_gamma: float = _key(OPTIMISATION, 0.1, 'lr factor at each milestone')
    warmup_epochs: int = _key(OPTIMISATION, 0, 'linear warm-up (for big-batch recipes; the paper has none)')
    clip_grad_value: Optional[float] = _key(OPTIMISATION, 0.1, 'clip gradients to [-v, v]; null turns it off')
    label_smoothing: float = _key(OPTIMISATION, 0.0, 'cross-entropy label smoothing')
    max_steps: Optional[int] = _key(OPTIMISATION, None, 'stop after N optimizer steps')
    seed: int = _key(OPTIMISATION, 0, 'initial weights, shuffling and augmentation')

    teacher: Optional[str] = _key(
        DISTILL, None, "distil from it: a run folder, a weights file (with teacher_model), or a timm name (its "
                       "pretrained weights)")
    teacher_model: Optional[str] = _key(DISTILL, None, 'timm name of a teacher weights file outside a run folder')
    teacher_model_kwargs: Dict[str, Any] = _key(DISTILL, factory=dict, help="the teacher's timm.create_model kwargs")
    distill_alpha: float = _key(DISTILL, 0.9, 'weight of the distillation term; the label loss gets 1 - alpha')
    distill_temperature: float = _key(DISTILL, 4.0, 'softmax temperature of the distillation term (x T^2)')

    mixed_precision: str = _key(SPEED, 'auto', "'auto' (bf16 on CUDA and on CPUs with bf16 instructions, else none), 'no', 'bf16', 'fp16'")
    compile: bool = _key(SPEED, False, 'torch.compile the model')
    compile_mode: Optional[str] = _key(SPEED, None, "e.g. 'max-autotune-no-cudagraphs', 'reduce-overhead'")
    channels_last: Optional[bool] = _key(SPEED, None, 'None: on (CUDA and CPU)')
    sync_bn: bool = _key(SPEED, False, 'SyncBatchNorm across processes')
    eval_batch_size: int = _key(SPEED, 1024, 'per process')
    num_threads: Optional[int] = _key(SPEED, None, "CPU threads per process; None: the process's cores (see docs/training.md)")

    output_dir: Optional[str] = _key(
        OUTPUT, None, 'may use {seed} {model} {dataset} {config}; None: runs/{model}-{dataset}/seed{seed}')
    log_with: str = _key(OUTPUT, 'none', "'wandb', 'tensorboard', 'none', or a comma list")
    project: str = _key(OUTPUT, 'timm_rc', 'W&B project / tracker project name')
    run_name: Optional[str] = _key(OUTPUT, None, 'None: the output_dir below runs/')
    log_model: bool = _key(OUTPUT, False, 'W&B: log the final model.safetensors + config.json as a model artifact')
    log_interval: int = _key(OUTPUT, 50, 'progress-bar refresh in steps (reads values without a host sync)')
    keep_checkpoints: int = _key(OUTPUT, 2, 'newest complete checkpoints kept')
    resume: Optional[str] = _key(OUTPUT, None, "'auto' (newest complete checkpoint in output_dir) or a path")
    # set by load_config from --config, not by hand: the experiment's file and the values it gave, which the
    # results table compares the run with (run_config.json records both)
    config_file: Optional[str] = field(default=None, metadata={'group': OUTPUT, 'help': '', 'recorded': True})
    config_values: Dict[str, Any] = field(default_factory=dict, metadata={'group': OUTPUT, 'help': '', 'recorded': True})

    def resolved_output_dir(self) -> Path:
        """ output_dir with {seed}, {model}, {dataset} and {config} (the config file's name without .yaml)
        filled in: one folder per seed, model or config file in sweeps. """
        fields = dict(seed=self.seed, model=self.model.replace('/', '_'), dataset=Path(self.dataset).name,
                      config=Path(self.config_file).stem if self.config_file else 'no-config')
        template = self.output_dir or 'runs/{model}-{dataset}/seed{seed}'
        try:
            return Path(template.format(**fields))
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f'output_dir {template!r} may only use {{seed}}, {{model}}, {{dataset}} and {{config}}: '
                            f'{e}') from None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    'loader': ('auto', 'gpu', 'dataloader', 'timm'),
    'sample_steps_cells': ('same', 'independent'),
    'mixed_precision': ('auto', 'no', 'bf16', 'fp16'),
}
TRACKERS = ('wandb', 'tensorboard', 'none')
POSITIVE = ('batch_size', 'eval_batch_size', 'log_interval', 'keep_checkpoints', 'epochs',
            'max_train_samples', 'max_eval_samples', 'max_steps', 'num_threads')


# numeric keys: (the test, what it says); every value must also be finite (no nan, no inf)
RANGES = {
    'lr': (lambda v: v > 0, '> 0'),
    'momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'weight_decay': (lambda v: v >= 0, '>= 0'),
    'lr_gamma': (lambda v: v > 0, '> 0'),
    'lr_milestones': (lambda v: v >= 0, 'a list of epochs >= 0'),
    'warmup_epochs': (lambda v: v >= 0, '>= 0'),
    'clip_grad_value': (lambda v: v > 0, '> 0'),
    'label_smoothing': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'seed': (lambda v: 0 <= v < 2 ** 32, 'in [0, 2**32)'),
    'num_workers': (lambda v: v >= 0, '>= 0'),
    'distill_alpha': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'distill_temperature': (lambda v: v > 0, '> 0'),
}


def paper_epochs(depth: Optional[int]) -> int:
    """ Appendix B: networks deeper than 10 layers train 160 epochs, the others 120. """
    return 160 if depth is None or depth > 10 else 120


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
SETTABLE = [name for name, f in _FIELDS.items() if not f.metadata.get('recorded')]


def _type_name(tp) -> str:
    """ int, float or null, list of int, mapping: how a user reads a type. """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return ' or '.join(_type_name(a) for a in args if a is not type(None)) + ' or null'
    if origin in (list, List):
        return f'list of {_type_name(args[0])}'
    if origin in (dict, Dict):
        return 'mapping'
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


def _convert(key: str, value: Any, tp, from_cli: bool) -> Any:
    """ Check (and, for command-line strings, parse) one value against the field's type. """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (from_cli and str(value).lower() in ('null', 'none', '~')):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _convert(key, value, inner, from_cli)

    def bad():
        return UserError(f'config key {key!r} needs a value of type {_type_name(tp)}, got {value!r}')

    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ('true', 'false', '1', '0', 'yes', 'no'):
            return str(value).lower() in ('true', '1', 'yes')
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if from_cli or isinstance(value, str):
            try:
                return int(str(value))
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if origin in (dict, Dict):
        text = value if from_cli and isinstance(value, str) else None
        if text is not None:
            try:
                value = yaml.safe_load(text)  # JSON is YAML (and {width: 8} is YAML too)
            except yaml.YAMLError:
                value = None
        if not isinstance(value, dict):
            if text is not None and text.lstrip().startswith('{'):  # meant as JSON: say where it breaks
                try:
                    json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(f'config key {key!r}: {text!r} is not valid JSON: {e.msg}: column {e.colno} '
                                    f'(e.g. \'{{"width": 8}}\')') from None
            raise bad()
        return dict(value)
    if origin in (list, List):
        if from_cli and isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith('[') else value.split(',')
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_convert(key, v, args[0], from_cli) for v in value]
    raise TypeError(f'unsupported config type {tp} for {key}')


def _apply(cfg: Dict[str, Any], updates: Dict[str, Any], source: str, from_cli: bool) -> None:
    """ Set each key; a mapping merges into the current one (the later source wins per entry), and
    `key.sub` sets one entry of the mapping `key`. """
    hints = typing.get_type_hints(TrainConfig)
    for key, value in updates.items():
        key, dot, sub = key.partition('.')
        if key not in _FIELDS or (_FIELDS[key].metadata.get('recorded') and source != 'recorded'):
            import difflib
            close = difflib.get_close_matches(key, sorted(SETTABLE), n=1)
            mean = f"did you mean {close[0]!r}? " if close else ''
            raise UserError(
                f'unknown config key {key!r} in {source}; {mean}valid keys: {", ".join(sorted(SETTABLE))}')
        is_mapping = typing.get_origin(hints[key]) in (dict, Dict)
        if dot:
            if not is_mapping or not sub:
                raise UserError(f'config key {key + dot + sub!r} in {source}: only mappings '
                                f'({", ".join(k for k in SETTABLE if typing.get_origin(hints[k]) in (dict, Dict))}) '
                                f'take a dotted entry such as model_kwargs.width')
            if from_cli and isinstance(value, str):
                try:
                    value = yaml.safe_load(value)  # 8 -> int, true -> bool, [1, 2] -> list, text stays text
                except yaml.YAMLError:
                    pass
            value = {sub: value}
        value = _convert(key, value, hints[key], from_cli)
        cfg[key] = {**(cfg.get(key) or {}), **value} if is_mapping else value


def _validate(cfg: TrainConfig) -> None:
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise UserError(f'config key {key!r} must be one of {", ".join(choices)}; got {getattr(cfg, key)!r}')
    for name in cfg.log_with.split(','):
        if name.strip() not in TRACKERS:
            raise UserError(f'config key \'log_with\' takes {", ".join(TRACKERS)} (or a comma list); got {name!r}')
    for key in POSITIVE:
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UserError(f'config key {key!r} must be >= 1, got {value}')
    for key, (ok, allowed) in RANGES.items():
        value = getattr(cfg, key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is not None and (not math.isfinite(v) or not ok(v)):
                extra = ', or null to turn clipping off' if key == 'clip_grad_value' else ''
                extra += '' if math.isfinite(v) else ' and finite'
                raise UserError(f'config key {key!r} must be {allowed}{extra}, got {value}')
    if cfg.teacher is None and (cfg.teacher_model is not None or cfg.teacher_model_kwargs):
        raise UserError('teacher_model and teacher_model_kwargs describe the teacher; give the teacher itself with '
                        '--teacher (a run folder, a weights file or a timm name)')
    if cfg.sample_steps is not None and (len(cfg.sample_steps) != 2 or not 1 <= cfg.sample_steps[0] <= cfg.sample_steps[1]):
        raise UserError(f'config key \'sample_steps\' takes [min, max] with 1 <= min <= max (e.g. 1,8), or null; '
                        f'got {cfg.sample_steps}')


def parse_cli(argv: Sequence[str]) -> Dict[str, Any]:
    """ `--config FILE` and `--key value` / `--key=value` pairs; a bare `--resume` means 'auto'. """
    out: Dict[str, Any] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--') or arg == '--':
            raise UserError(f'unexpected argument {arg!r}; use --config FILE and --key value pairs')
        key, eq, value = arg[2:].partition('=')
        key = key.replace('-', '_')
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith('--') and len(nxt) > 2):
                if key == 'resume':
                    value = 'auto'
                elif key in _FIELDS and _FIELDS[key].type in (bool, 'bool'):
                    value = 'true'
                else:
                    raise UserError(f'--{key} needs a value')
            else:
                value = nxt
                i += 1
        out[key] = value  # the last of repeated keys wins, as with argparse
        i += 1
    return out


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ('-h', '--help') for a in argv)


def config_help(prog: str = 'python train.py') -> str:
    """ Every config key with its type, default and help text, grouped as in `TrainConfig`. """
    hints = typing.get_type_hints(TrainConfig)
    lines = [
        f'usage: {prog} [--config FILE.yaml] [--key value | --key=value ...]',
        '',
        'Settings come from the defaults below, then the YAML file, then the command line (the last of a',
        'repeated key wins). Mappings merge per entry: --model_kwargs \'{"width": 8}\' or --model_kwargs.width 8.',
        'A bare --resume means --resume auto; a bare boolean flag (--compile) means true; null/none unsets.',
        'Multi-process: accelerate launch [--multi_gpu --num_processes N] -m timm_rc train ... (or train.py ...)',
    ]
    defaults = TrainConfig()
    group = None
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get('recorded'):  # set by --config, not a key to give
            continue
        if f.metadata['group'] != group:
            group = f.metadata['group']
            lines += ['', f'{group}:']
        lines.append(f'  --{f.name} {_type_name(hints[f.name])} (default {json.dumps(getattr(defaults, f.name))})')
        if f.metadata['help']:
            lines.append(f"      {f.metadata['help']}")
    return '\n'.join(lines)


def load_config(argv: Sequence[str] = (), base: Optional[Dict[str, Any]] = None,
                base_source: str = 'the run folder') -> TrainConfig:
    """ The defaults, then `base` (a resumed run's own settings), then the YAML file of `--config`, then the
    command line's `--key value` pairs. """
    cli = parse_cli(argv)
    values = dataclasses.asdict(TrainConfig())
    if base:
        _apply(values, {k: v for k, v in base.items() if k in SETTABLE}, base_source, from_cli=False)
        _apply(values, {k: v for k, v in base.items() if k in _FIELDS and k not in SETTABLE}, 'recorded', from_cli=False)
    path = cli.pop('config', None)
    if path is not None:
        p = Path(path)
        if p.is_dir():
            files = sorted(f.name for f in p.glob('*.yaml'))[:6]
            raise UserError(f'--config {path} is a folder; give a config file' + (
                f', e.g. {p / files[0]} (it holds {", ".join(files)}{", ..." if len(files) == 6 else ""})'
                if files else ''))
        if not p.is_file():
            raise UserError(f'config file {path} does not exist')
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f'config file {path} is not valid YAML{yaml_problem(e)}') from None
        if not isinstance(data, dict):
            raise UserError(f'config file {path} must hold a mapping of keys to values')
        _apply(values, data, f'config file {path}', from_cli=False)
        values['config_file'], values['config_values'] = str(path), data
    _apply(values, cli, 'the command line', from_cli=True)
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg


def file_settings(values: Dict[str, Any]) -> Dict[str, Any]:
    """ Every key's value for a run made from a config file that gave `values` with nothing on top (the
    defaults, the file's values typed as the trainer reads them: YAML's '1e-4' is 0.0001). A key the code no
    longer knows is left out. """
    out = config_defaults()
    try:
        _apply(out, {k: v for k, v in values.items() if k in SETTABLE}, 'the recorded config file', from_cli=False)
    except UserError:
        pass
    return out


def config_defaults() -> Dict[str, Any]:
    """ Every key's default (what a run folder written before a key existed used). """
    return TrainConfig().to_dict()
