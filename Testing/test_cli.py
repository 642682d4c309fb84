"""The command-line program as the Slicer panels run it: real subprocesses, JSON progress lines, exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import make_tiny_base

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
