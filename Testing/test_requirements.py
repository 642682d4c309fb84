"""Resources/requirements.txt names every package the engine needs at run time.

The engine's command-line paths (the demo, segment with every output, train with validation, evaluate with HD95,
info, adapters) run in a child interpreter that sees only the standard library, the engine and the packages of
Resources/requirements.txt plus torch (which Slicer installs through its PyTorch extension), with what those
packages themselves declare they need. Whatever else happens to be installed here (SciPy for MONAI's Hausdorff
distance, once) stays invisible, so a missing requirement fails this test instead of a user's first run. MONAI
imports many packages only when a code path asks for them (``monai.utils.optional_import``): running the paths is
what finds those.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from synthetic import make_tiny_base, write_case

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_REQUIREMENTS = REPO_ROOT / "Resources" / "requirements.txt"
GIVEN = ("torch",)
"""Installed by Slicer's PyTorch extension (and pinned for CI in Testing/requirements.txt), not by the list."""
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_names(path: Path) -> list[str]:
    """Distribution names of a requirements file (comments, versions and markers dropped)."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        match = _NAME.match(line)
        if match and not line.startswith("-"):
            names.append(match.group(1))
    return names


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need, transitively (extras off, environment markers evaluated)."""
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = _canonical(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # reported by the caller
        for requirement in requires:
            requirement_text, _, marker = requirement.partition(";")
            if marker and not _marker_holds(marker):
                continue
            match = _NAME.match(requirement_text)
            if match:
                pending.append(match.group(1))
    return seen


def _marker_holds(marker: str) -> bool:
    if "extra" in marker:
        return False
    from packaging.markers import Marker  # pytest's own dependency

    return Marker(marker).evaluate()


def visible_site(folder: Path, distributions: set[str]) -> Path:
    """A folder of links to exactly the top-level files and packages (and metadata) of ``distributions``."""
    folder.mkdir()
    for name in sorted(distributions):
        distribution = metadata.distribution(name)
        for file in distribution.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            target = Path(distribution.locate_file(top))
            link = folder / top
            if target.exists() and not link.exists():
                link.symlink_to(target, target_is_directory=target.is_dir())
    return folder


DRIVER = r"""
import json, sys
sys.path[:] = json.loads(sys.argv[1])
from TCURLoRALib.cli import main
for arguments in json.loads(sys.argv[2]):
    code = main(arguments)
    if code != 0:
        print(f"exit {code}: {arguments}", file=sys.stderr)
        sys.exit(code)
print("all paths ran")
"""


@pytest.fixture(scope="module")
def restricted_path(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    listed = requirement_names(RUNTIME_REQUIREMENTS)
    closure = dependency_closure(listed + list(GIVEN))
    missing = sorted(name for name in closure if not _installed(name))
    assert not missing, f"listed in {RUNTIME_REQUIREMENTS.name} (or needed by what is) but not installed: {missing}"
    site = visible_site(tmp_path_factory.mktemp("restricted") / "site", closure)
    standard_library = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]]
    dynload = [entry for entry in sys.path if entry.endswith("lib-dynload")]
    return [*dict.fromkeys(standard_library + dynload), str(site), str(REPO_ROOT / "TCURLoRASegment")]


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def run_restricted(path: list[str], commands: list[list[str]], env: dict[str, str]) -> subprocess.CompletedProcess:
    # -I: no PYTHONPATH, no user site; -S: no site-packages. sys.path is then set to exactly ``path``.
    return subprocess.run([sys.executable, "-I", "-S", "-c", DRIVER, json.dumps(path), json.dumps(commands)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env, "OMP_NUM_THREADS": "1"})


def test_the_restriction_hides_what_the_list_does_not_name(restricted_path: list[str]) -> None:
    """The check itself: pytest is installed here but not listed, so the child must not find it."""
    probe = "import importlib.util, json, sys; sys.path[:] = json.loads(sys.argv[1]); " \
            "print(importlib.util.find_spec('pytest') is None, importlib.util.find_spec('SimpleITK') is not None)"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", probe, json.dumps(restricted_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["True", "True"], result.stderr


def test_engine_paths_run_with_only_the_listed_packages(restricted_path: list[str], tmp_path: Path) -> None:
    models, home, out = tmp_path / "models", tmp_path / "home", tmp_path / "out"
    for folder in (models, out):
        folder.mkdir()
    make_tiny_base(models / "tiny-base.safetensors")
    cases = [write_case(tmp_path, seed) for seed in (1, 2, 3)]
    test_image, test_label = str(cases[2][0]), str(cases[2][1])
    train_cases = [argument for pair in cases[:2] for argument in ("--case", str(pair[0]), str(pair[1]))]
    prediction = str(out / "prediction.nii.gz")
    commands = [
        ["info", str(models / "tiny-base.safetensors")],
        ["train", "--name", "probe", *train_cases, "--steps", "2", "--batch-size", "1", "--validate-every", "1",
         "--unmapped", "background", "--device", "cpu", "--progress", "none"],
        ["adapters", "list"],
        ["segment", test_image, "-o", prediction, "--adapter", "probe", "--seg-nrrd", str(out / "p.seg.nrrd"),
         "--probabilities", str(out / "p_prob.nii.gz"), "--device", "cpu", "--progress", "none"],
        ["evaluate", "--predictions", prediction, "--references", test_label, "--csv", str(out / "m.csv"),
         "--progress", "none"],
        ["demo", "-o", str(out / "demo"), "--image", test_image, "--reference", test_label, "--device", "cpu",
         "--progress", "none"],
    ]
    env = {"TCURLORA_MODELS": str(models), "TCURLORA_HOME": str(home)}
    result = run_restricted(restricted_path, commands, env)
    assert result.returncode == 0 and "all paths ran" in result.stdout, (
        f"an engine path failed with only {RUNTIME_REQUIREMENTS.name}'s packages visible: add what it needs to "
        f"that file.\n{result.stderr[-4000:]}")
    assert (out / "m.csv").is_file() and (out / "demo").is_dir()
