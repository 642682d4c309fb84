"""The panels' one door into the engine: the adapter store, the shipped base model, labels, and import checks.

Engine calls go through the package's front door (``TCURLoRALib``: the store, the shipped base, cards), inside
functions, so that the panels open (and say what is missing) even where the engine cannot import yet. The Slicer
module files reach the engine only through here and :mod:`.runs`.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cards import Label, ModelCard
from .adapters import BASE_ONLY_TEXT, AdapterChoice, adapter_choices

__all__ = ["AdapterListing", "adapter_store", "base_card", "engine_folder", "check_new_adapter_name", "engine_status",
           "import_problem", "labels_of", "list_adapters", "shipped_base", "shipped_sample", "start_label_names"]

ENGINE_PACKAGE = "TCURLoRALib"
BASE_TOOLTIP = "The frozen base model without an adapter"


def engine_folder() -> Path:
    """The folder that holds the ``TCURLoRALib`` package (the Segment module's folder)."""
    return Path(__file__).resolve().parents[2]


def adapter_store() -> Any:
    """The adapter store: shipped adapters and the user's folder (``$TCURLORA_HOME``)."""
    from .. import adapter_store

    return adapter_store()


def _resolve_base(path: str | os.PathLike | None) -> Path:
    from .. import resolve_base

    return resolve_base(str(path) if path else None)


def shipped_base() -> Path | None:
    """The one shipped base model file, or None while none (or several) is shipped."""
    try:
        return _resolve_base(None)
    except ValueError:
        return None


def shipped_sample() -> Path | None:
    """The shipped sample volume (``Resources/Samples`` beside the shipped models), or None when absent."""
    from ..paths import SAMPLE_IMAGE, shipped_samples_dir

    sample = shipped_samples_dir() / SAMPLE_IMAGE
    return sample if sample.is_file() else None


def base_card(path: str | os.PathLike) -> ModelCard:
    """The model card of a base-model file."""
    from .. import read_info

    return ModelCard.from_json(read_info(path, "base")[1])


def labels_of(adapter: str | None, base: str | os.PathLike | None = None) -> list[Label]:
    """The output labels of an adapter (by store name), or of the base (``base``, else the shipped one).

    Raises:
        FileNotFoundError: no such adapter or base file; ValueError: no base given and none or several shipped.
    """
    if adapter:
        return list(adapter_store().find(adapter).card.labels)
    return list(base_card(_resolve_base(base)).labels)


def start_label_names(parent: str | None, base: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """The label names a new adapter starts from (the parent's, else the base's), never raising.

    Returns:
        ``(names, problem)``: the names (background first), or ``[]`` and why they cannot be read yet.
    """
    try:
        return [label.name for label in labels_of(parent, base)], ""
    except Exception as error:  # noqa: BLE001  before the first Start the engine may not import yet
        return [], f"(not readable yet: {import_problem(error)})"


def check_new_adapter_name(name: str) -> str:
    """``name`` stripped, when it is a valid adapter name that no stored adapter has (case-insensitively).

    Raises:
        ValueError: an invalid name; FileExistsError: the name is taken.
    """
    from .. import check_adapter_name

    name = check_adapter_name(str(name).strip())
    if name.casefold() in {entry.name.casefold() for entry in adapter_store().list()}:
        raise FileExistsError(f"An adapter named {name!r} exists already: choose another name")
    return name


@dataclass
class AdapterListing:
    """What the store lists for the panels.

    Attributes:
        choices: one entry per adapter (see :func:`~.adapters.adapter_choices`).
        base: the "Base model only" entry, its tooltip naming the shipped base and its labels when readable.
        problem: why nothing could be listed (for example PyTorch not installed yet), else None.
    """

    choices: list[AdapterChoice] = field(default_factory=list)
    base: AdapterChoice = AdapterChoice(None, BASE_ONLY_TEXT, BASE_TOOLTIP)
    problem: str | None = None


def list_adapters() -> AdapterListing:
    """The store's adapters and the base entry; never raises (the panels open whatever the engine's state)."""
    try:
        choices = adapter_choices(adapter_store().list())
        base_path = shipped_base()
        base = AdapterListing.base
        if base_path is not None:
            card = base_card(base_path)
            labels = ", ".join(label.name for label in card.labels[1:])
            base = AdapterChoice(None, BASE_ONLY_TEXT, f"{card.name}: {BASE_TOOLTIP.lower()}\nLabels: {labels}")
        return AdapterListing(choices, base)
    except Exception as error:  # noqa: BLE001  a broken or missing dependency is reported, never fatal
        return AdapterListing(problem=f"adapters are listed once PyTorch and MONAI are installed (on the first "
                                      f"Apply); now: {import_problem(error)}")


def import_problem(error: BaseException) -> str:
    """Why an import failed, for the panel.

    A missing package raises ImportError; a broken one (a CUDA build without its libraries, say) raises OSError or
    RuntimeError from inside its own ``__init__``: both end up on the panel, neither is fatal.
    """
    if isinstance(error, ImportError):
        return f"not installed ({error})"
    return f"broken ({type(error).__name__}: {error})"


def _probe(package: str) -> tuple[Any, str]:
    try:
        module = importlib.import_module(package)
    except Exception as error:  # noqa: BLE001  see import_problem
        return None, import_problem(error)
    return module, str(getattr(module, "__version__", "unknown version"))


def engine_status() -> dict[str, str]:
    """Imports the engine, PyTorch and MONAI and describes what was found (takes seconds: on request only).

    Returns:
        Display strings under ``"location"`` (folder of the imported ``TCURLoRALib``), ``"version"``, ``"torch"``
        (version and whether CUDA is available) and ``"monai"`` (version, or why the import failed).
    """
    engine, version = _probe(ENGINE_PACKAGE)
    location = (os.path.dirname(os.path.abspath(engine.__file__)) if engine is not None
                else f"not importable (looked in {engine_folder()})")
    torch, torch_text = _probe("torch")
    if torch is not None:
        torch_text += " (CUDA available)" if torch.cuda.is_available() else " (CPU only)"
    return {"location": location, "version": version, "torch": torch_text, "monai": _probe("monai")[1]}
