""" Checkpoints verified before resume, one run per output folder, failed writes. CPU only. """
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import TINY, make_parquet, run, run_main
from timm_rc.train import UserError
from timm_rc.runs.checkpoints import MANIFEST, checkpoint_problem, choose_checkpoint
from timm_rc.train.lock import LOCK_FILE, RunLock

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def argv(data, out, *extra):
    return ['--data_dir', str(data), '--epochs', '2', '--output_dir', str(out), *TINY, *extra]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_parquet(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
    """ An uninterrupted 2-epoch run: checkpoints epoch_0001 and epoch_0002, and the weights to match. """
    out = tmp_path_factory.mktemp('ref') / 'run'
    run(argv(data, out))
    return out


@pytest.fixture
def copy(reference, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(reference, out)
    return out


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / 'model.safetensors')), load_file(str(b / 'model.safetensors'))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def truncate(path: Path, size: int = 1000) -> int:
    saved = path.stat().st_size
    with open(path, 'r+b') as f:
        f.truncate(size)
    return saved


def epochs_logged(out: Path):
    return [json.loads(line)['epoch'] for line in (out / 'metrics.jsonl').read_text().splitlines()]


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


# ---- 5. a checkpoint is verified before it is trusted ----------------------------------------


def test_a_checkpoint_records_the_size_and_sha256_of_every_file(reference):
    ckpt = reference / 'checkpoints' / 'epoch_0002'
    files = json.loads((ckpt / MANIFEST).read_text())['files']
    assert sorted(files) == sorted(p.name for p in ckpt.iterdir() if p.name != MANIFEST)
    assert {'model.safetensors', 'optimizer.bin', 'scheduler.bin', 'random_states_0.pkl',
            'trainer_state.json'} <= set(files)
    for name, entry in files.items():
        assert entry == dict(size=(ckpt / name).stat().st_size,
                             sha256=hashlib.sha256((ckpt / name).read_bytes()).hexdigest())
    assert checkpoint_problem(ckpt) is None
    assert not (reference / LOCK_FILE).exists()  # released at the end of the run


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize('damage,problem', [
    (lambda c: truncate(c / 'model.safetensors'), 'model.safetensors has 1,000 bytes, {size:,} when saved'),
    (lambda c: truncate(c / 'optimizer.bin'), 'optimizer.bin has 1,000 bytes, {size:,} when saved'),
    (lambda c: truncate(c / 'scheduler.bin', 10), 'scheduler.bin has 10 bytes, {size:,} when saved'),
    (lambda c: (c / 'trainer_state.json').write_text('{"epoch": 2, "glo'),
     'trainer_state.json has 17 bytes, {size:,} when saved'),
    (lambda c: _flip_a_byte(c / 'model.safetensors'), 'model.safetensors does not match the checksum recorded when '
                                                       'saved'),
    (lambda c: (c / 'random_states_0.pkl').unlink(), 'random_states_0.pkl is missing'),
    (lambda c: (c / MANIFEST).write_text('{"files": {"model.saf'),
     'its manifest.json is unreadable (JSONDecodeError: Unterminated string starting at: line 1 column 12 (char 11))'),
])
def test_each_kind_of_damage_is_found_and_named(damage, problem, copy):
    ckpt = copy / 'checkpoints' / 'epoch_0002'
    sizes = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    damage(ckpt)
    name = problem.split()[0]
    assert checkpoint_problem(ckpt) == problem.format(size=sizes.get(name, 0))


