"""Training on several processes under torchrun (DDP, gloo on the CPU): the same training as one process with N times
the batch, one writer, one reporter, and a job that ends together when one process fails or is cancelled.

The torchrun tests start real ``python -m torch.distributed.run --standalone --nproc_per_node 2`` jobs; every wait
has a timeout, so a job that hangs fails the test instead of stopping the suite.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import ddp_fit
from synthetic import BASE_LABELS, TARGET, case_arrays, make_tiny_base, tiny_card_fields, write_case
from TCURLoRALib import tensorfiles
from TCURLoRALib.cases import IGNORE_INDEX, PreparedCase
from TCURLoRALib.crops import CropSampler
from TCURLoRALib.distributed import TRACE_ENV, DataParallel, World, device_for
from TCURLoRALib.loop import fit
from TCURLoRALib.loss import dice_ce_from_statistics, dice_ce_statistics, masked_dice_ce
from TCURLoRALib.progress import CANCEL_FILE_ENV, Cancelled
from TCURLoRALib.settings import TrainSettings
from TCURLoRALib.train import pretrain, train_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGINE_FOLDER = Path(__file__).resolve().parents[1] / "TCURLoRASegment"
TESTING_FOLDER = Path(__file__).resolve().parent
TARGET_LABELS = [BASE_LABELS[0], TARGET]
SMALL_SPACING = (1.6, 1.6, 1.6)  # one sliding window a validation case (see test_train.py)
JOB_TIMEOUT_S = 400


def torchrun(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """A 2-process torchrun job on this machine (a free port of its own), its output captured."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ENGINE_FOLDER), str(TESTING_FOLDER)]),
                "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd)


def finish(job: subprocess.Popen) -> tuple[int, str, str]:
    try:
        stdout, stderr = job.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.kill()
        stdout, stderr = job.communicate()
        pytest.fail(f"the torchrun job did not end within {JOB_TIMEOUT_S} s:\n{stderr[-3000:]}")
    return job.returncode, stdout, stderr


def trace_lines(folder: Path, rank: int) -> list[dict]:
    path = folder / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(job: subprocess.Popen, trace: Path, step: int) -> list[dict]:
    """Waits until both ranks have traced ``step`` (the job still running); returns rank 1's trace."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if job.poll() is not None:
            pytest.fail(f"the job ended (exit {job.returncode}) before step {step}:\n{job.stderr.read()[-3000:]}")
        if all(len(trace_lines(trace, rank)) >= step for rank in (0, 1)):
            return trace_lines(trace, 1)
        time.sleep(0.2)
    job.kill()
    pytest.fail(f"step {step} not reached within {JOB_TIMEOUT_S} s")


def labels_json() -> str:
    return json.dumps([label.to_json() for label in TARGET_LABELS])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ddp")
    train, validation = folder / "train", folder / "validation"
    train.mkdir()
    validation.mkdir()
    for seed in (0, 1):
        write_case(train, seed, SMALL_SPACING)
    write_case(validation, 2, SMALL_SPACING)
    card = folder / "card.json"
    card.write_text(json.dumps(tiny_card_fields("pre")))
    return {"base": make_tiny_base(folder / "base.safetensors"), "train": train, "validation": validation,
            "card": card}


@pytest.fixture
def one_process_group(tmp_path: Path):
    """A gloo process group of this process alone, for DataParallel's members without torchrun."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def small_cases() -> list[PreparedCase]:
    cases = []
    for seed in range(3):
        image, labels = case_arrays(seed)
        cases.append(PreparedCase(f"case{seed}", image, np.where(labels == 5, 2, labels).astype(np.int64)))
    return cases


# ---------------------------------------------------------------- torchrun's environment and devices


