"""Writing outputs (outputs.py): atomic files, all-or-nothing groups, checks before the work, results kept on failure.

Faults are real: read-only and full file systems (tmpfs mounts where the machine allows), a file size limit
(RLIMIT_FSIZE) and signals in child processes, names taken by another writer, a writer killed by SIGKILL.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from faults import fill, read_only_folder, run_python, small_filesystem
from TCURLoRALib import outputs
from TCURLoRALib.outputs import (KEEP_DIR_ENV, OutputError, OutputFiles, atomic_write, remove_stale_temporaries,
                                  temporary_path)


def text_writer(text: str):
    def write(temporary: str) -> None:
        Path(temporary).write_text(text)
    return write


def failing_writer(temporary: str) -> None:
    Path(temporary).write_text("half a fi")
    raise OSError(28, "No space left on device")


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------------- one file


def test_atomic_write_replaces_keeps_permissions_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "labels.nii.gz"
    atomic_write(target, text_writer("one"))
    target.chmod(0o640)
    atomic_write(target, text_writer("two"))
    assert target.read_text() == "two" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert listing(tmp_path) == ["labels.nii.gz"]


def test_a_new_file_gets_ordinary_permissions_even_from_a_private_writer(tmp_path: Path) -> None:
    def private(temporary: str) -> None:
        os.close(os.open(temporary, os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors and mkstemp create files

    atomic_write(tmp_path / "a.safetensors", private)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o666 & ~umask


def test_atomic_write_temporary_keeps_the_extension_and_is_hidden(tmp_path: Path) -> None:
    seen = []
    atomic_write(tmp_path / "s.seg.nrrd", lambda temporary: seen.append(temporary) or Path(temporary).write_text(""))
    name = Path(seen[0]).name
    assert name.startswith(".s.") and name.endswith(".tmp.seg.nrrd"), name


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write(target, text_writer("old"))
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, failing_writer)
    assert target.read_text() == "old" and listing(tmp_path) == ["m.json"]


def test_atomic_write_without_overwrite_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    atomic_write(target, text_writer("first"), overwrite=False)
    with pytest.raises(OutputError, match="already exists: nothing was replaced"):
        atomic_write(target, text_writer("second"), overwrite=False)
    assert target.read_text() == "first" and listing(tmp_path) == ["a.txt"]


# ---------------------------------------------------------------------------------------------------- checks before the work


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"label map '.*out\.txt' already exists: give --overwrite"):
        OutputFiles().add(tmp_path / "out.txt", "label map")
    planned = OutputFiles(overwrite=True)
    planned.add(tmp_path / "out.txt", "label map")
    planned.publish({tmp_path / "out.txt": text_writer("new")})
    assert (tmp_path / "out.txt").read_text() == "new"


def test_an_input_is_never_written_over_even_with_overwrite(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    base.write_text("weights")
    os.link(base, tmp_path / "alias.safetensors")
    for target in (base, tmp_path / "alias.safetensors", tmp_path / "." / "base.safetensors"):
        with pytest.raises(OutputError, match=r"is the file .*base\.safetensors' that this command reads"):
            OutputFiles(overwrite=True, inputs=[base]).add(target, "adapter")
    assert base.read_text() == "weights"


def test_shipped_folders_are_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "Models"
    models.mkdir()
    (models / "base.safetensors").write_text("shipped")
    monkeypatch.setenv("TCURLORA_MODELS", str(models))
    for target in (models / "base.safetensors", models / "new.safetensors"):
        with pytest.raises(OutputError, match="folder of shipped files .* which is read only"):
            OutputFiles(overwrite=True).add(target, "adapter")
        with pytest.raises(OutputError, match="folder of shipped files"):
            atomic_write(target, text_writer("x"))
    assert listing(models) == ["base.safetensors"] and (models / "base.safetensors").read_text() == "shipped"


def test_same_output_twice_is_refused(tmp_path: Path) -> None:
    planned = OutputFiles()
    planned.add(tmp_path / "a.nii.gz", "label map")
    with pytest.raises(ValueError, match="is the same file as the label map"):
        planned.add(tmp_path / "sub" / ".." / "a.nii.gz", "probability map")


def test_missing_folder_or_a_file_as_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"folder '.*missing' does not exist; create it"):
        OutputFiles().add(tmp_path / "missing" / "a.txt", "report")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a folder"):
        OutputFiles().add(tmp_path / "file" / "a.txt", "report")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(OutputError, match="is a folder: give a file name"):
        OutputFiles(overwrite=True).add(tmp_path / "dir.txt", "report")


def test_read_only_folder_is_refused_before_the_work(tmp_path: Path) -> None:
    with read_only_folder(tmp_path / "ro") as folder:
        with pytest.raises(OutputError, match=r"folder '.*ro' does not take new files \(Read-only file system|"
                                              r"folder '.*ro' does not take new files \(Permission denied"):
            OutputFiles().add(folder / "labels.nii.gz", "label map")


def test_too_little_free_space_is_refused_before_the_work(tmp_path: Path) -> None:
    free = outputs.shutil.disk_usage(tmp_path).free
    planned = OutputFiles()
    planned.add(tmp_path / "a.bin", "first output", expected_bytes=free // 2)
    with pytest.raises(OutputError, match=r"not enough free space in .*: the outputs need about .* MB, only .* free"):
        planned.add(tmp_path / "b.bin", "second output", expected_bytes=free // 2 + 1)
    with pytest.raises(OutputError, match="not enough free space"):
        planned.expect(tmp_path / "a.bin", free + 1)


def test_small_filesystem_is_refused_before_the_work(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", 512) as folder:
        with pytest.raises(OutputError, match="not enough free space"):
            OutputFiles().add(folder / "probabilities.nrrd", "probability map", expected_bytes=600_000)


# ---------------------------------------------------------------------------------------------------- all or none


def test_a_failing_writer_publishes_nothing_and_restores_replaced_files(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "labels.nii.gz").write_text("old labels")
    planned = OutputFiles(overwrite=True)
    for name in ("labels.nii.gz", "s.seg.nrrd", "p.nrrd"):
        planned.add(folder / name, name)
    with pytest.raises(OutputError) as caught:
        planned.publish({folder / "labels.nii.gz": text_writer("new labels"),
                         folder / "s.seg.nrrd": text_writer("segmentation"), folder / "p.nrrd": failing_writer})
    assert listing(folder) == ["labels.nii.gz"] and (folder / "labels.nii.gz").read_text() == "old labels"
    # The writers are run again into the kept folder; the failing one fails there too: nothing kept, and it says so.
    assert caught.value.kept_in is None and "could not be kept elsewhere either" in str(caught.value)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(outputs.KEPT_PREFIX)]


def test_exclusive_publish_never_replaces_a_file_that_appeared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs of one command with one output name: the second to finish must not replace the first's file."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    planned = OutputFiles()
    target = planned.add(store / "mine.safetensors", "adapter")
    (store / "mine.safetensors").write_text("the other run's adapter")  # after the check, before the write
    with pytest.raises(OutputError, match=r"adapter '.*mine\.safetensors' appeared while this command ran") as caught:
        planned.publish({target: text_writer("this run's adapter")})
    assert (store / "mine.safetensors").read_text() == "the other run's adapter"
    assert listing(store) == ["mine.safetensors"]
    kept = caught.value.kept_in / "mine.safetensors"
    assert kept.parent.parent == tmp_path and kept.read_text() == "this run's adapter"
    assert str(kept) in str(caught.value) and "choose another name, or give --overwrite" in str(caught.value)


def test_results_are_kept_in_the_jobs_work_folder_when_one_is_named(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A background job runs in the caller's folder but names its work folder: kept results go there first."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(KEEP_DIR_ENV, str(work))
    planned = OutputFiles()
    target = planned.add(tmp_path / "mine.safetensors", "adapter")
    (tmp_path / "mine.safetensors").write_text("the other run's adapter")
    with pytest.raises(OutputError) as caught:
        planned.publish({target: text_writer("this run's adapter")})
    assert caught.value.kept_in.parent == work
    assert (caught.value.kept_in / "mine.safetensors").read_text() == "this run's adapter"


def test_full_disk_at_the_final_write_keeps_the_results_elsewhere(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with small_filesystem(tmp_path / "disk", 2048) as disk:
        planned = OutputFiles()
        planned.add(disk / "labels.nii.gz", "label map", expected_bytes=1000)
        planned.add(disk / "p.nrrd", "probability map", expected_bytes=400_000)
        fill(disk)  # something else filled the disk during the work
        with pytest.raises(OutputError, match="No space left on device") as caught:
            planned.publish({disk / "labels.nii.gz": text_writer("labels"),
                             disk / "p.nrrd": lambda t: Path(t).write_bytes(b"p" * 400_000)})
        assert listing(disk) == ["filler.bin"]
        kept = caught.value.kept_in
        assert kept.parent == tmp_path and listing(kept) == ["labels.nii.gz", "p.nrrd"]
        assert (kept / "p.nrrd").stat().st_size == 400_000
        assert "free some space on that disk" in str(caught.value)


FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
from TCURLoRALib.outputs import OutputError, OutputFiles
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
folder = Path(sys.argv[1])
planned = OutputFiles(overwrite=True)
for name in ("labels.nii.gz", "s.seg.nrrd", "p.nrrd"):
    planned.add(folder / name, name)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    planned.publish({folder / "labels.nii.gz": lambda t: Path(t).write_bytes(b"l" * 1000),
                     folder / "s.seg.nrrd": lambda t: Path(t).write_bytes(b"s" * 1000),
                     folder / "p.nrrd": lambda t: Path(t).write_bytes(b"p" * 200_000)})
except OutputError as error:
    print(error)
    sys.exit(2)
"""


