"""The command-line program as the Slicer panels run it: real subprocesses, JSON progress lines, exit codes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from synthetic import TARGET, make_tiny_base, write_case
from TCURLoRALib import files, volumes
from TCURLoRALib.cli import build_parser

ENGINE_FOLDER = Path(__file__).resolve().parents[1] / "TCURLoRASegment"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ENGINE_FOLDER), **(env or {})}
    return subprocess.run([sys.executable, "-m", "TCURLoRALib", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def json_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    make_tiny_base(folder / "tiny-base.safetensors")
    return folder


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("segment", "train", "pretrain", "evaluate", "adapters", "info"):
        assert command in result.stdout


@pytest.mark.parametrize("command, defaults", [("train", "plain"), ("pretrain", "pretraining")])
def test_help_states_every_settings_default(command: str, defaults: str) -> None:
    """The training options and their printed defaults come from TrainSettings (without importing torch)."""
    from TCURLoRALib.cli import PRETRAINING_FIELDS, TRAINING_FIELDS
    from TCURLoRALib.settings import TrainSettings, flag

    settings = TrainSettings() if defaults == "plain" else TrainSettings.for_pretraining()
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for name in TRAINING_FIELDS if command == "train" else PRETRAINING_FIELDS:
        assert f"{flag(name)} " in text and f"(default: {settings.default_text(name)})" in text, name
    assert "(default: 1000)" in text if command == "pretrain" else "(default: 200)" in text
    assert ".py" not in text  # no pointers to source files


def test_help_and_settings_need_no_torch() -> None:
    """What the Slicer panels read (TrainSettings, the device choices) and --help import no torch."""
    code = ("import sys, contextlib, io\n"
            "from TCURLoRALib.settings import TrainSettings\n"
            "from TCURLoRALib.devices import DEVICE_CHOICES, check_device\n"
            "from TCURLoRALib.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['train', '--help'])\n"
            "assert TrainSettings().steps and check_device('cuda:1') == 'cuda:1'\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ENGINE_FOLDER)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_info_prints_the_card(models: Path) -> None:
    result = run_cli("info", str(models / "tiny-base.safetensors"))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["kind"] == "base"
    assert printed["card"]["name"] == "tiny"
    assert [label["name"] for label in printed["card"]["labels"]] == ["background", "grey matter", "white matter"]


def test_bad_input_exits_2_with_a_json_error_line(tmp_path: Path) -> None:
    result = run_cli("info", str(tmp_path / "missing.safetensors"), "--progress", "json")
    assert result.returncode == 2
    events = json_events(result.stdout)
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "bad_input"
    assert "missing.safetensors" in events[-1]["message"]
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x10\x00\x00")
    result = run_cli("info", str(truncated))
    assert result.returncode == 2 and "error:" in result.stderr


def test_adapters_list_reads_shipped_and_user_folders(models: Path, tmp_path: Path) -> None:
    env = {"TCURLORA_MODELS": str(models), "TCURLORA_HOME": str(tmp_path / "home")}
    result = run_cli("adapters", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []  # the base model in the shipped folder is not an adapter
    result = run_cli("adapters", "delete", "nothing-here", env=env)
    assert result.returncode == 2


# ---------------------------------------------------------------- training from the command line, as a user does it


SMALL_SPACING = (1.6, 1.6, 1.6)  # one sliding window a case: validation stays cheap


def two_label_cases(folder: Path, count: int) -> list[tuple[str, str]]:
    """NIfTI cases whose label maps hold 1 (the bright ellipsoid) and 2 (the inside), as a user's would."""
    pairs = []
    for seed in range(count):
        image_path, label_path = write_case(folder, seed, SMALL_SPACING)
        labels = sitk.ReadImage(str(label_path))
        array = sitk.GetArrayFromImage(labels)
        relabelled = sitk.GetImageFromArray(np.select([array == TARGET.value, array == 2], [1, 2], 0)
                                            .astype(np.uint16))
        relabelled.CopyInformation(labels)
        sitk.WriteImage(relabelled, str(label_path))
        pairs.append((str(image_path), str(label_path)))
    return pairs


