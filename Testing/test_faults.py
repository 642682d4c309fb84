"""Nothing silently wrong, nothing silently lost: the command line under real faults (issue #12).

Each test runs the command line's ``main`` on real files: bytes flipped in an adapter file, a name taken by another
run while training, read-only and full file systems, a file size limit, SIGTERM and SIGKILL. Signals, the file size
limit and the race run in a child process (``python -m TCURLoRALib``, or a small driver that calls the same ``main``
after arranging the fault at a fixed point of the run); the others in this process, which saves the seconds of
importing torch. The table of these faults and what each gets is in Testing/README.md.
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from faults import (Ran, call_cli, events, fill, flip_bytes, read_only_folder, run_python, small_filesystem,
                    tensor_offset)
from synthetic import make_tiny_base, write_case
from TCURLoRALib import tensorfiles
from TCURLoRALib.outputs import KEPT_PREFIX

pytestmark = pytest.mark.usefixtures("one_torch_thread", "in_tmp_path")

TRAIN_QUICKLY = ("--steps", "1", "--batch-size", "1", "--validation", "none", "--unmapped", "background",
                 "--threads", "1", "--rank", "4")


@pytest.fixture()
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results kept after a failed write land in the current folder: the test's own, never the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny base, one small case, and an adapter trained on it for one step by the CLI."""
    folder = tmp_path_factory.mktemp("world")
    base = make_tiny_base(folder / "base.safetensors")
    image, label = write_case(folder, seed=0, spacing=(1.6, 1.6, 1.6))  # one 32^3 window at the model's 2 mm
    adapter = folder / "adapter.safetensors"
    result = call_cli("train", "-o", str(adapter), "--base", str(base), "--case", str(image), str(label),
                      *TRAIN_QUICKLY, "--progress", "none")
    assert result.returncode == 0, result.stderr
    return {"base": base, "image": image, "label": label, "adapter": adapter, "case": (str(image), str(label))}


def train_args(world: dict, *output: str) -> list[str]:
    return ["train", *output, "--base", str(world["base"]), "--case", *world["case"], *TRAIN_QUICKLY,
            "--progress", "json"]


def trained(result: Ran | subprocess.CompletedProcess) -> bool:
    """Whether the run got as far as a training step (checks before the work must stop it earlier)."""
    return any(event.get("event") == "step" for event in events(result.stdout))


def kept_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(KEPT_PREFIX))


# ---------------------------------------------------------------------------------------------------- 1 integrity


@pytest.mark.parametrize("tensor, count, mask", [("decoder2.conv_block.conv1.conv.weight", 1, 0x01),  # one bit
                                                  ("tcur.attention.u", 16, 0xFF)])                    # 16 bytes
def test_a_damaged_adapter_is_refused_and_nothing_written(world: dict, tmp_path: Path, tensor: str, count: int,
                                                          mask: int) -> None:
    damaged = tmp_path / "damaged.safetensors"
    shutil.copyfile(world["adapter"], damaged)
    flip_bytes(damaged, tensor_offset(damaged, tensor) + 40, count, mask)
    out = tmp_path / "out"
    out.mkdir()
    result = call_cli("segment", str(world["image"]), "-o", str(out / "labels.nii.gz"), "--base", str(world["base"]),
                     "--adapter", str(damaged), "--seg-nrrd", str(out / "labels.seg.nrrd"))
    assert result.returncode == 2, result.stderr
    assert "damaged.safetensors' is damaged: its tensors do not match the digest" in result.stderr
    assert "copy the file again from where it came from, or retrain it" in result.stderr
    assert list(out.iterdir()) == []


def test_an_adapter_with_nan_weights_is_refused(world: dict, tmp_path: Path) -> None:
    """A digest proves a file is as written; NaN weights written by a diverged run are refused by value."""
    tensors, card = tensorfiles.load(world["adapter"], "adapter")
    tensors["decoder3.conv_block.conv1.conv.weight"][0, 0] = float("nan")
    tensorfiles.save_atomic(tmp_path / "nan.safetensors", tensors, card, "adapter")
    result = call_cli("segment", str(world["image"]), "-o", str(tmp_path / "labels.nii.gz"), "--base",
                     str(world["base"]), "--adapter", str(tmp_path / "nan.safetensors"))
    assert result.returncode == 2
    assert "non-finite values (NaN or infinity) in 'decoder3.conv_block.conv1.conv.weight'" in result.stderr
    assert not (tmp_path / "labels.nii.gz").exists()


