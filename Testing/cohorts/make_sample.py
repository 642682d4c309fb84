"""Regenerate the demo sample in ``Resources/Samples/`` from nilearn's copy of the MNI ICBM152 2009a template.

Usage, from the repository root::

    python -m Testing.cohorts.make_sample [--out Resources/Samples] [--cache DIR]

Writes ``MNI152-2009a-T1-1.5mm.nii.gz`` (int16, nilearn's uint8 T1 x 4, smoothed with sigma 0.5 mm and resampled
linearly to 1.5 mm, cropped to the brain plus 3 voxels) and ``MNI152-2009a-tissue-1.5mm.nii.gz`` (uint8 on the
same grid: 0 background, 1 CSF, 2 grey matter, 3 white matter). nilearn ships grey and white matter probability
maps only, so CSF is what is left inside the brain: the argmax of (1 - GM - WM, GM, WM) inside the T1's non-zero
region, as for the ``tissue`` cohorts. The MNI notice, ``MNI152-NOTICE.txt``, is written by hand and kept beside
them; this script checks that it is there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .sources import cache_dir, package_dir, tissue_labels

__all__ = ["SPACING", "IMAGE_NAME", "LABEL_NAME", "make_sample", "main"]

SPACING = 1.5
IMAGE_NAME = "MNI152-2009a-T1-1.5mm.nii.gz"
LABEL_NAME = "MNI152-2009a-tissue-1.5mm.nii.gz"
NOTICE_NAME = "MNI152-NOTICE.txt"
_MARGIN = 3


def make_sample(out: Path, cache: Optional[Path] = None) -> tuple[Path, Path]:
    """Write the sample image and its tissue label map into `out`; returns both paths.

    Raises:
        FileNotFoundError: `out` lacks MNI152-NOTICE.txt (the files may not travel without it).
    """
    out = Path(out)
    if not (out / NOTICE_NAME).is_file():
        raise FileNotFoundError(f"{str(out / NOTICE_NAME)!r} is missing: the MNI notice must sit beside the sample")
    data = package_dir("nilearn", Path(cache) if cache else cache_dir()) / "nilearn" / "datasets" / "data"
    t1, gm, wm = (sitk.ReadImage(str(data / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
                  for kind in ("t1", "gm", "wm"))
    grid = _cropped_grid(t1)
    image = sitk.Resample(sitk.SmoothingRecursiveGaussian(t1, 0.5), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    image_array = sitk.GetArrayFromImage(image)
    gm_array, wm_array = (sitk.GetArrayFromImage(sitk.Resample(p, grid, sitk.Transform(), sitk.sitkLinear, 0.0))
                          / 255.0 for p in (gm, wm))
    labels = tissue_labels(gm_array, wm_array, image_array > 0.5).astype(np.uint8)
    paths = (out / IMAGE_NAME, out / LABEL_NAME)
    for array, path in ((np.round(np.clip(image_array, 0, None) * 4).astype(np.int16), paths[0]), (labels, paths[1])):
        volume = sitk.GetImageFromArray(array)
        volume.CopyInformation(grid)
        sitk.WriteImage(volume, str(path), True)
    return paths


def _cropped_grid(t1: sitk.Image) -> sitk.Image:
    """A SPACING mm grid, axes as in `t1`, covering the brain (t1 > 0) plus _MARGIN voxels."""
    index = np.argwhere(sitk.GetArrayViewFromImage(t1) > 0)[:, ::-1]  # (i, j, k)
    low = t1.TransformIndexToPhysicalPoint([int(v) for v in index.min(0)])
    high = t1.TransformIndexToPhysicalPoint([int(v) for v in index.max(0)])
    direction = np.array(t1.GetDirection()).reshape(3, 3)
    extent = np.abs(direction.T @ (np.array(high) - np.array(low)))
    size = [int(np.ceil(e / SPACING)) + 1 + 2 * _MARGIN for e in extent]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing((SPACING,) * 3)
    grid.SetDirection(t1.GetDirection())
    grid.SetOrigin(tuple(np.array(low) - direction @ np.full(3, _MARGIN * SPACING)))
    return grid


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m Testing.cohorts.make_sample", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("Resources") / "Samples")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        for path in make_sample(args.out, args.cache):
            print(f"{path} ({path.stat().st_size / 1e6:.2f} MB)")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
