"""paths.py's crash-safe writers: replace_folder / StagedFolder (a folder replaced whole, also when a step fails or
an interrupt arrives mid-swap, with and without an atomic exchange) and write_text_atomically."""

from __future__ import annotations

import os
import signal

import pytest

from nnunetv2_cipa import paths
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.paths import StagedFolder, write_text_atomically


def folder_with(path, text):
    path.mkdir()
    (path / "report.md").write_text(text)
    return path


def visible(parent):
    return {p.name: (p / "report.md").read_text() for p in parent.iterdir()}


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_a_step_that_fails_mid_swap_leaves_the_old_folder_in_place(tmp_path, monkeypatch, atomic_exchange):
    """Without an atomic exchange the old folder is renamed aside first; a failure before the new one is in place
    puts it back, so the name never ends up empty."""
    if not atomic_exchange:
        monkeypatch.setattr(paths, "exchange", lambda a, b: False)
    target = folder_with(tmp_path / "report", "old")

    def fail():
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match="cannot move the new folder into place"):
        with StagedFolder(target, on_swap=fail) as folder:
            (folder / "report.md").write_text("new")
    # with the exchange the swap is done when on_swap runs: the new folder stays; without it the old one is back
    assert visible(tmp_path) == {"report": "new" if atomic_exchange else "old"}


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_sigterm_during_the_swap_lands_after_it(tmp_path, monkeypatch, atomic_exchange):
    """SIGINT/SIGTERM are held back from the first rename to the end of on_replaced: what follows the swap runs
    with it, and the interrupt then removes only the old copy."""
    if not atomic_exchange:
        monkeypatch.setattr(paths, "exchange", lambda a, b: False)
    target = folder_with(tmp_path / "report", "old")
    seen = []

    def interrupted(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            with StagedFolder(target, on_swap=lambda: os.kill(os.getpid(), signal.SIGTERM),
                              on_replaced=lambda: seen.append((target / "report.md").read_text())) as folder:
                (folder / "report.md").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == ["new"] and visible(tmp_path) == {"report": "new"}


def test_staged_folder_takes_dot_as_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with StagedFolder(".") as folder:
        (folder / "report.md").write_text("new")
    assert visible(tmp_path) == {"here": "new"}


def test_a_mount_point_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(tmp_path / "volume"))
    (tmp_path / "volume").mkdir()
    with pytest.raises(InputError, match="volume: report folder is a mount point"):
        StagedFolder.check_replaceable(tmp_path / "volume", "report folder")
    StagedFolder.check_replaceable(tmp_path / "volume" / "report", "report folder")


def test_write_text_atomically_leaves_no_temporary_file_when_interrupted(tmp_path, monkeypatch):
    def interrupted(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(tmp_path / "metrics.json", "{}")
    assert list(tmp_path.iterdir()) == []
