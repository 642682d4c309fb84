"""Writing outputs safely: one file atomically, the files of one command all or none, checked before the work.

- A file is written under a hidden temporary name in its own folder (``.<name>.tcurlora-<host>-<pid>-<random>.tmp``
  plus its extension, so that writers choose the same format), flushed to disk, then renamed onto its name: a crash
  or a cancel leaves the old file or the new one, never half of one. The host and process in the name let a later
  run tell a dead writer's leftover from a live one (:func:`remove_stale_temporaries`).
- :class:`OutputFiles` holds the files of one command. :meth:`OutputFiles.add` checks a destination before the work:
  its folder exists and takes a new file, there is room for it, an existing file is replaced only with
  ``overwrite``, and it is neither a shipped file nor one of the command's inputs. :meth:`OutputFiles.publish`
  writes every file to its temporary name, then renames them together, holding SIGINT and SIGTERM back meanwhile
  (a cancel that arrives then withdraws them all): all appear or none do. A new file is published exclusively, by a
  hard link that fails when the name appeared meanwhile, so a second run cannot silently replace the first's result.
- Should publishing still fail (a full disk, a name taken meanwhile, a folder made read only), nothing is published,
  the results are written into a new ``tcurlora-kept-<time>`` folder (in ``$TCURLORA_KEEP_DIR``, which a background
  job sets to its work folder, else the current folder, else the system's temporary folder, else the home folder)
  and :class:`OutputError` names it.

Torch-free: the Slicer panels and the store import it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

from .paths import shipped_models_dir, shipped_samples_dir
from .progress import Cancelled

__all__ = ["KEEP_DIR_ENV", "OutputError", "OutputFiles", "atomic_write", "remove_stale_temporaries", "temporary_path"]

PathLike = Union[str, "os.PathLike[str]"]
Writer = Callable[[str], None]
"""Writes one file at the path it is given (a temporary name with the destination's extension)."""

KEPT_PREFIX = "tcurlora-kept-"
KEEP_DIR_ENV = "TCURLORA_KEEP_DIR"
"""Where results that could not be published are kept first (set by :class:`~TCURLoRALib.jobs.Job`)."""
STALE_AFTER_S = 24 * 3600.0
"""A temporary file of another machine (a shared folder) counts as stale once unchanged this long."""
SPACE_MARGIN_BYTES = 1 << 20
_DOUBLE_EXTENSIONS = (".nii.gz", ".seg.nrrd")
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_TEMPORARY = re.compile(r"^\..+\.tcurlora-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}\.(tmp|bak|probe)(\..*)?$")


class OutputError(ValueError):
    """An output cannot be written (checked before the work) or could not be published (after it).

    Attributes:
        kept_in: the folder that holds the results when publishing failed and they were kept, else None.
    """

    def __init__(self, message: str, kept_in: Union[Path, None] = None):
        super().__init__(message)
        self.kept_in = kept_in


# ---------------------------------------------------------------------------------------------------- one file


def temporary_path(path: PathLike, kind: str = "tmp") -> Path:
    """A fresh hidden name beside ``path`` that keeps its extension (``kind``: tmp, bak or probe)."""
    path = Path(path)
    extension = _extension(path.name)
    stem = path.name[: len(path.name) - len(extension)] if extension else path.name
    token = f"tcurlora-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    return _folder(path) / f".{stem}.{token}.{kind}{extension}"


def atomic_write(path: PathLike, write: Writer, *, overwrite: bool = True, what: str = "file") -> Path:
    """Write one file atomically: ``write(temporary)``, flush, rename onto ``path``.

    Args:
        path: destination; its folder must exist. Never a shipped file.
        write: called once with the temporary file's path (same folder, same extension).
        overwrite: replace an existing file (default); False publishes exclusively and refuses an existing one.
        what: how messages name the file.

    Returns:
        ``path``.

    Raises:
        OutputError: a shipped destination, or ``overwrite=False`` and the file exists (checked again at the rename).
        FileNotFoundError: the folder does not exist.
        Whatever ``write`` raises, after the temporary file is removed (an existing file is then left untouched).
    """
    path = Path(path)
    _refuse_shipped(path, what)
    folder = _folder(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {what} {str(path)!r}: folder {str(folder)!r} does not exist")
    if not overwrite and os.path.lexists(path):
        raise OutputError(f"{what} {str(path)!r} already exists: nothing was replaced")
    temporary = temporary_path(path)
    try:
        _write_flushed(temporary, write)
        backup = _publish(temporary, path, overwrite, what)
    except BaseException:
        _remove(temporary)
        raise
    _remove(backup)
    _fsync_folder(folder)
    return path


# ---------------------------------------------------------------------------------------------------- all or none


@dataclass(frozen=True)
class _Output:
    path: Path
    what: str
    expected_bytes: int


class OutputFiles:
    """The files one command writes: checked before the work, published together or not at all.

    Args:
        overwrite: whether an existing file may be replaced (the CLI's ``--overwrite``).
        inputs: files the command reads (image, base model, adapter, ...): never written over, whatever
            ``overwrite`` says.

    Example::

        outputs = OutputFiles(overwrite=False, inputs=[image_path, base_path])
        label_path = outputs.add("labels.nii.gz", "label map", expected_bytes=voxels)
        ...                                            # the work
        outputs.publish({label_path: lambda temporary: write_label_map(temporary, ...)})
    """

    def __init__(self, *, overwrite: bool = False, inputs: Iterable[Union[PathLike, None]] = ()):
        self.overwrite = bool(overwrite)
        self.inputs = [Path(p) for p in inputs if p is not None]
        self._outputs: list[_Output] = []

    @property
    def paths(self) -> list[Path]:
        return [output.path for output in self._outputs]

    def add(self, path: PathLike, what: str, expected_bytes: int = 0) -> Path:
        """Check ``path`` as a destination now, before the work; returns it as a Path.

        Raises:
            OutputError: a shipped file or an input of the command; a folder that does not take a new file
                (missing, not a folder, read only, no permission); too little free space for ``expected_bytes``
                (with the other outputs on the same file system).
            FileExistsError: the file exists and ``overwrite`` is False.
            ValueError: the same path added twice.
        """
        path = Path(path)
        _refuse_shipped(path, what)
        for given in self.inputs:
            if _same_file(path, given):
                raise OutputError(f"{what} {str(path)!r} is the file {str(given)!r} that this command reads: it is "
                                  f"never written over; choose another path")
        for output in self._outputs:
            if _same_file(path, output.path):
                raise ValueError(f"{what} {str(path)!r} is the same file as the {output.what}: give two paths")
        if os.path.lexists(path):
            if path.is_dir():
                raise OutputError(f"{what} {str(path)!r} is a folder: give a file name")
            if not self.overwrite:
                raise FileExistsError(f"{what} {str(path)!r} already exists: give --overwrite to replace it, or "
                                      f"another path")
        _probe_folder(path, what)
        self._outputs.append(_Output(path, what, max(0, int(expected_bytes))))
        self._check_space()
        return path

    def expect(self, path: PathLike, expected_bytes: int) -> None:
        """Sets the expected size of an added output once it is known (e.g. after the model is built) and checks
        the free space again.

        Raises:
            OutputError: too little free space; ValueError: ``path`` was not added.
        """
        path = Path(path)
        for index, output in enumerate(self._outputs):
            if output.path == path:
                self._outputs[index] = _Output(path, output.what, max(0, int(expected_bytes)))
                self._check_space()
                return
        raise ValueError(f"{str(path)!r} is not one of the outputs {[str(p) for p in self.paths]}")

    def publish(self, writers: Mapping[PathLike, Writer]) -> list[Path]:
        """Write every added output and publish them together (see the module docstring).

        Args:
            writers: one writer for each added path (keys as returned by :meth:`add`).

        Returns:
            The published paths, in the order they were added.

        Raises:
            OutputError: publishing failed; nothing was published. Its ``kept_in`` is the folder that holds the
                results, or None where they could not be kept either (the message says why).
            ValueError: ``writers`` does not match the added outputs.
            Anything else a writer raises before publishing (KeyboardInterrupt, a cancel, ...): nothing published,
                nothing kept.
        """
        by_path = {Path(key): write for key, write in writers.items()}
        if set(by_path) != set(self.paths):
            raise ValueError(f"writers for {sorted(map(str, by_path))} but outputs {sorted(map(str, self.paths))}")
        temporaries: dict[Path, Path] = {}
        try:
            for output in self._outputs:
                _refuse_shipped(output.path, output.what)
                temporaries[output.path] = temporary_path(output.path)
                _write_flushed(temporaries[output.path], by_path[output.path])
            self._publish_all(temporaries)
        except (Cancelled, OutputError):
            for temporary in temporaries.values():
                _remove(temporary)
            raise
        except Exception as error:  # noqa: BLE001  any failure of the write: keep the results, then report
            for temporary in temporaries.values():
                _remove(temporary)
            raise self._keep(by_path, error) from error
        except BaseException:
            for temporary in temporaries.values():
                _remove(temporary)
            raise
        for folder in {_folder(path) for path in self.paths}:
            _fsync_folder(folder)
        return self.paths

    # ------------------------------------------------------------------------------------------------ internals

    def _publish_all(self, temporaries: Mapping[Path, Path]) -> None:
        """Renames every temporary onto its name; on any failure or a held-back cancel, undoes those done."""
        done: list[tuple[Path, Union[Path, None]]] = []
        withdrawn = False
        with _signals_held() as cancel_pending:
            try:
                for output in self._outputs:
                    backup = _publish(temporaries[output.path], output.path, self.overwrite, output.what)
                    done.append((output.path, backup))
                withdrawn = cancel_pending()
            except BaseException:
                _undo(done)
                raise
            if withdrawn:
                _undo(done)
            else:
                for _path, backup in done:
                    _remove(backup)
        # The held-back signal is delivered when the mask is lifted (its handler raises there); were it handled
        # without raising, the command must still not report success.
        if withdrawn:
            raise OutputError("cancelled while the outputs were being published: nothing was written")

    def _check_space(self) -> None:
        needed: dict[int, tuple[int, Path]] = {}
        for output in self._outputs:
            folder = _folder(output.path)
            device = os.stat(folder).st_dev
            total, _ = needed.get(device, (0, folder))
            needed[device] = (total + output.expected_bytes, folder)
        for total, folder in needed.values():
            free = shutil.disk_usage(folder).free
            if total and free < total + SPACE_MARGIN_BYTES:
                raise OutputError(f"not enough free space in {str(folder)!r}: the outputs need about "
                                  f"{_megabytes(total + SPACE_MARGIN_BYTES)}, only {_megabytes(free)} are free; "
                                  f"free some space or choose a folder on another disk")

    def _keep(self, writers: Mapping[Path, Writer], error: BaseException) -> OutputError:
        """Writes every output into a new folder where the user can find them; returns the error to raise."""
        failed = f"could not write {self._names()}: {_reason(error)}"
        fix = _fix_for(error)
        attempts = []
        for parent in _keeping_places():
            try:
                folder = _new_folder(parent)
            except OSError as place_error:
                attempts.append(f"{str(parent)!r}: {_reason(place_error)}")
                continue
            try:
                for output in self._outputs:
                    _write_flushed(folder / output.path.name, writers[output.path])
            except Exception as keep_error:  # noqa: BLE001  try the next place
                shutil.rmtree(folder, ignore_errors=True)
                attempts.append(f"{str(parent)!r}: {_reason(keep_error)}")
                continue
            kept = ", ".join(str(folder / output.path.name) for output in self._outputs)
            return OutputError(f"{failed}. Nothing was replaced; the result was kept in {kept}: move it where you "
                               f"want it ({fix})", kept_in=folder)
        return OutputError(f"{failed}; the result could not be kept elsewhere either ({'; '.join(attempts)}): "
                           f"{fix}, and run again")

    def _names(self) -> str:
        return ", ".join(f"{output.what} {str(output.path)!r}" for output in self._outputs)


# ---------------------------------------------------------------------------------------------------- stale files


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Removes the temporary files of writers that died (a SIGKILL, a power cut) from ``folder``.

    A temporary of this machine is stale when its process no longer runs; one of another machine (a shared
    folder) when it has not changed for :data:`STALE_AFTER_S`. Files of live writers and other files are kept.

    Returns:
        The removed files.
    """
    folder = Path(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None:
            continue
        path = folder / name
        try:
            age = now - path.lstat().st_mtime
        except OSError:
            continue
        if match["host"] == _HOST:
            stale = not _process_exists(int(match["pid"]))
        else:
            stale = age > STALE_AFTER_S
        if stale and _remove(path):
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------------- helpers


_UMASK = os.umask(0o022)
os.umask(_UMASK)
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _extension(name: str) -> str:
    lower = name.lower()
    for extension in _DOUBLE_EXTENSIONS:
        if lower.endswith(extension) and len(name) > len(extension):
            return name[-len(extension):]
    return os.path.splitext(name)[1]


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _same_file(a: Path, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_shipped(path: Path, what: str) -> None:
    """No command writes into the shipped models' or samples' folder (read only, part of the extension)."""
    folder = os.path.realpath(_folder(path))
    for shipped in (shipped_models_dir(), shipped_samples_dir()):
        if os.path.isdir(shipped) and folder == os.path.realpath(shipped):
            raise OutputError(f"{what} {str(path)!r} is in the folder of shipped files {str(shipped)!r}, which is "
                              f"read only: choose another path")


def _probe_folder(path: Path, what: str) -> None:
    """Creates and removes a hidden file beside ``path``: the one test of writability that holds for read-only
    mounts, ACLs, network folders and root alike."""
    folder = _folder(path)
    if not folder.exists():
        raise OutputError(f"cannot write {what} {str(path)!r}: folder {str(folder)!r} does not exist; create it or "
                          f"choose another path")
    if not folder.is_dir():
        raise OutputError(f"cannot write {what} {str(path)!r}: {str(folder)!r} is not a folder")
    probe = temporary_path(path, "probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as error:
        raise OutputError(f"cannot write {what} {str(path)!r}: folder {str(folder)!r} does not take new files "
                          f"({_reason(error)}); {_fix_for(error)}") from error
    os.close(fd)
    _remove(probe)


def _write_flushed(path: Path, write: Writer) -> None:
    """Runs the writer, gives the file an ordinary new file's permissions (some writers create theirs private) and
    flushes it to disk."""
    write(str(path))
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~_UMASK)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _publish(temporary: Path, path: Path, overwrite: bool, what: str) -> Union[Path, None]:
    """Moves ``temporary`` onto ``path``; returns a backup (hard link) of the file it replaced, if any."""
    if not overwrite:
        _link_exclusively(temporary, path, what)
        return None
    backup = None
    if os.path.lexists(path):
        backup = temporary_path(path, "bak")
        try:
            os.link(path, backup)
        except OSError:
            shutil.copy2(path, backup)
        # A new file gets the permissions of the one it replaces (writers create theirs with the umask's).
        with contextlib.suppress(OSError):
            os.chmod(temporary, os.stat(path).st_mode & 0o777)
    try:
        os.replace(temporary, path)
    except BaseException:
        _remove(backup)
        raise
    return backup


def _link_exclusively(temporary: Path, path: Path, what: str) -> None:
    """Publishes a new file only if the name is still free: link(2) fails with EEXIST, atomically."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{what} {str(path)!r} appeared while this command ran (another run "
                                            f"writing the same file?)") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS,
                               errno.EMLINK):
            raise
        # No hard links here (FAT, some network folders): claim the name with O_EXCL, then rename onto the claim.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{what} {str(path)!r} appeared while this command ran (another "
                                                f"run writing the same file?)") from None
        os.replace(temporary, path)
        return
    _remove(temporary)


