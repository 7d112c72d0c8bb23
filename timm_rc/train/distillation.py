""" Knowledge distillation from a trained network: the teacher, its checks, and the training loss.

The paper names distillation as complementary to RC: the weight-shared student learns from the logits of
its unshared twin (the ResNet-18 graph for RC-4) as well as from the labels. The loss is timm's
`timm.task.LogitDistillationTask` (Hinton et al. 2015):

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with the teacher wrapped in timm's `DistillationTeacher` (eval mode, no gradient, its own input
normalisation where its `pretrained_cfg` mean/std differ from the student's). The teacher sees the same
augmented batch as the student.

    teacher = load_teacher('runs/cpu_w8/resnet18_postact/seed0')     # a run folder
    teacher = load_teacher('weights.safetensors', 'rc4_unshared_cifar', {'width': 8})
    teacher = load_teacher('resnet18')                                 # timm's pretrained weights
"""
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.create import create_model
from ..errors import UserError
from ..runs.source import ModelSource

__all__ = ['Teacher', 'load_teacher', 'check_teacher', 'distillation_task', 'weights_digest']


@dataclass
class Teacher:
    model: nn.Module  # eval mode, requires_grad False
    identity: Dict[str, Any]  # what run_config.json and summary.json record: source, model, kwargs, weights digest


def weights_digest(model: nn.Module) -> str:
    """ sha256 (16 hex digits) of a model's state_dict: names, shapes, dtypes and bytes, in key order. The same
    weights give the same digest wherever the file lies and whatever format holds them. """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f'{name}:{tuple(t.shape)}:{t.dtype};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()[:16]


def load_teacher(source: str, model: Optional[str] = None, model_kwargs: Optional[Dict[str, Any]] = None) -> Teacher:
    """ The teacher `source` names, frozen: a run folder (or its weights file), a weights file with `model`
    (and `model_kwargs`), or a registered timm name, created with its pretrained weights (which the machine
    must be able to load: timm's cache, or `pretrained_cfg_overlay` with a file). """
    kwargs = dict(model_kwargs or {})
    path = Path(source)
    try:
        if model is not None and not path.exists():
            raise UserError(f'teacher {source} does not exist; teacher_model names the network of a teacher '
                            f'weights file, so give that file (or a run folder) as --teacher')
        src = ModelSource.parse(source, model, kwargs)  # a missing path or a file without its model: said here
        if src.kind != 'timm':
            net = src.load()
            name, kwargs = src.identity()
            name = name or net.pretrained_cfg.get('architecture')
        else:
            name = source
            try:
                net = create_model(source, {'pretrained': True, **kwargs}).eval()
            except UserError:
                raise
            except Exception as e:  # no network for the hub, no cached file
                raise UserError(f'teacher {source}: timm could not load its pretrained weights ({type(e).__name__}: '
                                f'{str(e).splitlines()[0][:200] if str(e) else ""}); give a run folder or a weights '
                                f'file instead') from None
    except UserError as e:  # the loader's hints name the student's options; here they are the teacher's
        text = re.sub(r'--model(_kwargs)?\b', r'--teacher_model\1', str(e))
        raise UserError(text if text.startswith('teacher') else f'teacher: {text}') from None
    for p in net.parameters():
        p.requires_grad_(False)
    identity = dict(source=str(source), model=name, model_kwargs=kwargs, weights_sha256=weights_digest(net),
                    params=sum(p.numel() for p in net.parameters()))
    return Teacher(net.eval(), identity)


def check_teacher(teacher: nn.Module, num_classes: int, input_size: Sequence[int]) -> None:
    """ One forward pass of a zero image of the student's `input_size`: a teacher that cannot take it, or whose
    head has another class count than the data, is a `UserError` naming both, before anything is trained. """
    ref = next(teacher.parameters())
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(1, *input_size, device=ref.device, dtype=ref.dtype))
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else ''
        raise UserError(f'the teacher cannot take the student\'s {tuple(input_size)} images ({type(e).__name__}: '
                        f'{first}); distil from a teacher trained on this data') from None
    classes = out.shape[-1] if isinstance(out, torch.Tensor) and out.ndim == 2 else None
    if classes != num_classes:
        raise UserError(f'the teacher has a {classes}-class head but the data has {num_classes} classes; distil from a '
                        f'teacher trained on this data (e.g. --teacher_model_kwargs \'{{"num_classes": {num_classes}}}\' '
                        f'for a weights file of such a head)')


def distillation_task(student: nn.Module, teacher: nn.Module, criterion: nn.Module, alpha: float,
                      temperature: float, device: torch.device) -> nn.Module:
    """ timm's `LogitDistillationTask`: task(x, labels) -> {'loss', 'output', 'task_loss', 'kd_loss'}, with the
    label loss weighted 1 - alpha and the distillation term alpha (x T^2 inside). `student` may be wrapped
    (DDP, torch.compile); the teacher stays outside every wrapper and in eval mode. """
    from timm.task import DistillationTeacher, LogitDistillationTask
    teacher = teacher.to(device).eval()
    wrapped = DistillationTeacher(teacher, device=device)
    task = LogitDistillationTask(student, wrapped, criterion=criterion, distill_loss_weight=alpha,
                                 task_loss_weight=1.0 - alpha, temperature=temperature, device=device, verbose=False)
    return task
