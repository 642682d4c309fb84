"""The package's front door (TCURLoRALib/__init__.py and api.py): lazy and torch-free to import, names resolved
through the store, one argument order, and the only way in for the CLI and README's script."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

import TCURLoRALib as tcurlora
from synthetic import make_tiny_base, write_case
from TCURLoRALib.panels.selftest import BLOCKED

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE = REPO_ROOT / "TCURLoRASegment" / "TCURLoRALib"
TORCH_FREE = ("TrainSettings", "adapter_store", "read_info", "resolve_adapter", "resolve_base",
              "validation_table", "Cancelled", "segment", "train_adapter", "pretrain", "evaluate", "run_demo",
              "load_base", "TrainingResult")
"""Front-door names that resolve without torch, monai or numpy (the computing calls import those when called)."""


@pytest.fixture()
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shipped-models folder holding only a tiny base, and an empty user store."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    make_tiny_base(folder / "tiny-base.safetensors")
    monkeypatch.setenv("TCURLORA_MODELS", str(folder))
    monkeypatch.setenv("TCURLORA_HOME", str(tmp_path / "home"))
    return folder


def test_every_exported_name_resolves_and_is_listed() -> None:
    for name in tcurlora.__all__:
        assert getattr(tcurlora, name) is not None, name
    assert set(TORCH_FREE) <= set(tcurlora.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        tcurlora.nothing_here  # noqa: B018


def test_importing_and_listing_need_no_torch(shipped: Path) -> None:
    """Slicer's GUI process imports the package to fill lists before PyTorch is installed."""
    code = f"""
import importlib.abc, json, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {list(BLOCKED)!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked")
sys.meta_path.insert(0, Blocker())
sys.path.insert(0, {str(ENGINE.parent)!r})
import TCURLoRALib as tcurlora
names = {list(TORCH_FREE)!r}
resolved = [name for name in names if getattr(tcurlora, name) is not None]
print(json.dumps({{"resolved": resolved, "adapters": [e.name for e in tcurlora.adapter_store().list()],
                  "base": tcurlora.resolve_base(None).name, "kind": tcurlora.read_info(tcurlora.resolve_base(None))[0],
                  "steps": tcurlora.TrainSettings().steps}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"resolved": list(TORCH_FREE), "adapters": [], "base": "tiny-base.safetensors", "kind": "base",
                      "steps": tcurlora.TrainSettings().steps}


def test_names_resolve_through_the_store_and_outputs_come_second(shipped: Path, tmp_path: Path) -> None:
    """train_adapter by name into the user's store, then segment with adapter=<name> and the shipped base."""
    cases = [write_case(tmp_path, seed) for seed in (1, 2)]
    trained = tcurlora.train_adapter(cases, name="spot", labels=["target"], steps=1, batch_size=1,
                                     validation="none", unmapped="background", threads=1)
    assert trained.output_path == tmp_path / "home" / "adapters" / "spot.safetensors"
    assert trained.output_path.is_file() and trained.card.name == "spot"
    assert [entry.name for entry in tcurlora.adapter_store().list()] == ["spot"]

    result = tcurlora.segment(cases[0][0], tmp_path / "out.nii.gz", adapter="spot", device="cpu", threads=1)
    assert [label.name for label in result.labels] == ["background", "target"]
    assert sitk.ReadImage(str(tmp_path / "out.nii.gz")).GetSize() == sitk.ReadImage(str(cases[0][0])).GetSize()
    base_only = tcurlora.segment(cases[0][0], tmp_path / "base.nii.gz", adapter="none", device="cpu")
    assert [label.name for label in base_only.labels] == ["background", "grey matter", "white matter"]

    session = tcurlora.AdaptedUNETR(tcurlora.load_base())
    assert session.set_adapter("spot").name == "spot"
    again = tcurlora.segment(cases[0][0], tmp_path / "again.nii.gz", base=session)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again.nii.gz"))).tolist() == \
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz"))).tolist()
    assert again.labels == result.labels

    with pytest.raises(FileNotFoundError, match="no adapter named 'missing'"):
        tcurlora.segment(cases[0][0], tmp_path / "x.nii.gz", adapter="missing")
    with pytest.raises(ValueError, match="give the new adapter a name"):
        tcurlora.train_adapter(cases)


def test_public_calls_share_one_argument_order() -> None:
    """Inputs first, then output_path (positional), everything else keyword-only."""
    import inspect

    for name, inputs in (("segment", ["image_path"]), ("train_adapter", ["cases"]),
                         ("pretrain", ["cases", "card_fields"]), ("evaluate", ["prediction_paths", "reference_paths"]),
                         ("run_demo", [])):
        parameters = inspect.signature(getattr(tcurlora, name)).parameters.values()
        positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        expected = inputs + (["output_path"] if name != "evaluate" and name != "run_demo" else [])
        assert positional == (expected if name != "run_demo" else ["output_folder"]), name


def test_cli_and_panels_reach_the_engine_only_through_the_front_door() -> None:
    """cli.py imports the package itself and its own progress reporters; the panels' engine door the package."""
    tree = ast.parse((ENGINE / "cli.py").read_text(encoding="utf-8"))
    engine_imports = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            engine_imports.add(node.module or "")
        elif isinstance(node, ast.Import):
            engine_imports.update(alias.name for alias in node.names if alias.name.startswith("TCURLoRALib"))
    assert engine_imports == {"", "progress", "TCURLoRALib"}, engine_imports
    door = (ENGINE / "panels" / "engine.py").read_text(encoding="utf-8")
    assert not re.search(r"from \.\.(store|files|cli) import", door)


def test_readme_script_runs(tmp_path: Path) -> None:
    """README's five-line script, as a user runs it from a checkout (outputs in a scratch folder)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## From Python"):]
    script = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    script = script.replace('"Resources/', f'"{REPO_ROOT / "Resources"}/')
    env = {**os.environ, "PYTHONPATH": str(ENGINE.parent), "OMP_NUM_THREADS": "1", "TCURLORA_HOME": str(tmp_path)}
    env.pop("TCURLORA_MODELS", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "left hippocampus" in result.stdout and "grey matter" in result.stdout
    assert (tmp_path / "tissue.nii.gz").is_file() and (tmp_path / "hippocampus.nii.gz").is_file()
