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
`python -m timm_rc.eval --steps` evaluates), `independent` one per cell. The test error of each epoch
is measured at hi steps; metrics.jsonl records each process's draws (`train/steps_drawn`).
"""
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .bnstats import bn_scalars, per_step_bn, save_bn_stats
from .checkpoint import checkpoint_problem, choose_checkpoint, complete_checkpoints, fault, latest_checkpoint, \
    read_trainer_state, remove_partial, save_checkpoint, writing
from .lock import RunLock, run_on_main
from ..models import RCNet
from .config import INIT_KWARGS, TrainConfig, UserError, config_help, load_config, paper_epochs, wants_help
from .data import BatchedTensorDataset, GpuBatches, TimmImageDataset, augment, collate_batch, decode_split, \
    epoch_generator, load_dataset_splits, small_uniform_images, timm_transforms, \
    normalize

__all__ = ['main', 'train', 'Diverged', 'reset_accelerate_state', 'draw_steps']


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


def _sampled_model_kwargs(cfg: TrainConfig) -> None:
    """ sample_steps [lo, hi]: the model gets BN layers for hi steps, and runs k' steps with the BN
    layers of steps 1..k' ('first'), the ones sampled training trains for k'. """
    if cfg.sample_steps is None:
        return
    high = cfg.sample_steps[1]
    if cfg.model_kwargs.get('steps', high) != high:
        raise UserError(f'sample_steps {cfg.sample_steps} builds the model with BN layers for its largest count, '
                        f'steps={high}, but model_kwargs sets steps={cfg.model_kwargs["steps"]}; drop it or set {high}')
    cfg.model_kwargs = {**cfg.model_kwargs, 'steps': high, 'bn_policy': cfg.model_kwargs.get('bn_policy', 'first')}


def _create_model(cfg: TrainConfig) -> nn.Module:
    import timm
    import timm_rc  # noqa: F401  registers the RC models
    name = cfg.model.split('.')[0]
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:10] or timm.list_models('rc*_cifar')
        raise UserError(f'unknown model {cfg.model!r}; similar names: {", ".join(close)}')
    overlay = cfg.model_kwargs.get('pretrained_cfg_overlay')
    file = overlay.get('file') if isinstance(overlay, dict) else None
    if cfg.model_kwargs.get('pretrained') and file and not Path(file).is_file():
        raise UserError(f'the starting weights {file} (model_kwargs pretrained_cfg_overlay) do not exist; give the file '
                        f'written by python -m timm_rc.convert or a training run\'s model.safetensors')
    try:
        model = timm.create_model(cfg.model, **cfg.model_kwargs)
    except (TypeError, ValueError) as e:
        hint = (' (sample_steps needs an RC network that can change its step count, e.g. rc4_cifar)'
                if cfg.sample_steps is not None else '')
        raise UserError(f'cannot build {cfg.model} with model_kwargs {cfg.model_kwargs}: {e}{hint}') from None
    except (RuntimeError, OSError) as e:
        if not cfg.model_kwargs.get('pretrained'):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and 'Error(s) in loading state_dict' in lines[0] else (lines or [repr(e)])[0]
        raise UserError(f'the starting weights {file or "(pretrained)"} do not fit {cfg.model} with model_kwargs '
                        f'{ {k: v for k, v in cfg.model_kwargs.items() if k not in INIT_KWARGS} }: {detail[:300]}; '
                        f'give the model and kwargs they were written for') from None
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
    'num_processes', 'params', 'loader', 'num_workers', 'mixed_precision', 'channels_last', 'sync_bn'))


def _check_same_run(saved_file: Path, run_config: Dict[str, Any]) -> None:
    """ Refuse to resume a run with settings that change what it trains (model, data, optimisation). """
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text())
    diffs = [f'{k}: {saved.get(k)!r} in the run, {v!r} now' for k, v in run_config.items()
             if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v]
    if diffs:
        raise UserError(f'cannot resume {saved_file.parent}: its settings differ ({"; ".join(diffs)}). Resume with '
                        f'the run\'s own settings (see {saved_file}) or start a new output_dir; these may change on '
                        f'resume: {", ".join(sorted(RESUME_MAY_CHANGE - {"params", "num_processes", "resume"}))}')


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """ One run; its output folder is locked against a second run for its duration (see `RunLock`). """
    lock = RunLock(cfg.resolved_output_dir())
    try:
        return _train(cfg, lock)
    finally:
        lock.release()


def _train(cfg: TrainConfig, lock: RunLock) -> Dict[str, Any]:
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import TorchDynamoPlugin, set_seed
    from tqdm.auto import tqdm

    out = cfg.resolved_output_dir()
    ckpt_dir = out / 'checkpoints'
    cuda = torch.cuda.is_available()
    mixed_precision = ('bf16' if cuda else 'no') if cfg.mixed_precision == 'auto' else cfg.mixed_precision
    _check_device_settings(cfg, cuda, int(os.environ.get('WORLD_SIZE', '1')), mixed_precision)
    threads_note = _set_cpu_threads(cfg) if not cuda else None
    trackers, wandb_mode, wandb_note = _trackers(cfg, out)
    # `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA: Accelerate only
    # sets up gloo processes (MULTI_CPU) when asked for the CPU, else every process runs alone
    multi_cpu = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not cuda
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=mixed_precision,
        log_with=trackers or None,
        project_dir=str(out),
        step_scheduler_with_optimizer=False,  # the schedule below counts global optimizer steps
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_plugin=TorchDynamoPlugin(backend='inductor', mode=cfg.compile_mode) if cfg.compile else None,
        # with sampled step counts the BN layers of the steps not run get no gradient in that batch
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.sample_steps else None,
    )
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise UserError(f'batch_size {cfg.batch_size} (global) must be divisible by the {world} processes')
    loader = cfg.loader if cfg.loader != 'auto' else ('gpu' if device.type == 'cuda' else 'dataloader')
    channels_last = device.type == 'cuda' if cfg.channels_last is None else cfg.channels_last

    # protect an existing run: one run per folder at a time (the lock is taken before anything is
    # written), continuing it must be asked for, and only a verified checkpoint is resumed from
    def claim_output_dir() -> Optional[str]:
        lock.acquire()
        chosen = None
        if cfg.resume == 'auto':
            chosen = choose_checkpoint(ckpt_dir)  # the newest good one; broken ones are set aside
            if chosen is None:
                accelerator.print(f'no complete checkpoint in {ckpt_dir}; starting from scratch')
        elif cfg.resume:
            chosen = Path(cfg.resume)
            if not chosen.is_dir():
                raise UserError(f'resume checkpoint {cfg.resume} does not exist')
            problem = checkpoint_problem(chosen)
            if problem is not None:
                raise UserError(f'resume checkpoint {chosen} is broken: {problem}; resume with --resume (the newest '
                                f'good checkpoint) or name another one')
        elif complete_checkpoints(ckpt_dir) or (out / 'summary.json').exists():
            raise UserError(f'{out} already holds a run (checkpoints or summary.json); pass --resume to continue '
                            f'it, or choose another output_dir')
        remove_partial(ckpt_dir)
        return None if chosen is None else str(chosen)

    resume_from = run_on_main(accelerator, claim_output_dir)  # the other processes wait for the verdict
    resume_from = None if resume_from is None else Path(resume_from)

    _sampled_model_kwargs(cfg)
    set_seed(cfg.seed)  # the same initial weights on every process
    train_raw, test_raw, image_col, label_col, num_classes, _ = load_dataset_splits(cfg.dataset, cfg.data_dir)
    model = _create_model(cfg)
    in_chans = model.pretrained_cfg.get('input_size', (3,))[0]
    if cfg.loader == 'auto' and not small_uniform_images(train_raw, image_col, in_chans=in_chans, like=test_raw):
        loader = 'timm'  # images of any size and mode: timm's pipeline in DataLoader workers
    where = cfg.data_dir or cfg.dataset
    if loader == 'timm':
        train_tf, eval_tf = timm_transforms(model)
        train_split = TimmImageDataset(train_raw, image_col, label_col, train_tf, in_chans, cfg.max_train_samples)
        test_split = TimmImageDataset(test_raw, image_col, label_col, eval_tf, in_chans, cfg.max_eval_samples)
    else:
        train_split = decode_split(train_raw, image_col, label_col, cfg.max_train_samples, f'dataset {where}')
        test_split = decode_split(test_raw, image_col, label_col, cfg.max_eval_samples, f'dataset {where}')
        for split_name, split in (('training', train_split), ('test', test_split)):
            if split.images.shape[1] != in_chans:
                raise UserError(f'the {split_name} images of {where} have {split.images.shape[1]} channels and '
                                f'{cfg.model} takes {in_chans}; --loader timm converts them (or leave loader at auto)')
        if test_split.images.shape[2:] != train_split.images.shape[2:]:
            raise UserError(f'the test images of {where} are {tuple(test_split.images.shape[2:])} and the training images '
                            f'{tuple(train_split.images.shape[2:])}; --loader timm resizes them (or leave loader at auto)')
    if model.num_classes != num_classes:
        raise UserError(
            f'{cfg.model} has a {model.num_classes}-class head but {cfg.data_dir or cfg.dataset} has '
            f'{num_classes} classes; use the model\'s .cifar100 tag (e.g. rc4_cifar.cifar100) or '
            f'--model_kwargs \'{{"num_classes": {num_classes}}}\'')
    global_batch = cfg.batch_size
    if len(train_split) < global_batch:
        raise UserError(f'{len(train_split)} training examples cannot fill one batch of {global_batch}')
    depth = 4 * model.steps + 2 if isinstance(model, RCNet) else None  # RC-1/2/4: depth 6/10/18
    epochs = cfg.epochs or paper_epochs(depth)
    n_params = sum(p.numel() for p in model.parameters())
    mean = torch.tensor(model.pretrained_cfg['mean'], device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(model.pretrained_cfg['std'], device=device).view(1, -1, 1, 1) * 255
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        fused=device.type == 'cuda' or None)
    if loader == 'gpu':
        batches = GpuBatches(
            type(train_split)(train_split.images.to(device), train_split.labels.to(device)),
            global_batch, cfg.seed, rank, world)
    elif loader == 'timm':
        workers = _num_workers(cfg)
        batches = torch.utils.data.DataLoader(
            train_split, batch_size=global_batch // world, shuffle=True, drop_last=True, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.type == 'cuda')
    else:
        batches = torch.utils.data.DataLoader(
            BatchedTensorDataset(train_split), batch_size=global_batch // world, shuffle=True, drop_last=True,
            collate_fn=collate_batch)
    steps_per_epoch = len(train_split) // global_batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, StepSchedule(
        cfg.warmup_epochs * steps_per_epoch, [m * steps_per_epoch for m in cfg.lr_milestones], cfg.lr_gamma))
    if loader == 'timm':
        eval_loader = torch.utils.data.DataLoader(test_split, batch_size=cfg.eval_batch_size, shuffle=False,
                                                  num_workers=_num_workers(cfg))
    else:
        eval_loader = torch.utils.data.DataLoader(
            BatchedTensorDataset(test_split), batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate_batch)
    model, optimizer, scheduler, eval_loader = accelerator.prepare(model, optimizer, scheduler, eval_loader)
    # safetensors refuses non-contiguous tensors, and channels_last conv weights are not contiguous
    accelerator.register_save_state_pre_hook(_contiguous_weights)
    if loader != 'gpu':
        batches = accelerator.prepare(batches)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    state = dict(epoch=0, global_step=0, best_test_top1_error=None, train_time_s=0.0, train_images=0,
                 wall_time_s=0.0)
    run_config = dict(cfg.to_dict(), epochs=epochs, params=n_params, num_processes=world, loader=loader,
                      mixed_precision=mixed_precision, channels_last=channels_last, output_dir=str(out))
    if resume_from is not None:
        _check_same_run(out / 'run_config.json', run_config)
        accelerator.load_state(str(resume_from))
        state.update(read_trainer_state(resume_from))
        accelerator.print(f'resumed from {resume_from} (epoch {state["epoch"]}, step {state["global_step"]})')
    metrics_file = out / 'metrics.jsonl'
    if accelerator.is_main_process and metrics_file.is_file():  # drop epochs no checkpoint holds
        lines = metrics_file.read_text().splitlines()
        metrics_file.write_text(''.join(
            line + '\n' for line in lines if json.loads(line)['epoch'] <= state['epoch']))

    # trackers take scalars only (TensorBoard's hparams): lists, mappings and None as JSON text
    tracker_config = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                      for k, v in run_config.items()}
    try:
        accelerator.init_trackers(cfg.project, config=tracker_config, init_kwargs={
            'wandb': {'name': cfg.run_name or str(out).removeprefix('runs/'), 'dir': str(out),
                      **({'mode': wandb_mode} if wandb_mode else {})}})
    except Exception as e:  # W&B: no network, a rejected key, a server error; nothing trained or lost yet
        raise UserError(f'{", ".join(trackers)} could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                        f'log offline with WANDB_MODE=offline (upload later with `wandb sync`), or use --log_with '
                        f'tensorboard or none. The run folder is untouched') from None
    if 'wandb' in trackers and accelerator.is_main_process:
        # the end-of-run summary shows the run's results, not one line per BN statistic
        accelerator.get_tracker('wandb', unwrap=True).define_metric('bn/*', summary='none')
    for note in (threads_note, wandb_note):
        if note:
            accelerator.print(note)
    if accelerator.is_main_process:
        (out / 'run_config.json').write_text(json.dumps(run_config, indent=2))
        precision = 'fp32' if mixed_precision == 'no' else mixed_precision
        accelerator.print(f'{cfg.model} {json.dumps(cfg.model_kwargs)}: {n_params:,} params, {epochs} epoch{"s" * (epochs != 1)} of {steps_per_epoch} steps '
                          f'(batch {global_batch} over {world} process{"es" * (world > 1)}), loader {loader}, '
                          f'{precision}, {len(train_split)}/{len(test_split)} train/test examples')

    net = accelerator.unwrap_model(model, keep_torch_compile=False)  # set_steps acts on the wrapped model too
    cells = 2 if cfg.sample_steps_cells == 'independent' else 1

    def evaluate():
        from ..eval import evaluate as evaluate_model  # the one evaluation, shared with `python -m timm_rc.eval`
        if cfg.sample_steps is not None:
            net.set_steps(net.steps)  # the largest k' sampled
        return evaluate_model(model, eval_loader, mean=mean, std=std, channels_last=channels_last,
                              num_classes=num_classes, accelerator=accelerator)

    summary: Dict[str, Any] = {}
    start_time = time.time() - state['wall_time_s']
    stop = False
    for epoch in range(state['epoch'], epochs):
        if stop:
            break
        model.train()
        set_seed(cfg.seed * 1000 + epoch, device_specific=True)  # dropout etc.: a function of the epoch
        gen = epoch_generator(cfg.seed, epoch, device, rank)
        batches.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = steps = 0
        drawn = []  # this epoch's k' draws (sample_steps)
        host = HostScalars(device)
        bar = tqdm(total=steps_per_epoch, desc=f'epoch {epoch + 1}/{epochs}', dynamic_ncols=True,
                   disable=not accelerator.is_local_main_process, leave=True)
        t0 = last_t = time.time()
        for images, labels in batches:
            if cfg.compile:
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (reduce-overhead)
            if images.is_floating_point():  # timm's pipeline: augmented and normalised in the workers
                x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
            else:
                x = normalize(augment(images, gen), mean, std, channels_last)
            if cfg.sample_steps is not None:
                k = draw_steps(cfg.seed, state['global_step'], *cfg.sample_steps, cells)
                net.set_steps(k[0] if cells == 1 else tuple(k))
                drawn.append(k)
            logits = model(x)
            loss = criterion(logits.float(), labels)
            accelerator.backward(loss)
            if cfg.clip_grad_value is not None:
                accelerator.clip_grad_value_(model.parameters(), cfg.clip_grad_value)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            correct += (logits.argmax(-1) == labels).sum()
            seen += labels.numel()
            steps += 1
            state['global_step'] += 1
            fault(f'step{state["global_step"]}')
            if steps % cfg.log_interval == 0 or steps == steps_per_epoch:
                ready = host.push(torch.stack([loss_sum / steps, correct.float() / seen]))
                now = time.time()
                rate = (steps - bar.n) * labels.numel() * world / max(now - last_t, 1e-9)
                post = dict(lr=f'{scheduler.get_last_lr()[0]:.4g}', img_s=f'{rate:.0f}')
                if ready is not None:
                    # early stop on one process only; with several, every process stops together at
                    # the epoch-end check below (one leaving alone would hang the others' collectives)
                    if world == 1 and not math.isfinite(ready[0]):
                        raise Diverged(f'the training loss became {ready[0]} in epoch {epoch + 1}')
                    post = dict(loss=f'{ready[0]:.4f}', acc=f'{ready[1]:.3f}', **post)
                bar.set_postfix(post, refresh=False)
                bar.update(steps - bar.n)
                last_t = now
            if cfg.max_steps is not None and state['global_step'] >= cfg.max_steps:
                stop = True
                break
        # epoch end: the one host sync of the epoch
        totals = accelerator.reduce(torch.stack([loss_sum, correct.float()]), reduction='sum')
        steps_drawn = _gather_draws(accelerator, drawn, cells) if cfg.sample_steps is not None else None
        train_loss = totals[0].item() / (steps * world)
        train_acc = totals[1].item() / (seen * world)
        epoch_time = time.time() - t0
        bar.close()
        if not math.isfinite(train_loss):
            raise Diverged(f'the training loss became {train_loss} in epoch {epoch + 1}')
        test = evaluate()
        test_acc, test_err, counted = test.top1_acc, test.top1_error, test.examples
        full_epoch = steps == steps_per_epoch
        images = seen * world
        state['train_time_s'] += epoch_time
        state['train_images'] += images
        if full_epoch:
            state['epoch'] = epoch + 1
        best = state['best_test_top1_error']
        state['best_test_top1_error'] = test_err if best is None else min(best, test_err)
        state['wall_time_s'] = time.time() - start_time

        bn = per_step_bn(accelerator.unwrap_model(model, keep_torch_compile=False))
        metrics = {
            'train/loss': train_loss, 'train/acc': train_acc, 'test/top1_err': test_err, 'test/top1_acc': test_acc,
            'test/loss': test.loss, **({'test/top5_err': test.top5_error} if test.top5_error is not None else {}),
            'lr': scheduler.get_last_lr()[0], 'epoch': epoch + 1, 'epoch_time_s': epoch_time,
            'images_per_sec': images / epoch_time, **bn_scalars(bn),
        }
        try:
            accelerator.log(metrics, step=epoch + 1)
        except Exception as e:  # a tracker failing mid-run must not cost the run its checkpoints
            accelerator.print(f'warning: logging epoch {epoch + 1} to {", ".join(trackers)} failed '
                              f'({type(e).__name__}: {e}); training goes on, metrics.jsonl has every epoch')
        if accelerator.is_main_process:
            bn_file = out / 'bn_stats' / f'epoch_{epoch + 1:04d}.safetensors'
            with writing('BN statistics', bn_file, ckpt_dir):
                save_bn_stats(bn, bn_file)
            line = {k: v for k, v in metrics.items() if not k.startswith('bn/')}
            if steps_drawn is not None:  # a list per process: not a tracker scalar, metrics.jsonl only
                line['train/steps_drawn'] = steps_drawn
            with writing('metrics', metrics_file, ckpt_dir), open(metrics_file, 'a') as f:
                f.write(json.dumps(line) + '\n')
        accelerator.print(f'epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f} acc {100 * train_acc:.2f}% | '
                          f'test top-1 error {test_err:.2f}% | {images / epoch_time:.0f} img/s')
        summary = dict(
            model=cfg.model, model_kwargs=cfg.model_kwargs, dataset=cfg.dataset, data_dir=cfg.data_dir,
            params=n_params, epochs=epochs, epochs_completed=state['epoch'], global_step=state['global_step'],
            test_top1_error=test_err, best_test_top1_error=state['best_test_top1_error'],
            train_loss=train_loss, eval_examples=counted, train_examples=len(train_split),
            images_per_sec=state['train_images'] / max(state['train_time_s'], 1e-9),
            wall_time_s=state['wall_time_s'], seed=cfg.seed, num_processes=world, global_batch_size=global_batch,
            loader=loader, mixed_precision=mixed_precision, device=str(device),
            num_threads=torch.get_num_threads() if device.type == 'cpu' else None,
            device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
            versions=_library_versions(),
        )
        if accelerator.is_main_process:
            with writing('the summary', out / 'summary.json', ckpt_dir):
                (out / 'summary.json').write_text(json.dumps(summary, indent=2))
        if full_epoch:
            save_checkpoint(accelerator, ckpt_dir, epoch + 1, state, cfg.keep_checkpoints)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from timm.models import save_for_hf
        final = accelerator.unwrap_model(model, keep_torch_compile=False).to(memory_format=torch.contiguous_format)
        with writing('the final model', out / 'model.safetensors', ckpt_dir):
            # the block style is recorded even when it was the default (the default changed in 0.2.0)
            block = {'block': final.block} if isinstance(getattr(final, 'block', None), str) else {}
            # where the starting weights came from is not part of the architecture: a run folder must load
            # without the file it was initialised from (e.g. a converted network, python -m timm_rc.convert)
            args = {k: v for k, v in cfg.model_kwargs.items() if k not in INIT_KWARGS}
            save_for_hf(final, str(out), model_args=dict(args, **block), safe_serialization=True)
        accelerator.print(f'done: {out / "model.safetensors"}, summary in {out / "summary.json"}')
    if cfg.log_model and 'wandb' in trackers and accelerator.is_main_process:
        _log_model_artifact(accelerator.get_tracker('wandb', unwrap=True), out, summary)
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


def _is_main_process() -> bool:
    """ Rank 0, read from the launcher's environment: true before any process group exists. """
    return int(os.environ.get('RANK', '0')) == 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    """ Console entry point: `timm-rc-train` / `python train.py` / `accelerate launch train.py`.

    User errors print one line (from the main process only) and exit with code 2; a diverged run exits
    with 3; Ctrl-C or SIGTERM says where the newest complete checkpoint is and exits with 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(config_help())
        return
    cfg = None

    def stop(signum, frame):  # `kill PID` (SIGTERM, also a scheduler's) stops the run as Ctrl-C does
        raise KeyboardInterrupt
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        cfg = load_config(argv)
        train(cfg)
    except UserError as e:
        if _is_main_process():
            print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2)
    except Diverged as e:
        if _is_main_process():
            print(f'error: training diverged: {e}. Stopped before saving this epoch; the newest complete '
                  f'checkpoint is untouched. Start again in a new output_dir with a lower lr or with clipping (a resumed run keeps its settings).', file=sys.stderr)
        raise SystemExit(3)
    except KeyboardInterrupt:
        if _is_main_process():
            print(f'\ninterrupted. {_resume_hint(cfg, argv)}', file=sys.stderr)
        raise SystemExit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _resume_hint(cfg: Optional[TrainConfig], argv: Sequence[str]) -> str:
    if cfg is None:
        return 'Nothing was started.'
    try:
        out = cfg.resolved_output_dir()
    except UserError:
        return 'Nothing was started.'
    newest = latest_checkpoint(out / 'checkpoints')
    if newest is None:
        return f'No epoch was completed, so {out} holds no checkpoint to resume from.'
    import shlex
    kept, skip = [], False
    for i, a in enumerate(argv):  # drop an earlier --resume [value]
        if skip:
            skip = False
            continue
        if a == '--resume':
            skip = i + 1 < len(argv) and not argv[i + 1].startswith('--')
            continue
        if not a.startswith('--resume='):
            kept.append(a)
    args = shlex.join(kept)
    return (f'The newest complete checkpoint is {newest}; continue with: python train.py {args} --resume '
            f'(or the same through accelerate launch)')