def test_a_write_past_the_file_size_limit_publishes_nothing(tmp_path: Path) -> None:
    """The disk-full fault without a mount: the third file of three fails in a child process."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "labels.nii.gz").write_text("old")
    result = run_python(FILE_SIZE_LIMIT, str(folder), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "File too large" in result.stdout
    assert listing(folder) == ["labels.nii.gz"] and (folder / "labels.nii.gz").read_text() == "old"


CANCEL_WHILE_PUBLISHING = """
import os, signal, sys
from pathlib import Path
from TCURLoRALib import outputs
from TCURLoRALib.progress import Cancelled

def cancel(signum, frame):
    raise Cancelled("SIGTERM")

signal.signal(signal.SIGTERM, cancel)
folder = Path(sys.argv[1])
publish = outputs._publish
def publish_then_cancel(temporary, path, overwrite, what):
    backup = publish(temporary, path, overwrite, what)
    os.kill(os.getpid(), signal.SIGTERM)  # the cancel arrives after the first file is in place
    return backup
outputs._publish = publish_then_cancel
planned = outputs.OutputFiles()
for name in ("labels.nii.gz", "s.seg.nrrd"):
    planned.add(folder / name, name)
try:
    planned.publish({folder / name: lambda t: Path(t).write_text("x") for name in ("labels.nii.gz", "s.seg.nrrd")})
