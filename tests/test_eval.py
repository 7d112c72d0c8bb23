""" `python -m timm_rc eval` and `timm_rc.eval.evaluate`, the one evaluation of the trainer and every command. """
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.utils import accuracy

from test_train import SHARED_CIFAR10, TINY, make_parquet, run
from cli_helpers import exits_2 as _exits_2, json_result
from timm_rc.cli.eval import main
from timm_rc.evaluation import EvalResult, evaluate, model_mean_std
from timm_rc.runs.source import load_model
from timm_rc.train import UserError, reset_accelerate_state
from timm_rc.data import BatchedTensorDataset, collate_batch, load_image_splits, normalize

REPO = Path(__file__).resolve().parents[1]


def eval_json(argv, capsys):
    return json_result(main, argv, capsys)


def exits_2(argv, capsys):
    return _exits_2(main, argv, capsys)


# ---- a finished run gives exactly its summary's test error ------------------------------------


def test_run_folder_gives_exactly_the_summary_test_error(tiny, capsys):
    root, out, summary = tiny
    # the run recorded data_dir 'data' relative to `root`; found from here through its output_dir
    r = eval_json([str(out)], capsys)
    assert r['top1_error'] == summary['test_top1_error']  # exactly, not approximately
    assert r['examples'] == summary['eval_examples'] == 40
    assert r['run_test_top1_error'] == summary['test_top1_error']
    assert r['model'] == 'rc4_cifar' and r['model_kwargs'] == {'width': 4} and r['params'] == summary['params']
    assert r['class_names'] == [f'c{i}' for i in range(10)] and len(r['per_class_accuracy']) == 10
    assert sum(r['per_class_examples']) == 40 and r['images_per_sec'] > 0
    assert r['top1_error'] <= 100 and r['top5_error'] <= r['top1_error'] and r['loss'] > 0
    # the trainer logged the same routine's numbers
    last = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()][-1]
    assert last['test/top1_err'] == r['top1_error'] and last['test/top5_err'] == r['top5_error']
    assert last['test/loss'] == pytest.approx(r['loss'], rel=1e-9)


def test_as_a_real_command(tiny):
    root, out, summary = tiny
    p = subprocess.run([sys.executable, '-m', 'timm_rc.eval', 'runs/tiny/seed0', '--json'], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)['top1_error'] == summary['test_top1_error']


def test_weights_files(tiny, tmp_path, capsys):
    root, out, summary = tiny
    weights = shutil.copy(out / 'model.safetensors', tmp_path / 'w.safetensors')
    r = eval_json([str(weights), '--model', 'rc4_cifar', '--model_kwargs', '{"width": 4}',
                   '--data_dir', str(root / 'data')], capsys)
    assert r['top1_error'] == summary['test_top1_error']
    # a checkpoint's weights: model, kwargs and data are those of the run it lies in
    ckpt = out / 'checkpoints' / 'epoch_0001' / 'model.safetensors'
    assert eval_json([str(ckpt)], capsys)['top1_error'] == summary['test_top1_error']


def test_a_bf16_channels_last_run_is_evaluated_as_it_was_trained(tiny, tmp_path, capsys):
    """ The CUDA defaults (bf16 autocast, channels_last), here on the CPU: the command takes precision and
    memory format from run_config.json, so error and loss are the trainer's own. """
    root, _, _ = tiny
    out = tmp_path / 'bf16'
    summary = run(['--data_dir', str(root / 'data'), '--epochs', '1', '--max_train_samples', '32', '--output_dir',
                   str(out), '--loader', 'gpu', '--mixed_precision', 'bf16', '--channels_last', 'true', *TINY])
    r = eval_json([str(out)], capsys)
    assert r['mixed_precision'] == 'bf16' and r['channels_last'] is True
    assert r['top1_error'] == summary['test_top1_error']
    last = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    assert r['loss'] == pytest.approx(last['test/loss'], rel=1e-12)


