""" A run folder and its one reader and writer, `Run`.

The trainer writes, into its `output_dir`:

    run_config.json        every setting of the run (TrainConfig, resolved: epochs, loader, precision, ...)
    summary.json           results so far (rewritten every epoch): test error, epochs completed, versions, ...
    metrics.jsonl          one JSON line per epoch (train/loss, test/top1_err, lr, ...)
    bn_stats/epoch_N.safetensors   per-step BN statistics of the RC cells
    checkpoints/epoch_N/   accelerate's save_state + trainer_state.json + manifest.json (`timm_rc.runs.checkpoints`)
    model.safetensors + config.json   the final model in timm's format (`save_for_hf`)
    run.lock               held while a trainer writes into the folder

Every command reads these through `Run`, so the old-run rules live here once: a run_config.json key that
an older trainer did not write has the default that trainer used (`config(defaults=True)`), and an RC
run trained before timm_rc 0.2.0 without an explicit block gets `block='preact'` (`model_kwargs`), the
default of its time.
"""
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .checkpoints import complete_checkpoints, latest_checkpoint, usual_mode, writing
from .config import INIT_KWARGS, TrainConfig, config_defaults, load_config
from ..errors import UserError

__all__ = ['Run', 'walk_runs', 'load_run_config', 'PAPER_RC_MODELS']

MAX_JSON_BYTES = 1 << 20  # a run's summary.json / run_config.json is a few KB
# the paper's networks, whose default block changed in 0.2.0 ('preact' before, 'postact' since)
PAPER_RC_MODELS = ('rc1_cifar', 'rc2_cifar', 'rc4_cifar', 'rc2_unshared_cifar', 'rc4_unshared_cifar')


