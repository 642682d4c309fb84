"""Real faults for tests: read-only folders, small (full) file systems, flipped bytes in files, child processes.

A read-only folder is a read-only tmpfs mount when running as root (root ignores permission bits), else a folder
with mode 0555. A small file system is a tmpfs mount of the asked size; where mounting is not allowed (not root),
the tests that need one are skipped and the others make writes fail with RLIMIT_FSIZE in a child process instead.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ENGINE_FOLDER = Path(__file__).resolve().parents[1] / "TCURLoRASegment"
TESTING_FOLDER = Path(__file__).resolve().parent


def _mount_tmpfs(folder: Path, options: str) -> bool:
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return result.returncode == 0


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@contextlib.contextmanager
def small_filesystem(folder: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of ``size_kb`` kB mounted at ``folder``; skips the test where mounting is not allowed."""
    if not _mount_tmpfs(folder, f"size={size_kb}k"):
        pytest.skip("mounting a small file system needs root")
    try:
        yield folder
    finally:
        _unmount(folder)


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[Path]:
    """An existing, empty folder that takes no new file (a read-only mount as root, mode 0555 otherwise)."""
    if os.name == "posix" and os.geteuid() == 0:
        if not _mount_tmpfs(folder, "size=64k,ro"):
            pytest.skip("root, and a read-only mount is not allowed here")
        try:
            yield folder
        finally:
            _unmount(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


def fill(folder: Path) -> None:
    """Writes into ``folder`` until its file system is full."""
    with open(folder / "filler.bin", "wb") as stream:
        block = b"\0" * 65536
        try:
            while True:
                stream.write(block)
                stream.flush()
        except OSError:
            pass


def tensor_offset(path: Path, name: str) -> int:
    """Byte position in the file of the first byte of tensor ``name`` (safetensors layout)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return 8 + length + int(header[name]["data_offsets"][0])


def flip_bytes(path: Path, position: int, count: int = 1, mask: int = 0xFF) -> None:
    """XORs ``count`` bytes of the real file at ``position`` with ``mask`` (0x01: one bit each)."""
    with open(path, "r+b") as stream:
        stream.seek(position)
        data = bytearray(stream.read(count))
        stream.seek(position)
        stream.write(bytes(b ^ mask for b in data))


def run_python(code: str, *args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``code`` in a child Python with the engine and Testing/ on its path; ``sys.argv[1:]`` are ``args``."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ENGINE_FOLDER), str(TESTING_FOLDER)]),
                "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=full_env,
                          timeout=timeout)


BLOCK_IMPORTS = '''
import sys

class _Blocked:
    """Refuses to import the named packages, as a Python without them installed would."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocked())
'''


def run_python_without(blocked: tuple, code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Like :func:`run_python`, with the top-level packages ``blocked`` (e.g. ``("torch", "monai")``) unimportable
    (a ``sys.meta_path`` finder that raises ImportError)."""
    return run_python(BLOCK_IMPORTS.format(blocked=tuple(blocked)) + code, *args, env=env)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m TCURLoRALib ...`` in a child process."""
    return run_python("import sys; from TCURLoRALib.cli import main; sys.exit(main(sys.argv[1:]))", *args, cwd=cwd,
                      env=env, timeout=timeout)


@dataclass
class Ran:
    """What a command-line run gave: exit code and both output streams."""

    returncode: int
    stdout: str
    stderr: str


def call_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> Ran:
    """``python -m TCURLoRALib ...`` run in this process (torch already imported: seconds faster than a child),
    with ``env`` set and ``cwd`` as the current folder for the run; the signal handlers it installs are undone."""
    from TCURLoRALib.cli import main

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    saved_env = {key: os.environ.get(key) for key in (env or {})}
    saved_cwd = os.getcwd()
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(list(args))
    finally:
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return Ran(code, stdout.getvalue(), stderr.getvalue())


def events(stdout: str) -> list[dict]:
    """The JSON progress lines of a ``--progress json`` run."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
