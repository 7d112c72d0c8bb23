""" train.py and the evaluation on images of any size and mode: timm's data pipeline (issue 9, part 3). """
import numpy as np
import pytest
import torch

from test_train import run
from timm_rc.cli.eval import main as eval_main


def make_mixed_parquet(folder, n_train=48, n_test=12, num_classes=3, seed=0):
    """ RGB and grayscale images of several sizes, in the hub's parquet schema. """
    import datasets
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(40, 30), (50, 50), (64, 48), (33, 71)]
    for split, n in (('train', n_train), ('test', n_test)):
        images, labels = [], []
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            label = int(rng.integers(num_classes))
            if i % 3 == 0:
                arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
                images.append(Image.fromarray(arr, mode='L'))
            else:
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                arr[..., label] = 255  # learnable: the label's channel is bright
                images.append(Image.fromarray(arr, mode='RGB'))
            labels.append(label)
        features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=[f'k{i}' for i in range(num_classes)]))
        datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features).to_parquet(
            str(folder / f'{split}.parquet'))
    return folder


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    return make_mixed_parquet(tmp_path_factory.mktemp('mixed') / 'data')


def test_mixed_images_train_through_timms_pipeline(mixed, tmp_path):
    out = tmp_path / 'run'
    summary = run(['--model', 'rc4_cifar', '--model_kwargs', '{"width": 4, "num_classes": 3}', '--data_dir', str(mixed),
                   '--epochs', '2', '--batch_size', '8', '--num_workers', '0', '--log_with', 'none',
                   '--output_dir', str(out)])
    assert summary['loader'] == 'timm' and summary['train_examples'] == 48 and summary['eval_examples'] == 12
    assert summary['epochs_completed'] == 2 and np.isfinite(summary['train_loss'])
    # the evaluation command reads the run the same way (timm's evaluation transform) and agrees exactly
    report = eval_main([str(out), '--json'])
    assert report['top1_error'] == summary['test_top1_error'] and report['examples'] == 12


def test_a_timm_family_on_mixed_images_with_workers(mixed, tmp_path):
    summary = run(['--model', 'rc_resnet18', '--model_kwargs', '{"num_classes": 3}', '--data_dir', str(mixed),
                   '--epochs', '1', '--max_steps', '1', '--batch_size', '4', '--max_eval_samples', '4',
                   '--num_workers', '2', '--log_with', 'none', '--output_dir', str(tmp_path / 'r18')])
    assert summary['loader'] == 'timm' and summary['global_step'] == 1 and summary['eval_examples'] == 4


def test_the_timm_transform_gives_the_models_input_size(mixed):
    import timm
    import timm_rc  # noqa: F401
    from timm_rc.data import load_split, split_loader
    model = timm.create_model('rc4_cifar', width=4, num_classes=3)
    split, num_classes, names = load_split('x', str(mixed), 'test', None, model)
    images, labels = next(iter(split_loader(split, 12)))
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32 and num_classes == 3
    assert names == ['k0', 'k1', 'k2'] and labels.dtype == torch.int64
    # normalised with the model's mean/std: a white pixel maps to (1 - mean) / std
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    assert images.max().item() <= max((1 - m) / s for m, s in zip(mean, std)) + 1e-5


def test_the_tensor_path_says_to_use_timm_for_mixed_images(mixed, tmp_path):
    from timm_rc.train import UserError
    with pytest.raises(UserError, match=r'differ in size or mode.*--loader timm'):
        run(['--model_kwargs', '{"width": 4, "num_classes": 3}', '--data_dir', str(mixed), '--loader', 'dataloader',
             '--epochs', '1', '--log_with', 'none', '--output_dir', str(tmp_path / 'x')])


def test_a_validation_split_stands_in_for_a_missing_test_split(mixed, tmp_path):
    import shutil
    data = tmp_path / 'valdata'
    data.mkdir()
    shutil.copy(mixed / 'train.parquet', data / 'train.parquet')
    shutil.copy(mixed / 'test.parquet', data / 'validation.parquet')
    from timm_rc.data import load_dataset_splits
    train, test, image_col, label_col, num_classes, names = load_dataset_splits('x', str(data))
    assert len(train) == 48 and len(test) == 12 and (image_col, label_col, num_classes) == ('image', 'label', 3)
    # the evaluation names the split it used
    import timm
    import timm_rc  # noqa: F401
    from timm_rc.data import load_split
    split, _, _ = load_split('x', str(data), 'test', None, timm.create_model('rc4_cifar', width=4, num_classes=3))
    assert split.split_name == 'validation' and len(split) == 12


