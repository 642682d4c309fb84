"""The background job runner with real subprocesses: the CLI's progress, failure and cancel (by signal and by the
cancel file alone, as on Windows), and a misbehaving stand-in engine (Testing/fake_job.py): output in another code
page, a reader that fails, a child that ignores every request to stop."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from synthetic import make_tiny_base, write_case
from TCURLoRALib import jobs
from TCURLoRALib.jobs import Job, JobState, hidden_console_options
from TCURLoRALib.outputs import KEEP_DIR_ENV
from TCURLoRALib.progress import CANCEL_FILE_ENV, Cancelled, CancelOnFile, cancellable

TESTING_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("jobdata")
    make_tiny_base(folder / "base.safetensors")
    for seed in (1, 2):
        write_case(folder, seed)
    return folder


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(monkeypatch):
    """A failing test must not leave a 5000-step training running: every job started here is killed at the end."""
    started: list[Job] = []
    start = Job.start

    def recording_start(job: Job) -> None:
        started.append(job)
        start(job)

    monkeypatch.setattr(Job, "start", recording_start)
    yield
    for job in started:
        job.cancel(grace_seconds=0)
        job.wait(timeout=60)


def drain(job: Job, timeout: float = 300) -> list[dict]:
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while not job.finished and time.monotonic() < deadline:
        events.extend(job.poll_events())
        time.sleep(0.05)
    job.wait(timeout=30)
    events.extend(job.poll_events())
    return events


def test_segment_job_reports_progress_and_cleans_up(data: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.nii.gz"
    job = Job(["segment", str(data / "case1_image.nii.gz"), "-o", str(output), "--base",
               str(data / "base.safetensors")], work_dir=tmp_path / "work")
    (tmp_path / "work").mkdir()
    job.start()
    events = drain(job)
    kinds = [event["event"] for event in events]
    assert job.state is JobState.DONE, job.log
    assert kinds[0] == "start" and "step" in kinds and kinds[-2:] == ["done", "finished"]
    steps = [event for event in events if event["event"] == "step"]
    assert steps[-1]["step"] == steps[-1]["total"]
    assert output.is_file()
    assert not (tmp_path / "work").exists(), "the work folder is removed after success"


def test_a_relative_output_lands_in_the_callers_folder_not_the_work_folder(data: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The work folder goes after success: a relative ``-o`` must resolve against where the job was made."""
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    job = Job(["segment", str(data / "case1_image.nii.gz"), "-o", "out.nii.gz", "--base",
               str(data / "base.safetensors")], work_dir=tmp_path / "work")
    monkeypatch.chdir(tmp_path)  # where the caller is later does not matter: the job's folder was fixed when made
    (tmp_path / "work").mkdir()
    job.start()
    drain(job)
    assert job.state is JobState.DONE, job.log
    assert (caller / "out.nii.gz").is_file()
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "work").exists()


def test_failure_surfaces_its_message_and_keeps_the_work_folder(data: Path, tmp_path: Path) -> None:
    job = Job(["segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), "--base",
               str(data / "base.safetensors")], work_dir=tmp_path)
    job.start()
    drain(job)
    assert job.state is JobState.FAILED and job.returncode == 2
    assert "missing.nii.gz" in job.error
    assert any(str(tmp_path) in line for line in job.log)


def long_training(data: Path, out: Path, work_dir: Path) -> Job:
    return Job(["train", "--base", str(data / "base.safetensors"), "--case", str(data / "case1_image.nii.gz"),
                str(data / "case1_label.nii.gz"), "--case", str(data / "case2_image.nii.gz"),
                str(data / "case2_label.nii.gz"), "--label-map",
                '{"1": "grey matter", "2": "white matter", "5": "white matter"}',
                "--steps", "5000", "-o", str(out)], work_dir=work_dir)


def wait_for_event(job: Job, kind: str, timeout: float = 240) -> list[dict]:
    deadline = time.monotonic() + timeout
    events: list[dict] = []
    while not any(e["event"] == kind for e in events) and time.monotonic() < deadline and not job.finished:
        events.extend(job.poll_events())
        time.sleep(0.05)
    assert any(e["event"] == kind for e in events), job.log
    return events


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("use_signals", [True, False], ids=["sigterm-and-file", "cancel-file-only"])
def test_cancel_stops_the_engine_cleanly_and_writes_no_adapter(data: Path, tmp_path: Path, use_signals) -> None:
    """POSIX sends SIGTERM and creates the cancel file; Windows (no SIGTERM) relies on the file alone: either way
    the engine itself stops at its next step with the cancelled code, before the grace period ends."""
    out = tmp_path / "never.safetensors"
    job = long_training(data, out, tmp_path)
    job.use_signals = use_signals
    job.start()
    wait_for_event(job, "step")
    pid = job._process.pid
    job.cancel(grace_seconds=600)
    assert job.cancel_file.is_file()
    drain(job, timeout=120)
    assert job.state is JobState.CANCELLED
    assert job.returncode == 130, "the engine stopped by itself, with the cancelled code (no kill)"
    assert gone(pid)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")], "no temporary adapter file left"


