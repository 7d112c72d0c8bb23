""" The training run: the paper's protocol through Hugging Face Accelerate.

Order as in Accelerate's examples: Accelerator, seed, data, model, optimizer, scheduler, prepare,
loop (backward, clip, step), evaluation with gather_for_metrics, log, save_state, end_training.
One GPU, several GPUs and several machines run the same code (`accelerate launch`).

`sample_steps: [lo, hi]` trains one RC network for every step count k' in [lo, hi] (the extended
version's cost-adjustable RC): the model is built with BN layers for hi steps (`steps=hi`, and
`bn_policy='first'`, so that k' steps run the BN layers of steps 1..k' they were trained with), and
every batch runs k' steps per cell, drawn from a generator seeded by (seed, global step): every
process draws the same k' without communicating, and a resumed run replays the same draws.
`sample_steps_cells: same` draws one k' for both cells (the k'-step graphs that
`python -m timm_rc eval --steps` evaluates), `independent` one per cell. The test error of each epoch
is measured at hi steps; metrics.jsonl records each process's draws (`train/steps_drawn`).
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._deprecated import alias
from ..runs.checkpoints import checkpoint_problem, choose_checkpoint, fault, read_trainer_state, remove_partial, \
    save_checkpoint
from ..runs.config import INIT_KWARGS, TrainConfig, paper_epochs
from ..models.create import create_model
from .distillation import Teacher, check_teacher, distillation_task, load_teacher
from ..data import BatchedTensorDataset, GpuBatches, Splits, augment, collate_batch, epoch_generator, load_splits, \
    normalize
from ..errors import UserError
from ..evaluation import auto_channels_last, auto_precision, evaluate, model_mean_std
from ..models import RCNet
from ..runs import Run
from .bnstats import bn_scalars, per_step_bn
from .lock import RunLock, run_on_main

__all__ = ['train', 'Diverged', 'reset_accelerate_state', 'draw_steps', 'StepSchedule', 'RESUME_MAY_CHANGE',
           'sampled_model_kwargs']


class Diverged(Exception):
    """ The training loss became NaN or inf. """


class StepSchedule:
    """ lr factor at optimizer step s: linear warm-up, then x gamma at each milestone (in steps).

    A callable object (not a lambda), so LambdaLR's state_dict holds plain numbers.
    """

    def __init__(self, warmup_steps: int, milestones: Sequence[int], gamma: float):
        self.warmup_steps, self.milestones, self.gamma = warmup_steps, sorted(milestones), gamma

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return warm * self.gamma ** sum(step >= m for m in self.milestones)


class HostScalars:
    """ Reads device scalars for the progress bar without stalling the GPU: the values copied at one
    refresh are shown at a later one, once their copy has landed. """

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'
        self.pending = self.event = None

    def push(self, values: torch.Tensor) -> Optional[List[float]]:
        ready = None
        if self.pending is not None and (not self.cuda or self.event.query()):
            ready = self.pending.tolist()
        if self.cuda:
            self.pending = values.detach().to('cpu', non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.pending = values.detach().clone()
        return ready


def _contiguous_weights(models, weights, output_dir) -> None:
    """ accelerate save_state pre-hook: make every tensor of the state dicts contiguous. """
    for state_dict in weights:
        for k, t in state_dict.items():
            state_dict[k] = t.contiguous()


def reset_accelerate_state() -> None:
    """ Forget Accelerate's process-wide state, so that `train` can run again in the same process
    (tests, benchmarks, notebooks) with other settings. """
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _library_versions() -> Dict[str, str]:
    import accelerate
    import datasets
    import timm
    import timm_rc
    return dict(torch=torch.__version__, timm=timm.__version__, accelerate=accelerate.__version__,
                datasets=datasets.__version__, timm_rc=timm_rc.__version__, python=sys.version.split()[0])


def draw_steps(seed: int, global_step: int, low: int, high: int, cells: int = 1) -> List[int]:
    """ The unrolled steps k' (one per cell, or one for both) of the batch at `global_step` (0-based):
    uniform in [low, high], a pure function of (seed, global_step), so every process draws the same
    value without communicating and a resumed run replays the same draws. """
    g = torch.Generator().manual_seed((seed * 1_000_003 + global_step) * 1_013 + 11)
    return torch.randint(low, high + 1, (cells,), generator=g).tolist()


def _num_workers(cfg: TrainConfig) -> int:
    """ DataLoader workers of timm's pipeline: the config's, else the cores left per process (at most 8). """
    if cfg.num_workers is not None:
        return cfg.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    local = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    return max(0, min(8, cores // local - 1))


def sampled_model_kwargs(cfg: TrainConfig) -> Dict[str, Any]:
    """ The model kwargs the run builds its model with. sample_steps [lo, hi]: the model gets BN layers
    for hi steps, and runs k' steps with the BN layers of steps 1..k' ('first'), the ones sampled
    training trains for k'. """
    if cfg.sample_steps is None:
        return dict(cfg.model_kwargs)
    high = cfg.sample_steps[1]
    if cfg.model_kwargs.get('steps', high) != high:
        raise UserError(f'sample_steps {cfg.sample_steps} builds the model with BN layers for its largest count, '
                        f'steps={high}, but model_kwargs sets steps={cfg.model_kwargs["steps"]}; drop it or set {high}')
    return {**cfg.model_kwargs, 'steps': high, 'bn_policy': cfg.model_kwargs.get('bn_policy', 'first')}


