"""nnU-Net's folder variables (reading them for the user, setting them for the console scripts we run), the
output files and folders our commands write, and the signal handling that keeps those writes whole (SIGTERM as an
interrupt, interrupts held back during a swap)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.trainer_discovery import ext_trainer_path

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
AT_FDCWD, RENAME_EXCHANGE = -100, 2
UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def required_folder(name: str) -> Path:
    """The folder in environment variable ``name`` (one of NNUNET_FOLDERS); InputError if it is unset."""
    value = os.environ.get(name)
    if not value:
        raise InputError(f"{name} is not set; export it to nnU-Net's {name.removeprefix('nnUNet_')} folder")
    return Path(value)


def cli_environment(root: Path) -> dict[str, str]:
    """os.environ plus nnU-Net's three folders created under ``root``, our trainers discoverable, 2 worker processes
    for nnU-Net's pools, and no ``nnUNet_n_proc_DA`` (nnU-Net 2.8.1's planner crashes with 0; set it for training)."""
    env = dict(os.environ, nnUNet_extTrainer=str(ext_trainer_path()), nnUNet_def_n_proc="2", PYTHONUNBUFFERED="1")
    for name in NNUNET_FOLDERS:
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    env.pop("nnUNet_n_proc_DA", None)
    return env


def output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` created if needed (with its parents); InputError naming it if that fails or it is not a folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{path}: {what} exists and is not a folder") from None
    except OSError as e:
        raise InputError(f"{path}: cannot create the {what} ({e.strerror or e})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{path}: {what} is not writable")
    return path


def check_output_file(path: str | os.PathLike) -> Path:
    """``path`` if a file can be written there (checked before any work): not a folder, and its nearest existing
    ancestor a writable folder (the missing ones are created on writing). InputError naming the problem."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: output file is an existing folder")
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: output file exists and is not a regular file")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{path}: cannot write the output file: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write the output file: {ancestor} is not writable")
    return path


def read_json(path: Path, what: str, expected: type | None = None):
    """The parsed JSON file ``path`` (``what`` it should be, with its article, for messages); InputError naming the
    file when it cannot be read, is not JSON or (``expected``) not of that type."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not readable as {what} ({e})") from e
    if expected is not None and not isinstance(content, expected):
        raise InputError(f"{path}: not {what} (a JSON {expected.__name__} expected, found "
                         f"{type(content).__name__})")
    return content


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so that a reader (or a crash) sees the
    old file or the new one, never a part; InputError naming the file if it cannot be written."""
    path = Path(path)
    folder = output_folder(path.parent)
    try:
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from e
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException as e:  # also Ctrl-C / SIGTERM: no temporary file is left
        Path(temporary).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise InputError(f"{path}: cannot write ({e.strerror or e})") from e
        raise