def _undo(done: Sequence[tuple[Path, Union[Path, None]]]) -> None:
    for path, backup in reversed(done):
        if backup is not None:
            with contextlib.suppress(OSError):
                os.replace(backup, path)
        else:
            _remove(path)


@contextlib.contextmanager
def _signals_held() -> Iterator[Callable[[], bool]]:
    """Holds SIGINT and SIGTERM back (main thread, POSIX); yields a check for one that arrived meanwhile."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield lambda: bool(signal.sigpending() & _HELD_SIGNALS)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _keeping_places() -> list[Path]:
    places = []
    keep_dir = os.environ.get(KEEP_DIR_ENV)
    first = [lambda: Path(keep_dir)] if keep_dir else []
    for candidate in (*first, Path.cwd, lambda: Path(tempfile.gettempdir()), Path.home):
        with contextlib.suppress(Exception):
            place = candidate()
            if place not in places:
                places.append(place)
    return places


def _new_folder(parent: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        folder = parent / f"{KEPT_PREFIX}{stamp}" if attempt == 0 else parent / f"{KEPT_PREFIX}{stamp}-{attempt}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free {KEPT_PREFIX}{stamp} folder name in {str(parent)!r}")


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        import psutil
    except ImportError:
        return True  # cannot tell: keep the file
    return psutil.pid_exists(pid)


def _remove(path: Union[Path, None]) -> bool:
    if path is None:
        return False
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _fsync_folder(folder: Path) -> None:
    """Makes renames durable; folders cannot be opened on Windows, where there is nothing to do."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror if not error.filename else f"{error.strerror}: {error.filename!r}"
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__).strip()


def _fix_for(error: BaseException) -> str:
    code = _errno_of(error)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some space on that disk or choose a folder on another one"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "choose a folder you can write to"
    if code == errno.EEXIST:
        return "choose another name, or give --overwrite to replace the file"
    return "check the folder and choose another path if needed"


def _errno_of(error: BaseException) -> Union[int, None]:
    while error is not None:
        if isinstance(error, OSError) and error.errno:
            return error.errno
        text = str(error)
        for code in (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EEXIST):
            if os.strerror(code) in text:
                return code
        error = error.__cause__ or error.__context__
    return None


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"
