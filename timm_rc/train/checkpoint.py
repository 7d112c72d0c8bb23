""" Epoch checkpoints that are either complete or absent.

`accelerator.save_state` writes into a hidden `.tmp-epoch_N` folder; only when every process has
finished does the main process add `trainer_state.json` and rename the folder to `epoch_N` (a rename
is atomic). A process killed while writing leaves a `.tmp-*` folder that resume ignores and removes.
Accelerate's automatic checkpoint naming cannot give that guarantee (its newest folder may be a
partial one), so naming and rotation are done here, in a few lines.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import UserError

__all__ = ['complete_checkpoints', 'latest_checkpoint', 'save_checkpoint', 'read_trainer_state', 'fault']

STATE_FILE = 'trainer_state.json'
PREFIX = 'epoch_'


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


def save_checkpoint(accelerator, ckpt_dir: Path, epoch: int, state: Dict[str, Any], keep: int) -> Path:
    """ Save after `epoch` epochs; keep the newest `keep` complete checkpoints. """
    final = ckpt_dir / f'{PREFIX}{epoch:04d}'
    tmp = ckpt_dir / f'.tmp-{final.name}'
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
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