def test_train_a_new_two_label_adapter_from_label_maps_by_name(models: Path, tmp_path: Path) -> None:
    """#16: new labels by name, the mapping and the split said before training, plain progress lines in a log (stderr
    is no terminal here), the result as a table."""
    cases = two_label_cases(tmp_path, 2)
    output = tmp_path / "two.safetensors"
    result = run_cli("train", "--base", str(models / "tiny-base.safetensors"), "--case", *cases[0], "--case",
                     *cases[1], "--labels", "bright spot,inner part", "-o", str(output), "--steps", "4",
                     "--batch-size", "1", "--validate-every", "2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    log = result.stderr.splitlines()
    assert log[:5] == [
        "adapter labels (from the names in --labels): 1 bright spot, 2 inner part",
        "cases: 1 train (case1_image), 1 validates (case0_image): --validation auto holds out 1 of 2 cases: number "
        "--seed % 2 = 0 (0-based, in the order given); the state with the best validation Dice is written",
        "label mapping (case label value [segment name] -> adapter label):",
        "  1 -> 1 bright spot  (same value)",
        "  2 -> 2 inner part   (same value)"]
    assert log[5] == "train adapter: started, 4 steps"
    steps = [line for line in log if line.startswith("train adapter: step ")]
    assert len(steps) == 4 and re.fullmatch(r"train adapter: step 1/4, loss \d\.\d{4}, about \d+ s left \(estimate\)",
                                            steps[0]), steps
    assert re.fullmatch(r"train adapter: step 4/4, loss \d\.\d{4}", steps[-1])
    assert any(re.fullmatch(r"train adapter: validation at step 2: mean Dice \d\.\d{4}; bright spot \d\.\d{4}, inner "
                            r"part \d\.\d{4}", line) for line in log)
    printed = result.stdout.splitlines()
    assert printed[0] == f"adapter 'two' written to {output}"
    assert re.fullmatch(r"validation on 1 case \(case0_image\): the (starting state|state of step [24]), the best "
                        r"mean Dice, was written", printed[1])
    assert printed[2].split() == ["label", "Dice", "at", "start"]
    assert [line.split()[0] for line in printed[3:]] == ["bright", "inner", "mean"]
    card = files.read_info(output)[1]
    assert card["labels"] == [{"value": 0, "name": "background", "color": [0, 0, 0]},
                              {"value": 1, "name": "bright spot", "color": [128, 174, 128]},
                              {"value": 2, "name": "inner part", "color": [241, 214, 145]}]
    assert [(m["value"], m["label"], m["rule"]) for m in card["training"]["label_mapping"]] == [
        (1, "bright spot", "same value"), (2, "inner part", "same value")]
    assert card["training"]["validation_split"]["validation"] == ["case0_image"]


def test_labels_from_a_label_map_and_what_is_refused(models: Path, tmp_path: Path) -> None:
    """#16.1-16.3: names in --label-map make new labels; one case says why nothing validates (never ``{}``); a name
    missing from --labels, a segmentation's names that do not match, are refused with the way out."""
    base = str(models / "tiny-base.safetensors")
    cases = two_label_cases(tmp_path, 1)
    output = tmp_path / "mapped.safetensors"
    result = run_cli("train", "--base", base, "--case", *cases[0], "--label-map",
                     '{"1": "bright spot", "2": "inner part"}', "--out", str(output), "--steps", "0")
    assert result.returncode == 0, result.stderr
    assert "note: --out is deprecated, use -o/--output" in result.stderr
    assert "adapter labels (new, from the names in --label-map): 1 bright spot, 2 inner part" in result.stderr
    assert "  1 -> 1 bright spot  (--label-map by value)" in result.stderr
    assert result.stdout.splitlines()[1] == (
        "no validation: one case: nothing to hold out for validation (--validation auto), so the state after the "
        "last step is written; give more cases or --validation CASES. Measure the result on cases it did not train "
        "on with the evaluate command")
    assert [label["name"] for label in files.read_info(output)[1]["labels"]] == ["background", "bright spot",
                                                                                 "inner part"]

    full = '[{"value": 0, "name": "background", "color": [0, 0, 0]}, {"value": 1, "name": "a", "color": [1, 2, 3]}]'
    result = run_cli("train", "--base", base, "--case", *cases[0], "--labels", full, "--label-map", '{"1": "b"}',
                     "-o", str(tmp_path / "never.safetensors"))
    assert result.returncode == 2
    assert ("error: label mapping '1' -> 'b': the adapter has no label 'b' (its labels: 0 'background', 1 'a'): add "
            "it to --labels, or leave --labels out") in result.stderr

    image = sitk.ReadImage(cases[0][0])
    seg_nrrd = tmp_path / "named.seg.nrrd"
    volumes.write_segmentation(seg_nrrd, sitk.GetArrayFromImage(sitk.ReadImage(cases[0][1])),
                               volumes.Geometry.from_image(image),
                               [volumes.Segment(1, "Left hippocampus"), volumes.Segment(2, "Right hippocampus")])
    result = run_cli("train", "--base", base, "--case", cases[0][0], str(seg_nrrd), "--labels",
                     "bright spot,inner part", "-o", str(tmp_path / "never.safetensors"))
    assert result.returncode == 2
    assert "label values map to no adapter label: 1 'Left hippocampus', 2 'Right hippocampus'" in result.stderr
    result = run_cli("train", "--base", base, "--case", cases[0][0], str(seg_nrrd), "--labels",
                     "bright spot,inner part", "--label-map", '{"1": "bright spot", "2": "inner part"}', "-o",
                     str(tmp_path / "never.safetensors"))
    assert result.returncode == 2
    assert ("sends named segments by their value to labels of another name: 1 'Left hippocampus' -> 'bright spot', "
            "2 'Right hippocampus' -> 'inner part'. The mapping of this case:\n"
            "  1 'Left hippocampus'  -> 1 bright spot  (--label-map by value)\n") in result.stderr
    assert "--label-map '{\"Left hippocampus\": \"bright spot\"}'" in result.stderr
    assert not (tmp_path / "never.safetensors").exists()


def test_a_diverging_learning_rate_is_bad_input(models: Path, tmp_path: Path) -> None:
    cases = two_label_cases(tmp_path, 1)
    result = run_cli("train", "--base", str(models / "tiny-base.safetensors"), "--case", *cases[0], "--labels",
                     "bright spot,inner part", "-o", str(tmp_path / "a.safetensors"), "--steps", "5", "--lr", "1e30",
                     "--lr-u", "1e30", "--threads", "1", "--progress", "json")
    assert result.returncode == 2, result.stderr
    events = json_events(result.stdout)
    assert events[-1]["kind"] == "bad_input"
    assert re.fullmatch(r"the loss became (nan|inf) at step \d: lower the learning rate, --lr \(now 1e\+30\) or "
                        r"--lr-u \(now 1e\+30\)", events[-1]["message"])
    assert all("eta_estimate" in event for event in events if event["event"] == "step")
    assert "Traceback" not in result.stderr and not (tmp_path / "a.safetensors").exists()


def test_options_are_the_same_on_every_command(models: Path, tmp_path: Path) -> None:
    """#13.7: --threads and the device choices on every command that computes; options after an action; messages
    that name flags."""
    for command in ("segment", "train", "pretrain", "evaluate", "demo"):
        text = " ".join(run_cli(command, "--help").stdout.split())
        assert "--threads N torch CPU threads (default: torch's own choice)" in text, command
        assert "--progress {auto,bar,plain,json,none}" in text, command
        if command != "evaluate":
            assert "--device {auto,cpu,cuda,cuda:N}" in text and "(default: auto)" in text, command
    env = {"TCURLORA_MODELS": str(models), "TCURLORA_HOME": str(tmp_path / "home")}
    assert run_cli("adapters", "list", "--progress", "none", env=env).returncode == 0
    result = run_cli("adapters", "--progress", "json", "delete", "nothing-here", env=env)  # kept after the action
    assert result.returncode == 2 and json_events(result.stdout)[-1]["kind"] == "bad_input"
    result = run_cli("train", "--name", "x", "--cases", "c.json", "--steps", "-1", env=env)
    assert result.returncode == 2 and "error: --steps must be an integer >= 0, got -1" in result.stderr
    result = run_cli("segment", "in.nii.gz", "-o", "out.nii.gz", "--base", str(models / "tiny-base.safetensors"),
                     "--device", "gpu")
    assert result.returncode == 2 and "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'" in result.stderr


def test_annotated_slices_belong_to_the_case_before_them() -> None:
    from TCURLoRALib.cases import AnnotatedSlices
    from TCURLoRALib.cli import _cases

    args = build_parser().parse_args(["train", "--case", "a.nii", "a_l.nii", "--annotated-slices", "z:3,5",
                                      "--case", "b.nii", "b_l.nii"])
    first, second = _cases(args)
    assert (first.image.name, first.annotated_slices) == ("a.nii", AnnotatedSlices("z", (3, 5)))
    assert (second.image.name, second.annotated_slices) == ("b.nii", None)
    for wrong in (["--annotated-slices", "z:1", "--case", "a", "b"],
                  ["--case", "a", "b", "--annotated-slices", "z:1", "--annotated-slices", "z:2"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["train", *wrong])
        assert exit_info.value.code == 2
    with pytest.raises(ValueError, match=r"--annotated-slices must look like 'z:3,10,17', got 'z:a'"):
        _cases(build_parser().parse_args(["train", "--case", "a", "b", "--annotated-slices", "z:a"]))


def test_threads_apply_to_a_command_that_computes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--threads holds while the command computes, and the caller's setting comes back after it."""
    import torch

    from TCURLoRALib import metrics
    from TCURLoRALib.cli import main

    array = np.zeros((4, 5, 6), np.uint8)
    array[1:3, 1:3, 1:3] = 1
    for name in ("p", "r"):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nii.gz"))
    seen = []
    evaluate = metrics.evaluate
    monkeypatch.setattr(metrics, "evaluate", lambda *a, **k: seen.append(torch.get_num_threads()) or evaluate(*a, **k))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["evaluate", "--predictions", str(tmp_path / "p.nii.gz"), "--references",
                     str(tmp_path / "r.nii.gz"), "--threads", "1", "--progress", "none"]) == 0
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_labels_option_spellings(tmp_path: Path) -> None:
    from TCURLoRALib.cli import _labels_argument
    from TCURLoRALib.labelset import adapter_labels

    full = [{"value": 0, "name": "background", "color": [0, 0, 0]}, {"value": 5, "name": "t", "color": [1, 2, 3]}]
    (tmp_path / "labels.json").write_text(json.dumps(full))
    assert _labels_argument(json.dumps(full)) == full
    assert _labels_argument(str(tmp_path / "labels.json")) == full
    assert _labels_argument(" left hippocampus , right hippocampus") == ["left hippocampus", "right hippocampus"]
    assert [label.to_json() for label in adapter_labels(full, None, []).labels] == full
    with pytest.raises(ValueError, match=r"--labels: an empty label name in 'a,,b'"):
        _labels_argument("a,,b")
    with pytest.raises(FileNotFoundError, match=r"--labels file .*missing\.json' does not exist"):
        _labels_argument(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"--labels is neither a JSON file nor valid JSON"):
        _labels_argument("[{")
    with pytest.raises(ValueError, match=r"--labels must be a JSON list of \{value, name, color\} objects"):
        _labels_argument('{"value": 0}')
