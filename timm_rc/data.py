""" Image data through Hugging Face `datasets`.

CIFAR-sized data (small images of one size) is decoded once into uint8 tensors; two input paths share
one augmentation (random 32x32 crop of the 4-pixel zero-padded image, random horizontal flip,
per-channel normalisation), done as batched tensor work on the compute device:

* `GpuBatches`: the whole split lives on the GPU as uint8; each epoch is a device-side permutation,
  sliced into static batches. No workers, no host sync (airbench's recipe).
* a plain `DataLoader` over the uint8 tensors (the CPU default), prepared by Accelerate.

The shuffling and augmentation randomness of epoch e depends only on (seed, epoch), so a run resumed
from an epoch checkpoint replays exactly what an uninterrupted run would have done.

Images of any size and mode (`TimmImageDataset`) go through timm's own pipeline instead: decoded per
example in DataLoader workers, converted to the model's channels, resized, cropped, augmented and
normalised by `timm.data.create_transform` for the model's pretrained config (`resolve_data_config`).
"""
import contextlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import UserError

__all__ = ['ImageSplit', 'Splits', 'load_splits', 'load_split', 'split_loader', 'load_image_splits', 'load_dataset_splits',
           'small_uniform_images', 'choose_data_path', 'TimmImageDataset', 'timm_transforms', 'augment', 'normalize',
           'epoch_generator', 'GpuBatches', 'BatchedTensorDataset', 'collate_batch', 'DATA_PATHS', 'data_identity']

# how images reach the model: 'gpu' and 'dataloader' hold uint8 tensors (CIFAR-sized data), 'timm' decodes
# per example through timm's pipeline; 'auto' chooses (`choose_data_path`)
DATA_PATHS = ('auto', 'gpu', 'dataloader', 'timm')

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
SHORT_NAMES = {'cifar10': 'uoft-cs/cifar10', 'cifar100': 'uoft-cs/cifar100'}
LABEL_COLUMNS = ('label', 'fine_label', 'labels')
TEST_SPLITS = ('test', 'validation', 'valid', 'val')  # the split evaluated on: the first that exists


@dataclass
class ImageSplit:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def _load_dataset_dict(dataset: str, data_dir: Optional[str]):
    """ `datasets.load_dataset` without its progress bars ("Generating train split": datasets' own work, not
    the user's, and printed before any error about the data). """
    from datasets.utils import logging as datasets_logging
    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        return _load_dataset_dict_loud(dataset, data_dir)
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


def _load_dataset_dict_loud(dataset: str, data_dir: Optional[str]):
    import datasets
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            where = '' if path.is_absolute() else f' (relative to {Path.cwd()})'
            raise UserError(f'data_dir {data_dir} does not exist or is not a folder{where}; give the folder that '
                            f'holds the data (train.parquet and test.parquet, or train/ and test/ image folders) as '
                            f'--data_dir, or as data_dir in the config file or the sweep\'s parameters')
        parquet = any(path.glob('*.parquet')) or any(path.glob('*/*.parquet'))
        images = not parquet and any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.glob('*/*/*'))
        if not parquet and not images:
            raise UserError(f'data_dir {data_dir} holds no parquet files (expected train.parquet and test.parquet) and '
                            f'no image folder (expected train/<class>/<image> and test/<class>/<image>)')
        try:
            if images:  # datasets' imagefolder layout: split/class/image, the class from the folder name
                return datasets.load_dataset('imagefolder', data_dir=str(path))
            return datasets.load_dataset(str(path))
        except Exception as e:  # datasets raises many kinds here
            raise UserError(f'could not read the dataset in {data_dir}: {e}') from None
    hub_id, _, config = SHORT_NAMES.get(dataset, dataset).partition(':')  # 'owner/name:config'
    local = f'--data_dir path/to/{dataset.split("/")[-1].split(":")[0]}'
    with _offline_unless_reachable() as offline:
        try:
            return datasets.load_dataset(hub_id, config or None)
        except Exception as e:
            why = f'{offline} and no copy is cached' if offline else f'{type(e).__name__}: {e}'
            raise UserError(
                f'could not load dataset {hub_id!r} from the Hugging Face hub ({why}). Point data_dir at a local '
                f'copy (train.parquet and test.parquet, or train/<class>/<image> folders), e.g. {local}') from None