# ------------------------------------------------------------------------------------------- a misbehaving engine


def fake_job(tmp_path: Path, *arguments: str) -> Job:
    return Job(list(arguments), module="fake_job", work_dir=tmp_path, env={"PYTHONPATH": str(TESTING_DIR)})


def test_output_in_another_code_page_is_replaced_and_the_job_finishes(tmp_path: Path) -> None:
    """PythonSlicer writes in the ANSI code page on Windows: a non-UTF-8 byte must not kill the reader."""
    job = fake_job(tmp_path, "ansi")
    job.start()
    assert job.wait(timeout=120) is JobState.DONE, job.log
    events = job.poll_events()
    assert [e["event"] for e in events][-2:] == ["done", "finished"]
    assert any(line.startswith("C:\\Users\\Jos\ufffd M\ufffdller") for line in job.log), job.log
    assert "\ufffd\ufffd\ufffd" in job.log[1]


def test_child_writes_utf8_unbuffered_and_knows_its_cancel_file(tmp_path: Path) -> None:
    job = fake_job(tmp_path, "env", "PYTHONIOENCODING", "PYTHONUNBUFFERED", CANCEL_FILE_ENV, KEEP_DIR_ENV)
    job.start()
    assert job.wait(timeout=120) is JobState.DONE, job.log
    (logged,) = [e for e in job.poll_events() if e["event"] == "log"]
    assert json.loads(logged["message"]) == {"PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1",
                                             CANCEL_FILE_ENV: str(tmp_path / jobs.CANCEL_FILE_NAME),
                                             KEEP_DIR_ENV: str(tmp_path)}, "results that fail to publish stay " \
                                                                           "in the work folder"


def test_a_failing_reader_still_finishes_the_job_and_stops_the_child(tmp_path: Path, monkeypatch) -> None:
    def broken(line: str):
        raise RuntimeError(f"cannot parse {line!r}")

    monkeypatch.setattr(jobs, "_parse_event", broken)
    job = fake_job(tmp_path, "stubborn")
    job.start()
    assert job.wait(timeout=120) is JobState.FAILED
    assert job.error.startswith("reading the job's output failed: RuntimeError: cannot parse")
    assert gone(job._process.pid), "nobody reads its output any more: the child is killed, not left blocking"
    assert job.poll_events()[-1]["event"] == "finished"


def test_cancel_returns_at_once_and_kills_a_child_that_ignores_it(tmp_path: Path) -> None:
    job = fake_job(tmp_path, "stubborn")
    job.start()
    wait_for_event(job, "start", timeout=120)
    job.cancel(grace_seconds=3600)
    # The child ignores SIGTERM and the cancel file: had cancel waited for it, it would not have returned yet.
    assert not job.finished and not gone(job._process.pid)
    job.cancel(grace_seconds=0)
    assert job.wait(timeout=120) is JobState.CANCELLED
    assert gone(job._process.pid)
    assert job.poll_events()[-1] == {"event": "finished", "state": "cancelled", "returncode": job.returncode,
                                     "error": None}


def test_console_window_is_hidden_on_windows_only() -> None:
    """The same STARTUPINFO as slicer.util.launchConsoleProcess: STARTF_USESHOWWINDOW with SW_HIDE."""
    options = hidden_console_options("nt", startupinfo=lambda: SimpleNamespace(dwFlags=0x100, wShowWindow=5))
    assert options["startupinfo"].dwFlags == 0x101 and options["startupinfo"].wShowWindow == 0
    assert hidden_console_options("posix") == {}


def test_cancel_file_stops_a_job_at_its_next_event_but_lets_done_and_error_through(tmp_path: Path) -> None:
    seen: list[str] = []
    path = tmp_path / "cancel"
    progress = cancellable(lambda event, **fields: seen.append(event), {CANCEL_FILE_ENV: str(path)})
    assert isinstance(progress, CancelOnFile)
    progress("start", total=2)
    path.touch()
    with pytest.raises(Cancelled, match="cancel requested"):
        progress("step", step=1)
    progress("error", kind="cancelled", message="x")
    progress("done")
    assert seen == ["start", "error", "done"]
    plain = seen.append
    assert cancellable(plain, {}) is plain


def test_a_cancel_wrapped_by_a_library_still_exits_as_cancelled() -> None:
    """SIGTERM during a MONAI transform arrives as RuntimeError("applying transform ...") from Cancelled."""
    from TCURLoRALib.cli import run_command

    def transform(args, progress):
        try:
            raise Cancelled("cancelled by SIGTERM")
        except Cancelled as error:
            raise RuntimeError("applying transform <RandAffined>") from error

    with pytest.raises(Cancelled, match="cancelled by SIGTERM"):
        run_command(transform, SimpleNamespace(), lambda *a, **k: None)
    with pytest.raises(ZeroDivisionError):
        run_command(lambda args, progress: 1 / 0, SimpleNamespace(), lambda *a, **k: None)