def test_a_network_output_that_is_not_finite_fails_instead_of_writing_background(world: dict,
                                                                                  tmp_path: Path) -> None:
    from TCURLoRALib.basemodel import load_base
    from TCURLoRALib.segmentation import segment

    base = load_base(world["base"])
    with torch.no_grad():
        base.model.out.conv.conv.bias[1] = float("nan")  # e.g. a base pretrained into NaN
    with pytest.raises(ValueError, match=r"the output of base model 'tiny' holds \d+ non-finite values .*nothing "
                                         r"was written"):
        segment(world["image"], base, tmp_path / "labels.nii.gz", seg_nrrd_path=tmp_path / "s.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- 2 overwrites


def test_train_out_follows_the_overwrite_rule_and_never_writes_over_its_base(world: dict, tmp_path: Path) -> None:
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"someone's file")
    result = call_cli(*train_args(world, "-o", str(existing)))
    assert result.returncode == 2 and not trained(result)
    assert "existing.safetensors' already exists: give --overwrite to replace it" in result.stderr
    assert existing.read_bytes() == b"someone's file"

    base_bytes = world["base"].read_bytes()
    result = call_cli(*train_args(world, "-o", str(world["base"]), "--overwrite"))
    assert result.returncode == 2 and not trained(result)
    assert "base.safetensors' that this command reads: it is never written over" in result.stderr
    assert world["base"].read_bytes() == base_bytes


def test_no_command_writes_into_the_shipped_folder(world: dict, tmp_path: Path) -> None:
    models = tmp_path / "Models"
    models.mkdir()
    shutil.copyfile(world["base"], models / "base.safetensors")
    env = {"TCURLORA_MODELS": str(models), "TCURLORA_HOME": str(tmp_path / "home")}
    for output in ("base.safetensors", "new.safetensors"):
        result = call_cli("train", "-o", str(models / output), "--case", *world["case"], *TRAIN_QUICKLY,
                         "--overwrite", "--progress", "json", env=env)
        assert result.returncode == 2 and not trained(result)
        assert "is in the folder of shipped files" in result.stderr
    result = call_cli("segment", str(world["image"]), "-o", str(models / "labels.nii.gz"), env=env)
    assert result.returncode == 2 and "folder of shipped files" in result.stderr
    assert sorted(os.listdir(models)) == ["base.safetensors"]
    assert (models / "base.safetensors").read_bytes() == world["base"].read_bytes()


def test_segment_output_that_exists_needs_overwrite(world: dict, tmp_path: Path) -> None:
    (tmp_path / "labels.nii.gz").write_bytes(b"earlier result")
    args = ["segment", str(world["image"]), "-o", str(tmp_path / "labels.nii.gz"), "--base", str(world["base"])]
    result = call_cli(*args)
    assert result.returncode == 2 and "already exists: give --overwrite" in result.stderr
    assert (tmp_path / "labels.nii.gz").read_bytes() == b"earlier result"
    assert call_cli(*args, "--overwrite").returncode == 0
    assert sitk.ReadImage(str(tmp_path / "labels.nii.gz")).GetSize() == sitk.ReadImage(str(world["image"])).GetSize()


# ---------------------------------------------------------------------------------------------------- 3 races