@contextlib.contextmanager
def _offline_unless_reachable(timeout: float = 3.0) -> Iterator[Optional[str]]:
    """ Yields None when the hub answers, else why it is not asked. When it does not answer (no network),
    datasets and huggingface_hub are put in their offline mode for the call: a cached copy still loads, and a
    missing one fails at once instead of after about 25 s of retry warnings. """
    import datasets
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        yield 'HF_HUB_OFFLINE is set'
        return
    from urllib.parse import urlparse
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)), timeout).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield None
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield f'{url.hostname} cannot be reached from here'
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _columns(split, where: str) -> Tuple[str, str, int]:
    import datasets
    features = split.features
    image_cols = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    label_cols = [k for k in LABEL_COLUMNS if isinstance(features.get(k), datasets.ClassLabel)]
    label_cols += [k for k, f in features.items() if isinstance(f, datasets.ClassLabel) and k not in label_cols]
    if not image_cols or not label_cols:
        raise UserError(
            f'{where} needs an Image column and a ClassLabel column (e.g. img + label, or img + fine_label); '
            f'it has: {", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())}')
    label = label_cols[0]
    return image_cols[0], label, features[label].num_classes


def decode_split(split, image_col: str, label_col: str, limit: Optional[int], where: str) -> ImageSplit:
    if limit is not None:
        split = split.select(range(min(limit, len(split))))
    arr = split.with_format('numpy', columns=[image_col])[:][image_col]
    if arr.dtype == object:  # images of different sizes or modes do not stack
        raise UserError(f'{where}: the images differ in size or mode, which the uint8 tensor path cannot hold; '
                        f'use timm\'s data pipeline: --loader timm')
    if arr.ndim == 3:  # grayscale
        arr = arr[..., None]
    images = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(np.asarray(split[label_col]), dtype=torch.int64)
    return ImageSplit(images=images, labels=labels)


def load_dataset_splits(dataset: str, data_dir: Optional[str] = None):
    """ The dataset's train and test splits, undecoded: (train, test, image column, label column,
    num_classes, class names). """
    ds = _load_dataset_dict(dataset, data_dir)
    where = data_dir or dataset
    test_name = next((name for name in TEST_SPLITS if name in ds), None)
    missing = (['train'] if 'train' not in ds else []) + (['test (or validation)'] if test_name is None else [])
    if missing:
        raise UserError(f'dataset {where} has no {" or ".join(missing)} split; it has: {", ".join(ds.keys())}')
    image_col, label_col, num_classes = _columns(ds['train'], f'dataset {where}')
    _columns(ds[test_name], f'dataset {where} ({test_name} split)')
    return ds['train'], ds[test_name], image_col, label_col, num_classes, list(ds['train'].features[label_col].names)


def small_uniform_images(split, image_col: str, probe: int = 64, max_side: int = 64, in_chans: int = 3,
                         like=None) -> bool:
    """ Whether the split looks like CIFAR to a model of `in_chans` channels: its first `probe` images share
    one size and the model's mode (RGB, or L for one channel), at most `max_side` pixels a side (such a
    split is decoded once to a uint8 tensor, and can live on the GPU); with `like` (another split), that
    split's first images too, of the same size and mode (the test split must look like the training split). """
    kinds = {(img.size, img.mode) for img in split.select(range(min(probe, len(split))))[image_col]}
    if like is not None:
        kinds |= {(img.size, img.mode) for img in like.select(range(min(probe, len(like))))[image_col]}
    if len(kinds) != 1:
        return False
    size, mode = next(iter(kinds))
    return max(size) <= max_side and mode == ('RGB' if in_chans == 3 else 'L')