def test_the_world_comes_from_torchruns_environment() -> None:
    assert World.from_environment({}) is None
    assert World.from_environment({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None  # as without it
    world = World.from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert world == World(rank=3, size=4, local_rank=1) and not world.main
    assert World(rank=0, size=2, local_rank=0).main
    with pytest.raises(ValueError, match=r"\$RANK must be a number \(torchrun sets it\), got 'x'"):
        World.from_environment({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match=r"\$RANK 2 is outside \$WORLD_SIZE 2"):
        World.from_environment({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_each_process_takes_the_device_of_its_local_rank() -> None:
    world = World(rank=3, size=4, local_rank=1)
    assert device_for(world, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda:0: under torchrun each process uses the GPU numbered by "
                                         r"its LOCAL_RANK; give --device cuda \(or auto\)"):
        device_for(world, "cuda:0")
    if not torch.cuda.is_available():
        assert device_for(world, "auto") == torch.device("cpu")
        with pytest.raises(ValueError, match=r"--device cuda was asked for, but CUDA is not available"):
            device_for(world, "cuda")
    elif torch.cuda.device_count() > 1:
        assert device_for(world, "cuda") == torch.device("cuda", 1)


def test_only_training_runs_under_torchrun(data: dict) -> None:
    """Any other command would run N times and write its outputs N times: refused, each process saying so."""
    env = {**os.environ, "PYTHONPATH": str(ENGINE_FOLDER), "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    result = subprocess.run([sys.executable, "-m", "TCURLoRALib", "info", str(data["base"])], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "[rank 1] error: info runs in one process: start it with python -m TCURLoRALib, not torchrun (which " \
           "runs only train and pretrain)" in result.stderr


# ---------------------------------------------------------------- the pieces of the equivalence


@pytest.mark.parametrize("processes, per_process", [(2, 2), (3, 1)])
def test_the_processes_crops_together_are_the_one_process_batch(processes: int, per_process: int) -> None:
    """Bit for bit, step after step: rank r's crops are crops r B .. r B + B - 1 of the one-process batch of N B, and
    drawing (not cutting) the others moves every random stream on as cutting them would."""
    cases = small_cases()
    whole = CropSampler(cases, (16, 16, 16), seed=5)
    parts = [CropSampler(cases, (16, 16, 16), seed=5) for _ in range(processes)]
    size = processes * per_process
    for step in range(12):
        images, targets = whole.batch(size)
        for rank, part in enumerate(parts):
            kept = range(rank * per_process, (rank + 1) * per_process)
            own_images, own_targets = part.batch(size, keep=kept)
            assert torch.equal(own_images, images[kept.start:kept.stop]), (step, rank)
            assert torch.equal(own_targets, targets[kept.start:kept.stop]), (step, rank)


def test_the_loss_of_summed_statistics_is_the_batch_loss() -> None:
    """Independent reference: masked_dice_ce (MONAI's DiceLoss with batch=True). In float64 the value and the
    gradient agree to rounding, and the statistics of the parts of a batch add up to those of the batch, also when
    a part holds no annotated voxel."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, 5, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.randint(0, 4, (3, 6, 5, 7), generator=generator)
    target[0, :3] = IGNORE_INDEX
    target[2] = IGNORE_INDEX  # a part without any annotated voxel
    reference = masked_dice_ce(logits, target)
    (reference_gradient,) = torch.autograd.grad(reference, logits)
    parts = sum(dice_ce_statistics(logits[i:i + 1], target[i:i + 1]) for i in range(3))
    assert torch.allclose(parts, dice_ce_statistics(logits, target), rtol=1e-12, atol=1e-12)
    loss = dice_ce_from_statistics(parts)
    (gradient,) = torch.autograd.grad(loss, logits)
    assert abs(float(loss.detach() - reference.detach())) < 1e-12
    assert torch.allclose(gradient, reference_gradient, rtol=1e-10, atol=1e-14)
    # Not a mean of per-crop losses: that would be another loss.
    with torch.no_grad():
        per_crop = torch.stack([masked_dice_ce(logits[i:i + 1], target[i:i + 1]) for i in range(2)]).mean()
        assert abs(float(per_crop - masked_dice_ce(logits[:2], target[:2]))) > 1e-3
    # Nothing annotated anywhere: 0, with a gradient of 0 (every parameter still reached).
    empty = torch.full_like(target, IGNORE_INDEX)
    nothing = dice_ce_from_statistics(dice_ce_statistics(logits, empty))
    (zero,) = torch.autograd.grad(nothing, logits)
    assert float(nothing.detach()) == 0.0 and not zero.any()


def test_a_process_other_than_rank_0_checks_and_writes_nothing(data: dict, tmp_path: Path,
                                                               one_process_group: None) -> None:
    """Its output folder need not exist (on a cluster it may exist only on rank 0's machine); it returns None."""
    other = DataParallel(World(rank=1, size=2, local_rank=1), torch.device("cpu"), "gloo")
    missing = tmp_path / "not-here"
    assert train_adapter(data["base"], data["train"], TARGET_LABELS, missing / "a.safetensors", steps=1,
                         batch_size=1, unmapped="background", validation="none", rank=2, threads=1,
                         parallel=other) is None
    assert pretrain(data["train"], tiny_card_fields("pre"), missing / "b.safetensors", steps=1, batch_size=1,
                    label_map={"5": "white matter"}, threads=1, parallel=other) is None
    assert not missing.exists() and {p.name for p in tmp_path.iterdir()} == {"store"}


def test_the_cancel_file_stops_the_processes_at_a_step(tmp_path: Path, one_process_group: None) -> None:
    cancel = tmp_path / "cancel"
    parallel = DataParallel(World(rank=0, size=2, local_rank=0), torch.device("cpu"), "gloo",
                            cancel_file=str(cancel))
    model = ddp_fit.Float64(ddp_fit.tiny_unetr(seed=0))
    steps: list[int] = []

    def cancel_after_two_steps(event: str, **fields: Any) -> None:
        if event == "step":
            steps.append(fields["step"])
            if fields["step"] == 2:
                cancel.touch()

    with pytest.raises(Cancelled, match="cancel requested"):
        fit(model, torch.optim.SGD(model.parameters(), lr=1e-3), small_cases(), [], labels=BASE_LABELS,
            patch_size=ddp_fit.PATCH, settings=TrainSettings(steps=5, batch_size=1, validation="none"),
            progress=cancel_after_two_steps, parallel=parallel)
    assert steps == [1, 2]


# ---------------------------------------------------------------- torchrun jobs


def test_two_processes_train_the_same_parameters_as_one_with_twice_the_batch(tmp_path: Path) -> None:
    """2 processes x 2 crops against 1 x 4: the whole UNETR in float64 for 3 steps of SGD with weight decay, linear
    in the gradient, so that a wrong crop, loss reduction or gradient scale shows, and so does a parameter that
    never reaches the loss (MONAI's unused cross-attention norms) being given a zero gradient, which weight decay
    would then shrink. Which process holds which crop does not matter: the gradient sums over all of them."""
    job = torchrun(str(TESTING_FOLDER / "ddp_fit.py"), str(tmp_path / "two.safetensors"), "2", "sgd")
    returncode, _, stderr = finish(job)
    assert returncode == 0, stderr[-3000:]
    ddp_fit.run(tmp_path / "one.safetensors", 4, "sgd")
    two, one = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    start = ddp_fit.Float64(ddp_fit.tiny_unetr(seed=0)).state_dict()
    assert two.keys() == one.keys()
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=0, atol=1e-12), name
    for trained in (one, two):
        moved = [name for name in trained if not torch.equal(trained[name], start[name])]
        assert any("decoder" in name for name in moved) and not any("cross_attn" in name for name in moved)


def test_a_torchrun_training_equals_one_process_and_only_rank_0_reports_and_writes(data: dict,
                                                                                    tmp_path: Path) -> None:
    out, trace = tmp_path / "out", tmp_path / "trace"
    out.mkdir()
    trace.mkdir()
    settings = {"steps": 2, "validate_every": 2, "seed": 1, "rank": 4, "lr": 1e-2, "unmapped": "background"}
    job = torchrun("-m", "TCURLoRALib", "train", "--base", str(data["base"]), "--cases", str(data["train"]),
                   "--validation", str(data["validation"]), "--labels", labels_json(), "-o",
                   str(out / "two.safetensors"), "--batch-size", "1", "--device", "cpu", "--threads", "1",
                   "--progress", "json", *TrainSettings(**settings).to_arguments(), env={TRACE_ENV: str(trace)})
    returncode, stdout, stderr = finish(job)
    assert returncode == 0, stderr[-3000:]
    # One file; the processes held the same parameters after every step.
    assert [p.name for p in out.iterdir()] == ["two.safetensors"]
    ranks = [trace_lines(trace, rank) for rank in (0, 1)]
    assert [line["step"] for line in ranks[0]] == [line["step"] for line in ranks[1]] == [1, 2]
    assert [line["digest"] for line in ranks[0]] == [line["digest"] for line in ranks[1]]
    assert len({line["digest"] for line in ranks[0]}) == 2  # the parameters did change
    # Progress from rank 0 alone: one start, one line a step, one done (stdout holds only JSON lines).
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [e["event"] for e in events].count("start") == 1 and [e["event"] for e in events].count("done") == 1
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    card = tensorfiles.load(out / "two.safetensors", kind="adapter")[1]
    training = card["training"]
    assert training["batch_size"] == 2 and training["distributed"] == {"processes": 2, "backend": "gloo"}

    # The same seed in one process with twice the batch: the same losses and parameters to float tolerance.
    one_events: list[dict] = []
    one_card = train_adapter(data["base"], data["train"], TARGET_LABELS, out / "one.safetensors", batch_size=2,
                             validation=str(data["validation"]), device="cpu", threads=1,
                             progress=lambda event, **fields: one_events.append({"event": event, **fields}),
                             **settings)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    one_losses = [e["loss"] for e in one_events if e["event"] == "step"]
    assert np.allclose(losses, one_losses, rtol=1e-4, atol=0), (losses, one_losses)
    two, one = (tensorfiles.load(out / name, kind="adapter")[0] for name in ("two.safetensors", "one.safetensors"))
    assert two.keys() == one.keys()
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=0, atol=1e-4), name
    assert card["metrics"]["validation"]["step"] == one_card.metrics["validation"]["step"]
    assert {key: value for key, value in training.items() if key not in ("seconds", "distributed")} == \
        {key: value for key, value in one_card.training.items() if key != "seconds"}


def test_a_process_that_dies_ends_the_job_without_a_file(data: dict, tmp_path: Path) -> None:
    """pretrain on 2 processes; rank 1 is killed (SIGKILL, as by the kernel's out-of-memory killer) after step 2:
    the job ends, non-zero, torchrun names rank 1 as the root cause, and nothing is written."""
    out, trace = tmp_path / "out", tmp_path / "trace"
    out.mkdir()
    trace.mkdir()
    job = torchrun("-m", "TCURLoRALib", "pretrain", "--card", str(data["card"]), "--cases", str(data["train"]),
                   "-o", str(out / "base.safetensors"), "--label-map", '{"5": "white matter"}', "--steps", "500",
                   "--batch-size", "1", "--device", "cpu", "--threads", "1", "--progress", "json",
                   env={TRACE_ENV: str(trace)})
    rank1 = wait_for_step(job, trace, 2)
    os.kill(rank1[0]["pid"], signal.SIGKILL)
    returncode, stdout, stderr = finish(job)
    assert returncode != 0
    assert "Root Cause" in stderr and "rank      : 1" in stderr.split("Root Cause", 1)[1], stderr[-3000:]
    assert list(out.iterdir()) == []
    assert not any(json.loads(line)["event"] == "done" for line in stdout.splitlines())


@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "cancel file"])
def test_a_cancelled_torchrun_job_stops_every_process_and_writes_nothing(data: dict, tmp_path: Path,
                                                                         how: str) -> None:
    out, trace, cancel = tmp_path / "out", tmp_path / "trace", tmp_path / "cancel"
    out.mkdir()
    trace.mkdir()
    job = torchrun("-m", "TCURLoRALib", "train", "--base", str(data["base"]), "--cases", str(data["train"]),
                   "--labels", labels_json(), "--unmapped", "background", "-o", str(out / "a.safetensors"),
                   "--steps", "500", "--batch-size", "1", "--rank", "2", "--validation", "none", "--device", "cpu",
                   "--threads", "1", "--progress", "none", env={TRACE_ENV: str(trace), CANCEL_FILE_ENV: str(cancel)})
    wait_for_step(job, trace, 2)
    stop: Callable[[], None] = (lambda: job.send_signal(signal.SIGTERM)) if how.startswith("SIGTERM") else cancel.touch
    stop()
    returncode, _, stderr = finish(job)
    assert returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] cancelled: " in stderr, stderr[-3000:]
    assert "internal error" not in stderr
    assert list(out.iterdir()) == []