class Run:
    """ A training run's folder. Reading never changes it; the write methods are the trainer's. """

    CONFIG = 'run_config.json'
    SUMMARY = 'summary.json'
    METRICS = 'metrics.jsonl'
    WEIGHTS = 'model.safetensors'  # what the trainer (timm's save_for_hf) and accelerate's save_state write
    MODEL_CONFIG = 'config.json'
    BN_STATS = 'bn_stats'
    CHECKPOINTS = 'checkpoints'

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f'Run({str(self.path)!r})'

    def __eq__(self, other) -> bool:
        return isinstance(other, Run) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @classmethod
    def find(cls, path: Union[str, Path]) -> Optional['Run']:
        """ The run whose folder `path` is, or that a weights file lies in: the run's own
        model.safetensors, or a checkpoint's (run/checkpoints/epoch_0002/model.safetensors). """
        path = Path(path)
        for d in ([path] if path.is_dir() else []) + list(path.parents)[:3]:
            if (d / cls.CONFIG).is_file():
                return cls(d)
        return None

    # ---- reading -------------------------------------------------------------------------------

    def _json(self, name: str) -> Optional[Any]:
        """ A JSON file of the folder, None where it does not exist; a UserError where it is no
        regular file of at most 1 MiB (e.g. a link to /dev/zero) or not valid JSON. """
        f = self.path / name
        if not f.exists():
            return None
        if not f.is_file() or f.stat().st_size > MAX_JSON_BYTES:
            raise UserError(f'{f}: not a regular file of at most {MAX_JSON_BYTES:,} bytes')
        try:
            return json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f'{f} is not valid JSON: {e}') from None

    def config(self, defaults: bool = False) -> Dict[str, Any]:
        """ run_config.json ({} where there is none). With `defaults`, a key that the trainer which wrote
        it did not know has its default (a key added later changes nothing at its default). """
        cfg = self._json(self.CONFIG)
        if cfg is not None and not isinstance(cfg, dict):
            raise UserError(f'{self.path / self.CONFIG} holds no mapping of settings')
        cfg = cfg or {}
        return {**config_defaults(), **cfg} if defaults else cfg

    def has_config(self) -> bool:
        return (self.path / self.CONFIG).is_file()

    def summary(self) -> Optional[Dict[str, Any]]:
        """ summary.json, or None before the first epoch ended. """
        s = self._json(self.SUMMARY)
        if s is not None and not isinstance(s, dict):
            raise UserError(f'{self.path / self.SUMMARY} holds no mapping')
        return s

    def metrics(self) -> List[Dict[str, Any]]:
        """ metrics.jsonl, one dict per epoch; a line being written (not valid JSON yet) is left out. """
        f = self.path / self.METRICS
        try:
            lines = f.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def model_config(self) -> Dict[str, Any]:
        """ timm's config.json of the final model ({} before the run ended). """
        try:
            cfg = self._json(self.MODEL_CONFIG)
        except UserError:
            return {}
        return cfg if isinstance(cfg, dict) else {}

    @property
    def model(self) -> Optional[str]:
        """ The timm name the run trained (run_config.json, else summary.json). """
        return self.config().get('model') or (self.summary() or {}).get('model')

    def model_kwargs(self, init: bool = False) -> Dict[str, Any]:
        """ The kwargs of timm.create_model that rebuild the run's network: the run's model_kwargs with
        the block style of its time (`legacy_kwargs`); without `init`, the kwargs that say where the
        starting weights came from (`INIT_KWARGS`) are left out: the run loads without that file. """
        kwargs = dict(self.config().get('model_kwargs') or {})
        if not init:
            kwargs = {k: v for k, v in kwargs.items() if k not in INIT_KWARGS}
        return {**kwargs, **self.legacy_kwargs()}

    def legacy_kwargs(self) -> Dict[str, Any]:
        """ {'block': 'preact'} for an RC run of the paper's networks trained before timm_rc 0.2.0 without
        an explicit block: its default was 'preact' then ('postact' since), and both load the same
        weights, so only the run's version tells them apart. {} for every other run. """
        version = (self.summary() or {}).get('versions', {}).get('timm_rc', '')
        model = str(self.model or '').split('.')[0]
        if not version or model not in PAPER_RC_MODELS:
            return {}
        old = tuple(int(x) for x in version.split('.')[:2] if x.isdigit()) < (0, 2)
        args = self.model_config().get('model_args') or {}
        if old and 'block' not in args and 'block' not in (self.config().get('model_kwargs') or {}):
            return {'block': 'preact'}
        return {}

    def data(self) -> Tuple[str, Optional[str]]:
        """ (dataset, data_dir) the run trained on, its data_dir resolved from the current folder: the run
        recorded it relative to the folder it was trained from, which is the current folder or the one
        that the run's recorded output_dir (e.g. runs/x/seed0) is relative to. """
        cfg = self.config()
        dataset, data_dir = cfg.get('dataset') or 'cifar10', cfg.get('data_dir')
        if data_dir is None or Path(data_dir).is_absolute() or Path(data_dir).is_dir():
            return dataset, data_dir
        out = Path(cfg.get('output_dir') or '')
        here = self.path.resolve()
        if out.parts and not out.is_absolute() and here.parts[-len(out.parts):] == out.parts:
            candidate = here.parents[len(out.parts) - 1] / data_dir
            if candidate.is_dir():
                return dataset, str(candidate)
        raise UserError(f'the run\'s data_dir {data_dir} (relative to where it was trained) does not exist from '
                        f'here ({Path.cwd()}); pass --data_dir DIR')

    def model_spec(self) -> Optional[Tuple[str, Dict[str, Any]]]:
        """ (timm name, model kwargs) from the run's summary.json or run_config.json; None when neither names one. """
        for read in (self.summary, self.config):
            try:
                s = read() or {}
            except UserError:
                continue
            if s.get('model'):
                return s['model'], dict(s.get('model_kwargs') or {})
        return None

    def label(self) -> str:
        """ 'model {kwargs} (run folder)', for plot titles and tables. """
        spec = self.model_spec()
        if spec is None:
            return str(self.path)
        model, kwargs = spec
        return model + (f' {json.dumps(kwargs, sort_keys=True)}' if kwargs else '') + f' ({self.path})'

    @property
    def weights(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def checkpoints(self) -> List[Path]:
        """ The complete checkpoints, oldest first. """
        return complete_checkpoints(self.checkpoints_dir)

    def newest_checkpoint(self) -> Optional[Path]:
        return latest_checkpoint(self.checkpoints_dir)

    def bn_stats_files(self) -> List[Path]:
        return sorted((self.path / self.BN_STATS).glob('epoch_*.safetensors'))

    def bn_stats_file(self, epoch: int) -> Path:
        return self.path / self.BN_STATS / f'epoch_{epoch:04d}.safetensors'

    def state(self, epochs: Optional[int] = None, max_steps: Optional[int] = None) -> str:
        """ 'complete', 'interrupted' or 'new'. Complete: model.safetensors and a summary with every epoch
        (`epochs`, else the run's own count) or its `max_steps` reached. Interrupted: complete checkpoints
        or a summary (the trainer needs --resume to go on). """
        try:
            s = self.summary()
        except UserError:
            s = {}
        if s is not None:
            try:
                finished = s['epochs_completed'] >= (epochs or s['epochs']) or (
                    max_steps is not None and s['global_step'] >= max_steps)
            except (KeyError, TypeError):
                finished = False
            if finished and self.weights.is_file():
                return 'complete'
            return 'interrupted'
        return 'interrupted' if self.checkpoints() else 'new'

    def holds_run(self) -> bool:
        """ Whether a trainer has written a run here (complete checkpoints or a summary). """
        return bool(self.checkpoints()) or (self.path / self.SUMMARY).exists()

    # ---- writing (the trainer's main process) ---------------------------------------------------
    # a failed write is one line naming the file, the newest complete checkpoint and how to resume

    def _write_json(self, name: str, what: str, data: Any) -> None:
        with writing(what, self.path / name, self.checkpoints_dir):
            (self.path / name).write_text(json.dumps(data, indent=2))

    def write_config(self, run_config: Dict[str, Any]) -> None:
        self._write_json(self.CONFIG, 'the run config', run_config)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        self._write_json(self.SUMMARY, 'the summary', summary)

    def append_metrics(self, row: Dict[str, Any]) -> None:
        f = self.path / self.METRICS
        with writing('metrics', f, self.checkpoints_dir), open(f, 'a') as out:
            out.write(json.dumps(row) + '\n')

    def keep_metrics_through(self, epoch: int) -> None:
        """ Drop the metrics of epochs after `epoch` (ones no checkpoint holds, before a resume). """
        f = self.path / self.METRICS
        if f.is_file():
            rows = [line for line in f.read_text().splitlines() if line.strip()]
            with writing('metrics', f, self.checkpoints_dir):
                f.write_text(''.join(line + '\n' for line in rows if json.loads(line)['epoch'] <= epoch))

    def save_bn_stats(self, stats: Dict[str, Any], epoch: int) -> None:
        from safetensors.torch import save_file
        if not stats:
            return
        f = self.bn_stats_file(epoch)
        with writing('BN statistics', f, self.checkpoints_dir):
            f.parent.mkdir(parents=True, exist_ok=True)
            save_file(stats, str(f))
            usual_mode(f)

    def save_model(self, model, model_args: Dict[str, Any]) -> None:
        """ The final model in timm's format (model.safetensors + config.json, `save_for_hf`); `model_args`
        (the kwargs that rebuild it) go into config.json. """
        from timm.models import save_for_hf
        with writing('the final model', self.weights, self.checkpoints_dir):
            save_for_hf(model, str(self.path), model_args=model_args, safe_serialization=True)
            usual_mode(self.weights)


def walk_runs(roots, on_skip: Optional[Callable[[str], None]] = None) -> List[Tuple[Run, Dict[str, Any]]]:
    """ (run, its summary) for every summary.json below `roots` that a trainer wrote (it names a model
    and a test error), in path order. os.walk does not follow symlinked folders (a link to a parent
    folder, or to a big data folder, is not walked into). Whatever is skipped is said to `on_skip`. """
    found = []
    for root in roots:
        for d, _, files in os.walk(root):
            if Run.SUMMARY in files:
                found.append(Run(d))
    out = []
    for run in sorted(found, key=lambda r: str(r.path)):
        try:
            summary = run.summary()
        except UserError as e:
            if on_skip:
                on_skip(f"skipping the run: {e}")
            continue
        if not isinstance(summary, dict) or not {'model', 'test_top1_error'} <= set(summary):
            if on_skip:
                on_skip(f'skipping {run.path / Run.SUMMARY}: not a timm_rc run summary (no model or test_top1_error)')
            continue
        out.append((run, summary))
    return out


def load_run_config(argv) -> TrainConfig:
    """ The trainer's config from the command line; with --resume into a folder that holds a run, the run's
    own settings (run_config.json) are the base under the config file and the command line, so that
    `python train.py --output_dir RUN --resume` continues the run as it was trained. Settings that change
    what is trained are still refused by the trainer. """
    cfg = load_config(argv)
    if cfg.resume is None:
        return cfg
    run = Run(cfg.resolved_output_dir())
    if not run.has_config():
        return cfg
    saved = {k: v for k, v in run.config().items() if k not in ('resume', 'output_dir')}
    return load_config(argv, base=saved, base_source=str(run.path / Run.CONFIG))


# timm_rc 0.2.0's helpers of `timm_rc.eval`, reached from there with a DeprecationWarning until 0.4.0
WEIGHTS = Run.WEIGHTS


def find_run(path: Union[str, Path]) -> Optional[Path]:
    """ The run folder that `path` is or lies in (`Run.find(path).path`), or None. """
    run = Run.find(path)
    return None if run is None else run.path


def read_run(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """ A run's run_config.json with its summary.json under 'summary' (`Run.config`, `Run.summary`). """
    run = Run(run_dir)
    out = dict(run.config())
    summary = run.summary()
    if summary is not None:
        out['summary'] = summary
    return out