class TimmImageDataset(torch.utils.data.Dataset):
    """ Images of any size and mode through timm's data pipeline: decoded per example (in DataLoader
    workers), converted to the model's channel count (RGB or L), transformed by `transform` (timm's
    `create_transform`: resize/crop, augmentation when training, normalisation). Yields (float image, label). """

    def __init__(self, split, image_col: str, label_col: str, transform, in_chans: int = 3,
                 limit: Optional[int] = None):
        if limit is not None:
            split = split.select(range(min(limit, len(split))))
        self.split, self.image_col, self.label_col = split, image_col, label_col
        self.transform, self.mode = transform, 'RGB' if in_chans == 3 else 'L'
        self.labels = torch.as_tensor(np.asarray(split[label_col]), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = self.split[int(i)][self.image_col].convert(self.mode)
        return self.transform(image), self.labels[i]


def timm_transforms(model) -> Tuple[Any, Any]:
    """ (training, evaluation) transforms of timm's pipeline for `model`'s pretrained config. """
    from timm.data import create_transform, resolve_data_config
    config = resolve_data_config({}, model=model)
    return create_transform(**config, is_training=True), create_transform(**config, is_training=False)


def choose_data_path(requested: str, train, image_col: str, in_chans: int = 3, like=None,
                     device_type: str = 'cpu') -> str:
    """ The data path for a run: 'timm' when asked for, or under 'auto' when the images are not CIFAR-sized
    for the model (`small_uniform_images`, with `like` the test split); otherwise the uint8 tensor path
    asked for, where 'auto' is 'gpu' on CUDA and 'dataloader' elsewhere. The trainer and every command
    choose through this one function. """
    if requested not in DATA_PATHS:
        raise UserError(f'loader must be one of {", ".join(DATA_PATHS)}; got {requested!r}')
    if requested == 'timm' or (requested == 'auto' and
                               not small_uniform_images(train, image_col, in_chans=in_chans, like=like)):
        return 'timm'
    if requested == 'auto':
        return 'gpu' if device_type == 'cuda' else 'dataloader'
    return requested


@dataclass
class Splits:
    """ The splits of a dataset as one data path gives them to the model. """
    train: Optional[Union[ImageSplit, 'TimmImageDataset']]  # None where not asked for
    test: Optional[Union[ImageSplit, 'TimmImageDataset']]
    path: str  # 'gpu', 'dataloader' or 'timm'
    num_classes: int
    class_names: List[str]
    test_name: str  # 'test', or the split that stands in for it ('validation', ...)
    identity: Dict[str, Any] = field(default_factory=dict)  # what identifies the data (`data_identity`)


def load_splits(dataset: str = 'cifar10', data_dir: Optional[str] = None, *, model=None, loader: Optional[str] = 'auto',
                device_type: str = 'cpu', max_train_samples: Optional[int] = None,
                max_eval_samples: Optional[int] = None, which: Sequence[str] = ('train', 'test')) -> Splits:
    """ The `which` splits of a dataset ('train', 'test'), each cut to its first max_*_samples examples, on
    the data path `choose_data_path` picks for `model` (None: 3 channels, uint8 path unless 'timm' is
    asked for): CIFAR-sized images decoded once to uint8 `ImageSplit`s (checked against the model's
    channels, and the test images against the training images' size), other images as
    `TimmImageDataset`s with timm's training / evaluation transform for `model`. """
    train_raw, test_raw, image_col, label_col, num_classes, names = load_dataset_splits(dataset, data_dir)
    where = data_dir or dataset
    in_chans = model.pretrained_cfg.get('input_size', (3,))[0] if model is not None else 3
    path = choose_data_path(loader or 'auto', train_raw, image_col, in_chans, like=test_raw, device_type=device_type)
    raw = {'train': (train_raw, max_train_samples), 'test': (test_raw, max_eval_samples)}
    out = {}
    if path == 'timm':
        if model is None:
            raise UserError(f'{where} needs timm\'s data pipeline (images of any size), which needs the model')
        transforms = dict(zip(('train', 'test'), timm_transforms(model)))
        for name in which:
            split, limit = raw[name]
            out[name] = TimmImageDataset(split, image_col, label_col, transforms[name], in_chans, limit)
    else:
        for name in which:
            split, limit = raw[name]
            out[name] = decode_split(split, image_col, label_col, limit, f'dataset {where}')
        model_name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', 'the model')
        for name, split in (out.items() if model is not None else ()):
            if split.images.shape[1] != in_chans:
                label = 'training' if name == 'train' else 'test'
                raise UserError(f'the {label} images of {where} have {split.images.shape[1]} channels and '
                                f'{model_name} takes {in_chans}; --loader timm converts them (or leave loader at auto)')
        if model is not None and len(out) == 2 and out['test'].images.shape[2:] != out['train'].images.shape[2:]:
            raise UserError(f'the test images of {where} are {tuple(out["test"].images.shape[2:])} and the training '
                            f'images {tuple(out["train"].images.shape[2:])}; --loader timm resizes them (or leave '
                            f'loader at auto)')
    test_name = str(test_raw.split) if test_raw.split is not None else 'test'
    identity = data_identity({name: raw[name] for name in which}, image_col, label_col, names)
    return Splits(out.get('train'), out.get('test'), path, num_classes, names, test_name, identity)


def data_identity(splits: Dict[str, Tuple[Any, Optional[int]]], image_col: str, label_col: str,
                  class_names: Sequence[str], probe: int = 64) -> Dict[str, Any]:
    """ What identifies the data a run uses, wherever its files lie: the class names, and per split the number
    of examples used and a sha256 of the encoded bytes and labels of its first `probe` examples. A moved copy
    of the same data has the same identity; another dataset of the same shape has another. """
    import hashlib
    import datasets
    out: Dict[str, Any] = {'class_names': list(class_names)}
    for name, (split, limit) in splits.items():
        n = len(split) if limit is None else min(limit, len(split))
        head = split.select(range(min(probe, n))).cast_column(image_col, datasets.Image(decode=False))
        digest = hashlib.sha256()
        for image, label in zip(head[image_col], head[label_col]):
            digest.update(image['bytes'] or b'')
            digest.update(str(label).encode())
        out[name] = {'examples': n, 'sha256': digest.hexdigest()[:16]}
    return out


def load_split(dataset: str = 'cifar10', data_dir: Optional[str] = None, split: str = 'test',
               max_samples: Optional[int] = None, model=None, loader: Optional[str] = None,
               ) -> Tuple[Union[ImageSplit, 'TimmImageDataset'], int, Optional[List[str]]]:
    """ One split of a dataset (its first `max_samples` examples) with the dataset's class count and class
    names (`load_splits` with one split; `loader` as the run was trained, None: 'auto'). The split's
    `split_name` says which split it is ('validation' where it stands in for test). """
    if split not in ('train', 'test'):
        raise UserError(f'split must be train or test, got {split!r}')
    limits = dict(max_train_samples=max_samples) if split == 'train' else dict(max_eval_samples=max_samples)
    splits = load_splits(dataset, data_dir, model=model, loader=loader, which=(split,), **limits)
    out = splits.train if split == 'train' else splits.test
    out.split_name = splits.test_name if split == 'test' else 'train'
    return out, splits.num_classes, splits.class_names


def split_loader(split: Union[ImageSplit, 'TimmImageDataset'], batch_size: int, device: Union[str, torch.device] = 'cpu',
                 num_workers: int = 0):
    """ The batches `evaluate` takes, in order, `batch_size` at a time: (uint8 images, labels) of an
    `ImageSplit`, (normalised float images, labels) of a `TimmImageDataset`. """
    pin = torch.device(device).type == 'cuda'
    if isinstance(split, TimmImageDataset):
        return torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                           pin_memory=pin)
    return torch.utils.data.DataLoader(BatchedTensorDataset(split), batch_size=batch_size, shuffle=False,
                                       collate_fn=collate_batch, pin_memory=pin)