def test_cifar_sized_grayscale_images_are_converted_not_crashed(tmp_path):
    """ Uniform 28x28 grayscale images (MNIST-like) for a 3-channel model: timm's pipeline converts them;
    the uint8 tensor path, asked for explicitly, says why it cannot. """
    import datasets
    from PIL import Image
    rng = np.random.default_rng(0)
    folder = tmp_path / 'gray28'
    folder.mkdir()
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=['a', 'b', 'c']))
    for split, n in (('train', 32), ('test', 8)):
        images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode='L') for _ in range(n)]
        datasets.Dataset.from_dict({'image': images, 'label': [i % 3 for i in range(n)]}, features=features).to_parquet(
            str(folder / f'{split}.parquet'))
    common = ['--model_kwargs', '{"width": 4, "num_classes": 3}', '--data_dir', str(folder), '--epochs', '1',
              '--batch_size', '8', '--num_workers', '0', '--log_with', 'none']
    summary = run([*common, '--output_dir', str(tmp_path / 'auto')])
    assert summary['loader'] == 'timm' and summary['eval_examples'] == 8
    from timm_rc.train import UserError
    with pytest.raises(UserError, match=r'have 1 channels and rc4_cifar takes 3; --loader timm converts them'):
        run([*common, '--loader', 'dataloader', '--output_dir', str(tmp_path / 'tensor')])
    assert not (tmp_path / 'tensor').exists()


def test_a_test_split_unlike_the_training_split_goes_through_timm_or_is_refused(tmp_path):
    """ Training images RGB 32x32, test images grayscale or 48x48: auto takes timm's pipeline (converted,
    resized and cropped to the model's input); the tensor path, forced, says why it cannot. """
    import datasets
    from PIL import Image
    rng = np.random.default_rng(0)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=['a', 'b', 'c']))

    def write(folder, split, n, size, mode):
        shape = (size, size, 3) if mode == 'RGB' else (size, size)
        images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(n)]
        datasets.Dataset.from_dict({'image': images, 'label': [i % 3 for i in range(n)]}, features=features).to_parquet(
            str(folder / f'{split}.parquet'))

    from timm_rc.train import UserError
    for name, size, mode, message in (('gray_test', 32, 'L', r'the test images of .* have 1 channels'),
                                      ('big_test', 48, 'RGB', r'the test images of .* are \(48, 48\) and the training')):
        folder = tmp_path / name
        folder.mkdir()
        write(folder, 'train', 16, 32, 'RGB')
        write(folder, 'test', 8, size, mode)
        common = ['--model_kwargs', '{"width": 4, "num_classes": 3}', '--data_dir', str(folder), '--epochs', '1',
                  '--batch_size', '8', '--num_workers', '0', '--log_with', 'none']
        assert run([*common, '--output_dir', str(tmp_path / f'{name}_auto')])['loader'] == 'timm'
        with pytest.raises(UserError, match=message):
            run([*common, '--loader', 'dataloader', '--output_dir', str(tmp_path / f'{name}_tensor')])


def test_an_image_folder_trains_and_evaluates(tmp_path):
    """ datasets' imagefolder layout (split/class/image) is read as it is (issue 17, item 14). """
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / 'folder'
    for split, n in (('train', 32), ('test', 8)):
        for i in range(n):
            label = i % 2
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            arr[..., label] = 255
            (root / split / f'class{label}').mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / split / f'class{label}' / f'{i}.png')
    from timm_rc.data import load_splits
    splits = load_splits('x', str(root))
    assert (len(splits.train), len(splits.test), splits.class_names, splits.path) == (32, 8, ['class0', 'class1'],
                                                                                       'dataloader')
    out = tmp_path / 'run'
    summary = run(['--data_dir', str(root), '--output_dir', str(out), '--epochs', '1', '--batch_size', '16',
                   '--model_kwargs', '{"width": 4, "num_classes": 2}'])
    assert summary['eval_examples'] == 8 and summary['train_examples'] == 32
    assert eval_main([str(out), '--json'])['top1_error'] == summary['test_top1_error']


def test_a_folder_without_data_names_both_layouts(tmp_path, capsys):
    from timm_rc.data import load_splits
    from timm_rc.errors import UserError
    with pytest.raises(UserError, match=r'holds no parquet files \(expected train.parquet and test.parquet\) and no '
                                        r'image folder \(expected train/<class>/<image> and test/<class>/<image>\)'):
        load_splits('x', str(tmp_path))


def test_an_unreachable_hub_fails_at_once_with_the_way_out(monkeypatch, tmp_path):
    """ No network: datasets is put in offline mode for the call (no retry warnings, no waiting), the error
    names why and how to point data_dir at a local copy, and the offline mode is given back after. """
    import socket
    import datasets
    from huggingface_hub import constants
    from timm_rc.data import load_dataset_splits
    from timm_rc.errors import UserError
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'cache')

    def unreachable(*args, **kwargs):
        raise OSError('no route')
    monkeypatch.setattr(socket, 'create_connection', unreachable)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', False)
    with pytest.raises(UserError) as e:
        load_dataset_splits('cifar100')
    assert str(e.value) == (
        "could not load dataset 'uoft-cs/cifar100' from the Hugging Face hub (huggingface.co cannot be reached from "
        "here and no copy is cached). Point data_dir at a local copy (train.parquet and test.parquet, or "
        "train/<class>/<image> folders), e.g. --data_dir path/to/cifar100")
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(UserError, match=r"\(HF_HUB_OFFLINE is set and no copy is cached\)"):
        load_dataset_splits('cifar10')
