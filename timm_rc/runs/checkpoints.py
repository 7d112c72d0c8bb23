""" Epoch checkpoints that are either complete or absent, and verified before they are trusted.

`accelerator.save_state` writes into a hidden `.tmp-epoch_N` folder; only when every process has
finished does the main process add `trainer_state.json`, then `manifest.json` (the size and sha256 of
every file, written last) and rename the folder to `epoch_N` (a rename is atomic). A process killed
while writing leaves a `.tmp-*` folder that resume ignores and removes. Accelerate's automatic
checkpoint naming cannot give that guarantee (its newest folder may be a partial one), so naming and
rotation are done here, in a few lines.

A checkpoint damaged later (a truncated file, a broken `trainer_state.json`) fails its manifest;
`--resume` then takes the newest good one and renames the broken one `broken-epoch_N` (kept, never
deleted, and out of the rotation). Checkpoints from before the manifest are checked by reading every
file.
"""
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ..errors import UserError

__all__ = ['complete_checkpoints', 'latest_checkpoint', 'save_checkpoint', 'read_trainer_state', 'fault',
           'checkpoint_problem', 'choose_checkpoint', 'WriteFailed', 'writing']

STATE_FILE = 'trainer_state.json'
MANIFEST = 'manifest.json'
PREFIX = 'epoch_'
BROKEN = 'broken-'


class WriteFailed(UserError):
    """ A file of the run could not be written (disk full, no permission); the complete checkpoints are
    untouched, so the run resumes from the newest one. """


def fault(point: str) -> None:
    """ Test hook: `TIMM_RC_FAULT=<point>` SIGKILLs this process at that point (see tests). """
    if os.environ.get('TIMM_RC_FAULT') == point:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def complete_checkpoints(ckpt_dir: Path) -> List[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def remove_partial(ckpt_dir: Path) -> None:
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob('.tmp-*'):
            shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    manifest = {str(p.relative_to(folder)): dict(size=p.stat().st_size, sha256=_sha256(p)) for p in files}
    (folder / MANIFEST).write_text(json.dumps(dict(files=manifest), indent=2))


def write_failed(what: str, path: Path, error: BaseException, ckpt_dir: Path) -> WriteFailed:
    """ The one line for a failed write: what, where, the newest complete checkpoint, how to resume. """
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        if error.filename is not None and Path(error.filename) != Path(path):
            reason += f' ({error.filename})'
    else:
        reason = f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
    newest = latest_checkpoint(ckpt_dir)
    if newest is None:
        kept = 'no epoch has a complete checkpoint yet, so --resume starts from scratch'
    else:
        kept = f'the newest complete checkpoint is {newest}, untouched'
    return WriteFailed(f'could not write {what} {path}: {reason}; {kept}. Free space (or fix permissions), then '
                       f'rerun the same command with --resume')


@contextmanager
def writing(what: str, path: Path, ckpt_dir: Path, tmp: Optional[Path] = None) -> Iterator[None]:
    """ Turn a failed write (OSError, or torch's RuntimeError from its C++ writer) into `WriteFailed`,
    removing the temporary folder `tmp` first. """
    try:
        yield
    except (OSError, RuntimeError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(what, path, e, ckpt_dir) from None


def usual_mode(*paths: Path) -> None:
    """ Give files (and the files below folders) the mode every other file gets, 0666 less the umask.
    safetensors (0.8) writes its files 0600, so other users of a shared machine could not read trained
    weights that every other file of the run lets them read. """
    mask = os.umask(0)
    os.umask(mask)
    for path in map(Path, paths):
        for f in ([path] if path.is_file() else path.rglob('*') if path.is_dir() else []):
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~mask)


def save_checkpoint(accelerator, ckpt_dir: Path, epoch: int, state: Dict[str, Any], keep: int) -> Path:
    """ Save after `epoch` epochs; keep the newest `keep` complete checkpoints. A failed write removes its
    temporary folder and raises `WriteFailed`. """
    final = ckpt_dir / f'{PREFIX}{epoch:04d}'
    tmp = ckpt_dir / f'.tmp-{final.name}'
    if accelerator.is_main_process:
        with writing('checkpoint', final, ckpt_dir, tmp):
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing('checkpoint', final, ckpt_dir, tmp):
        accelerator.save_state(str(tmp))
        usual_mode(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writing('checkpoint', final, ckpt_dir, tmp):
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            _write_manifest(tmp)  # last: a folder with a valid manifest was written completely
            fault('save')
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        for old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: Path) -> Dict[str, Any]:
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise UserError(f'{path} is not a complete timm_rc checkpoint (no {STATE_FILE})')
    return json.loads(state_file.read_text())


def _first_line(e: BaseException) -> str:
    """ `Type: first sentence` of an exception (torch's run on for several). """
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0].split(". ")[0]}' if text else type(e).__name__


def _read_every_file(path: Path) -> Optional[str]:
    """ A checkpoint without a manifest (written before there was one): read each file as resume would. """
    import torch
    from safetensors.torch import load_file
    for f in sorted(p for p in path.rglob('*') if p.is_file()):
        try:
            if f.suffix == '.safetensors':
                load_file(str(f))
            elif f.suffix in ('.bin', '.pkl', '.pt', '.pth'):
                torch.load(f, map_location='cpu', weights_only=False)  # our own files, as Accelerate loads them
        except Exception as e:  # any failure to read means resume would fail on it
            return f'{f.relative_to(path)} cannot be read ({_first_line(e)})'
    return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """ What is wrong with checkpoint `path` (a few words), or None when it is good. """
    manifest_file = path / MANIFEST
    if manifest_file.is_file():
        try:
            files = json.loads(manifest_file.read_text())['files']
            expected = {name: (int(v['size']), str(v['sha256'])) for name, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f'its {MANIFEST} is unreadable ({_first_line(e)})'
        for name, (size, digest) in expected.items():
            f = path / name
            if not f.is_file():
                return f'{name} is missing'
            actual = f.stat().st_size
            if actual != size:
                return f'{name} has {actual:,} bytes, {size:,} when saved'
            if _sha256(f) != digest:
                return f'{name} does not match the checksum recorded when saved'
    else:
        problem = _read_every_file(path)
        if problem is not None:
            return problem
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get('epoch'), int):
            return f'{STATE_FILE} holds no epoch'
    except (OSError, ValueError) as e:
        return f'{STATE_FILE} is unreadable ({_first_line(e)})'
    return None


def _set_aside(path: Path) -> Path:
    """ Rename a broken checkpoint out of resume's and rotation's way; it is kept for the user. """
    target = path.with_name(BROKEN + path.name)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f'{BROKEN}{path.name}.{n}')
    os.replace(path, target)
    return target


def choose_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """ The newest good checkpoint in `ckpt_dir`, or None when there is none at all.

    Newer broken ones are renamed `broken-epoch_N` (so that rotation, which counts `epoch_*` folders,
    never drops a good checkpoint to keep a broken one) with a warning that says why. When every
    checkpoint is broken nothing is renamed and a `UserError` lists what is wrong with each.
    """
    broken = []
    for ckpt in reversed(complete_checkpoints(ckpt_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            for bad, why in broken:
                kept = _set_aside(bad)
                print(f'warning: checkpoint {bad} is broken ({why}); kept as {kept.name}, resuming from {ckpt.name}',
                      file=sys.stderr, flush=True)
            return ckpt
        broken.append((ckpt, problem))
    if broken:
        raise UserError(f'no usable checkpoint in {ckpt_dir}: ' + '; '.join(f'{c.name}: {why}' for c, why in broken)
                        + '. Move them away to start afresh, or start in another output_dir')
    return None
