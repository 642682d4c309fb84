"""Where models are: the adapter store (shipped adapters, read only, and the user's own, listed together) and the
rules that turn a ``--base`` or ``--adapter`` argument into a file.

Layout: each adapter is one file ``<name>.safetensors`` (see :mod:`TCURLoRALib.files`); its store name is the file
name without the suffix. Two folders are read:

- the shipped folder (``Resources/Models/`` in the extension): read only. Base model files in it are skipped.
- the user folder: ``$TCURLORA_HOME/adapters`` when the environment variable ``TCURLORA_HOME`` is set, else
  ``~/.tcurlora/adapters``; read when the store is made, created only on the first write.

Rules:

- Names: ASCII letters, digits, ``-``, ``_``, ``.`` and space; 1-100 characters; no leading dot, no ``..``, no
  leading or trailing space, no trailing dot, no Windows device names (``CON``, ``NUL``, ...). Names compare
  case-insensitively, since adapter folders are often on case-insensitive file systems.
- A user adapter may not take a shipped adapter's name: :meth:`AdapterStore.path_for_new` refuses it. Should a
  later release ship a name a user adapter already has, both are listed, :meth:`AdapterStore.find` returns the
  shipped one, and the clash is reported in :attr:`AdapterStore.problems` so the user can rename theirs.
- Only user adapters can be deleted or renamed (shipped ones raise PermissionError).
- Files that cannot be read are skipped by :meth:`AdapterStore.list` and reported (logged as warnings and kept in
  :attr:`AdapterStore.problems`), never fatal.
- Temporary files that a killed save left in the user folder are removed by the next listing or save
  (:func:`TCURLoRALib.outputs.remove_stale_temporaries`).

Torch-free: listing adapters and reading their cards imports no torch (the Slicer panels fill their lists with it).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import files
from .cards import AdapterCard, CardError
from .outputs import OutputError, remove_stale_temporaries
from .paths import shipped_models_dir

ENV_HOME = "TCURLORA_HOME"
SUFFIX = ".safetensors"
MAX_NAME_LENGTH = 100
SOURCES = ("shipped", "user")

_NAME_CHARS = re.compile(r"[A-Za-z0-9_. -]+")
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterEntry:
    """One listed adapter. ``source`` is ``"shipped"`` or ``"user"``; shipped entries are read only."""

    name: str
    path: Path
    card: AdapterCard
    read_only: bool
    source: str


@dataclass(frozen=True)
class StoreProblem:
    """A file that was skipped or needs attention, with the reason."""

    path: Path
    message: str


def default_user_dir() -> Path:
    """``$TCURLORA_HOME/adapters`` if ``TCURLORA_HOME`` is set (and not empty), else ``~/.tcurlora/adapters``."""
    home = os.environ.get(ENV_HOME)
    return (Path(home).expanduser() if home else Path.home() / ".tcurlora") / "adapters"


def check_adapter_name(name: object) -> str:
    """Returns ``name`` if it is a safe adapter (file) name, see the module rules.

    Raises:
        ValueError: the name breaks a rule; the message quotes it and says which rule.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name:
        raise ValueError(f"adapter name {name!r} must not contain path separators ('/' or '\\')")
    if not _NAME_CHARS.fullmatch(name):
        bad = sorted({c for c in name if not _NAME_CHARS.fullmatch(c)})
        raise ValueError(f"adapter name {name!r} has characters {bad} not allowed: "
                         "use ASCII letters, digits, '-', '_', '.' and space")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"adapter name {name!r} is {len(name)} characters long, the limit is {MAX_NAME_LENGTH}")
    if name.startswith(".") or ".." in name or name.endswith("."):
        raise ValueError(f"adapter name {name!r} must not start or end with '.' or contain '..'")
    if name != name.strip():
        raise ValueError(f"adapter name {name!r} must not start or end with a space")
    if name.split(".")[0].strip().casefold() in _WINDOWS_DEVICES:
        raise ValueError(f"adapter name {name!r} is a reserved device name on Windows")
    return name


