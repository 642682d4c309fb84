"""Background jobs: ``python -m TCURLoRALib ...`` in a child process, its JSON progress lines drained by a thread.

No Slicer and no qt here, so that the runner is tested as it is: a Slicer panel creates a :class:`Job`, polls
:meth:`Job.poll_events` from a timer and shows the events; the GUI never blocks on the child, not even to cancel it.

What the child writes is decoded as UTF-8 with replacement characters (the child is told to write UTF-8; a
grandchild may still write in the ANSI code page), so no byte can stop the reader, and the reader always ends the
job, whatever happened to it. On Windows the child's console window is hidden as ``slicer.util.launchConsoleProcess``
hides it. Cancel is cooperative first (a cancel file the engine checks at every progress event, plus SIGTERM where
there is one) and forceful after a grace period (the child and its children are killed).
"""
from __future__ import annotations

import contextlib
import enum
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil

from .outputs import KEEP_DIR_ENV
from .progress import CANCEL_FILE_ENV

__all__ = ["ENGINE_MODULE", "Job", "JobState", "child_environment", "engine_folder", "hidden_console_options"]

ENGINE_MODULE = "TCURLoRALib"
_EXIT_CANCELLED = 130
_STARTF_USESHOWWINDOW = 0x1
_SW_HIDE = 0
CANCEL_FILE_NAME = "cancel-requested"


def engine_folder() -> Path:
    """The folder that holds the ``TCURLoRALib`` package (put on the child's ``PYTHONPATH``)."""
    return Path(__file__).resolve().parents[1]


def hidden_console_options(os_name: str = os.name, startupinfo: Callable[[], Any] | None = None) -> dict[str, Any]:
    """``Popen`` keyword arguments that keep a console program from opening a console window.

    On Windows ``PythonSlicer`` is a console program: started from the Slicer GUI it would open a console window
    whose closing kills the job. Like ``slicer.util.launchConsoleProcess`` (Slicer 5.8), the window is created
    hidden: ``STARTUPINFO`` with ``STARTF_USESHOWWINDOW`` and ``SW_HIDE``. Elsewhere nothing is needed.

    Args:
        os_name: ``os.name`` (a parameter so that the Windows branch is tested everywhere).
        startupinfo: the ``STARTUPINFO`` class; default ``subprocess.STARTUPINFO`` (which exists on Windows only).
    """
    if os_name != "nt":
        return {}
    info = (startupinfo or subprocess.STARTUPINFO)()
    info.dwFlags |= _STARTF_USESHOWWINDOW
    info.wShowWindow = _SW_HIDE
    return {"startupinfo": info}


