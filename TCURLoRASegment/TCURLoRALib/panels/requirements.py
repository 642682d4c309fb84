"""What the engine needs installed, how to install it without touching the user's PyTorch, and which interpreter
runs the jobs.

PyTorch comes from Slicer's PyTorch extension (it picks the build for the computer's GPU); everything else is the
extension's ``requirements.txt``, installed with ``slicer.util.pip_install`` under a constraint that keeps the
installed torch as it is (MONAI's own requirement could otherwise upgrade it from the registry).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

__all__ = ["IMPORT_NAMES", "MINIMUM_TORCH", "DependencyCheck", "check_dependencies", "ensure_dependencies",
           "missing_modules",
           "pip_arguments", "python_for_jobs", "read_requirements", "release", "requirements_file",
           "torch_version"]

PathLike = Union[str, "os.PathLike[str]"]

MINIMUM_TORCH = "2.0"
"""The oldest PyTorch the panels accept (the test suite runs with the torch pinned in Testing/requirements.txt)."""
IMPORT_NAMES = {"pynrrd": "nrrd"}
"""Requirements whose import name is not their distribution name."""


def requirements_file(module_dir: PathLike) -> Path:
    """The extension's ``requirements.txt`` as seen from a module folder.

    Installed (and in a build tree), the Segment module's CMakeLists puts it in ``<qt-scripted-modules>/Resources/``;
    in a checkout it is the top-level ``Resources/requirements.txt``.

    Raises:
        FileNotFoundError: neither exists (the message names both places).
    """
    module_dir = Path(module_dir)
    candidates = [module_dir / "Resources" / "requirements.txt", module_dir.parent / "Resources" / "requirements.txt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"requirements.txt not found in {[str(c) for c in candidates]}")


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~\[;@ ]", requirement, maxsplit=1)[0]


def read_requirements(path: PathLike) -> list[str]:
    """The requirement lines of a requirements file, comments and blank lines dropped.

    Raises:
        ValueError: the file names torch (it must come from the PyTorch extension, never from pip here).
    """
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if _distribution(line).lower() == "torch":
            raise ValueError(f"{str(path)!r} lists torch ({line!r}); install torch with the PyTorch extension")
        requirements.append(line)
    return requirements


def missing_modules(requirements: Sequence[str], find_spec: Callable[[str], Any] | None = None) -> list[str]:
    """The requirements whose import name cannot be found (``SimpleITK>=2.3`` -> ``SimpleITK``).

    A distribution name with ``-`` is looked up with ``_``; :data:`IMPORT_NAMES` lists the others that differ.
    """
    find_spec = find_spec or importlib.util.find_spec
    missing = []
    for requirement in requirements:
        name = _distribution(requirement)
        if find_spec(IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))) is None:
            missing.append(requirement)
    return missing


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version: ``"2.1.0+cu118"`` -> ``(2, 1, 0)``, ``"2.0.0a0"`` -> ``(2, 0, 0)``.

    Raises:
        ValueError: no leading number.
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def torch_version(version_of: Callable[[str], str] | None = None) -> str | None:
    """The installed torch's version from its metadata (no import: importing torch takes seconds), or None."""
    version_of = version_of or importlib.metadata.version
    try:
        return version_of("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class DependencyCheck:
    """What is missing before the engine can run.

    Attributes:
        torch: the installed torch's version, or None when torch is not installed.
        torch_problem: why the installed torch cannot be used (too old), or None.
        missing: requirement lines of ``requirements.txt`` whose module cannot be found.
    """

    torch: str | None
    torch_problem: str | None
    missing: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.torch is not None and self.torch_problem is None and not self.missing

    def reason(self) -> str:
        """One sentence naming everything that is missing (for a skipped self-test or a status line)."""
        parts = []
        if self.torch is None:
            parts.append("PyTorch is not installed (install the PyTorch extension, then PyTorch from its module)")
        elif self.torch_problem:
            parts.append(self.torch_problem)
        if self.missing:
            parts.append(f"these Python packages are not installed: {', '.join(self.missing)}")
        return "; ".join(parts) if parts else "everything is installed"


def check_dependencies(module_dir: PathLike, version_of: Callable[[str], str] | None = None,
                       find_spec: Callable[[str], Any] | None = None) -> DependencyCheck:
    """Checks torch (installed, at least :data:`MINIMUM_TORCH`) and the extension's requirements; installs nothing.

    Args:
        module_dir: a module folder (see :func:`requirements_file`).
        version_of, find_spec: ``importlib.metadata.version`` and ``importlib.util.find_spec`` (for tests).
    """
    version = torch_version(version_of)
    problem = None
    if version is not None and release(version) < release(MINIMUM_TORCH):
        problem = (f"PyTorch {version} is older than {MINIMUM_TORCH}: install PyTorch >={MINIMUM_TORCH} with the "
                   f"PyTorch Utils module (TCURLoRA does not replace your PyTorch by itself)")
    requirements = read_requirements(requirements_file(module_dir))
    return DependencyCheck(version, problem, tuple(missing_modules(requirements, find_spec)))


def pip_arguments(missing: Sequence[str], torch: str | None, folder: PathLike) -> list[str]:
    """Arguments for ``slicer.util.pip_install`` that install ``missing`` and leave the installed torch as it is.

    Writes ``folder/constraints.txt`` pinning ``torch==<installed version>``; pip then refuses any resolution that
    would change torch instead of upgrading it from the registry (MONAI requires torch).

    Args:
        missing: requirement lines to install.
        torch: the installed torch's version (:func:`torch_version`); None: no constraint (nothing to protect).
        folder: an existing folder for the constraints file.
    """
    if not missing:
        raise ValueError("nothing to install")
    arguments = []
    if torch is not None:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(f"torch=={torch}\n", encoding="utf-8")
        arguments += ["--constraint", str(constraints)]
    return arguments + list(missing)


def ensure_dependencies(
    module_dir: PathLike,
    install_torch: Callable[[str], bool],
    confirm: Callable[[str], bool],
    pip_install: Callable[[list[str]], None],
    version_of: Callable[[str], str] | None = None,
    find_spec: Callable[[str], Any] | None = None,
) -> bool:
    """Makes PyTorch and the extension's requirements importable, asking before each install.

    A PyTorch that is installed is never replaced (too old: an error that says what to do); a missing one is
    installed by ``install_torch`` (the PyTorch extension picks the build for the GPU); the other packages by
    ``pip_install`` with :func:`pip_arguments`, so that pip cannot upgrade that PyTorch.

    Args:
        module_dir: a module folder (see :func:`requirements_file`).
        install_torch: installs torch for a requirement such as ``">=2.0"``; False when the user declined.
        confirm: asks the user a question; False to stop.
        pip_install: ``slicer.util.pip_install`` (takes pip's arguments after ``install``).
        version_of, find_spec: see :func:`check_dependencies`.

    Returns:
        True when everything imports; False when the user declined an install.

    Raises:
        RuntimeError: the installed PyTorch is too old, or an install left something missing.
    """
    check = check_dependencies(module_dir, version_of, find_spec)
    if check.torch_problem:
        raise RuntimeError(check.torch_problem)
    if check.torch is None:
        if not install_torch(f">={MINIMUM_TORCH}"):
            return False
        importlib.invalidate_caches()
        check = check_dependencies(module_dir, version_of, find_spec)
    if check.missing and check.torch is not None and check.torch_problem is None:
        if not confirm("TCURLoRA needs these Python packages, which are not installed yet:\n"
                       + "\n".join(check.missing) + "\n\nInstall them now? This takes a few minutes."):
            return False
        with tempfile.TemporaryDirectory() as folder:
            pip_install(pip_arguments(check.missing, check.torch, folder))
        importlib.invalidate_caches()
        check = check_dependencies(module_dir, version_of, find_spec)
    if not check.ready:
        raise RuntimeError(f"Installing the dependencies failed: {check.reason()}")
    return True


def python_for_jobs(executable: str, which: Callable[[str], str | None] | None = None) -> str:
    """The interpreter for background jobs: ``PythonSlicer`` on PATH, else next to ``executable``, else
    ``executable`` itself (in Slicer, ``sys.executable`` may be the Slicer application, which cannot run ``-m``)."""
    if which is None:
        from shutil import which
    found = which("PythonSlicer")
    if found:
        return found
    folder = Path(executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (folder / name).is_file():
            return str(folder / name)
    return executable