def test_human_readable_table(tiny, capsys):
    root, out, summary = tiny
    main([str(out), '--data_dir', str(root / 'data')])
    text = capsys.readouterr().out
    assert f'top-1 error  {summary["test_top1_error"]:.2f}%' in text
    assert 'top-5 error' in text and 'images/s' in text and 'examples     40' in text
    assert '(the same)' in text and 'per-class accuracy (%):' in text and '| c9 ' in text


def test_untrained_model_by_name(tiny, capsys):
    root, _, _ = tiny
    r = eval_json(['--model', 'rc1_cifar', '--model_kwargs', '{"width": 4}', '--data_dir', str(root / 'data'),
                   '--max_samples', '8', '--batch_size', '3'], capsys)
    assert r['source'] is None and r['examples'] == 8 and 'run_test_top1_error' not in r


# ---- the routine against a direct computation -------------------------------------------------


def _reference(model, split):
    mean, std = model_mean_std(model)
    with torch.no_grad():
        logits = model(normalize(split.images, mean, std))
    top1, top5 = accuracy(logits, split.labels, topk=(1, 5))
    preds = logits.argmax(-1)
    per_class = [100.0 * (preds[split.labels == c] == c).double().mean().item() for c in range(logits.shape[-1])]
    return top1.item(), top5.item(), F.cross_entropy(logits, split.labels).item(), per_class


def test_top5_loss_and_per_class_equal_a_direct_computation(tiny):
    root, out, _ = tiny
    model = load_model(out)
    _, test, num_classes, _ = load_image_splits('cifar10', str(root / 'data'), 1)
    top1, top5, loss, per_class = _reference(model, test)
    mean, std = model_mean_std(model)
    loader = torch.utils.data.DataLoader(BatchedTensorDataset(test), batch_size=7, collate_fn=collate_batch)
    r = evaluate(model, loader, mean=mean, std=std, num_classes=num_classes)
    assert isinstance(r, EvalResult) and not model.training
    assert r.examples == 40 and r.per_class_examples == torch.bincount(test.labels, minlength=10).tolist()
    assert r.top1_correct == round(top1 * 40 / 100) and r.top5_correct == round(top5 * 40 / 100)
    assert r.top1_error == pytest.approx(100 - top1, abs=1e-9)
    assert r.top5_error == pytest.approx(100 - top5, abs=1e-9)
    assert r.loss == pytest.approx(loss, rel=1e-5)
    assert r.per_class_accuracy == pytest.approx(per_class, abs=1e-9)
    # through a (one-process) Accelerator: a prepared loader and gather_for_metrics, the trainer's path
    from accelerate import Accelerator
    try:
        accelerator = Accelerator(cpu=True)
        prepared = accelerator.prepare(loader)
        r2 = evaluate(model, prepared, mean=mean, std=std, num_classes=num_classes, accelerator=accelerator)
    finally:
        reset_accelerate_state()
    assert (r2.top1_correct, r2.top5_correct, r2.examples) == (r.top1_correct, r.top5_correct, r.examples)
    assert r2.loss == pytest.approx(r.loss, rel=1e-9)


def test_few_classes_have_no_top5_and_empty_classes_no_accuracy():
    model = timm.create_model('rc1_cifar', width=4, num_classes=3).train()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 1, 0, 1])  # no example of class 2
    mean, std = model_mean_std(model)
    r = evaluate(model, [(images[:4], labels[:4]), (images[4:], labels[4:])], mean=mean, std=std)
    assert r.top5_error is None and r.top5_correct is None and r.per_class_accuracy[2] is None
    assert r.per_class_examples == [3, 3, 0] and model.training  # the mode is restored
    json.dumps(r.to_dict())


# ---- bad input: one line, exit code 2 ---------------------------------------------------------


