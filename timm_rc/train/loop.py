""" The training run: the paper's protocol through Hugging Face Accelerate.

Order as in Accelerate's examples: Accelerator, seed, data, model, optimizer, scheduler, prepare,
loop (backward, clip, step), evaluation with gather_for_metrics, log, save_state, end_training.
One GPU, several GPUs and several machines run the same code (`accelerate launch`).
"""
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .bnstats import bn_scalars, per_step_bn, save_bn_stats
from .checkpoint import complete_checkpoints, fault, latest_checkpoint, read_trainer_state, remove_partial, \
    save_checkpoint
from ..models import RCNet
from .config import TrainConfig, UserError, load_config, paper_epochs
from .data import BatchedTensorDataset, GpuBatches, augment, collate_batch, epoch_generator, load_image_splits, \
    normalize

__all__ = ['main', 'train', 'Diverged', 'reset_accelerate_state']


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


def _create_model(cfg: TrainConfig) -> nn.Module:
    import timm
    import timm_rc  # noqa: F401  registers the RC models
    name = cfg.model.split('.')[0]
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:10] or timm.list_models('rc*_cifar')
        raise UserError(f'unknown model {cfg.model!r}; similar names: {", ".join(close)}')
    try:
        return timm.create_model(cfg.model, **cfg.model_kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f'cannot build {cfg.model} with model_kwargs {cfg.model_kwargs}: {e}') from None


def _trackers(cfg: TrainConfig) -> List[str]:
    names = [n.strip() for n in cfg.log_with.split(',') if n.strip() and n.strip() != 'none']
    if 'wandb' in names and 'WANDB_MODE' not in os.environ and not os.environ.get('WANDB_API_KEY'):
        netrc = Path.home() / '.netrc'
        if not (netrc.is_file() and 'api.wandb.ai' in netrc.read_text()):
            os.environ['WANDB_MODE'] = 'offline'  # no key: log locally, `wandb sync` later
    return names


