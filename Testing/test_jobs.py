"""The background job runner with real subprocesses of the CLI: progress, failure, cancel."""
from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from synthetic import make_tiny_base, write_case
from TCURLoRALib.jobs import Job, JobState


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("jobdata")
    make_tiny_base(folder / "base.safetensors")
    for seed in (1, 2):
        write_case(folder, seed)
    return folder


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


def test_failure_surfaces_its_message_and_keeps_the_work_folder(data: Path, tmp_path: Path) -> None:
    job = Job(["segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), "--base",
               str(data / "base.safetensors")], work_dir=tmp_path)
    job.start()
    drain(job)
    assert job.state is JobState.FAILED and job.returncode == 2
    assert "missing.nii.gz" in job.error
    assert any(str(tmp_path) in line for line in job.log)


def test_cancel_ends_the_process_tree_and_writes_no_adapter(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "never.safetensors"
    job = Job(["train", "--base", str(data / "base.safetensors"), "--case", str(data / "case1_image.nii.gz"),
               str(data / "case1_label.nii.gz"), "--case", str(data / "case2_image.nii.gz"),
               str(data / "case2_label.nii.gz"), "--label-map", '{"1": "grey matter", "2": "white matter", "5": "white matter"}',
               "--steps", "5000", "--out", str(out)], work_dir=tmp_path)
    job.start()
    deadline = time.monotonic() + 240
    events: list[dict] = []
    while not any(e["event"] == "step" for e in events) and time.monotonic() < deadline and not job.finished:
        events.extend(job.poll_events())
        time.sleep(0.1)
    assert any(e["event"] == "step" for e in events), job.log
    pid = job._process.pid
    job.cancel()
    drain(job, timeout=60)
    assert job.state is JobState.CANCELLED
    assert job.returncode == 130, "the engine caught SIGTERM and exited with the cancelled code"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")], "no temporary adapter file left"