@lru_cache(maxsize=1)
def _pid_space_tag() -> str:
    """12 hex digits naming this host and PID namespace (containers sharing a host name have their own PIDs): the
    same for every process that can see this one's PID, and of a fixed width, so no other tag starts with it."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        namespace = 0
    return hashlib.sha1(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:12]


def staging_owner(pid: int | None = None) -> str:
    """``<pid>_<tag>``: the process (this one by default) that a staging folder's name says it belongs to."""
    return f"{os.getpid() if pid is None else pid}_{_pid_space_tag()}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def remove_dead_stagings(parent: Path, prefix: str) -> None:
    """Remove the staging folders ``<prefix><staging_owner>_<token>`` in ``parent`` of processes on this host (and
    PID namespace) that are gone (killed with SIGKILL: nothing else leaves one); those of live processes and of other
    hosts or containers stay."""
    ours = re.compile(rf"{re.escape(prefix)}(\d+)_{_pid_space_tag()}_")
    for entry in parent.glob(f"{glob.escape(prefix)}*"):
        match = ours.match(entry.name)
        if match and not _process_exists(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def staging_folder(parent: Path, name: str) -> Path:
    """A new hidden ``.NAME.tmp-<staging_owner>_<token>`` folder in ``parent`` (where a folder NAME is to appear):
    ``prefixed_staging_folder`` with prefix ``.NAME.tmp-``."""
    return prefixed_staging_folder(parent, f".{name}.tmp-")


def prefixed_staging_folder(parent: Path, prefix: str) -> Path:
    """A new ``<prefix><staging_owner>_<token>`` folder in ``parent`` with the permissions of a folder made by mkdir,
    after removing those of killed processes; InputError naming ``parent`` if it cannot be made."""
    remove_dead_stagings(parent, prefix)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{staging_owner()}_", dir=parent))
    except OSError as e:
        raise InputError(f"{parent}: cannot create a folder there ({e.strerror or e})") from e
    umask = os.umask(0o022)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    return folder


@lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` atomically; False where the OS or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def remove_path(path: Path) -> None:
    """Remove ``path``: a folder with everything in it, or a file or symbolic link (never what a link points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def _signal_handlers(handlers: dict):
    """``handlers`` ({signal: handler}) installed for the block, the previous ones put back after it (main thread
    only, where Python runs every signal handler; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt."""


def _terminate(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


def sigterm_as_interrupt():
    """Within the block (main thread only), SIGTERM (``kill``, SLURM, docker) raises Terminated, a KeyboardInterrupt,
    so that the same clean-up runs as for Ctrl-C."""
    return _signal_handlers({signal.SIGTERM: _terminate})


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM recorded instead of handled during the block and raised again on leaving it, under the
    handlers of before (main thread only; elsewhere a no-op): a swap and what must follow it complete together, an
    interrupt lands after them. Python runs signal handlers in the main thread whichever thread receives the
    signal, so the handlers are swapped rather than the thread's signal mask."""
    pending: list[int] = []
    with _signal_handlers({s: lambda signum, frame: pending.append(signum) for s in (signal.SIGINT, signal.SIGTERM)}):
        yield
    for signum in dict.fromkeys(pending):
        signal.raise_signal(signum)


def replace_folder(staged: Path, target: Path, on_swap: Callable[[], None] = lambda: None,
                   on_replaced: Callable[[], None] = lambda: None) -> list[str]:
    """Give the complete ``staging_folder`` ``staged`` the name ``target``, replacing an existing ``target`` (a
    symbolic link is replaced, not followed); ``staged`` is gone afterwards, or holds the previous folder if that
    could not be removed. Where the OS can, the two swap names atomically (one complete folder under the name at
    every instant); elsewhere the old folder is first renamed to ``.NAME.old-<token>`` and put back if the second
    rename fails (a crash between the two leaves both, for the caller to recover). ``on_swap`` (a test hook) runs
    right after the exchange or between the two renames; ``on_replaced`` once the name holds the new folder. From
    the first rename to the end of ``on_replaced`` SIGINT and SIGTERM are held back. Once the new folder is in
    place, a previous one that cannot be removed is left under its hidden name: returns a note saying so."""
    old = None
    try:
        with signals_held():
            if not os.path.lexists(target):
                os.rename(staged, target)
            elif exchange(staged, target):
                old = staged
                on_swap()
            else:
                stem, _, token = staged.name.rpartition(".tmp-")
                old = staged.with_name(f"{stem}.old-{token}")
                os.rename(target, old)
                try:
                    on_swap()
                    os.rename(staged, target)
                except BaseException:
                    os.rename(old, target)
                    raise
            on_replaced()
    finally:  # also when an interrupt held back during the swap is raised on leaving it
        error = None if old is None or not os.path.lexists(old) else try_remove(old)
    return [] if error is None else [f"{target} is in place, but the previous {target.name} could not be removed "
                                     f"from {old} ({error.strerror or error}): remove it yourself"]


def try_remove(path: Path) -> OSError | None:
    """``remove_path(path)``; the error instead of raising it, None when it went."""
    try:
        remove_path(path)
    except OSError as e:
        return e
    return None


class StagedFolder:
    """``with StagedFolder(target) as folder:`` write into ``folder``, a ``staging_folder`` beside ``target``. When
    the block ends without an exception the folder replaces ``target`` (``replace_folder`` with ``on_swap`` and
    ``on_replaced``; its notes are left in ``.notes``); when it raises, the folder is removed and ``target`` stays
    as it was. ``check_replaceable`` says beforehand whether ``target`` can be replaced."""

    def __init__(self, target: Path, on_swap: Callable[[], None] = lambda: None,
                 on_replaced: Callable[[], None] = lambda: None):
        self.target, self.notes = Path(os.path.abspath(target)), []  # "." gets its name
        self.on_swap, self.on_replaced = on_swap, on_replaced

    def __enter__(self) -> Path:
        self.staged = staging_folder(output_folder(self.target.parent), self.target.name)
        return self.staged

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staged, ignore_errors=True)
            return
        try:
            self.notes = replace_folder(self.staged, self.target, self.on_swap, self.on_replaced)
        except BaseException as e:  # the new folder, where the swap did not happen (replace_folder removes an old one)
            with contextlib.suppress(OSError):
                remove_path(self.staged)
            if isinstance(e, OSError):
                raise InputError(f"{self.target}: cannot move the new folder into place ({e})") from e
            raise

    @staticmethod
    def check_replaceable(target: Path, what: str) -> None:
        """InputError if an existing folder ``target`` cannot be replaced as a whole: a mount point (a volume cannot
        be renamed), or a parent folder that is not writable."""
        target = Path(os.path.abspath(target))
        if os.path.ismount(target):
            raise InputError(f"{target}: {what} is a mount point, which cannot be replaced as a whole; give a folder "
                             "inside it")
        if target.exists() and not os.access(target.parent, os.W_OK | os.X_OK):
            raise InputError(f"{target}: cannot replace the {what}: {target.parent} is not writable")