def child_environment(base: dict[str, str], extra: dict[str, str], cancel_file: Path) -> dict[str, str]:
    """The child's environment: ``base`` and ``extra``, the engine first on ``PYTHONPATH``, UTF-8 unbuffered output,
    the cancel file, the job's work folder for results that could not be published (``$TCURLORA_KEEP_DIR``), and
    glibc malloc settings that cut a training step's system time (see DESIGN.md)."""
    env = {**base, **extra}
    env[KEEP_DIR_ENV] = str(cancel_file.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(engine_folder()), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env[CANCEL_FILE_ENV] = str(cancel_file)
    env.setdefault("MALLOC_MMAP_MAX_", "0")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "1000000000000")
    return env


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Job:
    """One run of the engine's CLI in a child process.

    Args:
        arguments: the CLI arguments after ``python -m TCURLoRALib`` (``--progress json`` is added).
        python: the interpreter; Slicer passes its ``PythonSlicer``, default the current one.
        work_dir: a temporary folder for inputs and outputs; removed after success, kept (and named in the log)
            after a failure or cancel so that nothing the user may need is lost. Created when not given.
        cwd: the child's current folder, against which relative paths in ``arguments`` resolve; default the
            caller's current folder when the job is made (never the work folder, which goes after success).
        env: extra environment variables for the child (a ``PYTHONPATH`` here is kept, after the engine's).
        module: the module run with ``-m`` (tests run stand-ins of the engine).

    Events (dicts from the child's JSON lines, see :mod:`TCURLoRALib.progress`) and the child's other output, as
    ``{"event": "log", "message": line}``, arrive in :meth:`poll_events`; the last one is always
    ``{"event": "finished", "state": ..., "returncode": ..., "error": ...}``.

    Attributes:
        use_signals: send SIGTERM on cancel as well as creating the cancel file (POSIX; on Windows ``terminate`` is
            TerminateProcess, a kill without clean-up, so only the cancel file is used there).
    """

    use_signals: bool = os.name != "nt"

    def __init__(
        self,
        arguments: Sequence[str],
        python: str | None = None,
        work_dir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        module: str = ENGINE_MODULE,
        cwd: str | os.PathLike | None = None,
    ):
        self.arguments = [str(argument) for argument in arguments]
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self.python = python or sys.executable
        self.module = module
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="tcurlora-job-"))
        self.cancel_file = self.work_dir / CANCEL_FILE_NAME
        self.env = env or {}
        self.state = JobState.PENDING
        self.returncode: int | None = None
        self.error: str | None = None
        self.log: list[str] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._reader_error: str | None = None
        self._cancel_requested = False
        self._descendants: list[psutil.Process] = []

    def command(self) -> list[str]:
        return [self.python, "-m", self.module, *self.arguments, "--progress", "json"]

    def start(self) -> None:
        """Start the child; returns at once."""
        if self.state is not JobState.PENDING:
            raise RuntimeError(f"job already {self.state.value}")
        self.cancel_file.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.cwd, env=child_environment(dict(os.environ), self.env, self.cancel_file),
            encoding="utf-8", errors="replace", bufsize=1, **hidden_console_options(),
        )
        self.state = JobState.RUNNING
        self._reader = threading.Thread(target=self._read_output, name="tcurlora-job-reader", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        try:
            for line in self._process.stdout:
                self._take_line(line.rstrip("\r\n"))
        except Exception as error:  # noqa: BLE001  whatever broke, the job must still finish (the panel waits)
            self._reader_error = f"reading the job's output failed: {type(error).__name__}: {error}"
            # Nobody drains the pipe any more: a child that keeps writing would block for ever.
            self._kill_tree()
        finally:
            self._finish(self._process.wait())

    def _take_line(self, line: str) -> None:
        event = _parse_event(line)
        if event is None:
            self.log.append(line)
            event = {"event": "log", "message": line}
        elif event.get("event") == "error":
            self.error = str(event.get("message"))
        self._events.put(event)

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        if returncode == 0 and self._reader_error is None:
            # Also after a cancel request that came too late: the result is complete and published.
            self.state = JobState.DONE
        elif self._cancel_requested or returncode == _EXIT_CANCELLED:
            self.state = JobState.CANCELLED
        else:
            self.state = JobState.FAILED
            if self._reader_error is not None:
                self.error = self._reader_error
            elif self.error is None:
                tail = [line for line in self.log if line.strip()][-5:]
                self.error = f"exit code {returncode}" + (": " + " | ".join(tail) if tail else "")
        if self.state is JobState.DONE:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        else:
            self.log.append(f"temporary files kept in {self.work_dir}")
        self._events.put({"event": "finished", "state": self.state.value, "returncode": returncode,
                          "error": self.error})

    def poll_events(self) -> list[dict[str, Any]]:
        """Every event that arrived since the last call, oldest first (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def cancel_requested(self) -> bool:
        """:meth:`cancel` was called (the job may still be running until the engine or the kill stops it)."""
        return self._cancel_requested

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the child has ended and its output is read (for scripts and tests, not for the GUI)."""
        if self._reader is not None:
            self._reader.join(timeout)
        return self.state

    def cancel(self, grace_seconds: float = 10.0) -> None:
        """Ask the job to stop; returns at once (the GUI thread calls this).

        The engine stops at its next progress event once the cancel file exists (and, on POSIX, on SIGTERM): it
        unwinds, writes nothing partial and exits with 130. Whatever of the child and its children is still alive
        ``grace_seconds`` later is killed, from a timer thread. Calling again with a shorter grace kills sooner.
        """
        if self._process is None or self.finished:
            return
        self._cancel_requested = True
        with contextlib.suppress(OSError):  # a vanished work folder: the kill after the grace period remains
            self.cancel_file.touch()
        with contextlib.suppress(psutil.Error):
            self._descendants += psutil.Process(self._process.pid).children(recursive=True)
        if self.use_signals:
            for process in [*self._descendants, self._process]:
                with contextlib.suppress(psutil.Error, OSError):
                    process.terminate()
        timer = threading.Timer(max(grace_seconds, 0.0), self._kill_tree)
        timer.daemon = True
        timer.start()

    def _kill_tree(self) -> None:
        """Kill the child and every descendant seen now or at cancel time (psutil refuses reused pids)."""
        if self._process is None or self.finished:
            return
        descendants = list(self._descendants)
        with contextlib.suppress(psutil.Error):
            descendants += psutil.Process(self._process.pid).children(recursive=True)
        for process in descendants:
            with contextlib.suppress(psutil.Error):
                process.kill()
        # Through Popen, not psutil: the reader thread reaps the child with Popen.wait and needs its exit code.
        with contextlib.suppress(OSError):
            self._process.kill()


def _parse_event(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