def class_count_remedy(model: str, num_classes: int) -> str:
    """ What makes `model` fit data of `num_classes` classes: the pretrained tag whose head has that
    many classes (e.g. rc4_cifar.cifar100, which also brings CIFAR-100's mean and std), else the
    num_classes kwarg. """
    from timm.models import get_arch_pretrained_cfgs
    base = model.split('.')[0]
    kwarg = f'--model_kwargs \'{{"num_classes": {num_classes}}}\''
    try:
        cfgs = get_arch_pretrained_cfgs(base)
    except Exception:  # a local-dir: model or an unknown architecture
        cfgs = {}
    fitting = [name for name, cfg in cfgs.items()  # {'rc4_cifar.cifar100': PretrainedCfg, ...}
               if name not in (model, base) and getattr(cfg, 'num_classes', None) == num_classes]
    if fitting:
        return f'use the model\'s tag for such data, {fitting[0]}, or {kwarg}'
    return f'set its head to the data\'s classes with {kwarg}'


def _create_model(cfg: TrainConfig) -> nn.Module:
    hint = (' (sample_steps needs an RC network that can change its step count, e.g. rc4_cifar)'
            if cfg.sample_steps is not None else '')
    model = create_model(cfg.model, cfg.model_kwargs, hint)
    if cfg.sample_steps is not None and not callable(getattr(model, 'set_steps', None)):
        raise UserError(f'sample_steps needs an RC network that can change its step count (set_steps, e.g. '
                        f'rc4_cifar); {cfg.model} cannot')
    if getattr(model, 'bn_sharing', None) == 'double' and cfg.sample_steps is None:
        raise UserError("bn_sharing 'double' keeps cell 2's BN layers per step count of cell 1, which only varies "
                        "when the step counts are sampled: add --sample_steps MIN,MAX (e.g. 1,4)")
    return model


def _trackers(cfg: TrainConfig, out: Path) -> Tuple[List[str], Optional[str], Optional[str]]:
    """ The trackers to start, the W&B mode to ask for (None: W&B's own choice), and a line to print
    about it (or None).

    W&B itself says whether a key is configured (environment, its settings files, any host in .netrc):
    without one the run logs offline rather than prompting, and says so. WANDB_MODE is honoured;
    WANDB_MODE=online without a key is an error, found before any work is done.
    """
    names = [n.strip() for n in cfg.log_with.split(',') if n.strip() and n.strip() != 'none']
    if 'wandb' not in names:
        return names, None, None
    mode = os.environ.get('WANDB_MODE', '').lower()
    if mode in ('offline', 'dryrun'):
        return names, None, (f'W&B logs offline (WANDB_MODE={mode}); upload later with: '
                             f'wandb sync {out}/wandb/offline-run-*')
    if mode == 'disabled':
        return names, None, 'W&B is disabled (WANDB_MODE=disabled): nothing is logged to it'
    import wandb
    try:
        has_key = wandb.login(prompt=False, verify=False)
    except Exception as e:  # an invalid key format, unreadable settings
        raise UserError(f'W&B credentials are not usable ({type(e).__name__}: {e}); fix them with `wandb login`, '
                        f'or log offline with WANDB_MODE=offline') from None
    if has_key:
        return names, None, None
    if mode == 'online':
        raise UserError('WANDB_MODE=online but no W&B API key is configured: run `wandb login` (or set '
                        'WANDB_API_KEY), or unset WANDB_MODE to log offline')
    return names, 'offline', (f'W&B: no API key configured (`wandb login`), logging offline; upload later with: '
                   f'wandb sync {out}/wandb/offline-run-*')


def _check_device_settings(cfg: TrainConfig, cuda: bool, world: int, mixed_precision: str) -> None:
    """ A setting that cannot take effect here is an error, never silently ignored. """
    if not cuda and mixed_precision == 'fp16':
        raise UserError('mixed_precision fp16 needs a CUDA device (on the CPU Accelerate would run fp32 '
                        'without saying so); on the CPU use bf16 or no')
    if cfg.sync_bn and not cuda:
        raise UserError(f'sync_bn needs CUDA processes (SyncBatchNorm has no CPU implementation); '
                        f'{"these " + str(world) + " processes run" if world > 1 else "this process runs"} on the CPU: '
                        f'drop --sync_bn')
    if cfg.compile_mode is not None and not cfg.compile:
        raise UserError(f'compile_mode {cfg.compile_mode!r} only applies with compile: true; add --compile true '
                        f'or drop compile_mode')
    if cfg.compile_mode == 'reduce-overhead' and not cuda:
        raise UserError("compile_mode 'reduce-overhead' means CUDA graphs and needs a CUDA device; on the CPU "
                        "use compile without a mode")
    if cfg.num_threads is not None and cuda:
        raise UserError('num_threads sets CPU threads for CPU training; this process trains on CUDA')
    if cfg.log_model and 'wandb' not in cfg.log_with:
        raise UserError("log_model logs the model to W&B and needs log_with to include 'wandb'")


