"""The converter under concurrency, kills and file-system permissions: one conversion per dataset ID at a time; a run
killed (SIGKILL, SIGTERM) while converting or while replacing a dataset leaves at every instant a complete dataset
or none under the name, and the next run removes what it left; unreadable or unwritable folders are clean errors.

The converter is run as a subprocess that stops itself (SIGSTOP) at a named point (NNUNETV2_CIPA_CONVERT_STOP_AT),
where the test kills or resumes it."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunetv2_cipa.conversion.pclt20k import convert_pclt20k
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
        assert "interrupted (terminated by signal 15); no partial dataset was left" in err
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