def load_image_splits(
        dataset: str,
        data_dir: Optional[str] = None,
        max_train_samples: Optional[int] = None,
        max_eval_samples: Optional[int] = None,
) -> Tuple[ImageSplit, ImageSplit, int, List[str]]:
    """ Returns (train, test, num_classes, class_names); images decoded once to uint8 tensors. """
    s = load_splits(dataset, data_dir, loader='dataloader', max_train_samples=max_train_samples,
                    max_eval_samples=max_eval_samples)
    return s.train, s.test, s.num_classes, s.class_names


# ---- augmentation: batched tensor work on the compute device ---------------------------------


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """ Random crop of the `pad`-pixel zero-padded images (same size out) and random horizontal flip.

    uint8 (N, C, H, W) in and out; one gather for the crop, no per-image Python work.
    """
    n, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=dev, generator=generator)
    rows = dy + torch.arange(h, device=dev).view(1, h, 1)  # (n, h, 1)
    cols = dx + torch.arange(w, device=dev).view(1, 1, w)  # (n, 1, w)
    if flip:
        mirrored = torch.rand(n, 1, 1, device=dev, generator=generator) < 0.5
        cols = torch.where(mirrored, 2 * dx + (w - 1) - cols, cols)  # read the crop right to left
    idx = torch.arange(n, device=dev).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx, rows, cols]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool = False) -> torch.Tensor:
    """ uint8 -> float32 (x / 255 - mean) / std; mean/std hold 255 * the per-channel values. """
    x = images.float().sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def epoch_generator(seed: int, epoch: int, device, rank: int = 0) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)
    return g


class GpuBatches:
    """ Training batches of a device-resident split: static shapes, no workers, no host sync.

    Every process draws the same global permutation of epoch e and takes its slice of each global
    batch; the last partial global batch is dropped.
    """

    def __init__(self, split: ImageSplit, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        self.images, self.labels = split.images, split.labels
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self.batch = global_batch // world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels) // self.global_batch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.seed, self.epoch, self.images.device)
        perm = torch.randperm(len(self.labels), device=self.images.device, generator=g)
        for i in range(len(self)):
            start = i * self.global_batch + self.rank * self.batch
            idx = perm[start:start + self.batch]
            yield self.images[idx], self.labels[idx]


class BatchedTensorDataset(torch.utils.data.Dataset):
    """ uint8 images + labels whose batches are fetched with one indexing op (`__getitems__`). """

    def __init__(self, split: ImageSplit):
        self.images, self.labels = split.images, split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: Sequence[int]):
        idx = torch.as_tensor(indices)
        return self.images[idx], self.labels[idx]


def collate_batch(batch):
    """ `BatchedTensorDataset.__getitems__` already returns the stacked batch. """
    return batch