def _launcher_set_threads() -> bool:
    """ True when OMP_NUM_THREADS=1 comes from `accelerate launch`'s default rather than from the user.

    Without `accelerate config`, the launcher sets OMP_NUM_THREADS=1 for every process unless the
    user set it or passed --num_cpu_threads_per_process. The launcher is this process's parent (or
    the parent of torchrun's agent, which runs inside it): its own environment and command line say
    what the user chose.
    """
    if os.environ.get('OMP_NUM_THREADS') != '1' or 'ACCELERATE_MIXED_PRECISION' not in os.environ:
        return False
    try:
        parent = Path(f'/proc/{os.getppid()}')
        env = parent.joinpath('environ').read_bytes().split(b'\0')
        argv = parent.joinpath('cmdline').read_bytes().split(b'\0')
    except OSError:
        return False
    user_chose = any(e.startswith(b'OMP_NUM_THREADS=') for e in env) or any(
        a.startswith(b'--num_cpu_threads_per_process') for a in argv)
    return not user_chose


def _asked_processes() -> Optional[int]:
    """ The --num_processes N that `accelerate launch` (this process's parent) was given, or None. """
    if 'ACCELERATE_MIXED_PRECISION' not in os.environ:  # not started by accelerate launch
        return None
    try:
        argv = [a.decode(errors='replace') for a in Path(f'/proc/{os.getppid()}/cmdline').read_bytes().split(b'\0')]
    except OSError:
        return None
    for i, a in enumerate(argv):
        value = a.split('=', 1)[1] if a.startswith('--num_processes=') else (
            argv[i + 1] if a == '--num_processes' and i + 1 < len(argv) else None)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _check_launch(world: int) -> None:
    """ `accelerate launch --num_processes N` without --multi_gpu (and without a config that says so) starts one
    process: a run that asked for several never trains on one silently. """
    asked = _asked_processes()
    if asked is not None and asked > 1 and world == 1:
        raise UserError(f'accelerate launch was asked for {asked} processes but started one (without --multi_gpu the '
                        f'launcher runs a single process); run accelerate launch --multi_gpu --num_processes {asked} '
                        f'train.py ... (gloo processes on a CPU machine), or drop --num_processes')


