"""Exclusive, crash-safe writing of one dataset folder in ``$nnUNet_raw`` (POSIX).

- ``DatasetLock``: an ``flock`` on ``$nnUNet_raw/.DatasetXXX.lock``, one per dataset ID whatever the name. The kernel
  releases it when its process dies, however it dies; a second conversion of the ID fails at once.
- A dataset is built in a hidden ``paths.StagedFolder`` ``.DatasetXXX_Name.tmp-<token>`` beside its final place
  and replaces it (``paths.replace_folder``) only when complete. Where the OS can (Linux:
  ``renameat2(RENAME_EXCHANGE)``), the new folder and the old one swap names atomically, so one complete dataset is
  visible under the name at every instant. Elsewhere the old folder is first renamed to
  ``.DatasetXXX_Name.old-<token>``; a crash between the two renames leaves that pair, and ``recover_interrupted``
  completes the replacement at the next run.
- ``recover_interrupted`` runs under the lock, so every staging folder of the ID it finds belongs to a dead run.

Test hook: with ``NNUNETV2_CIPA_CONVERT_STOP_AT=<point>`` the converter stops itself (SIGSTOP) at that point
("converting": after the first slice, "swap": inside ``replace_folder``), so that a test can kill it there.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import signal
import sys
from pathlib import Path

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.paths import try_remove

STOP_AT_ENV = "NNUNETV2_CIPA_CONVERT_STOP_AT"
PR_SET_PDEATHSIG = 1


def stop_point(name: str) -> None:
    """Test hook: SIGSTOP this process when NNUNETV2_CIPA_CONVERT_STOP_AT names ``name``."""
    if os.environ.get(STOP_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)


def worker_init(parent_pid: int) -> None:
    """Pool-worker set-up: Ctrl-C is the parent's to handle, and the worker dies with the parent (Linux), so that no
    orphan keeps writing into a staging folder that the next run removes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


class DatasetLock:
    """Exclusive lock of one dataset ID in ``raw`` for the ``with`` block; InputError at once if another process
    holds it. The lock file is removed on release (a new holder checks that it locked the file still in place)."""

    def __init__(self, raw: Path, dataset_id: int):
        self.path = raw / f".Dataset{dataset_id:03d}.lock"
        self.dataset_id = dataset_id
        self.fd: int | None = None

    def __enter__(self) -> DatasetLock:
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise InputError(f"{self.path}: cannot create the lock file in nnUNet_raw ({e.strerror or e})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise InputError(f"{self.path}: cannot lock ({e.strerror or e})") from e
                raise InputError(f"dataset ID {self.dataset_id}: another conversion (process {holder}) is writing "
                                 f"it right now (lock {self.path}); wait for it or pick another -d") from None
            try:
                in_place = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                in_place = False
            if in_place:
                self.fd = fd
            else:  # the previous holder removed the file between our open and our lock: lock the new one
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _leftovers(raw: Path, dataset_id: int, kind: str) -> list[tuple[Path, str, str]]:
    """(path, dataset folder name, token) of the ``.DatasetXXX_*.{kind}-<token>`` entries in ``raw``."""
    pattern = re.compile(rf"^\.(Dataset{dataset_id:03d}_.+)\.{kind}-(\w+)$")
    with os.scandir(raw) as entries:
        matches = [pattern.match(entry.name) for entry in entries]
    return sorted((raw / m.group(0), m.group(1), m.group(2)) for m in matches if m)


def recover_interrupted(raw: Path, dataset_id: int) -> list[str]:
    """Under the dataset's lock: complete a replacement a dead run left half done (its old copy renamed aside: the
    staged copy of the same token is complete) and remove every staging folder of earlier runs (a leftover that
    cannot be removed is a note, not an error: the new run does not need its name). Returns notes."""
    notes = []
    for old, name, token in _leftovers(raw, dataset_id, "old"):
        target, staged = raw / name, raw / f".{name}.tmp-{token}"
        if not target.exists():
            source = staged if staged.is_dir() else old
            os.rename(source, target)
            notes.append(f"{target}: {'completed' if source == staged else 'undid'} the replacement an interrupted "
                         "conversion left half done")
        if os.path.lexists(old):
            notes += _remove_leftover(old, say_removed=False)
    for staged, _, _ in _leftovers(raw, dataset_id, "tmp"):
        notes += _remove_leftover(staged)
    return notes


def _remove_leftover(path: Path, say_removed: bool = True) -> list[str]:
    """Remove what an earlier conversion left at ``path``; a note saying so, or why it could not be removed."""
    error = try_remove(path)
    if error is not None:
        return [f"{path}: left by an earlier conversion and cannot be removed ({error.strerror or error}); remove it "
                "yourself"]
    return [f"removed {path.name}, left in {path.parent} by an interrupted conversion"] if say_removed else []