def test_bad_input_exits_2_with_a_clear_message(tiny, tmp_path, capsys):
    root, out, _ = tiny
    data = str(root / 'data')
    weights = str(out / 'model.safetensors')
    stray = str(shutil.copy(weights, tmp_path / 'stray.safetensors'))
    (tmp_path / 'garbage.safetensors').write_bytes(b'not a safetensors file')
    (tmp_path / 'notes.txt').write_text('weights? no')
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    unfinished = tmp_path / 'unfinished'
    shutil.copytree(out / 'checkpoints', unfinished / 'checkpoints')
    moved = shutil.copytree(out, tmp_path / 'moved' / 'elsewhere')
    c100 = make_parquet(tmp_path / 'c100', n_train=4, n_test=4, num_classes=100)
    cases = [
        ([str(tmp_path / 'nope')], 'nope does not exist; give a run folder (holding model.safetensors), a weights file '
                                   'or a timm name (e.g. rc4_cifar)\n'),
        (['rc5_cifr'], 'rc5_cifr is neither a file or folder here nor a registered timm name; similar names: '
                       'rc4_cifar, rc2_cifar, rc1_cifar\n'),
        ([str(tmp_path)], 'holds no model.safetensors; give a run folder written by the trainer'),
        ([str(unfinished)], 'the run is not finished: its newest checkpoint is '
                            f'{unfinished}/checkpoints/epoch_0001/model.safetensors'),
        ([], 'error: no model given: give a run folder, a weights file or a timm name (e.g. rc4_cifar)\n'),
        ([stray], 'is a weights file outside a run folder: name its model with --model'),
        (['--model', 'rc5_cifar'], "unknown model 'rc5_cifar'; similar names: rc4_cifar, rc2_cifar, rc1_cifar\n"),
        ([weights, '--model', 'rc4_cifar'], 'do not fit rc4_cifar: size mismatch for conv1.weight'),
        ([str(out), '--model_kwargs', '{"num_classes": 100}'],
         'do not fit the model of ' + str(out / 'config.json') + ' with model_kwargs {"num_classes": 100}: '
                                                                 'size mismatch for fc.weight'),
        ([str(tmp_path / 'garbage.safetensors'), '--model', 'rc4_cifar'],
         f"cannot read weights {tmp_path / 'garbage.safetensors'}: not a valid safetensors file ("),
        ([str(tmp_path / 'notes.txt'), '--model', 'rc4_cifar'],
         f"{tmp_path / 'notes.txt'} is not a weights file: give a run folder, a weights file (.safetensors, .pth, "
         ".pt, .bin) or a timm name (e.g. rc4_cifar)"),
        ([str(tmp_path / 'text.pth'), '--model', 'rc4_cifar'],
         f"cannot read weights {tmp_path / 'text.pth'}: it is neither a safetensors file nor a torch checkpoint "
         "(torch.save's zip format)"),
        ([str(out), '--data_dir', str(c100)],
         f'the model has a 10-class head but {c100} has 100 classes; evaluate it on its own dataset'),
        ([str(out), '--model_kwargs', '{"width": 4'], '--model_kwargs needs a JSON object, e.g. \'{"width": 16}\';'),
        ([str(out), '--model_kwargs', '[4]'], "--model_kwargs needs a JSON object, e.g. '{\"width\": 16}'; got '[4]'"),
        (['--model', 'rc4_cifar', '--model_kwargs', '{"bn_sharing": "half"}'],
         'cannot build rc4_cifar with model_kwargs {\'bn_sharing\': \'half\'}: unknown bn_sharing'),
        ([str(moved)], "the run's data_dir data (relative to where it was trained) does not exist from here"),
        ([str(out), '--data_dir', str(tmp_path / 'nodata')], 'data_dir ' + str(tmp_path / 'nodata') + ' does not'),
        ([str(out), '--split', 'validation'], "argument --split: invalid choice: 'validation' (choose from"),
        ([str(out), '--batch_size', '0'], '--batch_size must be >= 1, got 0'),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(out), '--device', 'cuda'], '--device cuda: CUDA is not available here; use --device cpu'))
    for argv, message in cases:
        err = exits_2(argv, capsys)
        assert message in err, (argv, err)
    with pytest.raises(UserError, match='weights file outside a run folder'):
        load_model(stray)


