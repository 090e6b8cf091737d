"""The converter under concurrency, kills and file-system permissions: one conversion per dataset ID at a time; a run
killed (SIGKILL, SIGTERM) while converting or while replacing a dataset leaves at every instant a complete dataset
or none under the name, and the next run removes what it left; unreadable or unwritable folders are clean errors.

The converter is run as a subprocess that stops itself (SIGSTOP) at a named point (NNUNETV2_CIPA_CONVERT_STOP_AT),
where the test kills or resumes it."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunetv2_cipa.conversion.pclt20k import PENDING_SPLITS_FILE, convert_pclt20k
from nnunetv2_cipa.conversion.staging import STOP_AT_ENV
from nnunetv2_cipa.errors import InputError
from test_convert import DATASET, check_output, tree_hash

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # linux/prctl.h, linux/capability.h
DISABLE_EXCHANGE = ("import sys; from nnunetv2_cipa import paths; paths.exchange = lambda a, b: False; "
                    "from nnunetv2_cipa.cli import main; sys.exit(main(sys.argv[1:]))")


def convert_command(source: Path, *options: str, python_code: str | None = None) -> list[str]:
    entry = ["-c", python_code] if python_code else ["-m", "nnunetv2_cipa.cli"]
    return [sys.executable, *entry, "convert", str(source), "-d", "321", *options]


def start_stopped(command: list[str], raw: Path, point: str) -> subprocess.Popen:
    """Start ``command`` and return once it has stopped itself at ``point``."""
    env = {**os.environ, "nnUNet_raw": str(raw), STOP_AT_ENV: point}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pid, status = os.waitpid(process.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return process
        if pid:
            raise AssertionError(f"exited before stopping at {point!r}: {process.stderr.read()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"did not stop at {point!r} within 120 s")


def leftovers(raw: Path) -> list[str]:
    """Staging folders (.tmp-*) and old copies (.old-*) in ``raw``; a dead run's lock file does not count."""
    return sorted(p.name for p in raw.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_concurrent_conversions_of_one_id(source, raw):
    """While one conversion of ID 321 runs, others of the same ID (same or another name) fail at once; the running
    one completes, and its dataset is the only one."""
    before = tree_hash(source)
    first = start_stopped(convert_command(source, "--name", "Alpha"), raw, "converting")
    for name in ("Beta", "Alpha"):
        other = subprocess.run(convert_command(source, "--name", name), capture_output=True, text=True, timeout=120,
                               env={**os.environ, "nnUNet_raw": str(raw)})
        assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr
        assert f"dataset ID 321: another conversion (process {first.pid}) is writing it right now" in other.stderr
    os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset321_Alpha"]
    check_output(raw / "Dataset321_Alpha", source)
    assert tree_hash(source) == before


@pytest.mark.parametrize("signum, point, num_processes", [(signal.SIGKILL, "converting", 2),
                                                         (signal.SIGTERM, "converting", 1),
                                                         (signal.SIGKILL, "swap", 1), (signal.SIGTERM, "swap", 1)])
def test_killed_conversion_then_rerun(source, raw, signum, point, num_processes):
    """SIGTERM cleans up at once like SIGINT; after SIGKILL the next run removes the dead run's staging folder. While
    an --overwrite run swaps datasets, the name always shows a complete one."""
    before = tree_hash(source)
    options = ["-np", str(num_processes)]
    if point == "swap":
        convert_pclt20k(source, 321, folds=3)
        options.append("--overwrite")
    process = start_stopped(convert_command(source, *options), raw, point)
    os.kill(process.pid, signum)
    os.kill(process.pid, signal.SIGCONT)
    out, err = process.communicate(timeout=60)
    if signum == signal.SIGTERM:
        assert process.returncode == 143 and "Traceback" not in err, err
        assert "interrupted (terminated by signal 15); no partial output was left" in err
        assert leftovers(raw) == []
    else:
        assert process.returncode == -signal.SIGKILL
        assert leftovers(raw) and all(".tmp-" in name for name in leftovers(raw))
    if point == "swap":
        check_output(raw / DATASET, source, folds=5)    # the replacement happened in one step
    else:
        assert not (raw / DATASET).exists()

    report = convert_pclt20k(source, 321, overwrite=True)
    assert sorted(p.name for p in raw.iterdir()) == [DATASET]
    check_output(raw / DATASET, source)
    assert any("interrupted conversion" in note for note in report.notes) == (signum == signal.SIGKILL)
    assert tree_hash(source) == before


def test_killed_between_the_two_renames_of_the_fallback_swap(source, raw):
    """Without an atomic exchange (other OSes, some file systems) the old dataset is renamed aside first; a run
    killed right then leaves no dataset under the name, and the next run completes the replacement."""
    before = tree_hash(source)
    convert_pclt20k(source, 321, folds=3)
    process = start_stopped(convert_command(source, "--overwrite", python_code=DISABLE_EXCHANGE), raw, "swap")
    process.kill()
    process.communicate(timeout=60)
    names = leftovers(raw)
    assert not (raw / DATASET).exists() and len(names) == 2
    assert names[0].replace(".old-", ".tmp-") == names[1]          # the old copy and the complete new one
    with pytest.raises(InputError, match="already exists"):        # recovered first, so the dataset is there
        convert_pclt20k(source, 321)
    assert sorted(p.name for p in raw.iterdir()) == [DATASET]
    check_output(raw / DATASET, source, folds=5)
    assert tree_hash(source) == before


def without_permission_override() -> None:
    """preexec_fn: as root, drop the capabilities that let root ignore file permissions (for the exec'd program)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("case", ["patient_folder_unreadable", "raw_not_writable", "raw_parent_not_writable"])
def test_permission_problems_are_clean_errors(source, tmp_path, case):
    before = tree_hash(source)
    raw = tmp_path / "raw"
    if case == "patient_folder_unreadable":
        (source / "P0003").chmod(0)
        expected = f"{source / 'P0003'}: cannot list the patient folder (Permission denied)"
    elif case == "raw_not_writable":
        raw.mkdir(mode=0o555)
        expected = f"{raw}: nnUNet_raw folder is not writable"
    else:
        (tmp_path / "locked").mkdir(mode=0o555)
        raw = tmp_path / "locked" / "raw"
        expected = f"{raw}: cannot create the nnUNet_raw folder (Permission denied)"
    try:
        run = subprocess.run(convert_command(source), capture_output=True, text=True, timeout=120,
                             env={**os.environ, "nnUNet_raw": str(raw)},
                             preexec_fn=without_permission_override if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as e:
        pytest.skip(f"root cannot give up its permission override here ({e})")
    finally:
        (source / "P0003").chmod(0o755)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert expected in run.stderr
    assert not raw.exists() or list(raw.iterdir()) == []
    assert tree_hash(source) == before


@pytest.mark.parametrize("where", ["source_is_the_dataset", "source_inside_the_dataset", "raw_inside_the_source"])
def test_the_source_is_never_replaced_or_written_into(source, tmp_path, monkeypatch, where):
    """Even with --overwrite: the dataset folder would replace a source inside it, or land in the source tree."""
    raw = tmp_path / "raw"
    if where == "raw_inside_the_source":
        raw = source / "nnUNet_raw"
        expected = f"{raw / DATASET}: the dataset folder would lie inside the source tree {source}"
    else:
        inside = raw / DATASET if where == "source_is_the_dataset" else raw / DATASET / "PCLT20K"
        source = Path(shutil.copytree(source, inside))
        expected = f"{source}: the source lies in the dataset folder {raw / DATASET}, which the conversion replaces"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    before = tree_hash(source)
    with pytest.raises(InputError) as error:
        convert_pclt20k(source, 321, overwrite=True)
    assert expected in str(error.value)
    assert tree_hash(source) == before and not (source / "nnUNet_raw").exists()


def test_a_previous_dataset_that_cannot_be_removed_is_a_note_not_a_stuck_id(source, raw, monkeypatch):
    """The new dataset is in place once the swap is done: an old copy that resists removal is left under its hidden
    name with a note, and later conversions of the ID go on (removing it when they can)."""
    from nnunetv2_cipa import paths

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    convert_pclt20k(source, 321)
    monkeypatch.setattr(paths, "remove_path", refuse)
    report = convert_pclt20k(source, 321, overwrite=True, folds=3)
    check_output(raw / DATASET, source, folds=3)
    old = [p for p in raw.iterdir() if p.name != DATASET]
    assert len(old) == 1 and old[0].name.startswith(f".{DATASET}.") and (old[0] / "dataset.json").is_file()
    assert any(f"could not be removed from {old[0]} (Permission denied): remove it yourself" in n for n in report.notes)
    report = convert_pclt20k(source, 321, overwrite=True, folds=4)  # paths.remove_path refuses for staging too
    check_output(raw / DATASET, source, folds=4)
    assert any(f"{old[0]}: left by an earlier conversion and cannot be removed" in n for n in report.notes)
    monkeypatch.undo()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    report = convert_pclt20k(source, 321, overwrite=True)
    assert sorted(p.name for p in raw.iterdir()) == [DATASET]
    assert sum("by an interrupted conversion" in n for n in report.notes) == 2


def test_a_symlinked_dataset_folder_is_replaced_not_followed(source, raw, tmp_path):
    elsewhere = tmp_path / "other_disk" / DATASET
    elsewhere.mkdir(parents=True)
    (elsewhere / "keep.txt").write_text("keep")
    raw.mkdir()
    (raw / DATASET).symlink_to(elsewhere)
    report = convert_pclt20k(source, 321, overwrite=True)
    assert not (raw / DATASET).is_symlink() and sorted(p.name for p in raw.iterdir()) == [DATASET]
    check_output(raw / DATASET, source)
    assert (elsewhere / "keep.txt").read_text() == "keep" and report.notes == []


def test_a_full_disk_is_not_blamed_on_the_source(source, raw, monkeypatch):
    from nnunetv2_cipa.conversion import slices

    def full(path, *args, **kwargs):
        raise InputError(f"{path}: cannot write ([Errno 28] No space left on device)")

    monkeypatch.setattr(slices, "write_png", full)
    monkeypatch.setattr(slices, "_copy", lambda source_file, target: full(target))
    with pytest.raises(InputError) as error:
        convert_pclt20k(source, 321)
    message = str(error.value)
    assert message.startswith(f"{raw}: cannot write the converted dataset there (") and "No space left" in message
    assert "problem(s) in the source" not in message and message.count("No space left") == 1
    assert list(raw.iterdir()) == []


def test_planned_splits_that_cannot_be_written_stop_the_conversion_before_it_starts(source, raw, tmp_path,
                                                                                     monkeypatch):
    """nnU-Net trains with $nnUNet_preprocessed/<dataset>/splits_final.json once the dataset is planned: the
    conversion rewrites it under the lock, and checks it can before any work."""
    preprocessed = tmp_path / "pre"
    (preprocessed / DATASET / "splits_final.json").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    with pytest.raises(InputError, match="splits_final.json: output file is an existing folder"):
        convert_pclt20k(source, 321)
    assert list(raw.iterdir()) == []


def test_sigterm_during_the_swap_still_updates_the_planned_splits(source, raw, tmp_path, monkeypatch):
    """The planned copy of splits_final.json is written with the swap, interrupts held back: after SIGTERM there,
    nnUNet_raw and nnUNet_preprocessed hold the same folds."""
    preprocessed = tmp_path / "pre"
    (preprocessed / DATASET).mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    convert_pclt20k(source, 321, folds=3)
    process = start_stopped(convert_command(source, "--overwrite"), raw, "swap")
    os.kill(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGCONT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in err, err
    assert leftovers(raw) == []
    check_output(raw / DATASET, source, folds=5)
    assert (preprocessed / DATASET / "splits_final.json").read_bytes() == (raw / DATASET / "splits_final.json"
                                                                           ).read_bytes()


def test_killed_between_the_swap_and_the_planned_splits_the_next_run_writes_them(source, raw, tmp_path,
                                                                                 monkeypatch):
    """SIGKILL right after the new dataset took the name, before the planned copy of its folds was written: the
    dataset keeps a marker, and the next conversion of the ID (even one refused) writes the copy first."""
    preprocessed = tmp_path / "pre"
    (preprocessed / DATASET).mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    convert_pclt20k(source, 321, folds=3)
    assert not (raw / DATASET / PENDING_SPLITS_FILE).exists()
    process = start_stopped(convert_command(source, "--overwrite"), raw, "swap")
    process.kill()
    process.communicate(timeout=60)
    planned, converted = preprocessed / DATASET / "splits_final.json", raw / DATASET / "splits_final.json"
    assert len(json.loads(planned.read_text())) == 3 and len(json.loads(converted.read_text())) == 5
    assert (raw / DATASET / PENDING_SPLITS_FILE).is_file()
    with pytest.raises(InputError, match="already exists"):
        convert_pclt20k(source, 321)
    assert planned.read_bytes() == converted.read_bytes()
    assert not (raw / DATASET / PENDING_SPLITS_FILE).exists()
    check_output(raw / DATASET, source, folds=5)

    # a plan removed meanwhile (to plan again) is not recreated: the marker alone goes
    (raw / DATASET / PENDING_SPLITS_FILE).touch()
    shutil.rmtree(preprocessed / DATASET)
    assert convert_pclt20k(source, 321, folds=5, overwrite=True).warnings == []
    assert not (preprocessed / DATASET).exists() and not (raw / DATASET / PENDING_SPLITS_FILE).exists()
    # a planned copy that cannot be written names the marker, so that the user can go on
    (preprocessed / DATASET / "splits_final.json").mkdir(parents=True)
    (raw / DATASET / PENDING_SPLITS_FILE).touch()
    with pytest.raises(InputError, match=f"splits_final.json: output file is an existing folder .*{PENDING_SPLITS_FILE}"
                                         " says an interrupted conversion left them unwritten; remove it"):
        convert_pclt20k(source, 321, overwrite=True)
