"""PNG overlays (known answers) and the demo run on a tiny base with one adapter."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synthetic import BASE_LABELS, make_tiny_base, write_case
from TCURLoRALib.adapter import save_adapter
from TCURLoRALib.basemodel import load_base
from TCURLoRALib.cards import AdapterCard
from TCURLoRALib.demo import format_report, run_models
from TCURLoRALib.overlay import encode_png, overlay_views
from TCURLoRALib.store import AdapterStore
from TCURLoRALib.tcur import TCURLoRAConfig, TCURLoRAModel


def decode_png(data: bytes) -> np.ndarray:
    """A minimal decoder for the files encode_png writes (8-bit RGB, filter 0 on every row)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, size = 8, b"", None
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        crc = struct.unpack(">I", data[position + 8 + length:position + 12 + length])[0]
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height = size
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(rgb)), rgb)
    with pytest.raises(ValueError, match=r"H x W x 3 uint8 array, got shape \(5, 7\)"):
        encode_png(rgb[..., 0])


def test_overlay_is_radiological_with_anterior_and_superior_up() -> None:
    """A blob in the patient's right, anterior, superior corner of an LPS image lands top-left of each view."""
    image = sitk.GetImageFromArray(np.full((10, 12, 14), 100, np.float32))  # identity direction = LPS
    labels_array = np.zeros((10, 12, 14), np.uint8)
    labels_array[7:9, 1:3, 1:3] = 1  # high z = superior, low y = anterior, low x = patient's right
    labels = sitk.GetImageFromArray(labels_array)
    views = overlay_views(image, labels, {1: (255, 0, 0)}, opacity=1.0)
    red = {view: np.argwhere((picture == (255, 0, 0)).all(-1)) for view, picture in views.items()}
    assert views["axial"].shape == (24, 28, 3), "two pixels a voxel"
    assert red["axial"][:, 0].max() < 12 and red["axial"][:, 1].max() < 14, "anterior up, patient's right on the left"
    assert red["coronal"][:, 0].max() < 10 and red["coronal"][:, 1].max() < 14, "superior up, right on the left"
    assert red["sagittal"][:, 0].max() < 10 and red["sagittal"][:, 1].max() < 12, "superior up, anterior on the left"


def test_demo_writes_outputs_for_base_and_adapter(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    base_path = make_tiny_base(tmp_path / "base.safetensors")
    image_path, label_path = write_case(tmp_path, seed=3)
    base = load_base(base_path)
    model = TCURLoRAModel(base.model, TCURLoRAConfig(rank=4))
    with torch.no_grad():
        for group in model.groups.values():
            group.u.add_(0.05)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    card = AdapterCard(name="demo-adapter", base_fingerprint=base.card.fingerprint, base_name=base.card.name, rank=4,
                       groups=list(model.groups), init="pinv", labels=BASE_LABELS,
                       training={"cases": 0, "steps": 0, "seconds": 0.0, "device": "cpu", "seed": 0})
    save_adapter(shipped / "demo-adapter.safetensors", model, card, include_head=False)
    entries = AdapterStore(shipped, tmp_path / "user").list()

    runs = run_models(base_path, entries, image_path, tmp_path / "out", reference_path=label_path, device="cpu")
    assert [run.model for run in runs] == ["base (tiny)", "demo-adapter"]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    for stem in ("base", "demo-adapter"):
        assert {f"{stem}.nii.gz", f"{stem}.seg.nrrd", f"{stem}_axial.png", f"{stem}_coronal.png",
                f"{stem}_sagittal.png"} <= set(names)
    written = sitk.ReadImage(str(runs[0].label_map))
    assert written.GetSize() == sitk.ReadImage(str(image_path)).GetSize()
    assert set(runs[0].volumes_ml) == {"grey matter", "white matter"}
    assert set(runs[0].dice) == {"grey matter", "white matter"} and not runs[1].dice
    assert all(0.0 <= value <= 1.0 for value in runs[0].dice.values())
    decode_png(runs[1].pictures[0].read_bytes())
    report = format_report(runs)
    assert "demo-adapter" in report and " mL" in report