def _set_cpu_threads(cfg: TrainConfig) -> Optional[str]:
    """ CPU training uses the cores this process is entitled to (its affinity mask over the processes
    of this machine) unless the user chose a count (num_threads, OMP_NUM_THREADS, or the launcher's
    --num_cpu_threads_per_process). Returns a line to print, or None. """
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
        return None
    if not _launcher_set_threads():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    local = max(int(os.environ.get('LOCAL_WORLD_SIZE', '1')), 1)
    threads = max(cores // local, 1)
    torch.set_num_threads(threads)
    return (f'{threads} CPU thread(s) per process (accelerate launch set OMP_NUM_THREADS=1; choose with '
            f'--num_threads N)')


# what may change when a run is resumed; everything else must match the run's run_config.json
RESUME_MAY_CHANGE = frozenset((
    'epochs', 'max_steps', 'log_with', 'project', 'run_name', 'log_interval', 'log_model', 'keep_checkpoints',
    'resume', 'eval_batch_size', 'num_threads', 'compile', 'compile_mode', 'data_dir', 'output_dir',
    'num_processes', 'params', 'loader', 'num_workers', 'mixed_precision', 'channels_last', 'sync_bn',
    'config_file', 'config_values'))


_RECORDED = {'params', 'num_processes', 'resume', 'config_file', 'config_values'}  # not keys a user changes


def _check_same_run(run: Run, run_config: Dict[str, Any]) -> None:
    """ Refuse to resume a run with settings that change what it trains (model, data, optimisation). """
    if not run.has_config():
        return
    saved_file = run.path / Run.CONFIG
    saved = run.config()
    diffs = [f'{k}: {saved.get(k)!r} in the run, {v!r} now' for k, v in run_config.items()
             if k not in RESUME_MAY_CHANGE | {'data'} and k in saved and saved[k] != v]
    if 'data' in saved and saved['data'] != run_config['data']:  # other data, wherever it lies (data_dir may move)
        was, now = saved['data'], run_config['data']
        what = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        parts = ["class names" if k == "class_names" else k + " split" for k in what]
        diffs.append(f'the data ({run_config.get("data_dir") or run_config.get("dataset")}) is not the data the run '
                     f'trained on: its {" and ".join(parts)} differ{"s" * (len(parts) == 1 and parts[0] != "class names")}')
    if (saved.get('loader') == 'timm') != (run_config.get('loader') == 'timm'):  # another augmentation altogether
        diffs.append(f'loader: {saved.get("loader")!r} in the run, {run_config.get("loader")!r} now (timm\'s pipeline '
                     f'augments differently from the uint8 paths)')
    if diffs:
        raise UserError(f'cannot resume {saved_file.parent}: its settings differ ({"; ".join(diffs)}). Resume with '
                        f'the run\'s own settings (see {saved_file}) or start a new output_dir; these may change on '
                        f'resume: {", ".join(sorted(RESUME_MAY_CHANGE - _RECORDED))}')


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """ One run; its output folder is locked against a second run for its duration (see `RunLock`).
    Returns the run's summary (what summary.json holds). `cfg` is not changed. """
    lock = RunLock(cfg.resolved_output_dir())
    try:
        return _train(cfg, lock)
    finally:
        lock.release()


@dataclass
class _Setup:
    """ Everything a run's epochs use, built once by `_set_up`. """
    cfg: TrainConfig
    run: Run
    accelerator: Any
    model: nn.Module  # as prepared by Accelerate (DDP, compiled)
    net: nn.Module  # the model itself: set_steps acts on the wrapped model too
    optimizer: Any
    scheduler: Any
    criterion: nn.Module
    batches: Any
    eval_loader: Any
    splits: Splits
    mean: torch.Tensor
    std: torch.Tensor
    channels_last: bool
    epochs: int
    steps_per_epoch: int
    n_params: int
    mixed_precision: str
    run_config: Dict[str, Any]
    trackers: List[str]
    teacher: Optional[Teacher]  # distillation: the frozen teacher, and `task` the loss with it
    task: Optional[nn.Module]
    state: Dict[str, Any]  # epoch, global_step, best error, times: what a checkpoint's trainer_state.json holds


@dataclass
class _EpochStats:
    train_loss: float
    train_acc: float
    seconds: float
    images: int  # over all processes
    steps: int
    steps_drawn: Optional[List[list]]  # sample_steps: each process's k' draws
    lr: float  # the lr of the epoch's last step (the one it trained with, not the next epoch's)
    lr_mean: float  # the mean over the epoch's steps: below `lr` in warm-up epochs
    kd_loss: Optional[float]  # distillation: the mean distillation term (before alpha)
    stop: bool  # max_steps reached


def _make_accelerator(cfg: TrainConfig, out: Path):
    """ (accelerator, mixed precision, trackers, W&B mode, notes to print): every device setting checked
    before anything is written. """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import TorchDynamoPlugin
    cuda = torch.cuda.is_available()
    mixed_precision = auto_precision('cuda' if cuda else 'cpu') if cfg.mixed_precision == 'auto' else cfg.mixed_precision
    world = int(os.environ.get('WORLD_SIZE', '1'))
    _check_launch(world)
    _check_device_settings(cfg, cuda, world, mixed_precision)
    threads_note = _set_cpu_threads(cfg) if not cuda else None
    trackers, wandb_mode, wandb_note = _trackers(cfg, out)
    # `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA: Accelerate only
    # sets up gloo processes (MULTI_CPU) when asked for the CPU, else every process runs alone
    accelerator = Accelerator(
        cpu=world > 1 and not cuda,
        mixed_precision=mixed_precision,
        log_with=trackers or None,
        project_dir=str(out),
        step_scheduler_with_optimizer=False,  # the schedule counts global optimizer steps
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_plugin=TorchDynamoPlugin(backend='inductor', mode=cfg.compile_mode) if cfg.compile else None,
        # with sampled step counts the BN layers of the steps not run get no gradient in that batch
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.sample_steps else None,
    )
    return accelerator, mixed_precision, trackers, wandb_mode, [n for n in (threads_note, wandb_note) if n]


def _claim_output_dir(cfg: TrainConfig, run: Run, lock: RunLock, accelerator) -> Optional[Path]:
    """ Protect an existing run: one run per folder at a time (the lock is taken before anything is
    written), continuing it must be asked for, and only a verified checkpoint is resumed from. Returns
    the checkpoint to resume from, or None. The other processes wait for the main one's verdict. """
    def claim() -> Optional[str]:
        lock.acquire()
        chosen = None
        if cfg.resume == 'auto':
            chosen = choose_checkpoint(run.checkpoints_dir)  # the newest good one; broken ones are set aside
            if chosen is None:
                accelerator.print(f'no complete checkpoint in {run.checkpoints_dir}; starting from scratch')
        elif cfg.resume:
            chosen = Path(cfg.resume)
            if not chosen.is_dir():
                raise UserError(f'resume checkpoint {cfg.resume} does not exist')
            problem = checkpoint_problem(chosen)
            if problem is not None:
                raise UserError(f'resume checkpoint {chosen} is broken: {problem}; resume with --resume (the newest '
                                f'good checkpoint) or name another one')
        elif run.holds_run():
            raise UserError(f'{run.path} already holds a run (checkpoints or summary.json); pass --resume to continue '
                            f'it, or choose another output_dir')
        remove_partial(run.checkpoints_dir)
        return None if chosen is None else str(chosen)

    chosen = run_on_main(accelerator, claim)
    return None if chosen is None else Path(chosen)


def _train_loader(cfg: TrainConfig, splits: Splits, device: torch.device, rank: int, world: int):
    """ The training batches of the run's data path: the split on the GPU, timm's pipeline in DataLoader
    workers, or a DataLoader over the uint8 tensors. """
    global_batch = cfg.batch_size
    if splits.path == 'gpu':
        return GpuBatches(type(splits.train)(splits.train.images.to(device), splits.train.labels.to(device)),
                          global_batch, cfg.seed, rank, world)
    if splits.path == 'timm':
        workers = _num_workers(cfg)
        return torch.utils.data.DataLoader(
            splits.train, batch_size=global_batch // world, shuffle=True, drop_last=True, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.type == 'cuda')
    return torch.utils.data.DataLoader(BatchedTensorDataset(splits.train), batch_size=global_batch // world,
                                       shuffle=True, drop_last=True, collate_fn=collate_batch)


def _eval_loader(cfg: TrainConfig, splits: Splits):
    if splits.path == 'timm':
        return torch.utils.data.DataLoader(splits.test, batch_size=cfg.eval_batch_size, shuffle=False,
                                           num_workers=_num_workers(cfg))
    return torch.utils.data.DataLoader(BatchedTensorDataset(splits.test), batch_size=cfg.eval_batch_size,
                                       shuffle=False, collate_fn=collate_batch)


def _set_up(cfg: TrainConfig, run: Run, accelerator, mixed_precision: str, trackers: List[str]) -> _Setup:
    """ Seed, model, data, optimizer, schedule, `accelerator.prepare`: Accelerate's order. """
    from accelerate.utils import set_seed
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    channels_last = auto_channels_last(device.type) if cfg.channels_last is None else cfg.channels_last
    set_seed(cfg.seed)  # the same initial weights on every process
    model = _create_model(cfg)
    splits = load_splits(cfg.dataset, cfg.data_dir, model=model, loader=cfg.loader, device_type=device.type,
                         max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples)
    if model.num_classes != splits.num_classes:
        raise UserError(f'{cfg.model} has a {model.num_classes}-class head but {cfg.data_dir or cfg.dataset} has '
                        f'{splits.num_classes} classes; {class_count_remedy(cfg.model, splits.num_classes)}')
    if len(splits.train) < cfg.batch_size:
        raise UserError(f'{len(splits.train)} training examples cannot fill one batch of {cfg.batch_size}')
    depth = 4 * model.steps + 2 if isinstance(model, RCNet) else None  # RC-1/2/4: depth 6/10/18
    epochs = cfg.epochs or paper_epochs(depth)
    n_params = sum(p.numel() for p in model.parameters())
    mean, std = model_mean_std(model, device)
    teacher = _load_teacher(cfg, splits, model)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        # fused: one kernel for every tensor (CPU: torch >= 2.4); not with sampled step counts, whose unused BN
        # layers have no gradient in some steps (the fused kernel takes no missing momentum buffer)
        fused=(device.type in ('cuda', 'cpu') and cfg.sample_steps is None) or None)
    batches = _train_loader(cfg, splits, device, rank, world)
    steps_per_epoch = len(splits.train) // cfg.batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, StepSchedule(
        cfg.warmup_epochs * steps_per_epoch, [m * steps_per_epoch for m in cfg.lr_milestones], cfg.lr_gamma))
    model, optimizer, scheduler, eval_loader = accelerator.prepare(model, optimizer, scheduler, _eval_loader(cfg, splits))
    # safetensors refuses non-contiguous tensors, and channels_last conv weights are not contiguous
    accelerator.register_save_state_pre_hook(_contiguous_weights)
    if splits.path != 'gpu':
        batches = accelerator.prepare(batches)
    run_config = dict(cfg.to_dict(), epochs=epochs, params=n_params, num_processes=world, loader=splits.path,
                      mixed_precision=mixed_precision, channels_last=channels_last, output_dir=str(run.path),
                      data=splits.identity, **({'teacher_identity': teacher.identity} if teacher else {}))
    task = None
    if teacher is not None:
        if channels_last:
            teacher.model.to(memory_format=torch.channels_last)
        task = distillation_task(model, teacher.model, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                                 cfg.distill_alpha, cfg.distill_temperature, device)
    state = dict(epoch=0, global_step=0, best_test_top1_error=None, train_time_s=0.0, train_images=0,
                 wall_time_s=0.0)
    return _Setup(
        cfg=cfg, run=run, accelerator=accelerator, model=model,
        net=accelerator.unwrap_model(model, keep_torch_compile=False), optimizer=optimizer, scheduler=scheduler,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), batches=batches, eval_loader=eval_loader,
        splits=splits, mean=mean, std=std, channels_last=channels_last, epochs=epochs,
        steps_per_epoch=steps_per_epoch, n_params=n_params, mixed_precision=mixed_precision, run_config=run_config,
        trackers=trackers, teacher=teacher, task=task, state=state)


