"""Where shipped models and the user's adapters live."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_MODELS", "shipped_models_dir"]

ENV_MODELS = "TCURLORA_MODELS"


def shipped_models_dir() -> Path:
    """The folder of shipped base models and adapters.

    ``$TCURLORA_MODELS`` when set; else ``Resources/Models`` of the module folder (an installed extension); else the
    source tree's top-level ``Resources/Models`` (a checkout).
    """
    override = os.environ.get(ENV_MODELS)
    if override:
        return Path(override).expanduser()
    module_folder = Path(__file__).resolve().parents[1]
    installed = module_folder / "Resources" / "Models"
    if installed.is_dir():
        return installed
    return module_folder.parent / "Resources" / "Models"


SAMPLE_IMAGE = "MNI152-2009a-T1-1.5mm.nii.gz"
SAMPLE_REFERENCE = "MNI152-2009a-tissue-1.5mm.nii.gz"
"""The shipped sample (Resources/Samples) and its reference tissue map, labelled like the shipped base."""


def shipped_samples_dir() -> Path:
    """``Resources/Samples`` beside the models folder (see :func:`shipped_models_dir`)."""
    return shipped_models_dir().parent / "Samples"