@pytest.mark.parametrize('damage,problem', [
    (lambda c: None, None),  # a good checkpoint from before the manifest is trusted as before
    (lambda c: truncate(c / 'optimizer.bin'), 'optimizer.bin cannot be read (RuntimeError: PytorchStreamReader '
                                              'failed reading zip archive: failed finding central directory)'),
    (lambda c: truncate(c / 'model.safetensors'), 'model.safetensors cannot be read (SafetensorError: Error while '
                                                  'deserializing header: invalid header length)'),
    (lambda c: (c / 'trainer_state.json').write_text('{"epoch": 2, "glo'),
     'trainer_state.json is unreadable (JSONDecodeError: Unterminated string starting at: line 1 column 14 (char 13))'),
])
def test_a_checkpoint_without_a_manifest_is_checked_by_reading_it(damage, problem, copy):
    ckpt = copy / 'checkpoints' / 'epoch_0002'
    (ckpt / MANIFEST).unlink()  # as written before manifests existed
    damage(ckpt)
    assert checkpoint_problem(ckpt) == problem


def test_resume_falls_back_from_a_broken_checkpoint_and_keeps_it(data, reference, copy, capsys):
    ckpts = copy / 'checkpoints'
    size = truncate(ckpts / 'epoch_0002' / 'optimizer.bin')
    summary = run(argv(data, copy, '--resume'))
    captured = capsys.readouterr()
    assert (f'warning: checkpoint {ckpts / "epoch_0002"} is broken (optimizer.bin has 1,000 bytes, {size:,} when '
            f'saved); kept as broken-epoch_0002, resuming from epoch_0001\n') in captured.err
    assert f'resumed from {ckpts / "epoch_0001"} (epoch 1, step 6)' in captured.out
    assert summary['epochs_completed'] == 2 and same_weights(reference, copy)
    assert epochs_logged(copy) == [1, 2]
    # the broken one is kept, out of the rotation (keep_checkpoints=2 keeps two good ones)
    assert sorted(p.name for p in ckpts.iterdir()) == ['broken-epoch_0002', 'epoch_0001', 'epoch_0002']
    assert (ckpts / 'broken-epoch_0002' / 'optimizer.bin').stat().st_size == 1000


def test_an_old_checkpoint_without_a_manifest_resumes_and_falls_back(data, reference, copy, capsys):
    ckpts = copy / 'checkpoints'
    for c in ckpts.iterdir():
        (c / MANIFEST).unlink()
    run(argv(data, copy, '--resume'))  # epoch 2 of 2 is done: loads it, trains nothing
    captured = capsys.readouterr()
    assert f'resumed from {ckpts / "epoch_0002"} (epoch 2, step 12)' in captured.out
    assert 'warning' not in captured.err and same_weights(reference, copy)
    truncate(ckpts / 'epoch_0002' / 'scheduler.bin', 10)
    run(argv(data, copy, '--resume'))
    captured = capsys.readouterr()
    assert (f'warning: checkpoint {ckpts / "epoch_0002"} is broken (scheduler.bin cannot be read (RuntimeError: '
            f'PytorchStreamReader failed reading zip archive: not a ZIP archive)); kept as '
            f'broken-epoch_0002, resuming from epoch_0001\n') in captured.err
    assert same_weights(reference, copy) and (ckpts / 'epoch_0002' / MANIFEST).is_file()


def test_no_good_checkpoint_is_one_line_naming_each_problem(data, copy, capsys):
    ckpts = copy / 'checkpoints'
    size = truncate(ckpts / 'epoch_0002' / 'model.safetensors')
    (ckpts / 'epoch_0001' / MANIFEST).unlink()
    (ckpts / 'epoch_0001' / 'trainer_state.json').write_text('')
    before = sorted(p.name for p in ckpts.iterdir())
    code, err = run_main(argv(data, copy, '--resume'), capsys)
    assert code == 2
    assert err == (f'error: no usable checkpoint in {ckpts}: epoch_0002: model.safetensors has 1,000 bytes, '
                   f'{size:,} when saved; epoch_0001: trainer_state.json is unreadable (JSONDecodeError: Expecting '
                   f'value: line 1 column 1 (char 0)). Move them away to start afresh, or start in another '
                   f'output_dir\n')
    assert sorted(p.name for p in ckpts.iterdir()) == before  # nothing renamed, nothing deleted
    assert not (copy / LOCK_FILE).exists()
    # a broken checkpoint named explicitly is refused, not replaced by another one
    code, err = run_main(argv(data, copy, '--resume', str(ckpts / 'epoch_0002')), capsys)
    assert code == 2
    assert err == (f'error: resume checkpoint {ckpts / "epoch_0002"} is broken: model.safetensors has 1,000 bytes, '
                   f'{size:,} when saved; resume with --resume (the newest good checkpoint) or name another one\n')