def _load_teacher(cfg: TrainConfig, splits: Splits, student: nn.Module) -> Optional[Teacher]:
    """ The run's teacher (None without one), checked against the data's class count and image size. """
    if cfg.teacher is None:
        return None
    teacher = load_teacher(cfg.teacher, cfg.teacher_model, cfg.teacher_model_kwargs)
    images = getattr(splits.train, 'images', None)
    input_size = tuple(images.shape[1:]) if images is not None else tuple(student.pretrained_cfg['input_size'])
    check_teacher(teacher.model, splits.num_classes, input_size)
    return teacher


def _start_trackers(s: _Setup, wandb_mode: Optional[str]) -> None:
    """ The trackers, with the run's config (scalars only, as TensorBoard's hparams take them). A tracker
    that cannot start (W&B: no network, a rejected key) is one line before anything is trained. """
    cfg, accelerator = s.cfg, s.accelerator
    tracker_config = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                      for k, v in s.run_config.items()}
    wandb_dir = s.run.path / 'wandb'
    had_wandb_dir = wandb_dir.exists()
    try:
        accelerator.init_trackers(cfg.project, config=tracker_config, init_kwargs={
            'wandb': {'name': cfg.run_name or str(s.run.path).removeprefix('runs/'), 'dir': str(s.run.path),
                      **({'mode': wandb_mode} if wandb_mode else {})}})
    except Exception as e:  # W&B: no network, a rejected key, a server error; nothing trained or lost yet
        if not had_wandb_dir and accelerator.is_main_process:  # what the failed start left behind
            import shutil
            shutil.rmtree(wandb_dir, ignore_errors=True)
        raise UserError(f'{", ".join(s.trackers)} could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                        f'log offline with WANDB_MODE=offline (upload later with `wandb sync`), or use --log_with '
                        f'tensorboard or none. The run folder is untouched') from None
    if 'wandb' in s.trackers and accelerator.is_main_process:
        # the end-of-run summary shows the run's results, not one line per BN statistic
        accelerator.get_tracker('wandb', unwrap=True).define_metric('bn/*', summary='none')