class AdapterStore:
    """Lists, finds, creates, deletes and renames adapters in the shipped and the user folder.

    Args:
        shipped_dir: folder of the shipped adapters (read only); a missing folder is reported, not fatal.
        user_dir: the user's adapter folder; default :func:`default_user_dir` (read when the store is made).

    Attributes:
        problems: the problems found by the latest :meth:`list` (also by find, load, ...).
    """

    def __init__(self, shipped_dir: str | os.PathLike, user_dir: str | os.PathLike | None = None) -> None:
        self.shipped_dir = Path(shipped_dir)
        self.user_dir = Path(user_dir) if user_dir is not None else default_user_dir()
        self.problems: list[StoreProblem] = []

    def list(self) -> list[AdapterEntry]:
        """All readable adapters of both folders, sorted by name (case-insensitively), shipped first on a tie.

        Unreadable files are skipped and recorded in :attr:`problems`.
        """
        problems: list[StoreProblem] = []
        remove_stale_temporaries(self.user_dir)
        if not self.shipped_dir.is_dir():
            problems.append(StoreProblem(self.shipped_dir, "shipped adapter folder does not exist"))
        entries = self._scan(self.shipped_dir, "shipped", problems) + self._scan(self.user_dir, "user", problems)
        shipped = {e.name.casefold() for e in entries if e.source == "shipped"}
        for entry in entries:
            if entry.source == "user" and entry.name.casefold() in shipped:
                problems.append(StoreProblem(entry.path, f"user adapter {entry.name!r} has the name of a shipped "
                                                         "adapter, which takes precedence: rename it"))
        for problem in problems:
            _log.warning("adapter store: %s: %s", problem.path, problem.message)
        self.problems = problems
        return sorted(entries, key=lambda e: (e.name.casefold(), e.name, SOURCES.index(e.source)))

    def find(self, name: str) -> AdapterEntry:
        """The adapter called ``name`` (case-insensitive; an exact match and then a shipped one preferred).

        Raises:
            FileNotFoundError: no such adapter; the message lists the available names.
        """
        entries = self.list()
        matches = [e for e in entries if e.name.casefold() == str(name).casefold()]
        if not matches:
            raise FileNotFoundError(f"no adapter named {name!r}; available: {[e.name for e in entries]}")
        return min(matches, key=lambda e: (e.name != name, SOURCES.index(e.source)))

    def path_for_new(self, name: str, overwrite: bool = False) -> Path:
        """Path in the user folder for a new adapter ``name``; creates the user folder if needed.

        Raises:
            ValueError: an unsafe name (see :func:`check_adapter_name`).
            PermissionError: a shipped adapter has this name.
            FileExistsError: a user adapter has this name and ``overwrite`` is False, or one differs from it only
                in case (such a file would be the same file on case-insensitive file systems).
        """
        check_adapter_name(name)
        if name.casefold() in {p.stem.casefold() for p in self._files(self.shipped_dir)}:
            raise PermissionError(f"{name!r} is the name of a shipped adapter (read only): choose another name")
        for existing in self._files(self.user_dir):
            if existing.stem.casefold() != name.casefold():
                continue
            if existing.stem != name:
                raise FileExistsError(f"adapter name {name!r} differs only in case from the existing user adapter "
                                      f"{existing.stem!r}: choose another name or use {existing.stem!r}")
            if not overwrite:
                raise FileExistsError(f"a user adapter named {name!r} already exists ({str(existing)!r}): give "
                                      f"--overwrite to replace it, or another name")
        try:
            self.user_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the adapter folder {str(self.user_dir)!r} ({error.strerror or error}): "
                              f"set {ENV_HOME} to a folder you can write to") from error
        remove_stale_temporaries(self.user_dir)
        return self.user_dir / f"{name}{SUFFIX}"

    def delete(self, name: str) -> None:
        """Deletes the user adapter ``name``.

        Raises:
            PermissionError: ``name`` is a shipped adapter.
            FileNotFoundError: no adapter has this name.
        """
        path = self._user_path(name, "deleted")
        path.unlink()

    def rename(self, old: str, new: str) -> Path:
        """Renames the user adapter ``old`` to ``new`` and updates the name in its card; returns the new path.

        The file is rewritten under the new name (atomically) before the old one is removed, so a crash leaves at
        worst both names, never none.

        Raises:
            PermissionError: ``old`` is a shipped adapter, or ``new`` is a shipped adapter's name.
            FileNotFoundError: no user adapter ``old``.
            FileExistsError, ValueError: as :meth:`path_for_new` for ``new``.
        """
        old_path = self._user_path(old, "renamed")
        check_adapter_name(new)
        if new == old_path.stem:
            return old_path
        if new.casefold() == old_path.stem.casefold():
            new_path = self.user_dir / f"{new}{SUFFIX}"  # a change of case only: it replaces itself
        else:
            new_path = self.path_for_new(new)
        from . import tensorfiles  # the one store operation that rewrites tensors

        same_file = new_path.exists() and os.path.samefile(new_path, old_path)
        tensors, card = tensorfiles.load(old_path, "adapter")
        renamed = dataclasses.replace(AdapterCard.from_json(card), name=new)
        tensorfiles.save_atomic(new_path, tensors, renamed.to_json(), "adapter", overwrite=same_file)
        if not same_file:
            old_path.unlink()
        return new_path

    def _user_path(self, name: str, action: str) -> Path:
        """The existing user file for ``name``, or the right error for a shipped or unknown name."""
        check_adapter_name(name)
        for path in self._files(self.user_dir):
            if path.stem == name:
                return path
        if name.casefold() in {p.stem.casefold() for p in self._files(self.shipped_dir)}:
            raise PermissionError(f"{name!r} is a shipped adapter (read only): it cannot be {action}")
        raise FileNotFoundError(f"no user adapter named {name!r} in {str(self.user_dir)!r}")

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        """Adapter-like files of ``folder``: ``*.safetensors``, not hidden (temporary files of saves are hidden)."""
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith(".")
                      and p.is_file())

    def _scan(self, folder: Path, source: str, problems: list[StoreProblem]) -> list[AdapterEntry]:
        entries = []
        for path in self._files(folder):
            try:
                kind, card = files.read_info(path)
                if kind == "base":
                    continue  # the shipped folder also holds the base model
                entries.append(AdapterEntry(path.stem, path, AdapterCard.from_json(card), source == "shipped",
                                            source))
            except (files.TCURLoRAFileError, CardError, OSError) as error:
                problems.append(StoreProblem(path, f"skipped: {error}"))
        return entries