def test_a_second_broken_copy_of_an_epoch_gets_its_own_name(copy, capsys):
    ckpts = copy / 'checkpoints'
    (ckpts / 'broken-epoch_0002').mkdir()  # from an earlier incident
    (ckpts / 'epoch_0002' / 'scheduler.bin').unlink()
    assert choose_checkpoint(ckpts) == ckpts / 'epoch_0001'
    assert 'kept as broken-epoch_0002.2, resuming from epoch_0001' in capsys.readouterr().err
    assert sorted(p.name for p in ckpts.iterdir()) == ['broken-epoch_0002', 'broken-epoch_0002.2', 'epoch_0001']


# ---- 8. one run per output folder ----------------------------------------------------------------


def _wait_for_lock(out: Path, pid: int, proc, timeout=120.0) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            holder = json.loads((out / LOCK_FILE).read_text())
            if holder['pid'] == pid:
                return holder
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    raise AssertionError('the run never took its lock')


def test_a_second_run_in_a_busy_folder_is_refused_and_touches_nothing(data, tmp_path, capsys):
    out = tmp_path / 'run'
    env = dict(os.environ)
    env.pop('TIMM_RC_FAULT', None)
    first = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *argv(data, out, '--epochs', '1')], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = _wait_for_lock(out, first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-start, lock taken
        (out / 'checkpoints' / '.tmp-epoch_0009').mkdir(parents=True)  # a second start must not clean up here
        before = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob('*'))
        code, err = run_main(argv(data, out, '--resume'), capsys)
        assert code == 2
        assert err == (f'error: {out} is in use by process {first.pid} on host {HOST} (started {holder["started"]}: '
                       f'{holder["command"]}): one run per output_dir at a time; wait for it to finish or stop it\n')
        assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob('*')) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    assert epochs_logged(out) == [1] and not (out / LOCK_FILE).exists()


def _write_lock(out: Path, **holder) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    holder = dict(dict(host=HOST, start_ticks=None, started='2020-01-02 03:04:05', command='train.py --epochs 9'),
                  **holder)
    (out / LOCK_FILE).write_text(json.dumps(holder))
    return out / LOCK_FILE


def test_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(data, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    out = tmp_path / 'run'
    lock = _write_lock(out, pid=dead.pid)
    summary = run(argv(data, out, '--epochs', '1', '--max_steps', '1'))
    assert summary['global_step'] == 1
    assert (f'warning: taking over the stale lock {lock}: process {dead.pid} on host {HOST} (started '
            f'2020-01-02 03:04:05: train.py --epochs 9) is no longer running\n') in capsys.readouterr().err
    assert not lock.exists()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path, capsys):
    from timm_rc.train.lock import _start_ticks
    sleeper = subprocess.Popen(['sleep', '60'])
    try:
        ticks = _start_ticks(sleeper.pid)
        assert ticks is not None
        _write_lock(tmp_path, pid=sleeper.pid, start_ticks=ticks)  # alive: in use (the pid check alone)
        with pytest.raises(UserError, match=f'is in use by process {sleeper.pid} on host'):
            RunLock(tmp_path).acquire()
        lock = _write_lock(tmp_path, pid=sleeper.pid, start_ticks=ticks - 1)  # another process with that pid
        held = RunLock(tmp_path)
        held.acquire()
        assert 'is no longer running' in capsys.readouterr().err
        assert json.loads(lock.read_text())['pid'] == os.getpid()
        with pytest.raises(UserError, match=f'is in use by process {os.getpid()} on host {HOST}'):
            RunLock(tmp_path).acquire()  # the flock: a second holder even in this process
        held.release()
        assert not lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(data, tmp_path, capsys):
    out = tmp_path / 'run'
    lock = _write_lock(out, pid=4242, host='gpu-node-7')
    content = lock.read_bytes()
    code, err = run_main(argv(data, out, '--resume'), capsys)
    assert code == 2
    assert err == (f'error: {out} is locked by process 4242 on host gpu-node-7 (started 2020-01-02 03:04:05: '
                   f'train.py --epochs 9), which cannot be checked from host {HOST}; if that run is gone, delete '
                   f'{lock} and start again\n')
    assert lock.read_bytes() == content