def test_a_slice_of_the_real_cifar10(capsys):
    if not SHARED_CIFAR10.is_dir():
        pytest.skip(f'{SHARED_CIFAR10} not here')
    r = eval_json(['--model', 'rc1_cifar', '--model_kwargs', '{"width": 4}', '--data_dir', str(SHARED_CIFAR10),
                   '--max_samples', '256', '--device', 'cpu'], capsys)
    assert r['examples'] == 256 and r['class_names'][:2] == ['airplane', 'automobile']
    assert 0 <= r['top5_error'] <= r['top1_error'] <= 100


def test_a_run_from_before_the_block_default_changed_loads_as_preact(tmp_path):
    import shutil
    import timm
    from timm_rc.runs.source import load_model
    model = timm.create_model('rc2_cifar', width=4, block='preact')
    run = tmp_path / 'old'
    from timm.models import save_for_hf
    save_for_hf(model, str(run), model_args={'width': 4}, safe_serialization=True)
    config = json.loads((run / 'config.json').read_text())
    assert config['model_args']['block'] == 'preact'  # recorded since 0.2.0 (RCNet.block)
    del config['model_args']['block']  # 0.1.0 wrote no block
    (run / 'config.json').write_text(json.dumps(config))
    (run / 'run_config.json').write_text(json.dumps({'model': 'rc2_cifar', 'model_kwargs': {'width': 4}}))
    (run / 'summary.json').write_text(json.dumps({'model': 'rc2_cifar', 'versions': {'timm_rc': '0.1.0'}}))
    assert load_model(run).block == 'preact'
    new = tmp_path / 'new'
    shutil.copytree(run, new)
    (new / 'summary.json').write_text(json.dumps({'model': 'rc2_cifar', 'versions': {'timm_rc': '0.2.0'}}))
    assert load_model(new).block == 'postact'


@pytest.mark.parametrize('old,name,new', [
    ('timm_rc.eval', 'evaluate', 'timm_rc.evaluation'), ('timm_rc.eval', 'find_run', 'timm_rc.runs.folder'),
    ('timm_rc.eval', 'load_model', 'timm_rc.runs.source'), ('timm_rc.compress', 'static_int8', 'timm_rc.quantize'),
    ('timm_rc.compress', 'report_models', 'timm_rc.deploy.compression'), ('timm_rc.results', 'table', 'timm_rc.reports.tables'),
    ('timm_rc.plots', 'plot_bn', 'timm_rc.reports.figures'), ('timm_rc.sweep', 'plan', 'timm_rc.train.sweeps'),
    ('timm_rc.train.config', 'TrainConfig', 'timm_rc.runs.config'), ('timm_rc.train.data', 'load_image_splits', 'timm_rc.data'),
    ('timm_rc.train.checkpoint', 'choose_checkpoint', 'timm_rc.runs.checkpoints'),
    ('timm_rc.train', 'main', 'timm_rc.cli.train'), ('timm_rc.train.loop', 'main', 'timm_rc.cli.train'),
    # the modules that moved into subpackages in 0.3.0
    ('timm_rc.create', 'create_model', 'timm_rc.models.create'), ('timm_rc.config', 'load_config', 'timm_rc.runs.config'),
    ('timm_rc.checkpoints', 'latest_checkpoint', 'timm_rc.runs.checkpoints'),
    ('timm_rc.loading', 'load_model', 'timm_rc.runs.source'),
    ('timm_rc.recalibration', 'recalibrate_bn', 'timm_rc.evaluation.recalibration'),
    ('timm_rc.compression', 'model_size', 'timm_rc.deploy.compression'),
    ('timm_rc.convert_weights', 'convert_weights', 'timm_rc.deploy.convert'),
    ('timm_rc.distillation', 'load_teacher', 'timm_rc.train.distillation'),
    ('timm_rc.sweep_runner', 'load_sweep', 'timm_rc.train.sweeps'), ('timm_rc.formatting', 'format_table', 'timm_rc.reports.formatting'),
    ('timm_rc.export', 'export_model', 'timm_rc.deploy.export'),
])
def test_names_of_0_2_0_still_import_with_one_deprecation_warning(old, name, new):
    import importlib
    import sys
    import warnings
    module = importlib.import_module(old)
    module.__dict__.pop(name, None)  # a value kept by an earlier access
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        value = getattr(module, name)
        assert getattr(module, name) is value
    assert value is getattr(importlib.import_module(new), name)
    assert [str(w.message) for w in caught] == [
        f'{old}.{name} moved to {new}.{name} (timm_rc 0.3.0); the old name goes in 0.4.0']
    with pytest.raises(AttributeError, match=f"module '{old}' has no attribute 'no_such_name'"):
        getattr(sys.modules[old], 'no_such_name')