# Runs the CLI with ``train.fit`` wrapped: after training, before the final write, it does ACTION.
AFTER_TRAINING = """
import os, sys
from pathlib import Path
from TCURLoRALib import cli, train
fit = train.fit
def fit_then_act(*args, **kwargs):
    result = fit(*args, **kwargs)
    ACTION
    return result
train.fit = fit_then_act
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_second_training_of_the_same_name_does_not_replace_the_first(world: dict, tmp_path: Path) -> None:
    """The other training finishes first (its file appears after this one's start check): exclusive final write."""
    home = tmp_path / "home"
    store = home / "adapters"
    store.mkdir(parents=True)
    other = store / "mine.safetensors"
    action = f"Path({str(other)!r}).write_bytes(Path({str(world['adapter'])!r}).read_bytes())"
    work = tmp_path / "work"
    work.mkdir()
    result = run_python(AFTER_TRAINING.replace("ACTION", action), *train_args(world, "--name", "mine"),
                        cwd=work, env={"TCURLORA_HOME": str(home)})
    assert result.returncode == 2 and trained(result), result.stderr
    assert "mine.safetensors' appeared while this command ran (another run writing the same file?)" in result.stderr
    assert other.read_bytes() == world["adapter"].read_bytes(), "the first training's adapter was replaced"
    [kept] = kept_folders(work)
    assert str(kept / "mine.safetensors") in result.stderr
    _, card = tensorfiles.load(kept / "mine.safetensors", "adapter")
    assert card["name"] == "mine" and card["training"]["steps"] == 1
    assert sorted(os.listdir(store)) == ["mine.safetensors"]


# ---------------------------------------------------------------------------------------------------- 4 write checks


def test_a_read_only_store_is_refused_before_training(world: dict, tmp_path: Path) -> None:
    with read_only_folder(tmp_path / "home" / "adapters") as store:
        result = call_cli(*train_args(world, "--name", "mine"), env={"TCURLORA_HOME": str(store.parent)})
    assert result.returncode == 2 and not trained(result)
    assert "adapters' does not take new files" in result.stderr and "choose a folder you can write to" in result.stderr
    with read_only_folder(tmp_path / "ro-home") as home:
        result = call_cli(*train_args(world, "--name", "mine"), env={"TCURLORA_HOME": str(home)})
    assert result.returncode == 2 and not trained(result)
    assert "cannot create the adapter folder" in result.stderr and "set TCURLORA_HOME" in result.stderr


def test_a_missing_or_full_output_folder_is_refused_before_the_work(world: dict, tmp_path: Path) -> None:
    result = call_cli(*train_args(world, "-o", str(tmp_path / "no" / "such" / "a.safetensors")))
    assert result.returncode == 2 and not trained(result)
    assert "folder '" in result.stderr and "no/such' does not exist" in result.stderr
    with small_filesystem(tmp_path / "tiny-disk", 256) as disk:
        result = call_cli(*train_args(world, "-o", str(disk / "a.safetensors")))
        assert result.returncode == 2 and not trained(result)
        assert "not enough free space in" in result.stderr
        assert os.listdir(disk) == []


def test_a_final_write_that_fails_keeps_the_adapter_and_says_where(world: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills (or, where nothing can be mounted, the folder turns read only) during the training: the
    adapter is kept in the current folder (a Slicer job's work folder) and the message says where."""
    from TCURLoRALib import train

    out_folder, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    with contextlib.ExitStack() as stack:
        if os.name == "posix" and os.geteuid() == 0:
            stack.enter_context(small_filesystem(out_folder, 16 * 1024))
            fault, fix = (lambda: fill(out_folder)), "free some space on that disk"
        else:
            out_folder.mkdir()
            stack.callback(os.chmod, out_folder, 0o755)
            fault, fix = (lambda: os.chmod(out_folder, 0o555)), "choose a folder you can write to"
        fit = train.fit
        monkeypatch.setattr(train, "fit", lambda *args, **kwargs: (fit(*args, **kwargs), fault())[0])
        result = call_cli(*train_args(world, "-o", str(out_folder / "mine.safetensors")), cwd=work)
        assert result.returncode == 2 and trained(result), result.stderr
        assert not (out_folder / "mine.safetensors").exists()
        assert not [name for name in os.listdir(out_folder) if name.startswith(".")]
    [kept] = kept_folders(work)
    message = events(result.stdout)[-1]["message"]
    assert f"the result was kept in {kept / 'mine.safetensors'}: move it where you want it ({fix}" in message
    tensors, card = tensorfiles.load(kept / "mine.safetensors", "adapter")
    assert card["training"]["steps"] == 1 and "tcur.attention.u" in tensors


# ---------------------------------------------------------------------------------------------------- 5 all or none


def _file_size_limit() -> None:
    """In the child: writes past 200 kB fail with EFBIG (instead of the default SIGXFSZ kill)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_failed_probability_map_leaves_no_label_map_either(world: dict, tmp_path: Path) -> None:
    """The label map and .seg.nrrd (small) can be written, the probabilities (about 650 kB) cannot."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "TCURLoRASegment"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "TCURLoRALib", "segment", str(world["image"]), "-o", str(out / "labels.nii.gz"),
         "--seg-nrrd", str(out / "labels.seg.nrrd"), "--probabilities", str(out / "p.nrrd"), "--base",
         str(world["base"])], capture_output=True, text=True, env=env, cwd=tmp_path, preexec_fn=_file_size_limit,
        timeout=300)
    assert result.returncode == 2, result.stderr
    assert "could not write label map" in result.stderr and "probability map" in result.stderr
    assert os.listdir(out) == []
    assert kept_folders(tmp_path) == []  # the limit holds everywhere: nothing kept, and the message says so
    assert "could not be kept elsewhere either" in result.stderr


# The CLI with SIGTERM sent to itself while the outputs are being written (after the label map's writer ran).
CANCEL_WHILE_WRITING = """
import os, signal, sys
from TCURLoRALib import cli, volumes
write_segmentation = volumes.write_segmentation
def write_then_cancel(*args, **kwargs):
    written = write_segmentation(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return written
volumes.write_segmentation = write_then_cancel
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_while_writing_outputs_leaves_none_of_them(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_python(CANCEL_WHILE_WRITING, "segment", str(world["image"]), "-o", str(out / "labels.nii.gz"),
                        "--seg-nrrd", str(out / "labels.seg.nrrd"), "--base", str(world["base"]))
    assert result.returncode == 130, result.stderr
    assert "cancelled by SIGTERM" in result.stderr
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------------- 7 smaller ones


@pytest.mark.parametrize("size, spacing, message", [
    ((20, 20, 20), 100.0, r"too large to resample: it covers 2000 x 2000 x 2000 mm, which at the model's 2 x 2 x 2 "
                          r"mm is \(1000, 1000, 1000\) = 1,000,000,000 voxels, more than the 268,435,456 allowed; "
                          r"check the voxel spacing"),
    ((3, 3, 3), 1.0, r"too small to segment: \(3, 3, 3\) voxels covering 3 x 3 x 3 mm, .*at least 8 voxels along "
                     r"every axis"),
    ((1, 1, 1), 1.0, r"too small to segment"),
])
def test_volumes_too_large_or_too_small_exit_2_with_the_limit(world: dict, tmp_path: Path, size: tuple,
                                                               spacing: float, message: str) -> None:
    image = sitk.GetImageFromArray(np.ones(size[::-1], np.float32))
    image.SetSpacing((spacing,) * 3)
    sitk.WriteImage(image, str(tmp_path / "odd.nrrd"))
    result = call_cli("segment", str(tmp_path / "odd.nrrd"), "-o", str(tmp_path / "labels.nii.gz"), "--base",
                     str(world["base"]))
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "labels.nii.gz").exists()


KILLED_WHILE_SAVING = """
import os, signal, sys
from TCURLoRALib import cli, tensorfiles
write = tensorfiles._write_tensors
def write_then_die(*args):
    write(*args)
    os.kill(os.getpid(), signal.SIGKILL)
tensorfiles._write_tensors = write_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_the_temporary_of_a_save_killed_by_sigkill_is_removed_by_the_next_listing(world: dict,
                                                                                  tmp_path: Path) -> None:
    env = {"TCURLORA_HOME": str(tmp_path / "home"), "TCURLORA_MODELS": str(tmp_path / "no-shipped")}
    result = run_python(KILLED_WHILE_SAVING, *train_args(world, "--name", "mine"), env=env)
    assert result.returncode == -signal.SIGKILL
    store = tmp_path / "home" / "adapters"
    leftovers = [name for name in os.listdir(store) if name.startswith(".")]
    assert leftovers and all(".tmp" in name for name in leftovers)
    assert sum((store / name).stat().st_size for name in leftovers) > 10_000
    listed = call_cli("adapters", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert os.listdir(store) == []
