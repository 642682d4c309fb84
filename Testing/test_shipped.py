"""The shipped base model and adapters: they load with matching fingerprints and segment the shipped sample.

Floors are set below what ``python -m Testing.cohorts.make_defaults`` measured for the shipped files (README,
"Shipped models"), so that a damaged or replaced file fails here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from TCURLoRALib import files, metrics, volumes
from TCURLoRALib.adapter import AdaptedUNETR, read_adapter
from TCURLoRALib.basemodel import load_base
from TCURLoRALib.paths import SAMPLE_IMAGE, SAMPLE_REFERENCE, shipped_models_dir, shipped_samples_dir
from TCURLoRALib.segmentation import segment
from TCURLoRALib.store import AdapterStore

BASE_FILE = "brain-tissue-base.safetensors"
# Measured Dice on the shipped sample (MNI152 2009a at 1.5 mm, never seen in training) minus a margin.
# Measured by `python -m TCURLoRALib demo`: CSF 0.514, grey matter 0.807, white matter 0.811.
BASE_DICE_FLOORS = {"CSF": 0.45, "grey matter": 0.75, "white matter": 0.75}
# The sample has no reference for the adapters' structures: their volumes must stay within these bounds, about
# +-50 % of what `python -m TCURLoRALib demo` measured on the sample (mL, in the comments).
ADAPTER_VOLUME_BOUNDS_ML: dict[str, dict[str, tuple[float, float]]] = {
    "hippocampus": {"left hippocampus": (2.9, 8.8), "right hippocampus": (2.6, 7.9)},  # 5.85, 5.30
    "deep-grey-structures": {
        "left caudate": (2.0, 6.0), "right caudate": (2.1, 6.3),  # 3.97, 4.18
        "left putamen": (2.6, 7.9), "right putamen": (2.6, 7.9),  # 5.28, 5.25
        "left hippocampus": (2.6, 7.8), "right hippocampus": (2.7, 8.0),  # 5.23, 5.34
    },
}


@pytest.fixture(scope="module")
def session() -> AdaptedUNETR:
    torch.set_num_threads(1)
    return AdaptedUNETR(load_base(shipped_models_dir() / BASE_FILE))


def test_shipped_files_are_what_the_store_lists() -> None:
    entries = AdapterStore(shipped_models_dir(), Path("/nonexistent-user-folder")).list()
    assert sorted(entry.name for entry in entries) == sorted(ADAPTER_VOLUME_BOUNDS_ML)
    assert all(entry.read_only and entry.source == "shipped" for entry in entries)
    assert files.read_info(shipped_models_dir() / BASE_FILE)[0] == "base"
    for path in shipped_models_dir().glob("*.safetensors"):
        assert path.stat().st_size <= 25 * 1024 * 1024, f"{path.name} is over 25 MB"


def test_shipped_adapters_carry_a_digest_that_holds() -> None:
    """Rewritten with format_version 2 (tensors byte-identical to the trained files): damage is refused."""
    for entry in AdapterStore(shipped_models_dir(), Path("/nonexistent-user-folder")).list():
        contents = files.read_whole(entry.path, "adapter")
        assert contents.checked and contents.version >= 2, entry.name


def test_adapters_match_the_shipped_base(session: AdaptedUNETR) -> None:
    for entry in AdapterStore(shipped_models_dir(), Path("/nonexistent-user-folder")).list():
        _, card = read_adapter(entry.path, session.base)
        assert card.base_fingerprint == session.base.card.fingerprint
        assert "test" in card.metrics and card.training["cases"] <= 5


def test_base_segments_the_sample_above_its_floors(session: AdaptedUNETR, tmp_path: Path) -> None:
    session.set_adapter(None)
    result = segment(shipped_samples_dir() / SAMPLE_IMAGE, session, tmp_path / "base.nii.gz", device="cpu")
    reference = volumes.read_label_map(shipped_samples_dir() / SAMPLE_REFERENCE)
    predicted = volumes.read_label_map(result.output_path, allow_empty=True)
    scores = {m.name: m.dice for m in metrics.label_metrics(predicted.array(), reference.array(),
                                                             reference.geometry.spacing, session.labels)}
    for name, floor in BASE_DICE_FLOORS.items():
        assert scores[name] >= floor, f"{name}: Dice {scores[name]:.3f} below its floor {floor}"


@pytest.mark.parametrize("adapter", sorted(ADAPTER_VOLUME_BOUNDS_ML))
def test_adapter_segments_plausible_structures(session: AdaptedUNETR, adapter: str, tmp_path: Path) -> None:
    session.set_adapter(shipped_models_dir() / f"{adapter}.safetensors")
    try:
        result = segment(shipped_samples_dir() / SAMPLE_IMAGE, session, tmp_path / "a.nii.gz", device="cpu")
    finally:
        session.set_adapter(None)
    for name, (low, high) in ADAPTER_VOLUME_BOUNDS_ML[adapter].items():
        assert low <= result.volumes_ml[name] <= high, f"{adapter}/{name}: {result.volumes_ml[name]:.2f} mL"