except Cancelled:
    sys.exit(130)
"""


def test_a_cancel_while_publishing_withdraws_every_file(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    result = run_python(CANCEL_WHILE_PUBLISHING, str(folder))
    assert result.returncode == 130, result.stderr
    assert listing(folder) == []


# ---------------------------------------------------------------------------------------------------- stale files


KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from TCURLoRALib.outputs import atomic_write

def write_then_die(temporary):
    Path(temporary).write_bytes(b"\\0" * 100_000)
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(Path(sys.argv[1]) / "mine.safetensors", write_then_die)
"""


def test_temporaries_of_a_killed_writer_are_removed_live_ones_kept(tmp_path: Path) -> None:
    result = run_python(KILLED_WHILE_WRITING, str(tmp_path))
    assert result.returncode == -9
    [leftover] = tmp_path.iterdir()
    assert leftover.name.startswith(".mine.") and leftover.stat().st_size == 100_000
    live = temporary_path(tmp_path / "other.safetensors")  # this process: alive
    live.write_text("being written")
    foreign = tmp_path / ".x.tcurlora-000000-1-0123abcd.tmp.safetensors"  # another machine's
    foreign.write_text("")
    (tmp_path / ".hidden-but-not-ours.tmp").write_text("")
    assert remove_stale_temporaries(tmp_path) == [leftover]
    assert listing(tmp_path) == sorted([live.name, foreign.name, ".hidden-but-not-ours.tmp"])
    day_ago = foreign.stat().st_mtime - outputs.STALE_AFTER_S - 60
    os.utime(foreign, (day_ago, day_ago))
    assert remove_stale_temporaries(tmp_path) == [foreign]
