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
