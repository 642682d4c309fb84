"""TCURLoRA engine: a frozen UNETR with selectable tCURLoRA adapters (Slicer-free; run as ``python -m TCURLoRALib``).

The public calls (see :mod:`TCURLoRALib.api` for the argument conventions)::

    import TCURLoRALib as tcurlora

    tcurlora.segment("t1.nii.gz", "labels.nii.gz", adapter="hippocampus")
    tcurlora.train_adapter("cases/", name="my-hippocampus", labels=["left hippocampus", "right hippocampus"])
    tcurlora.evaluate(["labels.nii.gz"], ["reference.nii.gz"], csv_path="metrics.csv")
    base = tcurlora.load_base()            # the shipped base; AdaptedUNETR(base) switches adapters on it
    [entry.name for entry in tcurlora.adapter_store().list()]

Names are resolved on first use (PEP 562): importing the package, reading cards and listing adapters need no
torch; the calls that compute import it. The command line and the Slicer panels use only these names.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # computing (torch)
    "segment": "api", "train_adapter": "api", "pretrain": "api", "evaluate": "api", "run_demo": "api",
    "load_base": "api", "TrainingResult": "api", "AdaptedUNETR": "adapter",
    # settings, cases, models by name (no torch)
    "TrainSettings": "settings", "ADAPTER_ONLY": "settings", "POSTPROCESS_CHOICES": "settings",
    "TrainingCase": "cases", "parse_annotated_slices": "cases",
    "adapter_store": "store", "resolve_base": "store", "resolve_adapter": "store", "check_adapter_name": "store",
    "read_info": "files",
    "Cancelled": "progress", "torchrun_session": "distributed", "World": "distributed",
    # text for people
    "validation_table": "report", "format_metrics_table": ("metrics", "format_table"),
    "format_demo_report": ("demo", "format_report"),
}

__all__ = sorted(["__version__", *_EXPORTS])


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