def test_a_failed_start_leaves_no_folder_and_no_lock(data, tmp_path, capsys):
    out = tmp_path / 'new' / 'seed0'
    code, err = run_main(argv(data, out, '--model', 'rc5_cifar'), capsys)
    assert code == 2 and "unknown model 'rc5_cifar'" in err
    assert not (tmp_path / 'new').exists()


# ---- 9. a failed write says what failed and how to resume ------------------------------------


def test_a_failed_checkpoint_write_is_one_line_and_resume_is_bit_identical(data, reference, tmp_path, capsys,
                                                                            monkeypatch):
    from accelerate import Accelerator
    save_state, calls = Accelerator.save_state, []

    def save_state_then_fail(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        save_state(self, output_dir, **kwargs)
        if len(calls) == 2:  # the write of epoch 2 fails after writing some files
            raise RuntimeError('basic_ios::clear: iostream error')

    monkeypatch.setattr(Accelerator, 'save_state', save_state_then_fail)
    out = tmp_path / 'run'
    code, err = run_main(argv(data, out), capsys)
    assert code == 2 and 'Traceback' not in err
    ckpts = out / 'checkpoints'
    assert last_line(err) == (
        f'error: could not write checkpoint {ckpts / "epoch_0002"}: RuntimeError: basic_ios::clear: iostream error; '
        f'the newest complete checkpoint is {ckpts / "epoch_0001"}, untouched. Free space (or fix permissions), then '
        f'rerun the same command with --resume')
    assert sorted(p.name for p in ckpts.iterdir()) == ['epoch_0001']  # the temporary folder is gone
    assert not (out / LOCK_FILE).exists()
    monkeypatch.undo()
    run(argv(data, out, '--resume'))
    assert same_weights(reference, out) and epochs_logged(out) == [1, 2]


def _dev_full(path: Path) -> None:
    path.symlink_to('/dev/full')  # every write: ENOSPC, No space left on device


def _a_folder(path: Path) -> None:
    path.mkdir()
    (path / 'keep').touch()


@pytest.mark.parametrize('block,what,path,reason', [
    (lambda o: _dev_full(o / 'metrics.jsonl'), 'metrics', 'metrics.jsonl', 'No space left on device'),
    (lambda o: _dev_full(o / 'summary.json'), 'the summary', 'summary.json', 'No space left on device'),
    (lambda o: (o / 'bn_stats').touch(), 'BN statistics', 'bn_stats/epoch_0001.safetensors',
     'File exists ({out}/bn_stats)'),
    (lambda o: _a_folder(o / 'config.json'), 'the final model', 'model.safetensors',
     'Is a directory ({out}/config.json)'),
])
def test_each_failed_write_names_what_where_and_how_to_resume(block, what, path, reason, data, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    block(out)
    # --resume: a summary.json in the way would otherwise count as a run to protect
    code, err = run_main(argv(data, out, '--resume', '--epochs', '1', '--max_steps', '1'), capsys)
    assert code == 2 and 'Traceback' not in err
    assert last_line(err) == (
        f'error: could not write {what} {out / path}: {reason.format(out=out)}; no epoch has a complete checkpoint '
        f'yet, so --resume starts from scratch. Free space (or fix permissions), then rerun the same command with '
        f'--resume')
    assert not (out / LOCK_FILE).exists()