def _train_epoch(s: _Setup, epoch: int, bar) -> _EpochStats:
    """ One pass over the training batches (up to max_steps); the epoch's one host sync is at its end. """
    from accelerate.utils import set_seed
    cfg, accelerator, model, net = s.cfg, s.accelerator, s.model, s.net
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    cells = 2 if cfg.sample_steps_cells == 'independent' else 1
    model.train()
    set_seed(cfg.seed * 1000 + epoch, device_specific=True)  # dropout etc.: a function of the epoch
    gen = epoch_generator(cfg.seed, epoch, device, rank)
    s.batches.set_epoch(epoch)
    loss_sum = torch.zeros((), device=device)
    kd_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = steps = 0
    lr_sum = 0.0
    drawn = []  # this epoch's k' draws (sample_steps)
    host = HostScalars(device)
    # short epochs refresh more often than log_interval, so that the loss shows within the epoch
    interval = min(cfg.log_interval, max(1, s.steps_per_epoch // 10))
    stop = False
    t0 = last_t = time.time()
    for images, labels in s.batches:
        if cfg.compile:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (reduce-overhead)
        if images.is_floating_point():  # timm's pipeline: augmented and normalised in the workers
            x = images.contiguous(memory_format=torch.channels_last) if s.channels_last else images
        else:
            x = normalize(augment(images, gen), s.mean, s.std, s.channels_last)
        if cfg.sample_steps is not None:
            k = draw_steps(cfg.seed, s.state['global_step'], *cfg.sample_steps, cells)
            net.set_steps(k[0] if cells == 1 else tuple(k))
            drawn.append(k)
        if s.task is not None:  # distillation: the teacher sees the same batch, outside Accelerate's wrappers
            with accelerator.autocast():
                out = s.task(x, labels)
            loss, logits = out['loss'], out['output']
            kd_sum += out['kd_loss'].detach().float()
        else:
            logits = model(x)
            loss = s.criterion(logits.float(), labels)
        accelerator.backward(loss)
        if cfg.clip_grad_value is not None:
            accelerator.clip_grad_value_(model.parameters(), cfg.clip_grad_value)
        lr = s.scheduler.get_last_lr()[0]  # this step's lr (the scheduler steps to the next one below)
        lr_sum += lr
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        correct += (logits.argmax(-1) == labels).sum()
        seen += labels.numel()
        steps += 1
        s.state['global_step'] += 1
        fault(f'step{s.state["global_step"]}')
        last = steps == s.steps_per_epoch
        if steps % interval == 0 or last:
            values = torch.stack([loss_sum / steps, correct.float() / seen])
            # the last step reads its values at once: the epoch ends with a host sync anyway
            ready = values.tolist() if last else host.push(values)
            now = time.time()
            rate = (steps - bar.n) * labels.numel() * world / max(now - last_t, 1e-9)
            post = dict(lr=f'{lr:.4g}', img_s=f'{rate:.0f}')
            if ready is not None:
                # early stop on one process only; with several, every process stops together at
                # the epoch-end check (one leaving alone would hang the others' collectives)
                if world == 1 and not math.isfinite(ready[0]):
                    raise Diverged(f'the training loss became {ready[0]} in epoch {epoch + 1}')
                post = dict(loss=f'{ready[0]:.4f}', acc=f'{ready[1]:.3f}', **post)
            bar.set_postfix(post, refresh=False)
            bar.update(steps - bar.n)
            last_t = now
        if cfg.max_steps is not None and s.state['global_step'] >= cfg.max_steps:
            stop = True
            break
    totals = accelerator.reduce(torch.stack([loss_sum, correct.float(), kd_sum]), reduction='sum')
    steps_drawn = _gather_draws(accelerator, drawn, cells) if cfg.sample_steps is not None else None
    return _EpochStats(train_loss=totals[0].item() / (steps * world), train_acc=totals[1].item() / (seen * world),
                       seconds=time.time() - t0, images=seen * world, steps=steps, steps_drawn=steps_drawn, stop=stop,
                       lr=lr, lr_mean=lr_sum / steps,
                       kd_loss=totals[2].item() / (steps * world) if s.task is not None else None)


def _test(s: _Setup):
    """ The test error of the epoch: the one evaluation (`timm_rc.evaluation.evaluate`), at the largest
    sampled step count under sample_steps. """
    if s.cfg.sample_steps is not None:
        s.net.set_steps(s.net.steps)
    return evaluate(s.model, s.eval_loader, mean=s.mean, std=s.std, channels_last=s.channels_last,
                    num_classes=s.splits.num_classes, accelerator=s.accelerator)


def _record_epoch(s: _Setup, epoch: int, stats: _EpochStats, test, eval_seconds: float) -> Dict[str, Any]:
    """ Log the epoch to the trackers and the run folder (metrics, BN statistics, summary); returns the
    summary. """
    cfg, accelerator, state = s.cfg, s.accelerator, s.state
    bn = per_step_bn(s.net)
    metrics = {
        'train/loss': stats.train_loss, 'train/acc': stats.train_acc, 'test/top1_err': test.top1_error,
        'test/top1_acc': test.top1_acc, 'test/loss': test.loss,
        **({'test/top5_err': test.top5_error} if test.top5_error is not None else {}),
        # 12 significant digits: 0.1 / 10 is logged 0.01, not 0.010000000000000002
        'lr': float(f'{stats.lr:.12g}'), 'lr_mean': float(f'{stats.lr_mean:.12g}'), 'epoch': epoch + 1, 'epoch_time_s': stats.seconds, 'eval_time_s': eval_seconds,
        'images_per_sec': stats.images / stats.seconds, **bn_scalars(bn),
        **({'train/kd_loss': stats.kd_loss} if stats.kd_loss is not None else {}),
    }
    try:
        accelerator.log(metrics, step=epoch + 1)
    except Exception as e:  # a tracker failing mid-run must not cost the run its checkpoints
        accelerator.print(f'warning: logging epoch {epoch + 1} to {", ".join(s.trackers)} failed '
                          f'({type(e).__name__}: {e}); training goes on, metrics.jsonl has every epoch')
    if accelerator.is_main_process:
        s.run.save_bn_stats(bn, epoch + 1)
        line = {k: v for k, v in metrics.items() if not k.startswith('bn/')}
        if stats.steps_drawn is not None:  # a list per process: not a tracker scalar, metrics.jsonl only
            line['train/steps_drawn'] = stats.steps_drawn
        s.run.append_metrics(line)
    accelerator.print(f'epoch {epoch + 1}/{s.epochs}: train loss {stats.train_loss:.4f} acc '
                      f'{100 * stats.train_acc:.2f}% | test top-1 error {test.top1_error:.2f}% | '
                      f'{stats.images / stats.seconds:.0f} img/s')
    device = accelerator.device
    summary = dict(
        model=cfg.model, model_kwargs=cfg.model_kwargs, dataset=cfg.dataset, data_dir=cfg.data_dir,
        params=s.n_params, epochs=s.epochs, epochs_completed=state['epoch'], global_step=state['global_step'],
        test_top1_error=test.top1_error, best_test_top1_error=state['best_test_top1_error'],
        train_loss=stats.train_loss, eval_examples=test.examples, train_examples=len(s.splits.train),
        images_per_sec=state['train_images'] / max(state['train_time_s'], 1e-9),
        wall_time_s=state['wall_time_s'], seed=cfg.seed, num_processes=accelerator.num_processes,
        global_batch_size=cfg.batch_size, loader=s.splits.path, mixed_precision=s.mixed_precision,
        device=str(device), num_threads=torch.get_num_threads() if device.type == 'cpu' else None,
        device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        versions=_library_versions(),
        **({'teacher': dict(s.teacher.identity, alpha=cfg.distill_alpha, temperature=cfg.distill_temperature)}
           if s.teacher is not None else {}),
    )
    if accelerator.is_main_process:
        s.run.write_summary(summary)
    return summary


def _save_final_model(s: _Setup) -> None:
    """ model.safetensors + config.json in timm's format, with the kwargs that rebuild the network. """
    final = s.net.to(memory_format=torch.contiguous_format)
    # the block style is recorded even when it was the default (the default changed in 0.2.0)
    block = {'block': final.block} if isinstance(getattr(final, 'block', None), str) else {}
    # where the starting weights came from is not part of the architecture: a run folder must load
    # without the file it was initialised from (e.g. a converted network, python -m timm_rc convert)
    args = {k: v for k, v in s.cfg.model_kwargs.items() if k not in INIT_KWARGS}
    s.run.save_model(final, dict(args, **block))


def _train(cfg: TrainConfig, lock: RunLock) -> Dict[str, Any]:
    from tqdm.auto import tqdm
    run = Run(cfg.resolved_output_dir())
    accelerator, mixed_precision, trackers, wandb_mode, notes = _make_accelerator(cfg, run.path)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise UserError(f'batch_size {cfg.batch_size} (global) must be divisible by the {world} processes')
    resume_from = _claim_output_dir(cfg, run, lock, accelerator)
    cfg = dataclasses.replace(cfg, model_kwargs=sampled_model_kwargs(cfg))  # a copy: the caller's cfg stays
    s = _set_up(cfg, run, accelerator, mixed_precision, trackers)
    state = s.state
    if resume_from is not None:
        _check_same_run(run, s.run_config)
        accelerator.load_state(str(resume_from))
        state.update(read_trainer_state(resume_from))
        accelerator.print(f'resumed from {resume_from} (epoch {state["epoch"]}, step {state["global_step"]})')
    if accelerator.is_main_process:
        run.keep_metrics_through(state['epoch'])  # drop epochs no checkpoint holds
    _start_trackers(s, wandb_mode)
    for note in notes:
        accelerator.print(note)
    if accelerator.is_main_process:
        run.write_config(s.run_config)
        precision = 'fp32' if mixed_precision == 'no' else mixed_precision
        accelerator.print(
            f'{cfg.model} {json.dumps(cfg.model_kwargs)}: {s.n_params:,} params, {s.epochs} '
            f'epoch{"s" * (s.epochs != 1)} of {s.steps_per_epoch} steps (batch {cfg.batch_size} over {world} '
            f'process{"es" * (world > 1)}), loader {s.splits.path}, {precision}, '
            f'{len(s.splits.train)}/{len(s.splits.test)} train/test examples')
        if s.teacher is not None:
            t = s.teacher.identity
            accelerator.print(f'distilling from {t["source"]} ({t["model"]}, {t["params"]:,} params): loss = '
                              f'{1 - cfg.distill_alpha:g} x label loss + {cfg.distill_alpha:g} x KD at temperature '
                              f'{cfg.distill_temperature:g}')

    summary: Dict[str, Any] = {}
    start_time = time.time() - state['wall_time_s']
    for epoch in range(state['epoch'], s.epochs):
        bar = tqdm(total=s.steps_per_epoch, desc=f'epoch {epoch + 1}/{s.epochs}', dynamic_ncols=True,
                   disable=not accelerator.is_local_main_process, leave=True)
        stats = _train_epoch(s, epoch, bar)
        bar.close()
        if not math.isfinite(stats.train_loss):
            raise Diverged(f'the training loss became {stats.train_loss} in epoch {epoch + 1}')
        t_eval = time.time()
        test = _test(s)
        eval_seconds = time.time() - t_eval
        full_epoch = stats.steps == s.steps_per_epoch
        state['train_time_s'] += stats.seconds
        state['train_images'] += stats.images
        if full_epoch:
            state['epoch'] = epoch + 1
        best = state['best_test_top1_error']
        state['best_test_top1_error'] = test.top1_error if best is None else min(best, test.top1_error)
        state['wall_time_s'] = time.time() - start_time
        summary = _record_epoch(s, epoch, stats, test, eval_seconds)
        if full_epoch:
            save_checkpoint(accelerator, run.checkpoints_dir, epoch + 1, state, cfg.keep_checkpoints)
        if stats.stop:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_final_model(s)
        accelerator.print(f'done: {run.weights}, summary in {run.path / Run.SUMMARY}')
    if cfg.log_model and 'wandb' in trackers and accelerator.is_main_process:
        _log_model_artifact(accelerator.get_tracker('wandb', unwrap=True), run.path, summary)
    accelerator.end_training()
    return summary


def _gather_draws(accelerator, drawn: List[List[int]], cells: int) -> List[list]:
    """ Every process's k' draws of the epoch (one list per process, ints or [k1, k2] pairs); they must
    agree, since DDP needs the same graph on every process. """
    draws = torch.tensor(drawn, dtype=torch.int64, device=accelerator.device).reshape(-1, cells)
    per_process = accelerator.gather(draws[None]).reshape(accelerator.num_processes, -1, cells).cpu()
    differ = (per_process != per_process[0]).any(-1).any(0).nonzero()
    if len(differ):
        raise RuntimeError(f'the processes drew different step counts at batch {differ[0].item()} of this epoch: '
                           f'{per_process[:, differ[0].item()].tolist()}')
    return [[row[0] if cells == 1 else row for row in p] for p in per_process.tolist()]


def _log_model_artifact(run, out: Path, summary: Dict[str, Any]) -> None:
    """ The trained model (model.safetensors + timm's config.json) as a W&B model artifact. """
    import re
    import wandb
    name = re.sub(r'[^\w.-]+', '-', str(run.name or out.name)).strip('-') + '-model'
    artifact = wandb.Artifact(name, type='model', metadata={k: v for k, v in summary.items() if k != 'versions'})
    for file in ('model.safetensors', 'config.json'):
        artifact.add_file(str(out / file))
    run.log_artifact(artifact, aliases=['latest', f'epoch{summary.get("epochs_completed", 0)}'])


# `timm_rc.train.loop.main` of timm_rc 0.2.0: the command line is timm_rc.cli.train now
__getattr__ = alias(__name__, {'main': 'timm_rc.cli.train'})
