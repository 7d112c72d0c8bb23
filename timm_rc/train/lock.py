""" One run per output folder at a time.

The main process holds `run.lock` in the output folder for the whole run: an exclusive `flock` on it
(the kernel drops it when the process dies, however it dies) and, inside, who holds it: pid, host,
the process's start time and its command. A second start is refused and names the holder. A lock
left behind by a process that no longer runs on this host (SIGKILL, a crash) is reported and taken
over; the start time tells a reused pid from the holder. A lock from another host cannot be checked
from here: it is refused, with how to remove it if that run is gone.
"""
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

from ..errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: the pid check alone
    fcntl = None

__all__ = ['LOCK_FILE', 'RunLock', 'run_on_main']

LOCK_FILE = 'run.lock'
T = TypeVar('T')


def _start_ticks(pid: int) -> Optional[int]:
    """ When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22); None if unknown. """
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
        return int(stat.rsplit(')', 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int, start_ticks: Optional[int]) -> bool:
    """ Whether process `pid` of this host still runs and is the one that started at `start_ticks`. """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    now = _start_ticks(pid)
    return start_ticks is None or now is None or now == start_ticks  # another start time: the pid was reused


def _describe(holder: Dict[str, Any]) -> str:
    return (f'process {holder.get("pid")} on host {holder.get("host")} (started {holder.get("started")}: '
            f'{holder.get("command")})')


class RunLock:
    """ `acquire()` on the main process before anything is written to `folder`; `release()` always
    (a no-op when not held). A folder that `acquire` created is removed again by `release` if the run
    left nothing in it (a start that failed). """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: Optional[int] = None
        self.created: List[Path] = []

    def _holder(self, fd: int) -> Optional[Dict[str, Any]]:
        """ The lock's content: {} when empty, None when unreadable. """
        text = os.pread(fd, 1 << 16, 0).decode(errors='replace').strip()
        if not text:
            return {}
        try:
            holder = json.loads(text)
            return holder if isinstance(holder, dict) and isinstance(holder.get('pid'), int) else None
        except ValueError:
            return None

    def acquire(self) -> None:
        p = self.folder
        while not p.exists():
            self.created.append(p)  # deepest first
            p = p.parent
        if not p.is_dir():  # the output folder, or a folder above it, is a file
            self.created.clear()
            if p == self.folder:
                raise UserError(f'output_dir {p} is a file, not a folder: choose another output_dir')
            raise UserError(f'{p} is a file, so output_dir {self.folder} cannot be created below it: choose another '
                            f'output_dir')
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                self.release()
                raise UserError(f'cannot create the run lock {self.path}: {e.strerror or e}') from None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd) or {}
                os.close(fd)
                raise UserError(f'{self.folder} is in use by {_describe(holder)}: one run per output_dir at a time; '
                                f'wait for it to finish or stop it') from None
            try:  # the holder may have released (removed) the file between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = self._holder(fd)
        host = socket.gethostname()
        if holder:
            if holder.get('host') != host:
                os.close(fd)
                raise UserError(f'{self.folder} is locked by {_describe(holder)}, which cannot be checked from host '
                                f'{host}; if that run is gone, delete {self.path} and start again')
            if _running(holder['pid'], holder.get('start_ticks')):  # flock taken although it runs: no flock here
                os.close(fd)
                raise UserError(f'{self.folder} is in use by {_describe(holder)}: one run per output_dir at a time; '
                                f'wait for it to finish or stop it')
            print(f'warning: taking over the stale lock {self.path}: {_describe(holder)} is no longer running',
                  file=sys.stderr, flush=True)
        elif holder is None:
            print(f'warning: taking over the unreadable lock {self.path}', file=sys.stderr, flush=True)
        me = dict(pid=os.getpid(), host=host, start_ticks=_start_ticks(os.getpid()),
                  started=time.strftime('%Y-%m-%d %H:%M:%S'), command=' '.join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.remove(self.path)
            except OSError:
                pass
            os.close(self.fd)  # drops the flock
            self.fd = None
        for d in self.created:  # a failed start leaves no empty folder behind
            try:
                d.rmdir()
            except OSError:
                break
        self.created = []


def run_on_main(accelerator, fn: Callable[[], T]) -> T:
    """ Run `fn` on the main process only, while the others wait for it; every process then returns its
    result or stops with its error (so all stop together). The result must be picklable. """
    result, error, failure = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:
            failure, error = e, str(e) if isinstance(e, UserError) else f'the main process failed: {e!r}'
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        result, error = broadcast_object_list([result, error])
    if failure is not None:
        raise failure
    if error is not None:
        raise UserError(error)
    return result