# ---------------------------------------------------------------------------------------------------- model locations


def adapter_store() -> AdapterStore:
    """The store of this installation: shipped adapters (:func:`TCURLoRALib.paths.shipped_models_dir`) and the
    user's folder (:func:`default_user_dir`)."""
    return AdapterStore(shipped_models_dir())


def resolve_base(argument: str | os.PathLike | None) -> Path:
    """A ``--base`` argument: the file it names, or, when it is empty, the one shipped base model.

    Raises:
        FileNotFoundError: the named file does not exist.
        ValueError: no argument, and not exactly one base model in the shipped folder.
    """
    if argument:
        path = Path(argument)
        if not path.is_file():
            raise FileNotFoundError(f"base model {str(argument)!r} does not exist")
        return path
    folder = shipped_models_dir()
    bases = []
    for candidate in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            if files.read_info(candidate)[0] == "base":
                bases.append(candidate)
        except files.TCURLoRAFileError:
            continue
    if len(bases) != 1:
        found = "none" if not bases else ", ".join(p.name for p in bases)
        raise ValueError(f"give --base: {len(bases)} shipped base models in {str(folder)!r} ({found})")
    return bases[0]


def resolve_adapter(argument: str | os.PathLike | None) -> Path | None:
    """An ``--adapter`` argument: an adapter file, or the name of one in the store; ``None`` or ``"none"`` for the
    base alone.

    Raises:
        FileNotFoundError: a file that does not exist (an argument ending in ``.safetensors``), or no adapter of
            that name (the message lists the available ones).
    """
    if argument is None or str(argument).lower() == "none":
        return None
    path = Path(argument)
    if path.suffix == SUFFIX or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {str(argument)!r} does not exist")
        return path
    return adapter_store().find(str(argument)).path