def test_an_old_module_warns_where_it_is_imported_and_gives_its_names_to_import_star():
    """ It warned only when a name was used, and `from timm_rc.sweep_runner import *` imported nothing. """
    import sys
    import warnings
    import timm_rc.train.sweeps
    sys.modules.pop('timm_rc.sweep_runner', None)
    namespace = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        exec('from timm_rc.sweep_runner import *', namespace)
    assert [(str(w.message), w.filename) for w in caught] == [
        ('timm_rc.sweep_runner moved in timm_rc 0.3.0: its names are in timm_rc.train.sweeps; the old module goes '
         'in 0.4.0', '<string>')]  # the importer's line, not importlib's
    public = timm_rc.train.sweeps.__all__
    assert {n: namespace[n] for n in public} == {n: getattr(timm_rc.train.sweeps, n) for n in public}


def test_a_timm_name_is_a_source_as_for_the_other_verbs(tiny, capsys):
    """ `eval rc1_cifar` evaluates the untrained model, as `--model rc1_cifar` does (the help and the
    bad-source message offer a timm name; it said 'rc1_cifar does not exist'). """
    root, out, _ = tiny
    common = ['--model_kwargs', '{"width": 4}', '--data_dir', str(root / 'data'), '--max_samples', '8']
    by_name = eval_json(['rc1_cifar', *common], capsys)
    by_option = eval_json(['--model', 'rc1_cifar', *common], capsys)
    assert (by_name['model'], by_name['params'], by_name['source']) == ('rc1_cifar', by_option['params'], None)
    assert exits_2(['rc1_cifar', '--model', 'rc2_cifar'], capsys) == \
        'error: rc1_cifar is a timm name and --model names another (rc2_cifar); --model is for a weights file\n'
    # the library routine takes the name too, as every verb does (it refused a name that was not a path)
    assert load_model('rc1_cifar', model_kwargs={'width': 4}).num_classes == 10
    assert type(load_model('rc1_cifar', model_kwargs={'width': 4})) is type(load_model(None, 'rc1_cifar'))


def test_what_names_a_model_is_checked_in_the_users_terms(tiny, tmp_path, monkeypatch):
    """ The library's own errors (they were command-line wording, a raw ValueError, or silent). """
    root, out, _ = tiny
    with pytest.raises(UserError, match=r"^model_kwargs must be a dict such as \{\"width\": 16\}, got str "):
        load_model('rc1_cifar', model_kwargs='{"width": 4}')
    with pytest.raises(UserError, match=r"^rc1_cifar has no pretrained tag 'cifar10x'; its tags: cifar10, cifar100$"):
        load_model('rc1_cifar.cifar10x')
    # a misspelled kwarg on a run folder gets the valid keys of the run's model, as on a timm name
    with pytest.raises(UserError, match=r"got an unexpected keyword argument 'widht'; did you mean 'width'\? valid "
                                        r"keys: act_layer, block, "):
        load_model(out, model_kwargs={'widht': 4})
    # a folder named like a timm name hides it: said so
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'rc1_cifar').mkdir()
    with pytest.raises(UserError, match=r"^rc1_cifar holds no model.safetensors; .* rc1_cifar is also a timm name, "
                                        r"which this folder hides: run from another folder, or give --model rc1_cifar$"):
        load_model('rc1_cifar')
    from timm_rc.runs.source import load_spec  # compress report's: run folders and names, never files
    with pytest.raises(UserError, match=r"model.safetensors is a file; give the run folder that holds it, or a timm "
                                        r"name \(e.g. rc4_cifar\)$"):
        load_spec(str(out / 'model.safetensors'))