def train(cfg: TrainConfig) -> Dict[str, Any]:
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import TorchDynamoPlugin, set_seed
    from tqdm.auto import tqdm

    out = cfg.resolved_output_dir()
    ckpt_dir = out / 'checkpoints'
    cuda = torch.cuda.is_available()
    mixed_precision = ('bf16' if cuda else 'no') if cfg.mixed_precision == 'auto' else cfg.mixed_precision
    trackers = _trackers(cfg)
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
    )
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise UserError(f'batch_size {cfg.batch_size} (global) must be divisible by the {world} processes')
    loader = cfg.loader if cfg.loader != 'auto' else ('gpu' if device.type == 'cuda' else 'dataloader')
    channels_last = device.type == 'cuda' if cfg.channels_last is None else cfg.channels_last

    # protect an existing run: continuing it must be asked for
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(ckpt_dir) if cfg.resume == 'auto' else Path(cfg.resume)
        if resume_from is not None and not resume_from.is_dir():
            raise UserError(f'resume checkpoint {cfg.resume} does not exist')
        if resume_from is None:
            accelerator.print(f'no complete checkpoint in {ckpt_dir}; starting from scratch')
    elif complete_checkpoints(ckpt_dir) or (out / 'summary.json').exists():
        raise UserError(f'{out} already holds a run (checkpoints or summary.json); pass --resume to continue '
                        f'it, or choose another output_dir')
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_partial(ckpt_dir)
        out.mkdir(parents=True, exist_ok=True)

    set_seed(cfg.seed)  # the same initial weights on every process
    train_split, test_split, num_classes, _ = load_image_splits(
        cfg.dataset, cfg.data_dir, cfg.max_train_samples, cfg.max_eval_samples)
    model = _create_model(cfg)
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
    else:
        batches = torch.utils.data.DataLoader(
            BatchedTensorDataset(train_split), batch_size=global_batch // world, shuffle=True, drop_last=True,
            collate_fn=collate_batch)
    steps_per_epoch = len(train_split) // global_batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, StepSchedule(
        cfg.warmup_epochs * steps_per_epoch, [m * steps_per_epoch for m in cfg.lr_milestones], cfg.lr_gamma))
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
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state.update(read_trainer_state(resume_from))
        accelerator.print(f'resumed from {resume_from} (epoch {state["epoch"]}, step {state["global_step"]})')
    metrics_file = out / 'metrics.jsonl'
    if accelerator.is_main_process and metrics_file.is_file():  # drop epochs no checkpoint holds
        lines = metrics_file.read_text().splitlines()
        metrics_file.write_text(''.join(
            line + '\n' for line in lines if json.loads(line)['epoch'] <= state['epoch']))

    run_config = dict(cfg.to_dict(), epochs=epochs, params=n_params, num_processes=world, loader=loader,
                      mixed_precision=mixed_precision, channels_last=channels_last, output_dir=str(out))
    # trackers take scalars only (TensorBoard's hparams): lists, mappings and None as JSON text
    tracker_config = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                      for k, v in run_config.items()}
    accelerator.init_trackers(cfg.project, config=tracker_config, init_kwargs={
        'wandb': {'name': cfg.run_name or str(out).removeprefix('runs/'), 'dir': str(out)}})
    if accelerator.is_main_process:
        (out / 'run_config.json').write_text(json.dumps(run_config, indent=2))
        precision = 'fp32' if mixed_precision == 'no' else mixed_precision
        accelerator.print(f'{cfg.model}: {n_params:,} params, {epochs} epochs of {steps_per_epoch} steps '
                          f'(batch {global_batch} over {world} process{"es" * (world > 1)}), loader {loader}, '
                          f'{precision}, {len(train_split)}/{len(test_split)} train/test examples')

    def evaluate():
        model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=device)
        counted = 0
        with torch.no_grad():
            for images, labels in eval_loader:
                logits = model(normalize(images, mean, std, channels_last))
                preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
                correct += (preds == labels).sum()
                counted += labels.numel()
        return correct.item() / max(counted, 1), counted

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
        host = HostScalars(device)
        bar = tqdm(total=steps_per_epoch, desc=f'epoch {epoch + 1}/{epochs}', dynamic_ncols=True,
                   disable=not accelerator.is_local_main_process, leave=True)
        t0 = last_t = time.time()
        for images, labels in batches:
            if cfg.compile:
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (reduce-overhead)
            x = normalize(augment(images, gen), mean, std, channels_last)
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
        train_loss = totals[0].item() / (steps * world)
        train_acc = totals[1].item() / (seen * world)
        epoch_time = time.time() - t0
        bar.close()
        if not math.isfinite(train_loss):
            raise Diverged(f'the training loss became {train_loss} in epoch {epoch + 1}')
        test_acc, counted = evaluate()
        test_err = 100.0 * (1.0 - test_acc)
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
            'lr': scheduler.get_last_lr()[0], 'epoch': epoch + 1, 'epoch_time_s': epoch_time,
            'images_per_sec': images / epoch_time, **bn_scalars(bn),
        }
        accelerator.log(metrics, step=epoch + 1)
        if accelerator.is_main_process:
            save_bn_stats(bn, out / 'bn_stats' / f'epoch_{epoch + 1:04d}.safetensors')
            with open(out / 'metrics.jsonl', 'a') as f:
                f.write(json.dumps({k: v for k, v in metrics.items() if not k.startswith('bn/')}) + '\n')
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
            device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
            versions=_library_versions(),
        )
        if accelerator.is_main_process:
            (out / 'summary.json').write_text(json.dumps(summary, indent=2))
        if full_epoch:
            save_checkpoint(accelerator, ckpt_dir, epoch + 1, state, cfg.keep_checkpoints)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from timm.models import save_for_hf
        final = accelerator.unwrap_model(model, keep_torch_compile=False).to(memory_format=torch.contiguous_format)
        save_for_hf(final, str(out), model_args=dict(cfg.model_kwargs), safe_serialization=True)
        accelerator.print(f'done: {out / "model.safetensors"}, summary in {out / "summary.json"}')
    accelerator.end_training()
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    """ Console entry point: `timm-rc-train` / `python train.py` / `accelerate launch train.py`. """
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        train(cfg)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2)
    except Diverged as e:
        print(f'error: training diverged: {e}. Stopped before saving this epoch; the newest complete '
              f'checkpoint is untouched (resume with --resume, e.g. with a lower lr).', file=sys.stderr)
        raise SystemExit(3)
